"""The on-disk outbound queue (SQLite): requests and their device commands.

A request is written here, with all its commands, in one transaction before the bridge
acknowledges the MQTT message that carried it, so a command the bridge accepted
survives a broker outage and a bridge crash. Ids are primary keys: a request seen
twice is answered from here, never executed twice.

Used from the bridge's worker thread only (one connection, no locking needed).
Journal mode WAL with synchronous=FULL: a committed request survives a power cut.

    requests: id, text, reply_topic, correlation, status, reply (JSON), replied
    commands: id, request_id, device, action, value, expires_at, status
              (queued | done | failed | expired), result

Only what a restart needs is written: attempts and ack deadlines live in memory (after
a restart every open command is simply sent again, with the same id).

A request's `status` is "accepted" while its commands run and its final status once it
is closed (`reply` then holds the final reply). `replied` is set only when the broker
has acknowledged that final reply (PUBACK): a bridge killed between closing a request
and the broker taking its reply sends the reply again after the restart. Replies are
at least once (a requester keys them by id); device effects stay exactly once.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from firmware_bridge.commands import DeviceCommand

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    reply_topic TEXT,
    correlation BLOB,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    reply TEXT,
    replied INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    request_id TEXT NOT NULL REFERENCES requests(id),
    device TEXT NOT NULL,
    action TEXT NOT NULL,
    value REAL,
    expires_at REAL NOT NULL,
    status TEXT NOT NULL,
    result TEXT
);
CREATE INDEX IF NOT EXISTS commands_open ON commands(status) WHERE status = 'queued';
CREATE INDEX IF NOT EXISTS commands_request ON commands(request_id);
"""

FINAL = ("done", "failed", "expired")
OPEN = "accepted"  # a request's status while its commands run


@dataclass(frozen=True)
class StoredCommand:
    command: DeviceCommand
    status: str


class CommandStore:
    """SQLite-backed requests and commands; see the module docstring."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def request(self, request_id: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT id, text, reply_topic, correlation, status, reply, replied "
            "FROM requests WHERE id = ?",
            (request_id,),
        ).fetchone()
        if row is None:
            return None
        keys = (
            "id",
            "text",
            "reply_topic",
            "correlation",
            "status",
            "reply",
            "replied",
        )
        out = dict(zip(keys, row, strict=True))
        out["reply"] = None if out["reply"] is None else json.loads(out["reply"])
        out["closed"] = out["status"] != OPEN  # its final reply is stored
        return out

    def add(
        self,
        request_id: str,
        text: str,
        reply_topic: str | None,
        correlation: bytes | None,
        commands: list[DeviceCommand],
        status: str = OPEN,
        reply: dict[str, Any] | None = None,
    ) -> bool:
        """Store a request and its commands atomically; False if the id is known."""
        with self._tx():
            try:
                self._db.execute(
                    "INSERT INTO requests (id, text, reply_topic, correlation, "
                    "created, status, reply) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        request_id,
                        text,
                        reply_topic,
                        correlation,
                        time.time(),
                        status,
                        None if reply is None else json.dumps(reply),
                    ),
                )
            except sqlite3.IntegrityError:
                return False
            self._db.executemany(
                "INSERT INTO commands (id, request_id, device, action, value, "
                "expires_at, status) VALUES (?, ?, ?, ?, ?, ?, 'queued')",
                [
                    (c.id, c.request_id, c.device, c.action, c.value, c.expires_at)
                    for c in commands
                ],
            )
        return True

    def open_commands(self) -> list[StoredCommand]:
        """Commands without an outcome yet, oldest first."""
        rows = self._db.execute(
            "SELECT id, request_id, device, action, value, expires_at, status "
            "FROM commands WHERE status = 'queued' ORDER BY seq"
        ).fetchall()
        return [StoredCommand(DeviceCommand(*row[:6]), row[6]) for row in rows]

    def finish(self, command_id: str, status: str, result: dict[str, Any]) -> bool:
        """Close an open command; False if it was already closed (a late duplicate)."""
        with self._tx():
            cursor = self._db.execute(
                "UPDATE commands SET status = ?, result = ? WHERE id = ? "
                "AND status = 'queued'",
                (status, json.dumps(result), command_id),
            )
        return cursor.rowcount == 1

    def outcome(self, request_id: str) -> list[dict[str, Any]] | None:
        """The commands of a request when all are closed, else None."""
        rows = self._db.execute(
            "SELECT id, device, action, value, status, result FROM commands "
            "WHERE request_id = ? ORDER BY seq",
            (request_id,),
        ).fetchall()
        if any(r[4] not in FINAL for r in rows):
            return None
        keys = ("id", "device", "action", "value", "status")
        out = []
        for row in rows:
            item = dict(zip(keys, row[:5], strict=True))
            item.update(json.loads(row[5]) if row[5] else {})
            out.append(item)
        return out

    def close_request(
        self, request_id: str, status: str, reply: dict[str, Any]
    ) -> None:
        """Store a request's final status and reply (not yet `replied`: see
        `confirm_replies`)."""
        with self._tx():
            self._db.execute(
                "UPDATE requests SET status = ?, reply = ? WHERE id = ?",
                (status, json.dumps(reply), request_id),
            )

    def confirm_replies(self, request_ids: list[str]) -> None:
        """Mark final replies the broker acknowledged, in one commit."""
        if not request_ids:
            return
        with self._tx():
            self._db.executemany(
                "UPDATE requests SET replied = 1 WHERE id = ? AND status != ?",
                [(request_id, OPEN) for request_id in request_ids],
            )

    def unreplied(self) -> list[str]:
        """Requests whose commands all closed but whose final reply the broker has
        not acknowledged (never sent, or lost with a bridge killed meanwhile)."""
        rows = self._db.execute(
            "SELECT r.id FROM requests r WHERE r.replied = 0 AND NOT EXISTS ("
            "SELECT 1 FROM commands c WHERE c.request_id = r.id "
            "AND c.status = 'queued')"
        ).fetchall()
        return [r[0] for r in rows]

    def prune(self, older_than: float) -> int:
        """Forget answered requests older than `older_than` seconds; how many."""
        cutoff = time.time() - older_than
        with self._tx():
            old = "SELECT id FROM requests WHERE replied = 1 AND created < ?"
            self._db.execute(
                f"DELETE FROM commands WHERE request_id IN ({old})", (cutoff,)
            )
            cursor = self._db.execute(
                "DELETE FROM requests WHERE replied = 1 AND created < ?", (cutoff,)
            )
        return cursor.rowcount

    def counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT status, COUNT(*) FROM commands GROUP BY status")
        return dict(rows.fetchall())

    def transaction(self) -> _Transaction:
        """Group several calls into one commit (one disk flush).

        Use as `with store.transaction():`.
        """
        return _Transaction(self._db)

    _tx = transaction


class _Transaction:
    """BEGIN/COMMIT, or nothing when a transaction is already open (nesting)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.outer = False

    def __enter__(self) -> None:
        self.outer = not self.db.in_transaction
        if self.outer:
            self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.outer:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
