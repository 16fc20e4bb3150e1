"""Test brokers: real mosquitto processes on free ports with generated configs.

`Mosquitto(tmp)` writes a config (persistence on, so a killed-and-restarted broker keeps
sessions and queued messages it saved), starts the process and waits for the port.
`secure=True` adds a TLS listener with a test CA, a password file and an ACL, and
turns anonymous access off.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"mosquitto did not open port {port}")


class Mosquitto:
    """One mosquitto process; `start`, `kill` (SIGKILL), `stop` (SIGTERM), `restart`."""

    def __init__(self, folder: Path, secure: bool = False) -> None:
        if not Path(MOSQUITTO).exists():
            raise RuntimeError(
                "mosquitto is not installed: "
                "apt-get install -y mosquitto mosquitto-clients"
            )
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port() if secure else None
        self.secure = secure
        self.proc: subprocess.Popen | None = None
        self.users: dict[str, str] = {}
        lines = [
            "user root",
            "persistence true",
            f"persistence_location {self.folder}/",
            "autosave_interval 1",
            "autosave_on_changes false",
            f"log_dest file {self.folder}/mosquitto.log",
            "log_type error",
            "log_type warning",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            "message_size_limit 2000000",
            "set_tcp_nodelay true",
            f"listener {self.port} 127.0.0.1",
        ]
        if secure:
            from bridge.tls import make_test_pki

            self.pki = make_test_pki(self.folder / "pki")
            self.users = {
                "bridge": "bridge-secret",
                "device": "device-secret",
                "observer": "observer-secret",
            }
            self._password_file()
            acl = self.folder / "acl"
            acl.write_text(
                "user bridge\n"
                "topic readwrite edgeslm/#\n"
                "topic readwrite hermes/#\n"
                "topic readwrite homeassistant/#\n"
                "topic write home/#\n"
                "topic read home/#\n"
                "user device\n"
                "topic readwrite home/#\n"
                "topic readwrite edgeslm/+/bridge/+/ack\n"
                "topic write edgeslm/+/command\n"
                "topic read edgeslm/+/reply\n"
                "user observer\n"
                "topic read #\n"
            )
            lines += [
                "allow_anonymous false",
                f"password_file {self.folder}/passwd",
                f"acl_file {acl}",
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {self.pki['ca']}",
                f"certfile {self.pki['cert']}",
                f"keyfile {self.pki['key']}",
                "allow_anonymous false",
                f"password_file {self.folder}/passwd",
                f"acl_file {acl}",
            ]
            lines.insert(0, "per_listener_settings true")
        else:
            lines.append("allow_anonymous true")
        self.conf = self.folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def _password_file(self) -> None:
        path = self.folder / "passwd"
        path.write_text("".join(f"{u}:{p}\n" for u, p in self.users.items()))
        subprocess.run(["mosquitto_passwd", "-U", str(path)], check=True, timeout=30)

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _wait_port(self.port)
            if self.tls_port:
                _wait_port(self.tls_port)
        except TimeoutError:
            self.proc.kill()
            err = self.proc.communicate()[1].decode(errors="replace")
            log = self.folder / "mosquitto.log"
            detail = log.read_text() if log.exists() else ""
            raise RuntimeError(f"mosquitto failed to start: {err} {detail}") from None
        return self

    def kill(self) -> None:
        """SIGKILL: no goodbye, whatever was not autosaved is lost."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
