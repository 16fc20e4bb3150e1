"""The one model on the board, shared by requests in arrival order.

`ModelQueue` lets one request at a time use the models (the decoder and the
encoder share the board's cores, so they share one turn too). Requests wait in
first-come order; when `max_waiting` are already waiting, the next is refused at
once (the server answers 429). A waiting request whose client has gone leaves the
queue at its next check, so an abandoned request never runs.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# How often a waiting request checks whether its client is still there (seconds).
POLL_SECONDS = 0.2


class QueueFull(Exception):
    """`max_waiting` requests are already waiting."""


class ClientGone(Exception):
    """The client disconnected while its request waited."""


@dataclass
class QueueState:
    """A snapshot for /health: requests running and waiting, and the limit."""

    running: int
    waiting: int
    max_waiting: int


class ModelQueue:
    """First-come turns on the model, with a bounded waiting line.

    Args:
        max_waiting: requests that may wait while one runs (0: none wait; a
            request that finds the model busy is refused).
    """

    def __init__(self, max_waiting: int) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._line: deque[object] = deque()  # tickets of waiting requests, in order
        self._busy = False

    def state(self) -> QueueState:
        with self._cond:
            return QueueState(int(self._busy), len(self._line), self.max_waiting)

    @contextmanager
    def turn(self, gone: Callable[[], bool] = lambda: False) -> Iterator[None]:
        """Hold the model for the `with` block.

        Args:
            gone: True once the client has disconnected; checked while waiting.

        Raises:
            QueueFull: the waiting line is full.
            ClientGone: the client left before its turn came.
        """
        ticket = object()
        with self._cond:
            if self._busy or self._line:
                if len(self._line) >= self.max_waiting:
                    raise QueueFull
            self._line.append(ticket)
            try:
                while self._busy or self._line[0] is not ticket:
                    self._cond.wait(POLL_SECONDS)
                    if gone():
                        raise ClientGone
            finally:
                self._line.remove(ticket)
                self._cond.notify_all()
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
