"""Helpers of the server tests: a server on a free port, and raw HTTP requests.

`serving(app)` runs `edgeslm.serve.Server` in a thread of the test process, so a
test can look at the app's queue and counters while clients talk to it over
loopback TCP, as any other program on the board would.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import openai

from edgeslm.serve import App, Server


@contextmanager
def serving(app: App, **options: Any) -> Iterator[Server]:
    """A server for `app` on 127.0.0.1 and a free port, stopped afterwards."""
    server = Server(app, "127.0.0.1", 0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def client(
    server: Server, api_key: str = "unused", *, strict: bool = True, **options: Any
) -> openai.OpenAI:
    """The official client, no retries; `strict`: every answer is checked
    against the client's own response types.

    (The types of the legacy /v1/completions say a streamed chunk's
    finish_reason is never null, which OpenAI's own stream contradicts: turn
    `strict` off there.)
    """
    return openai.OpenAI(
        base_url=f"{server.url}/v1",
        api_key=api_key,
        max_retries=0,
        timeout=options.pop("timeout", 120),
        _strict_response_validation=strict,
        **options,
    )


def request(
    server: Server,
    method: str,
    path: str,
    body: bytes | str | dict | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One request on a new connection: (status, headers, parsed JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        send_headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=send_headers)
        response = conn.getresponse()
        data = response.read()
        parsed = json.loads(data) if data else None
        return response.status, dict(response.getheaders()), parsed
    finally:
        conn.close()


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], Any]:
    """One response with a Content-Length from a raw socket, leaving it open:
    (status, headers, parsed JSON body)."""
    stream = sock.makefile("rb")
    try:
        status = int(stream.readline().split(b" ", 2)[1])
        headers = {}
        while (line := stream.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip()] = value.strip()
        body = stream.read(int(headers["Content-Length"]))
    finally:
        stream.close()  # the socket stays open
    return status, headers, json.loads(body)


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll `condition` until it holds; False if it never did within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def assert_error(
    status: int, body: Any, expected: int, param: str | None = None
) -> dict:
    """An OpenAI error object with the expected status (and field at fault)."""
    assert status == expected, body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error
