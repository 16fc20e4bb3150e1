#!/usr/bin/env bash
# Emulated Raspberry Pi (aarch64) testing, called by .ci/run.
#
# Under qemu-user emulating the Pi 4 CPU (cortex-a72, ARMv8.0, no dotprod) and the
# Pi 5 CPU (cortex-a76, ARMv8.2 + dotprod), runs:
#   - the kernel self-test (kernels/selftest.c, cross-compiled, static);
#   - tests/test_sampler.py, test_kvcache.py, test_qmatmul.py and test_attention.py on
#     an aarch64 CPython 3.11 with the kernel cross-compiled for baseline ARMv8.0
#     (EDGESLM_KERNEL=c: no fallback); the int8 matmul's dot-product path is
#     compiled in and chosen at run time, so the Pi 5 CPU runs it and the Pi 4 not;
#   - greedy generation with a tiny random Llama (int8, its portable graph and fp32
#     packages made on the host by the project's exporter), checked against the
#     host's tokens and logits (tests/aarch64/e2e_driver.py).
# See docs/KERNEL.md, "Emulated Raspberry Pi (aarch64) testing", for how and why.
#
# Works on a fresh Debian 12 x86-64 machine as root: installs the cross compiler with
# apt-get; qemu, the arm64 Debian packages and the aarch64 wheels go to a work folder
# outside the repo (cached: a rerun downloads nothing). Nothing is registered with
# binfmt_misc, and dpkg's architectures and the host's apt lists are left alone.
#
# Environment:
#   EDGESLM_AARCH64_WORK  work and cache folder (default /var/tmp/edgeslm-aarch64)
#   EDGESLM_AARCH64_CPUS  qemu CPU models to run (default "cortex-a72 cortex-a76")
#   EDGESLM_SHARED_DATA   the shared data folder (default <repo>/../shared/data)
#   PYTHON                host Python 3.11 (default python3)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${EDGESLM_AARCH64_WORK:-/var/tmp/edgeslm-aarch64}
CPUS=${EDGESLM_AARCH64_CPUS:-cortex-a72 cortex-a76}
SHARED=${EDGESLM_SHARED_DATA:-$REPO/../shared/data}
PY=${PYTHON:-python3}

ROOT=$WORK/root                       # arm64 Debian packages, unpacked (qemu -L)
QEMU=$WORK/qemu/qemu-aarch64-static   # from Debian's qemu-user-static, unpacked
EMU_PY=$ROOT/usr/bin/python3.11-qemu  # wrapper: aarch64 python under qemu
SITE=$WORK/site                       # aarch64 wheels (pip --target)
BUILD=$WORK/build                     # cross-compiled kernel and self-test
MODEL=$WORK/model                     # tiny model packages (made on the host)
HOST_RUN=$WORK/host                   # host reference results
DRIVER=$REPO/tests/aarch64/e2e_driver.py
# The arm64 packages whose dependency closure makes the emulated root: CPython 3.11
# with its stdlib, and libstdc++ for onnxruntime.
ROOT_PACKAGES="python3.11-minimal libpython3.11-stdlib libstdc++6"
ROOT_FORMAT=1
# aarch64 wheels, pinned to the host's versions so that both sides run the same code.
WHEELS="numpy onnxruntime tokenizers jinja2 pytest hypothesis onnx"
# Tests that cannot mean anything emulated (each has a stand-in here):
#  - test_env_explicit_library loads edgeslm/_edgeslm_kernel.so, the host's (x86)
#    build; every emulated test loads the cross build through EDGESLM_KERNEL_LIB.
#  - test_kernel_selftest_hash builds selftest.c with the host compiler and runs it
#    natively; the cross-compiled self-test runs emulated before the tests instead.
#  - test_build_without_a_compiler_still_installs runs setup.py, and setuptools is
#    not among the emulated wheels; what it checks does not depend on the CPU.
#  - test_qmatmul.py's package tests export a checkpoint made with torch, which the
#    emulated environment does not have; the end-to-end run covers packages.
# The bridge tests' fixtures (tests/conftest.py loads them as a plugin) need paho-mqtt,
# which the emulated environment does not have and these tests do not use.
DESELECT=(
    -p no:bridge.fixtures
    --deselect tests/test_sampler.py::test_env_explicit_library
    --deselect tests/test_sampler.py::test_kernel_selftest_hash
    --deselect tests/test_sampler.py::test_build_without_a_compiler_still_installs
    --deselect tests/test_qmatmul.py::test_package_runs_its_portable_graph_without_the_kernel
    --deselect tests/test_qmatmul.py::test_package_without_portable_graph_needs_the_kernel
)

STARTED=$SECONDS
log() { echo "aarch64: $*"; }
die() {
    echo "aarch64: ERROR: $*" >&2
    exit 1
}

for cpu in $CPUS; do
    case "$cpu" in
    cortex-a72 | cortex-a76) ;;
    *) die "unsupported CPU $cpu in EDGESLM_AARCH64_CPUS (known: cortex-a72, cortex-a76)" ;;
    esac
done

mkdir -p "$WORK"
exec 9>"$WORK/.lock"
flock 9 # one run at a time per work folder

# --- 1. host tools: the cross compiler (apt), qemu-user-static (unpacked) ---------------

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        apt-get -o DPkg::Lock::Timeout=600 update -qq
        APT_UPDATED=1
    fi
}

if ! command -v aarch64-linux-gnu-gcc >/dev/null ||
    [ ! -e /usr/aarch64-linux-gnu/lib/libc.a ]; then
    log "installing gcc-aarch64-linux-gnu"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
        install -y -qq --no-install-recommends \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu \
        >/dev/null
fi

# qemu-user-static is unpacked, not installed: installing it would remove
# qemu-user-binfmt where a developer has it (the two conflict) and register binfmt
# handlers machine-wide; this script calls qemu explicitly and needs neither.
if [ ! -x "$QEMU" ]; then
    log "downloading qemu-user-static"
    apt_update_once
    tmp=$(mktemp -d "$WORK/.qemu.XXXXXX")
    (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root qemu-user-static)
    dpkg-deb --fsys-tarfile "$tmp"/qemu-user-static_*.deb |
        tar -x -C "$tmp" ./usr/bin/qemu-aarch64-static
    mkdir -p "$(dirname "$QEMU")"
    mv "$tmp/usr/bin/qemu-aarch64-static" "$QEMU"
    rm -rf "$tmp"
fi
log "$("$QEMU" --version | sed -n 1p)"

# --- 2. the emulated root: Debian arm64 packages unpacked with dpkg -x ------------------

# A private apt configuration (lists and status under $WORK/apt, architecture arm64)
# resolves and downloads the arm64 packages without `dpkg --add-architecture` and
# without touching the host's apt lists or locks.
APT_DIR=$WORK/apt
arm64_apt() { APT_CONFIG=$APT_DIR/apt.conf apt-get -o APT::Sandbox::User=root "$@"; }

root_stamp="format $ROOT_FORMAT: $ROOT_PACKAGES"
if [ "$(cat "$ROOT/.edgeslm-stamp" 2>/dev/null)" != "$root_stamp" ]; then
    log "building the arm64 root from Debian packages: $ROOT_PACKAGES"
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/archives/partial" "$APT_DIR/state"
    : >"$APT_DIR/state/status"
    cat >"$APT_DIR/apt.conf" <<EOF
APT::Architecture "arm64";
APT::Architectures { "arm64"; };
Dir::State "$APT_DIR/state";
Dir::State::Lists "$APT_DIR/lists";
Dir::State::status "$APT_DIR/state/status";
Dir::Cache "$APT_DIR/cache";
Dir::Cache::archives "$APT_DIR/archives";
Acquire::Languages "none";
EOF
    arm64_apt update -qq
    # shellcheck disable=SC2086  # the package list is split on purpose
    closure=$(arm64_apt install -s --no-install-recommends $ROOT_PACKAGES |
        awk '/^Inst /{print $2}')
    [ -n "$closure" ] || die "apt resolved no arm64 packages for: $ROOT_PACKAGES"
    rm -rf "$WORK/debs" "$ROOT.new"
    mkdir -p "$WORK/debs" "$ROOT.new"
    # shellcheck disable=SC2086
    (cd "$WORK/debs" && arm64_apt download -qq $closure)
    for deb in "$WORK"/debs/*.deb; do
        dpkg -x "$deb" "$ROOT.new"
    done
    [ -x "$ROOT.new/usr/bin/python3.11" ] || die "no python3.11 in the arm64 root"
    echo "$root_stamp" >"$ROOT.new/.edgeslm-stamp"
    rm -rf "$ROOT" "$WORK/debs"
    mv "$ROOT.new" "$ROOT"
    log "arm64 root ready: $(echo "$closure" | wc -w) packages, $(du -sh "$ROOT" | cut -f1)"
fi

# The python wrapper lives inside the root so that the interpreter finds its stdlib
# from argv[0]; qemu's -0 makes sys.executable the wrapper itself, so a test that
# starts `sys.executable` runs emulated too, without binfmt_misc. The caller sets
# QEMU_CPU; qemu-user passes the QEMU_* variables on to the children.
cat >"$EMU_PY" <<EOF
#!/bin/sh
# aarch64 CPython 3.11 under qemu-user; written by .ci/aarch64.sh.
: "\${QEMU_CPU:?set QEMU_CPU, e.g. cortex-a72 (Pi 4) or cortex-a76 (Pi 5)}"
QEMU_LD_PREFIX="$ROOT"
export QEMU_CPU QEMU_LD_PREFIX
exec "$QEMU" -0 "\$0" "$ROOT/usr/bin/python3.11" "\$@"
EOF
chmod +x "$EMU_PY"

# qemu 7.2 shows the host's /proc/cpuinfo (x86) to the guest, and onnxruntime's CPU
# detection dies on it (SIGSEGV at import). qemu-user looks every absolute path up
# under its -L prefix first, /proc/cpuinfo included, so an ARM cpuinfo in the root is
# what the guest reads. One entry per host CPU, like the sysfs files it also reads.
write_cpuinfo() {
    local part variant revision features n i
    case "$1" in
    cortex-a72)
        part=0xd08 variant=0x0 revision=3
        features="fp asimd evtstrm crc32 cpuid"
        ;;
    cortex-a76)
        part=0xd0b variant=0x4 revision=1
        features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp"
        features="$features cpuid asimdrdm lrcpc dcpop asimddp"
        ;;
    *) die "no /proc/cpuinfo template for CPU $1 (known: cortex-a72, cortex-a76)" ;;
    esac
    n=$(getconf _NPROCESSORS_CONF)
    mkdir -p "$ROOT/proc"
    for ((i = 0; i < n; i++)); do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: %s\n' "$i" "$features"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: %s\n' "$variant"
        printf 'CPU part\t: %s\nCPU revision\t: %s\n\n' "$part" "$revision"
    done >"$ROOT/proc/cpuinfo.new"
    mv "$ROOT/proc/cpuinfo.new" "$ROOT/proc/cpuinfo"
}

# --- 3. host packages: the runtime, the export extras and torch/transformers ---------

# .ci/run installs them (test extras); any that are missing are installed here with
# pyproject.toml's specifiers. They come first: the aarch64 wheels copy their versions.
missing=$(cd "$REPO" && "$PY" -c '
import re
import tomllib
from importlib import metadata

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = {"torch", "transformers", "onnx", "gguf", "safetensors", "numpy",
          "onnxruntime", "tokenizers", "jinja2"}
specs = list(project["dependencies"])
for extra in project["optional-dependencies"].values():
    specs += extra
for spec in specs:
    name = re.match(r"[A-Za-z0-9_.-]+", spec).group(0)
    if name.lower() in wanted:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            print(spec)
')
if [ -n "$missing" ]; then
    log "installing host packages for the model export: $(echo "$missing" | xargs)"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --disable-pip-version-check $missing
fi

# --- 4. aarch64 wheels, pinned to the host's versions -----------------------------------

# shellcheck disable=SC2086
requirements=$("$PY" -c '
import sys
from importlib import metadata

specs = []
for name in sys.argv[1:]:
    try:
        specs.append(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        specs.append(name)
print(" ".join(specs))
' $WHEELS)
if [ "$(cat "$SITE/.edgeslm-stamp" 2>/dev/null)" != "$requirements" ]; then
    log "installing aarch64 wheels: $requirements"
    platforms=()
    for minor in $(seq 36 -1 17); do # Debian 12 has glibc 2.36
        platforms+=(--platform "manylinux_2_${minor}_aarch64")
    done
    rm -rf "$SITE.new"
    # shellcheck disable=SC2086
    if ! "$PY" -m pip install -q --disable-pip-version-check --no-warn-script-location \
        --target "$SITE.new" "${platforms[@]}" --platform manylinux2014_aarch64 \
        --only-binary=:all: --python-version 3.11 --implementation cp \
        $requirements >"$WORK/pip.log" 2>&1; then
        cat "$WORK/pip.log"
        die "pip could not install the aarch64 wheels"
    fi
    echo "$requirements" >"$SITE.new/.edgeslm-stamp"
    rm -rf "$SITE"
    mv "$SITE.new" "$SITE"
fi

# --- 5. the kernel, cross-compiled for ARMv8.0 with setup.py's sources and flags --------

setup_list() { # prints a list that setup.py assigns at its top level
    (cd "$REPO" && "$PY" -c '
import ast
import sys

for node in ast.parse(open("setup.py").read()).body:
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == sys.argv[1]:
        print(" ".join(ast.literal_eval(node.value)))
' "$1")
}
read -r -a KSOURCES <<<"$(setup_list KERNEL_SOURCES)"
read -r -a KCFLAGS <<<"$(setup_list KERNEL_CFLAGS)"
if [ "${#KSOURCES[@]}" = 0 ] || [ "${#KCFLAGS[@]}" = 0 ]; then
    die "could not read KERNEL_SOURCES / KERNEL_CFLAGS from setup.py"
fi
mkdir -p "$BUILD"
log "cross-compiling the kernel: -march=armv8-a ${KCFLAGS[*]} ${KSOURCES[*]}"
(cd "$REPO" && aarch64-linux-gnu-gcc -march=armv8-a "${KCFLAGS[@]}" -fPIC -shared \
    -Ikernels "${KSOURCES[@]}" -lm -o "$BUILD/_edgeslm_kernel.so.new")
mv "$BUILD/_edgeslm_kernel.so.new" "$BUILD/_edgeslm_kernel.so"
(cd "$REPO" && aarch64-linux-gnu-gcc -march=armv8-a "${KCFLAGS[@]}" -static \
    -Ikernels kernels/selftest.c "${KSOURCES[@]}" -lm -o "$BUILD/selftest")
# A Pi 4 has no dot-product or int8 matrix instructions: only the matmul's
# dot-product functions, which run after a CPU check, may use them (qemu's
# cortex-a72 would trap them too, but only on the paths the tests reach).
aarch64-linux-gnu-objdump -d "$BUILD/_edgeslm_kernel.so" >"$BUILD/kernel.dis"
if awk '
    /^[0-9a-f]+ <.*>:$/ { fn = $2 }
    /\t(sdot|udot|usdot|sudot|smmla|ummla|usmmla)\t/ && fn !~ /dotprod/ { print fn ": " $0 }
' "$BUILD/kernel.dis" >"$BUILD/dotprod.txt" && [ -s "$BUILD/dotprod.txt" ]; then
    head -n 5 "$BUILD/dotprod.txt"
    die "the kernel uses ARMv8.2+ dot-product instructions outside its dot-product path"
fi
grep -qw sdot "$BUILD/kernel.dis" ||
    die "the cross-built kernel has no dot-product path for the Pi 5"

# --- 6. host reference: the tiny model packages and the host's generation ---------------

[ -f "$SHARED/tokenizers/ggml-vocab-llama-spm.gguf" ] ||
    die "shared data not found at $SHARED (set EDGESLM_SHARED_DATA)"
host_env=(env PYTHONPATH="$REPO" EDGESLM_KERNEL=numpy)
model_key=$(
    cd "$REPO"
    {
        find edgeslm -name '*.py' -print0 | sort -z | xargs -0 sha256sum
        sha256sum "$DRIVER" "$SHARED/tokenizers/ggml-vocab-llama-spm.gguf" | cut -d' ' -f1
        "$PY" -c 'from importlib.metadata import version as v
print(*(v(n) for n in ("torch", "transformers", "onnx", "gguf")))'
    } | sha256sum | cut -d' ' -f1
)
if [ "$(cat "$MODEL/.edgeslm-stamp" 2>/dev/null)" != "$model_key" ]; then
    log "exporting the tiny model packages (host)"
    rm -rf "$MODEL"
    "${host_env[@]}" "$PY" "$DRIVER" make-packages --shared-data "$SHARED" --out "$MODEL"
    echo "$model_key" >"$MODEL/.edgeslm-stamp"
fi
log "host reference generation"
rm -rf "$HOST_RUN"
# The host runs its own build of the kernel: the int8 package's operator needs it.
"${host_env[@]}" EDGESLM_KERNEL=c "$PY" "$DRIVER" generate --out "$HOST_RUN" \
    --package "$MODEL/pkg-int8" --package "$MODEL/pkg-int8-portable" \
    --package "$MODEL/pkg-fp32" --package "$MODEL/pkg-int8-portable-fp32compute"
"$PY" "$DRIVER" check-host --host "$HOST_RUN" || die "the host reference is unusable"
log "setup done in $((SECONDS - STARTED)) s"

# --- 7. under each emulated CPU ---------------------------------------------------------

SUMMARY=()
FAILED=0
record() { # status, text
    SUMMARY+=("$(printf '%-4s %s' "$1" "$2")")
    if [ "$1" != ok ]; then
        FAILED=$((FAILED + 1))
    fi
}

for cpu in $CPUS; do
    write_cpuinfo "$cpu"
    out=$WORK/run/$cpu
    rm -rf "$out"
    mkdir -p "$out"
    emu_env=(
        env -u PYTHONHOME -u PYTHONDONTWRITEBYTECODE
        QEMU_CPU="$cpu"
        PYTHONNOUSERSITE=1
        PYTHONPATH="$REPO:$SITE"
        PYTHONPYCACHEPREFIX="$WORK/pycache"
        EDGESLM_KERNEL=c
        EDGESLM_KERNEL_LIB="$BUILD/_edgeslm_kernel.so"
        EDGESLM_SHARED_DATA="$SHARED"
        HYPOTHESIS_STORAGE_DIRECTORY="$WORK/hypothesis/$cpu"
    )

    log "[$cpu] kernel self-test (static, both SIMD levels)"
    t=$SECONDS
    rc=0
    timeout 300 "$QEMU" -cpu "$cpu" "$BUILD/selftest" >"$out/selftest.log" 2>&1 || rc=$?
    cat "$out/selftest.log"
    if [ "$rc" = 0 ]; then
        record ok "$cpu  self-test: $(xargs <"$out/selftest.log") ($((SECONDS - t)) s)"
    else
        record FAIL "$cpu  self-test: exit $rc (log above)"
    fi

    log "[$cpu] kernel tests: emulated pytest, EDGESLM_KERNEL=c, the cross-built library"
    t=$SECONDS
    rc=0
    (cd "$REPO" && timeout 900 "${emu_env[@]}" "$EMU_PY" -m pytest \
        -p no:cacheprovider -q -o addopts= -rfE "${DESELECT[@]}" \
        tests/test_sampler.py tests/test_kvcache.py tests/test_qmatmul.py \
        tests/test_attention.py) 2>&1 |
        tee "$out/pytest.log" || rc=$?
    counts=$(grep -E '[0-9]+ (passed|failed|errors?)\b' "$out/pytest.log" | tail -n1 |
        tr -d '=' | xargs || true)
    if [ "$rc" = 0 ]; then
        record ok "$cpu  kernel tests: $counts ($((SECONDS - t)) s)"
    else
        record FAIL "$cpu  kernel tests: exit $rc: ${counts:-no summary}"
    fi

    log "[$cpu] end-to-end generation, emulated, against the host's"
    t=$SECONDS
    rc=0
    timeout 600 "${emu_env[@]}" "$EMU_PY" "$DRIVER" generate --out "$out/e2e" \
        --teacher "$HOST_RUN" --package "$MODEL/pkg-int8" \
        --package "$MODEL/pkg-int8-portable" --package "$MODEL/pkg-fp32" || rc=$?
    if [ "$rc" = 0 ]; then
        "$PY" "$DRIVER" compare --host "$HOST_RUN" --emulated "$out/e2e" \
            --label "$cpu" >"$out/compare.log" || rc=$?
        cat "$out/compare.log"
        while read -r line; do
            case "$line" in
            *": ok ("*) record ok "$cpu  e2e ${line#"aarch64: $cpu "}" ;;
            *) record FAIL "$cpu  e2e ${line#"aarch64: $cpu "}" ;;
            esac
        done <"$out/compare.log"
        if [ "$rc" != 0 ] && ! grep -q FAIL "$out/compare.log"; then
            record FAIL "$cpu  e2e: compare exited $rc"
        fi
    else
        record FAIL "$cpu  e2e: the emulated generation failed (exit $rc)"
    fi
    log "[$cpu] e2e done in $((SECONDS - t)) s"
done

echo
log "summary ($((SECONDS - STARTED)) s in all; work folder $WORK)"
for line in "${SUMMARY[@]}"; do
    echo "aarch64:   $line"
done
if [ "$FAILED" -gt 0 ]; then
    log "$FAILED check(s) FAILED"
    exit 1
fi
log "all checks passed"
