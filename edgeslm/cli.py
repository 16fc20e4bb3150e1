"""The `edgeslm` command line: chat, generate, export, info.

Only this module prints; everything else logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from edgeslm.errors import EdgeSLMError

log = logging.getLogger("edgeslm.cli")

EXAMPLES = """\
examples:
  edgeslm chat                                  chat with the default model
  edgeslm chat ./Llama-68M-Chat-v1              a Hugging Face folder (exported once)
  edgeslm generate "The capital of France is" --max-tokens 16
  edgeslm generate "Is water wet? Answer:" --choice " yes" --choice " no"
  edgeslm chat --json-schema schema.json         every reply is JSON for that schema
  edgeslm export model.gguf -o ./pkg            make an int8 package
  edgeslm info ./pkg                            what a package holds
  edgeslm serve ./pkg --port 8080               OpenAI-compatible HTTP API
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgeslm` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
    )
    if not args.verbose:
        logging.getLogger("edgeslm").setLevel(logging.WARNING)
        logging.getLogger("edgeslm.export").setLevel(logging.INFO)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print()
        return 130
    except (EdgeSLMError, ValueError, FileExistsError) as exc:
        print(f"edgeslm: error: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeslm",
        description="Run small language models on a board: int8 ONNX, no PyTorch.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    chat = sub.add_parser("chat", help="interactive chat (default model if none given)")
    chat.add_argument("model", nargs="?", help="package, HF folder, .gguf or hub id")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument(
        "--prompt-cache",
        metavar="FILE",
        help="restore the system prompt's KV cache from FILE (made on first use)",
    )
    _add_generation_options(chat, default_temperature=0.7)
    chat.set_defaults(func=_cmd_chat)

    gen = sub.add_parser("generate", help="continue a prompt ('-' reads stdin)")
    gen.add_argument("prompt")
    gen.add_argument("-m", "--model", help="package, HF folder, .gguf or hub id")
    _add_generation_options(gen, default_temperature=0.0)
    gen.set_defaults(func=_cmd_generate)

    exp = sub.add_parser("export", help="turn a checkpoint into an edgeslm package")
    exp.add_argument("src", help="Hugging Face model folder or .gguf file")
    exp.add_argument("-o", "--output", required=True, help="package folder to write")
    exp.add_argument(
        "--dtype",
        choices=("int8", "int4", "fp32"),
        default="int8",
        help="weight type (default: int8); int4 carries a GGUF's Q4_0/Q4_1 over",
    )
    exp.add_argument(
        "--block-size",
        type=int,
        default=32,
        choices=(32, 64, 128),
        help="int8 weight block length: 32 is the most faithful, larger blocks are "
        "a little smaller (default: 32)",
    )
    exp.add_argument(
        "--smooth",
        type=float,
        default=None,
        metavar="ALPHA",
        help="int8 activation smoothing strength in [0, 1], 0 = off (default: 0.5)",
    )
    exp.add_argument("--force", action="store_true", help="replace an existing package")
    exp.set_defaults(func=_cmd_export)

    info = sub.add_parser("info", help="describe a package and verify its files")
    info.add_argument("package")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    info.set_defaults(func=_cmd_info)

    models = sub.add_parser("models", help="supported models and what is installed")
    models.add_argument("--json", action="store_true", help="print them as JSON")
    models.add_argument(
        "--verify", action="store_true", help="check installed files' sha256"
    )
    models.set_defaults(func=_cmd_models)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP API (docs/SERVER.md)")
    serve.add_argument(
        "model", nargs="?", help="chat model (as for chat) or an encoder package"
    )
    serve.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    serve.add_argument("--port", type=int, default=8080, help="0: any free port")
    serve.add_argument(
        "--encoder",
        metavar="PKG",
        help="encoder for /v1/embeddings: package, BERT folder or 'default'",
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("EDGESLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $EDGESLM_API_KEY)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=4,
        help="requests that may wait for the model; more get 429 (default: 4)",
    )
    serve.add_argument(
        "--max-body-kib", type=int, default=1024, help="largest request body"
    )
    serve.add_argument("--threads", type=int, default=None, help="default: all cores")
    serve.add_argument("--n-ctx", type=int, default=None, help="context length")
    serve.set_defaults(func=_cmd_serve)

    # The MQTT bridge's options and behaviour live in firmware_bridge/cli.py.
    from firmware_bridge.cli import add_arguments, dispatch

    bridge = sub.add_parser("bridge", help="MQTT bridge to devices (docs/BRIDGE.md)")
    add_arguments(bridge)
    bridge.set_defaults(func=dispatch)

    # `edgeslm intent`: its options and output live in edgeslm/intent/cli.py.
    from edgeslm.intent import cli as intent_cli

    intent = sub.add_parser("intent", help="text to a device intent (docs/INTENTS.md)")
    intent_cli.add_arguments(intent)
    intent.set_defaults(func=intent_cli.run)
    return parser


def _add_generation_options(
    p: argparse.ArgumentParser, default_temperature: float
) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="default: 256")
    p.add_argument(
        "--temperature",
        type=float,
        default=default_temperature,
        help=f"0 = greedy (default: {default_temperature})",
    )
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument(
        "--stop", action="append", default=[], help="stop string (repeatable)"
    )
    p.add_argument("--threads", type=int, default=None, help="default: all cores")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument(
        "--json-schema",
        metavar="FILE|JSON",
        help="answer must be JSON valid against this schema (a file or JSON text)",
    )
    shape.add_argument("--regex", help="answer must match this regular expression")
    shape.add_argument(
        "--choice",
        action="append",
        metavar="TEXT",
        help="answer must be exactly one of these (repeat: --choice a --choice b)",
    )
    shape.add_argument(
        "--grammar", metavar="FILE", help="answer must match this Lark grammar file"
    )
    p.add_argument("--n-ctx", type=int, default=None, help="context length")


def _options(args: argparse.Namespace) -> dict:
    options = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "stop": args.stop,
    }
    if args.seed is not None:
        options["seed"] = args.seed
    options.update(_constraint(args))
    return options


def _constraint(args: argparse.Namespace) -> dict:
    """The constraint option given by --json-schema, --regex, --choice or --grammar."""
    if args.json_schema:
        text = args.json_schema
        if not text.lstrip().startswith("{"):
            text = _read_file(text, "--json-schema")
        return {"json_schema": text}
    if args.regex:
        return {"regex": args.regex}
    if args.choice:
        return {"choices": args.choice}
    if args.grammar:
        return {"grammar": _read_file(args.grammar, "--grammar")}
    return {}


def _read_file(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path} ({exc.strerror})") from exc


def _print_constrained(model, call, *args, **options) -> str:
    """Run a constrained generation, print it, and fail if it was cut short."""
    gen = call(*args, **options)
    print(gen.text)
    if not gen.complete:
        raise ValueError(
            f"the answer was cut short ({gen.finish_reason}) before it satisfied the "
            "constraint; raise --max-tokens"
        )
    return gen.text


def _load(name, args: argparse.Namespace):
    import edgeslm

    return edgeslm.load(name, n_threads=args.threads, n_ctx=args.n_ctx)


def _cmd_chat(args: argparse.Namespace) -> int:
    model = _load(args.model, args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt_cache:
        _prompt_cache(model, messages, Path(args.prompt_cache))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"edgeslm chat with {model.path.name}. /reset starts over, Ctrl-D quits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            continue
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        if _constraint(args):
            text = _print_constrained(model, model.chat, messages, **_options(args))
            messages.append({"role": "assistant", "content": text})
            continue
        reply = []
        for piece in model.chat(messages, stream=True, **_options(args)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def _prompt_cache(model, messages: list[dict], path: Path) -> None:
    """Restore the conversation prefix's cache from `path`, or compute and save it."""
    if path.is_file():
        n = model.load_prompt_cache(path)
        log.info("restored %d cached prompt tokens from %s", n, path)
        return

    # The prefix every conversation shares: where two different first turns diverge.
    a = model.chat_template.render([*messages, {"role": "user", "content": "a"}])
    b = model.chat_template.render([*messages, {"role": "user", "content": "b"}])
    ids = model.tokenize(os.path.commonprefix([a, b]), add_bos=False)
    model.forward(ids[:-1] or ids)
    model.save_prompt_cache(path)
    log.info("saved %d prompt tokens to %s", len(ids), path)


def _cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = _load(args.model, args)
    if _constraint(args):
        _print_constrained(model, model.generate, prompt, **_options(args))
        return 0
    for piece in model.generate(prompt, stream=True, **_options(args)):
        print(piece, end="", flush=True)
    print()
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from edgeslm.export import export_model

    out = export_model(
        args.src,
        args.output,
        dtype=args.dtype,
        overwrite=args.force,
        block_size=args.block_size,
        smooth=args.smooth,
    )
    print(f"wrote {out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from edgeslm.manifest import Manifest

    package = Path(args.package)
    manifest = Manifest.read(package)
    if args.json:
        print(manifest.to_json(), end="")
        return 0
    cfg = manifest.config
    print(f"package       {package}")
    print(f"architecture  {cfg.architecture} ({manifest.graph})")
    print(
        f"dimensions    {cfg.n_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.n_heads} heads ({cfg.n_kv_heads} kv), head_dim {cfg.head_dim}, "
        f"ffn {cfg.intermediate_size}"
    )
    print(f"vocabulary    {cfg.vocab_size} tokens, context {cfg.max_seq_len}")
    print(f"weights       {manifest.quantization}")
    print(
        f"special       bos {manifest.tokens.bos_token_id}, "
        f"eos {list(manifest.tokens.eos_token_ids)}"
    )
    print(f"chat template {'yes' if manifest.chat_template else 'none (ChatML)'}")
    print(
        f"chat format   {manifest.chat_format}, full context: {manifest.context_shift}"
    )
    print(f"source        {json.dumps(manifest.source)}")
    for name in manifest.files:
        size = (package / name).stat().st_size if (package / name).exists() else 0
        print(f"file          {name} ({size / 1e6:.1f} MB)")
    manifest.verify(package)
    print("sha256        all files verified")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    """The catalogue (models/*.json) with what of each model is on this machine."""
    from dataclasses import asdict

    from edgeslm.hub import catalog, installed, verify_files

    entries = catalog()
    found = {e.name: installed(e) for e in entries}
    if args.json:
        rows = [dict(asdict(e), installed=found[e.name]) for e in entries]
        print(json.dumps(rows, indent=2))
        return 0
    rows = [("name", "hub id", "arch", "chat", "licence", "installed")]
    for e in entries:
        chat = (e.chat_format or "-").split()[0]
        here = ", ".join(found[e.name]) or "-"
        name = e.name + (" *" if e.default else "")
        rows.append((name, e.hub_id, e.architecture, chat, e.licence, here))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[5]]))
    print(
        "\n* default. Give a name or hub id to chat, generate or serve; "
        "recommended quantization, files and notes: --json."
    )
    problems = [p for e in entries for p in verify_files(e)] if args.verify else []
    for problem in problems:
        print(f"edgeslm: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from edgeslm.serve import Server, load_app

    if args.max_queue < 0 or args.max_body_kib < 1:
        raise ValueError("--max-queue must be >= 0 and --max-body-kib >= 1")
    app = load_app(
        args.model,
        encoder=args.encoder,
        n_threads=args.threads,
        n_ctx=args.n_ctx,
        max_waiting=args.max_queue,
    )
    try:
        server = Server(
            app,
            args.host,
            args.port,
            api_key=args.api_key,
            max_body_bytes=args.max_body_kib * 1024,
        )
    except OSError as exc:  # port taken, address not on this machine, ...
        raise ValueError(
            f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); "
            "choose another --port or --host"
        ) from exc
    logging.getLogger("edgeslm.serve").setLevel(
        logging.DEBUG if args.verbose else logging.INFO
    )
    names = ", ".join(m["id"] for m in app.models()["data"])
    auth = "API key required" if server.api_key else "no API key"
    print(f"edgeslm: serving {names} on {server.url}/v1 ({auth})", flush=True)
    if not server.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"edgeslm: warning: {args.host} is reachable from other machines and "
            "anyone there can use the model; set --api-key",
            file=sys.stderr,
        )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
