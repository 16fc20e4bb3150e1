"""`edgeslm serve` under bad input and bad clients: errors, limits, disconnects.

The model is the tiny random-weight package (tests/conftest.py): its words are
noise, but it runs the real runtime fast, which is all these tests need. Every
test ends by checking that the server still answers.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import openai
import pytest
from serve_harness import (
    assert_error,
    client,
    read_answer,
    request,
    serving,
    wait_until,
)

import edgeslm
from edgeslm.serve import App

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
# Long enough that only a cancellation ends it early (minutes on the tiny model).
ENDLESS = 200_000


@pytest.fixture(scope="module")
def model(tiny_package):
    return edgeslm.load(tiny_package, n_threads=1)


@pytest.fixture
def app(model):
    return App(model, model_id="tiny", max_waiting=1)


def chat(**fields) -> dict:
    return {"model": "tiny", "messages": HI, "max_tokens": 4, **fields}


def still_serving(server) -> None:
    status, _, body = request(server, "POST", CHAT, chat())
    assert status == 200, body
    assert body["choices"][0]["message"]["role"] == "assistant"
    # The answer goes out after the model is freed; a stream's end just before.
    assert wait_until(lambda: health(server)["queue"]["running"] == 0)


def raw(server, data: bytes, timeout: float = 30) -> bytes:
    """Send raw bytes, read until the server closes or answers one response."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(data)
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed already
            pass
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def parse_raw(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


# --- malformed requests --------------------------------------------------------

BROKEN_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}
    ],
}
BAD_BODIES = [
    # (name, body, status, param, code)
    ("not json", b'{"messages": [', 400, None, "invalid_json"),
    ("nan", b'{"messages": [], "temperature": NaN}', 400, None, "invalid_json"),
    ("not utf-8", b'{"model": "\xff\xfe"}', 400, None, "invalid_json"),
    ("deep nesting", b"[" * 100_000, 400, None, "invalid_json"),
    ("not an object", b"[1, 2]", 400, None, "invalid_body"),
    ("no messages", {"model": "tiny"}, 400, "messages", "missing_field"),
    ("empty messages", chat(messages=[]), 400, "messages", None),
    ("unknown field", chat(temprature=0.5), 400, "temprature", "unknown_field"),
    ("old functions", chat(functions=[]), 400, "functions", "unknown_field"),
    ("negative max_tokens", chat(max_tokens=-1), 400, "max_tokens", None),
    ("zero max_tokens", chat(max_tokens=0), 400, "max_tokens", None),
    ("string max_tokens", chat(max_tokens="8"), 400, "max_tokens", "invalid_type"),
    ("bool max_tokens", chat(max_tokens=True), 400, "max_tokens", "invalid_type"),
    ("huge temperature", chat(temperature=9), 400, "temperature", None),
    ("zero top_p", chat(top_p=0), 400, "top_p", None),
    ("n=2", chat(n=2), 400, "n", "unsupported_value"),
    ("five stops", chat(stop=list("abcde")), 400, "stop", None),
    ("seed too big", chat(seed=2**70), 400, "seed", None),
    ("bad role", chat(messages=[{"role": "robot", "content": "x"}]), 400, None, None),
    (
        "image part",
        chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        400,
        None,
        "unsupported_value",
    ),
    ("stream_options alone", chat(stream_options={}), 400, "stream_options", None),
    ("tools not a list", chat(tools={"a": 1}), 400, "tools", None),
    (
        "tool name with spaces",
        chat(tools=[{"type": "function", "function": {"name": "turn on"}}]),
        400,
        "tools[0].function.name",
        None,
    ),
    (
        "tool_choice unknown",
        chat(
            tools=[{"type": "function", "function": {"name": "a"}}],
            tool_choice={"type": "function", "function": {"name": "b"}},
        ),
        400,
        "tool_choice",
        None,
    ),
    (
        "tools and a schema",
        chat(
            tools=[{"type": "function", "function": {"name": "a"}}],
            response_format={"type": "json_object"},
        ),
        400,
        "response_format",
        None,
    ),
    (
        "earlier call not JSON",
        chat(messages=[*HI, BROKEN_CALL]),
        400,
        "messages[1].tool_calls[0].function.arguments",
        None,
    ),
    (
        "earlier call not JSON, with tools",
        chat(
            messages=[*HI, BROKEN_CALL],
            tools=[{"type": "function", "function": {"name": "f"}}],
        ),
        400,
        None,
        None,
    ),
    ("bad response_format", chat(response_format={"type": "yaml"}), 400, None, None),
    (
        "ignore_eos and a schema",
        chat(ignore_eos=True, response_format={"type": "json_object"}),
        400,
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    "name, body, status, param, code", BAD_BODIES, ids=[b[0] for b in BAD_BODIES]
)
def test_malformed_requests_get_openai_errors(app, name, body, status, param, code):
    with serving(app) as server:
        got, headers, answer = request(server, "POST", CHAT, body)
        error = assert_error(got, answer, status, param)
        if code is not None:
            assert error["code"] == code, error
        if name == "unknown field":
            assert "did you mean temperature?" in error["message"]
        assert headers["Content-Type"] == "application/json"
        still_serving(server)


def test_errors_leave_the_connection_usable(app):
    import http.client

    with serving(app) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for body in (b"{oops", json.dumps(chat(max_tokens=-3)), json.dumps(chat())):
            conn.request("POST", CHAT, body=body)
            response = conn.getresponse()
            response.read()
        assert response.status == 200  # the third request, same connection
        conn.close()


# Requests answered before their body is read: (name, method, path, headers, status).
EARLY_REFUSALS = [
    ("401 wrong key", "POST", CHAT, "Authorization: Bearer wrong\r\n", 401),
    ("404 unknown path", "POST", "/v1/nothing", "", 404),
    ("405 wrong method", "POST", "/v1/models", "", 405),
    ("405 unknown method", "PUT", CHAT, "", 405),
    ("413 over the limit", "POST", CHAT, "Authorization: Bearer k\r\n", 413),
    ("GET with a body", "GET", "/health", "", 200),
]


@pytest.mark.parametrize(
    "name, method, path, headers, status",
    EARLY_REFUSALS,
    ids=[r[0] for r in EARLY_REFUSALS],
)
def test_an_unread_body_does_not_become_the_next_request(
    app, name, method, path, headers, status
):
    body = json.dumps(chat(messages=[{"role": "user", "content": "x" * 300}]))
    first = (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        f"{body}"
    )
    second = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with serving(app, api_key="k", max_body_bytes=256) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            # The refused request, answered with the connection kept open...
            s.sendall(first.encode())
            got, answer_headers, answer = read_answer(s)
            assert got == status, answer
            assert answer_headers.get("Connection") != "close", answer_headers
            # ...and the next one on it is read as a request of its own.
            s.sendall(second.encode())
            got, _, answer = read_answer(s)
            assert got == 200, answer
            assert answer["status"] == "ok"
        still_serving_with_key(server)


def test_a_body_too_large_to_drop_closes_the_connection(app):
    # Only the heads are sent: the bodies would never be read.
    chunked = "Transfer-Encoding: chunked\r\n\r\n"
    too_large = "Content-Length: 1073741824\r\n\r\n"  # 1 GiB
    with serving(app, api_key="k") as server:
        for framing in (chunked, too_large):
            head = "POST /v1/nothing HTTP/1.1\r\nHost: x\r\n"
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
                s.sendall((head + framing).encode())
                status, headers, body = read_answer(s)
                assert_error(status, body, 404)
                # Said, and done: the server closes rather than read on.
                assert headers["Connection"] == "close", headers
                assert s.recv(1) == b""
        still_serving_with_key(server)


def still_serving_with_key(server) -> None:
    auth = {"Authorization": "Bearer k"}
    status, _, body = request(server, "POST", CHAT, chat(), auth)
    assert status == 200, body


def test_other_endpoints_and_context_errors(app):
    with serving(app) as server:
        status, _, body = request(server, "POST", "/v1/embeddings", {"input": "x"})
        assert_error(status, body, 404, "model")  # no encoder on this server
        status, _, body = request(server, "GET", "/v1/nothing")
        assert_error(status, body, 404)
        status, _, body = request(server, "GET", CHAT)
        assert_error(status, body, 405)

        # Longer than the tiny model's 256-token context.
        long_prompt = {"model": "tiny", "prompt": "word " * 400, "max_tokens": 2}
        status, _, body = request(server, "POST", "/v1/completions", long_prompt)
        assert assert_error(status, body, 400)["code"] == "context_length_exceeded"
        status, _, body = request(
            server, "POST", "/v1/completions", {"prompt": [1, 99_999_999]}
        )
        assert_error(status, body, 400)
        still_serving(server)


TOOL = {
    "type": "function",
    "function": {
        "name": "set_light",
        "description": "Switch a light on or off",
        "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}},
    },
}


def test_default_max_tokens_is_what_the_real_prompt_leaves(app, model, monkeypatch):
    seen = []
    generate = model.generate

    def measured(prompt, **options):
        # What the model is given: its prompt, and the budget the server chose.
        used = len(model.tokenize(prompt, add_bos=False))
        seen.append((used, options["max_tokens"]))
        return generate(prompt, **{**options, "max_tokens": 2})  # short runs

    monkeypatch.setattr(model, "generate", measured)
    with serving(app) as server:
        plain = {"model": "tiny", "messages": HI}
        with_tools = {**plain, "tools": [TOOL], "tool_choice": "required"}
        for body in (plain, with_tools):
            status, _, answer = request(server, "POST", CHAT, body)
            assert status == 200, answer

    # Prompt and answer fill the context exactly, the tools' listing counted.
    (plain_used, plain_budget), (tools_used, tools_budget) = seen
    assert tools_used > plain_used  # the listing is in the prompt
    assert plain_used + plain_budget == model.n_ctx
    assert tools_used + tools_budget == model.n_ctx, seen


def test_broken_framing_gets_an_answer_not_a_hang(app):
    with serving(app) as server:
        status, body = parse_raw(raw(server, b"GARBAGE\r\n\r\n"))
        assert_error(status, body, 400)
        no_length = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n{}"
        status, body = parse_raw(raw(server, no_length))
        assert_error(status, body, 411)
        chunked = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        )
        status, body = parse_raw(raw(server, chunked))
        assert_error(status, body, 411)
        short = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 50\r\n\r\n{}"
        status, body = parse_raw(raw(server, short))  # the body ends early
        assert_error(status, body, 400)
        still_serving(server)


def test_huge_bodies_are_refused_before_they_are_read(app):
    with serving(app, max_body_bytes=64 * 1024) as server:
        api = client(server)
        with pytest.raises(openai.APIStatusError) as caught:
            api.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "x" * 1_000_000}],
                max_tokens=1,
            )
        assert caught.value.status_code == 413
        assert caught.value.body["code"] == "body_too_large"

        # A claimed gigabyte: answered at once, and the connection closed.
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1073741824\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(head + b"{" * 1000)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        status, body = parse_raw(answer)
        assert_error(status, body, 413)
        assert b"Connection: close" in answer

        # A client that asks first (Expect: 100-continue) is refused before it
        # sends the body, not told to go ahead.
        ask = head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n")
        status, body = parse_raw(raw(server, ask))
        assert_error(status, body, 413)
        still_serving(server)


def test_too_many_connections_get_503(app):
    with serving(app, max_connections=2) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        time.sleep(0.2)  # both accepted and waiting for a request line
        # The refusal comes on accepting, before the client sends anything.
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        status, body = parse_raw(answer)
        assert_error(status, body, 503)
        for s in idle:
            s.close()
        assert wait_until(lambda: request(server, "GET", "/health")[0] == 200)
        still_serving(server)


# --- the queue and disconnects -------------------------------------------------


def endless_stream(api):
    """A streaming request that runs until its client goes, with its first chunk."""
    stream = api.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=ENDLESS,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)  # the role
    next(chunks)  # a token: the model is running
    return stream


def health(server) -> dict:
    return request(server, "GET", "/health")[2]


def test_queue_limit_answers_429_and_queued_requests_run(app):
    with serving(app) as server:  # max_waiting=1
        api = client(server)
        running = endless_stream(api)

        waited: dict = {}

        def waiting_request():
            answer = client(server).chat.completions.create(
                model="tiny", messages=HI, max_tokens=3
            )
            waited["answer"] = answer

        thread = threading.Thread(target=waiting_request)
        thread.start()
        assert wait_until(lambda: health(server)["queue"]["waiting"] == 1)

        with pytest.raises(openai.RateLimitError) as caught:
            api.chat.completions.create(model="tiny", messages=HI, max_tokens=1)
        assert caught.value.status_code == 429
        assert caught.value.body["code"] == "queue_full"
        assert caught.value.response.headers["Retry-After"] == "1"
        assert health(server)["rejected"] == 1

        running.close()  # the running client goes: the waiting one gets its turn
        thread.join(60)
        assert waited["answer"].choices[0].finish_reason == "length"
        assert [r.finish_reason for r in app.recent] == ["cancelled", "length"]
        still_serving(server)


def test_client_vanishing_mid_stream_frees_the_model_at_once(app):
    with serving(app) as server:
        stream = endless_stream(client(server))
        assert health(server)["queue"]["running"] == 1
        stream.close()
        gone_at = time.monotonic()
        assert wait_until(lambda: health(server)["queue"]["running"] == 0, 10)
        freed_after = time.monotonic() - gone_at

        (record,) = app.recent
        assert record.finish_reason == "cancelled"
        assert record.completion_tokens < ENDLESS
        assert freed_after < 5, freed_after  # not the minutes ENDLESS would take
        assert app.counts["cancelled"] == 1
        still_serving(server)


def test_reset_connection_and_waiting_client_that_leaves(app):
    body = json.dumps(chat(max_tokens=ENDLESS, stream=True, ignore_eos=True))
    head = f"POST {CHAT} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n"
    with serving(app) as server:
        first = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        first.sendall((head + body).encode())
        seen = b""
        while b"data:" not in seen:  # streaming
            seen += first.recv(4096)

        second = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        second.sendall((head + body).encode())
        assert wait_until(lambda: health(server)["queue"]["waiting"] == 1)
        second.close()  # leaves the line before its turn
        assert wait_until(lambda: health(server)["queue"]["waiting"] == 0)

        # An abortive close (RST) of the running one.
        first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        first.close()
        assert wait_until(lambda: health(server)["queue"]["running"] == 0, 10)
        assert [r.finish_reason for r in app.recent] == ["cancelled"]  # one ran
        still_serving(server)


def test_non_streaming_client_that_times_out_cancels_its_generation(app):
    with serving(app) as server:
        impatient = client(server, timeout=1.5)
        with pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(
                model="tiny",
                messages=HI,
                max_tokens=ENDLESS,
                extra_body={"ignore_eos": True},
            )
        assert wait_until(lambda: health(server)["queue"]["running"] == 0, 10)
        assert [r.finish_reason for r in app.recent] == ["cancelled"]
        still_serving(server)


def test_disconnect_check_works_on_descriptors_above_1023(app):
    # Fill every descriptor below 1024, so that both ends of the next
    # connection get higher ones (select() cannot watch those).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY)]
    try:
        while fillers[-1] < 1024:
            fillers.append(os.dup(fillers[0]))
        with serving(app) as server:
            status, _, body = request(
                server, "POST", CHAT, chat(max_tokens=6, ignore_eos=True)
            )
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # Served whole, not cancelled as if the client had gone.
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 6
    assert [r.finish_reason for r in app.recent] == ["length"]


def test_a_half_closed_client_counts_as_gone(app):
    # Documented in docs/SERVER.md: over TCP, shutdown(SHUT_WR) looks like a
    # close until the server writes, so the generation is cancelled.
    body = json.dumps(chat(max_tokens=ENDLESS, ignore_eos=True))
    head = f"POST {CHAT} HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n"
    with serving(app) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall((head + body).encode())
            s.shutdown(socket.SHUT_WR)
            assert wait_until(lambda: len(app.recent) == 1, 10)
            assert s.recv(65536) == b""  # no answer: the server closed
        assert [r.finish_reason for r in app.recent] == ["cancelled"]
        still_serving(server)


# --- the command line -------------------------------------------------------------


def test_cli_serves_until_interrupted(tiny_package):
    cmd = [sys.executable, "-m", "edgeslm", "serve", str(tiny_package)]
    cmd += ["--port", "0", "--threads", "1", "--api-key", "k", "--max-queue", "2"]
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()
        assert "serving" in line and "API key required" in line, line
        url = line.split(" on ", 1)[1].split()[0]
        api = openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in api.models.list()] == [tiny_package.name]
        answer = api.chat.completions.create(
            model=tiny_package.name, messages=HI, max_tokens=2
        )
        assert answer.usage.completion_tokens <= 2
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(30)
    errors = process.stderr.read()
    assert code == 130, errors
    assert "Traceback" not in errors


def test_cli_refuses_bad_options_in_one_line(tmp_path, tiny_package):
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "edgeslm", "serve", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = serve(str(tmp_path), "--max-queue", "-1")
    assert done.returncode == 1
    assert done.stderr.startswith("edgeslm: error:") and "--max-queue" in done.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = serve(str(tiny_package), "--port", port, "--threads", "1")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("edgeslm: error: cannot listen"), done.stderr
    assert "Traceback" not in done.stderr
