"""`edgeslm intent "text" --registry FILE`: the recognizer on the command line.

The `edgeslm` command (edgeslm/cli.py) adds this subcommand; this module owns its
options and output. Output goes to stdout (this is a command-line module): one
line per request, or one JSON object per line with `--json`.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's options."""
    parser.add_argument("text", help="the request; '-' reads one request per line")
    parser.add_argument(
        "--registry",
        required=True,
        metavar="FILE",
        help="the site's device registry, YAML (docs/INTENTS.md)",
    )
    parser.add_argument(
        "--area", help="the area the request comes from (a voice satellite's)"
    )
    parser.add_argument(
        "--no-chat", action="store_true", help="leave out layer (c), the chat model"
    )
    parser.add_argument(
        "--templates-only",
        action="store_true",
        help="layer (a) only: no encoder, no chat model",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object a line")


def run(args: argparse.Namespace) -> int:
    """Recognize the request(s); exit status 0 when every one was recognized."""
    from edgeslm.intent.recognizer import IntentRecognizer

    kwargs = {"chat": False} if args.no_chat else {}
    if args.templates_only:
        kwargs = {"encoder": False}
    recognizer = IntentRecognizer.from_file(args.registry, **kwargs)
    context = {"area": args.area} if args.area else None
    texts = sys.stdin.read().splitlines() if args.text == "-" else [args.text]
    missed = 0
    for text in (t for t in texts if t.strip()):
        result = recognizer.recognize(text, context)
        missed += not result.recognized
        if args.json:
            line = json.dumps(result.to_dict(), ensure_ascii=False)
        else:
            line = _line(result)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    return 1 if missed else 0


def _line(result) -> str:
    if not result.recognized:
        return (
            f"not recognized (best guess {result.confidence:.2f}, "
            f"{result.latency_ms:.0f} ms): {result.text}"
        )
    slots = " ".join(f"{k}={v}" for k, v in result.slots.items())
    devices = ", ".join(result.devices) or "-"
    text = (
        f"{result.intent} {slots}".strip()
        + f"  [{result.layer}, {result.confidence:.2f}, {result.latency_ms:.0f} ms]"
        + f"  devices: {devices}"
    )
    if result.error:
        text += f"  error: {result.error}"
    return text
