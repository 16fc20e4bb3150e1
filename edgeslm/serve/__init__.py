"""An OpenAI-compatible HTTP API for the model on the board: `edgeslm serve`.

    from edgeslm.serve import App, Server
    server = Server(App(edgeslm.load("./pkg")), "127.0.0.1", 8080, api_key=None)
    server.serve_forever()

Endpoints: `POST /v1/chat/completions` (streaming, JSON schema, tools),
`POST /v1/completions`, `POST /v1/embeddings` (with an encoder), `GET /v1/models`,
`GET /health`. docs/SERVER.md describes the fields, the errors and the queue.

The modules: `protocol` checks request bodies, `tools` maps tool calls onto
constraints, `queue` shares the model, `app` holds the endpoints, `httpd` is the
transport (the standard library's threaded HTTP server).

Not yet: several models per server; batching concurrent requests; CORS headers for
browser clients; TLS (put a reverse proxy in front for that).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edgeslm.serve.app import App
from edgeslm.serve.httpd import Server

__all__ = ["App", "Server", "load_app"]

log = logging.getLogger(__name__)

# The name /v1/models gives `--encoder default`.
DEFAULT_ENCODER_ID = "all-MiniLM-L6-v2"


def load_app(
    model: str | None,
    *,
    encoder: str | None = None,
    n_threads: int | None = None,
    n_ctx: int | None = None,
    max_waiting: int = 4,
) -> App:
    """Load what the server serves.

    Args:
        model: a chat model (anything `edgeslm.load` takes; None: the default
            model) or an encoder package, which is then served alone.
        encoder: an encoder for /v1/embeddings next to the chat model: an encoder
            package, a BERT folder, or "default" for all-MiniLM-L6-v2.
        n_threads: onnxruntime threads for the chat model.
        n_ctx: the chat model's context length.
        max_waiting: requests that may wait for the model; beyond, 429.
    """
    import edgeslm
    from edgeslm.encoder import load_encoder

    if model is not None and _is_encoder_package(Path(model)):
        if encoder is not None:
            raise ValueError(f"{model} is an encoder; give a chat model with --encoder")
        enc = load_encoder(model)
        return App(encoder=enc, encoder_id=Path(model).name, max_waiting=max_waiting)

    chat_model = edgeslm.load(model, n_threads=n_threads, n_ctx=n_ctx)
    enc = None
    encoder_id = "edgeslm-encoder"
    if encoder is not None:
        enc = load_encoder(None if encoder == "default" else encoder)
        # The default is exported into the cache under a hashed folder name.
        encoder_id = DEFAULT_ENCODER_ID if encoder == "default" else Path(encoder).name
    return App(
        chat_model,
        enc,
        model_id=chat_model.path.name,
        encoder_id=encoder_id,
        max_waiting=max_waiting,
    )


def _is_encoder_package(path: Path) -> bool:
    manifest = path / "edgeslm.json"
    if not manifest.is_file():
        return False
    try:
        data: Any = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # edgeslm.load reports a broken manifest properly
    return isinstance(data, dict) and data.get("kind") == "encoder"
