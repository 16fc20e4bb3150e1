"""The bridge's command line: `python -m firmware_bridge` and `edgeslm bridge`.

    edgeslm bridge --config FILE [--dry-run]   serve until SIGTERM or Ctrl-C
    edgeslm bridge --demo [--broker HOST:PORT]  broker, simulated devices, commands

`edgeslm/cli.py` adds these options to its `bridge` subcommand (`add_arguments`) and
hands the parsed options here (`dispatch`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import threading
from collections.abc import Sequence

log = logging.getLogger("firmware_bridge")


def run(config_path: str, dry_run: bool = False) -> int:
    """Serve until SIGTERM/SIGINT, then shut down cleanly. Returns an exit code.

    Raises:
        BridgeConfigError: the configuration, the registry or a file they name
            cannot be used (the message says which and why).
    """
    from firmware_bridge.config import BridgeConfigError, load_config
    from firmware_bridge.service import Bridge

    overrides = {"dry_run": True} if dry_run else {}
    config = load_config(config_path, **overrides)
    try:
        bridge = Bridge(config)
        bridge.start()
    except (OSError, sqlite3.Error) as exc:
        raise BridgeConfigError(
            f"{config_path}: cannot start the bridge: {exc}; check the TLS files, "
            f"the password file and that the queue's folder is writable "
            f"(queue: {config.queue})"
        ) from exc
    done = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    bridge.stop()
    log.info("bridge stopped")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bridge's command-line options (shared with `edgeslm bridge`)."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="bridge YAML (start from firmware_bridge/examples/bridge.yaml)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="log what would be sent to devices and send nothing",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="start mosquitto, simulated devices and a bridge; send a few commands",
    )
    parser.add_argument(
        "--broker",
        metavar="HOST:PORT",
        help="with --demo: use this broker instead of starting mosquitto",
    )


def dispatch(args: argparse.Namespace) -> int:
    """Run what the parsed options ask for; an exit code.

    Raises:
        ValueError: neither --config nor --demo, or the bridge extra is missing.
    """
    if not args.config and not args.demo:
        raise ValueError("give --config FILE (or --demo); see docs/BRIDGE.md")
    try:
        import paho.mqtt  # noqa: F401
        import yaml  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            f"the bridge needs {exc.name}: pip install 'edgeslm[bridge]'"
        ) from None
    if args.demo:
        from firmware_bridge.demo import run_demo

        return run_demo(broker=args.broker)
    return run(args.config, args.dry_run)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m firmware_bridge`: options as `edgeslm bridge`, plus -v."""
    parser = argparse.ArgumentParser(
        prog="python -m firmware_bridge",
        description="MQTT bridge: spoken or typed commands to devices (docs/BRIDGE.md)",
    )
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from edgeslm.errors import EdgeSLMError

    try:
        return dispatch(args)
    except (EdgeSLMError, ValueError) as exc:
        log.error("%s", exc)
        return 1
