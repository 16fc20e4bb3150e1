"""The HTTP transport: the standard library's threaded server, one thread per
connection, HTTP/1.1 keep-alive, server-sent events in chunked encoding.

Why not an ASGI stack: docs/SERVER.md measures import time, start-up and memory of
http.server, starlette + uvicorn and aiohttp on this project's machine. One model
serves one request at a time, so an event loop buys nothing, and the standard
library costs no dependency at all.

What this module guards against, since http.server itself does not:
- bodies: `Content-Length` is required and capped (413 above `max_body_bytes`,
  decided from the header); JSON must be strict (no NaN) and a JSON object;
- bodies no endpoint reads (any error before the body is read: 401, 404, 405,
  413, ...; a GET with a body): read and dropped before the answer, up to
  `max_body_bytes` or 16 MiB, whichever is larger, so that a keep-alive
  connection stays in step and the client sees the answer rather than a
  reset; a larger, chunked or unmeasurable body closes the connection
  (`Connection: close`);
- slow or idle clients: every socket has a timeout;
- connection floods: at most `max_connections` handler threads, then a 503;
- every error, including malformed request lines, is an OpenAI error object.
- `Expect: 100-continue`: a body over the limit is refused before the client
  is told to send it.

Not yet: TLS and CORS (put a reverse proxy in front).
"""

from __future__ import annotations

import hmac
import json
import logging
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edgeslm import __version__
from edgeslm.serve.app import App
from edgeslm.serve.protocol import APIError
from edgeslm.serve.queue import ClientGone, QueueFull

log = logging.getLogger(__name__)

# Seconds a client may take to send a request, or to take a chunk of the answer.
SOCKET_TIMEOUT = 30.0
# Tells a client how long to wait before retrying a refused request.
RETRY_AFTER_SECONDS = 1
# A refused body up to this size (or up to the body limit, if larger) is read and
# dropped, keeping the connection usable; a larger one closes the connection.
DRAIN_LIMIT = 16 << 20
# poll() events that mean the connection is finished (reset, or shut both ways).
_POLL_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL

# Routes: path -> {method: App method name}.
ROUTES = {
    "/health": {"GET": "health"},
    "/v1/models": {"GET": "models"},
    "/v1/chat/completions": {"POST": "chat"},
    "/v1/completions": {"POST": "completions"},
    "/v1/embeddings": {"POST": "embeddings"},
}
PUBLIC = {"/health"}  # answered without the API key (liveness probes)


class Server(ThreadingHTTPServer):
    """The API server.

    Args:
        app: the endpoints.
        host, port: where to listen (port 0: any free port; see `port`).
        api_key: required as `Authorization: Bearer KEY` on /v1/* (None: open).
        max_body_bytes: largest request body accepted.
        max_connections: open connections served at once; more get a 503.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        app: App,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        api_key: str | None = None,
        max_body_bytes: int = 1 << 20,
        max_connections: int = 32,
    ) -> None:
        if max_body_bytes < 1 or max_connections < 1:
            raise ValueError(
                f"max_body_bytes and max_connections must be >= 1, got "
                f"{max_body_bytes} and {max_connections}"
            )
        self.app = app
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__((host, port), _Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://{host}:{self.port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.info("too many connections: refusing %s", client_address)
            error = APIError(
                503, "too many open connections; retry later", type="server_error"
            )
            body = json.dumps(error.body()).encode()
            head = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json"
                f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                f"Retry-After: {RETRY_AFTER_SECONDS}\r\n\r\n"
            )
            try:
                request.sendall(head.encode() + body)
                # Read what the client has sent so far: closing a socket with
                # unread data resets it, and a reset can lose the answer.
                while request.recv(65536, socket.MSG_DONTWAIT):
                    pass
            except OSError:  # nothing more to read now (or the client left)
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    """One connection: requests in turn, each dispatched to the `App`."""

    protocol_version = "HTTP/1.1"
    server_version = f"edgeslm/{__version__}"
    disable_nagle_algorithm = True  # every event goes out at once
    timeout = SOCKET_TIMEOUT
    server: Server

    def version_string(self) -> str:
        return self.server_version

    # --- dispatch -----------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        self._events = False  # True once an event stream has started
        self._dead = False  # True once a write to the client failed
        self._body_done = False  # True once the body is read, dropped or given up
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            self._route(method, path)
        except APIError as error:
            self._refuse(error)
        except QueueFull:
            self.server.app.count("rejected")
            error = APIError(
                429,
                f"the model is busy and {self.server.app.queue.max_waiting} "
                "requests are already waiting; retry later",
                code="queue_full",
                type="rate_limit_error",
            )
            self._refuse(error, {"Retry-After": str(RETRY_AFTER_SECONDS)})
        except ClientGone:
            log.debug("%s %s: client disconnected", method, path)
            self.close_connection = True
        except Exception:  # a bug: answer 500, keep serving
            log.exception("%s %s failed", method, path)
            self.server.app.count("failed")
            error = APIError(
                500, "internal error; see the server log", type="server_error"
            )
            self._refuse(error)

    def _refuse(self, error: APIError, headers: dict[str, str] | None = None) -> None:
        """Answer with an error, first dropping a body that was never read."""
        self._drop_body()
        self._send_error_object(error, headers)

    def _route(self, method: str, path: str) -> None:
        app = self.server.app
        methods = ROUTES.get(path)
        if methods is None and path.startswith("/v1/models/"):
            methods = {"GET": "model_card"}
        if methods is None:
            raise APIError(
                404, f"no endpoint {path}; see GET /v1/models", code="not_found"
            )
        if method not in methods:
            allowed = ", ".join(methods)
            raise APIError(
                405, f"{path} takes {allowed}, not {method}", code="method_not_allowed"
            )
        if path not in PUBLIC:
            self._authorize()

        name = methods[method]
        if method != "POST":
            self._drop_body()  # a GET reads no body: keep the connection in step
        if name == "model_card":
            self.send_json(app.model_card(path[len("/v1/models/") :]))
        elif method == "GET":
            self.send_json(getattr(app, name)())
        else:
            getattr(app, name)(self._read_json(), self)

    def handle_expect_100(self) -> bool:
        """Tell the client to send its body, unless the body is too large."""
        length = self._content_length()
        if length is not None and length > self.server.max_body_bytes:
            self._events = self._dead = False
            self.close_connection = True  # the body will not be read
            self._send_error_object(self._too_large(length))
            return False
        return super().handle_expect_100()

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise APIError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )

    def _read_json(self) -> Any:
        """The request body as JSON, with its size and syntax checked."""
        return _parse_json(self._read_body())

    def _read_body(self) -> bytes:
        """The request body, its framing and size checked.

        Raises:
            APIError: 411 without a usable Content-Length (the connection then
                closes), 413 over the body limit, 400 if the body ends early.
        """
        # A body of unknown length cannot be skipped: refuse it, close after.
        length = self._content_length()
        coding = self.headers.get("Transfer-Encoding")
        if coding is not None or length is None:
            self._body_done = True
            self.close_connection = True
            problem = (
                f"not Transfer-Encoding: {coding}"
                if coding is not None
                else f"got Content-Length {self.headers.get('Content-Length')!r}"
            )
            raise APIError(
                411,
                f"send the body with a Content-Length in bytes; {problem}",
                code="length",
            )

        # Too large: refused from the header (the body is then dropped or left).
        if length > self.server.max_body_bytes:
            raise self._too_large(length)

        # Read it whole.
        self._body_done = True
        raw = self.rfile.read(length)
        if len(raw) < length:
            self.close_connection = True
            raise APIError(400, "request body ended early", code="invalid_body")
        return raw

    def _too_large(self, length: int) -> APIError:
        return APIError(
            413,
            f"request body of {length} bytes is larger than this server's "
            f"limit of {self.server.max_body_bytes} (--max-body-kib)",
            code="body_too_large",
        )

    def _content_length(self) -> int | None:
        """The `Content-Length` header as a number; None if absent or malformed."""
        text = self.headers.get("Content-Length", "").strip()
        return int(text) if text.isascii() and text.isdigit() else None

    def _drop_body(self) -> None:
        """Read and drop a body no endpoint will read, before answering.

        Left unread, the body would be parsed as the next request on a keep-alive
        connection, and closing a socket with unread data resets it, which can
        lose the answer. A body up to the larger of the body limit and
        DRAIN_LIMIT is read; a larger, chunked or unmeasurable one is left, and
        the connection closes after the answer.
        """
        if self._body_done:
            return
        self._body_done = True

        # No body declared: nothing to do.
        framing = ("Content-Length", "Transfer-Encoding")
        if not any(name in self.headers for name in framing):
            return

        # A body of unknown or excessive length: give the connection up.
        length = self._content_length()
        limit = max(self.server.max_body_bytes, DRAIN_LIMIT)
        if "Transfer-Encoding" in self.headers or length is None or length > limit:
            self.close_connection = True
            return

        # Read it in pieces; a client that stops sending loses the connection.
        try:
            while length > 0:
                data = self.rfile.read(min(length, 1 << 16))
                if not data:
                    break
                length -= len(data)
        except OSError:  # a timeout or a reset
            pass
        if length > 0:
            self.close_connection = True

    # --- the Client protocol (edgeslm.serve.app) ----------------------------------

    def gone(self) -> bool:
        """True once the client has closed its end (or a write to it failed).

        A client that only shut down its sending side (`shutdown(SHUT_WR)`) looks
        the same over TCP as one that closed the socket, until a write is
        answered by a reset: both count as gone (docs/SERVER.md).
        """
        if self._dead:
            return True
        try:
            # poll, not select: select fails on descriptors >= 1024.
            poller = select.poll()
            poller.register(self.connection, select.POLLIN | select.POLLPRI)
            events = poller.poll(0)
            mask = events[0][1] if events else 0
            # A reset or a full shutdown; else EOF (a zero-byte peek) is the close.
            if mask & _POLL_HANGUP:
                self._dead = True
            elif mask and self.connection.recv(1, socket.MSG_PEEK) == b"":
                self._dead = True
        except OSError:
            self._dead = True
        return self._dead

    def send_json(self, body: dict[str, Any], status: int = 200, headers=None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self._write(lambda: (self.end_headers(), self.wfile.write(data)))

    def start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self._write(self.end_headers)
        self._events = True

    def send_event(self, data: dict[str, Any] | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        payload = f"data: {text}\n\n".encode()
        chunk = b"%x\r\n%s\r\n" % (len(payload), payload)
        if data == "[DONE]":
            chunk += b"0\r\n\r\n"  # the end of the chunked body
            self._events = False
        self._write(lambda: self.wfile.write(chunk))

    def _write(self, write) -> None:
        if self._dead:
            raise ClientGone
        try:
            write()
        except OSError as exc:  # broken pipe, reset, timeout
            self._dead = True
            self.close_connection = True
            raise ClientGone from exc

    # --- errors -------------------------------------------------------------------

    def _send_error_object(self, error: APIError, headers=None) -> None:
        where = f"{getattr(self, 'command', None)} {getattr(self, 'path', '')}"
        log.debug("%s: %d %s", where, error.status, error.message)
        try:
            if self._events:
                # The stream has started: the error becomes its last event.
                self.send_event(error.body())
                self.send_event("[DONE]")
            else:
                self.send_json(error.body(), error.status, headers)
        except ClientGone:
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain=None) -> None:
        """Errors found by http.server itself (bad request line, huge headers)."""
        self._events = self._dead = False
        self.close_connection = True
        # A request line too broken to name a version leaves http.server at
        # HTTP/0.9, which has no status line or headers: answer as HTTP/1.1.
        self.request_version = self.protocol_version
        text = message or self.responses.get(code, ("error",))[0]
        self._send_error_object(APIError(code, text, code="bad_request"))

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def _parse_json(raw: bytes) -> Any:
    """Strict JSON (no NaN or Infinity) from a request body.

    Raises:
        APIError: 400 saying what is wrong with the body, and where.
    """
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise APIError(400, f"body is not UTF-8 ({exc})", code="invalid_json") from exc
    except json.JSONDecodeError as exc:
        raise APIError(
            400,
            f"body is not valid JSON: {exc.msg} at line {exc.lineno} column "
            f"{exc.colno}",
            code="invalid_json",
        ) from exc
    except (ValueError, RecursionError) as exc:
        raise APIError(
            400, f"body is not valid JSON: {exc}", code="invalid_json"
        ) from exc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; send a number")
