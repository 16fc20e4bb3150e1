"""`python -m firmware_bridge --config FILE`: run the bridge until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence


def run(config_path: str, dry_run: bool = False) -> int:
    """Serve until SIGTERM/SIGINT, then shut down cleanly. Returns an exit code."""
    from firmware_bridge.config import load_config
    from firmware_bridge.service import Bridge

    overrides = {"dry_run": True} if dry_run else {}
    bridge = Bridge(load_config(config_path, **overrides))
    done = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        logging.getLogger("firmware_bridge").info("signal %d: shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bridge.start()
    done.wait()
    bridge.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m firmware_bridge",
        description="MQTT bridge: spoken or typed commands to devices (docs/BRIDGE.md)",
    )
    parser.add_argument("--config", required=True, help="bridge YAML file")
    parser.add_argument("--dry-run", action="store_true", help="log, do not send")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from edgeslm.errors import EdgeSLMError

    try:
        return run(args.config, args.dry_run)
    except (EdgeSLMError, ValueError, OSError) as exc:
        logging.getLogger("firmware_bridge").error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
