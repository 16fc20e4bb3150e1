"""The runtime never needs PyTorch: not imported, not even indirectly."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

FORBIDDEN = ("torch", "transformers")


def test_no_runtime_module_imports_torch_or_transformers():
    offenders = []
    for package in ("edgeslm", "firmware_bridge"):
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                for name in names:
                    if name.split(".")[0] in FORBIDDEN:
                        offenders.append(f"{path.relative_to(REPO_ROOT)}: {name}")
    assert offenders == []


def test_import_and_a_whole_generation_in_a_fresh_interpreter(tiny_package: Path):
    script = f"""
import sys
import edgeslm
model = edgeslm.load({str(tiny_package)!r}, n_threads=1)
msgs = [{{"role": "user", "content": "hello"}}]
out = model.chat(msgs, max_tokens=8, ignore_eos=True)
assert len(out.tokens) == 8, out
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
print("FORBIDDEN:", loaded)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "FORBIDDEN: []" in done.stdout, done.stdout


def test_loading_a_verified_package_and_sampling_load_no_openssl(tiny_package: Path):
    """OpenSSL (`hashlib`, `secrets`) and jinja2 are 7 MB of resident memory: a load
    whose files were verified before reads their stamps, an unseeded sampler seeds
    from os.urandom and the chat template compiles at the first chat, so plain
    generation needs none of them. The first process verifies (and hashes)."""
    load = f"""
import sys
import edgeslm
model = edgeslm.load({str(tiny_package)!r}, n_threads=1)
model.generate("hello", max_tokens=4, temperature=0.8, ignore_eos=True)
heavy = ("_hashlib", "secrets", "jinja2")
print("OPENSSL:", sorted(m for m in sys.modules if m in heavy))
"""
    runs = [
        subprocess.run(
            [sys.executable, "-c", load], capture_output=True, text=True, timeout=300
        )
        for _ in range(2)
    ]
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr
    assert "OPENSSL: []" in runs[1].stdout, runs[1].stdout
