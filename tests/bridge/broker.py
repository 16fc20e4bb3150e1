"""Test brokers: real mosquitto processes on free ports with generated configs.

`Mosquitto(tmp)` writes a config (persistence on, so a killed-and-restarted broker keeps
sessions and queued messages it saved), starts the process and waits for the port.
`secure=True` adds a TLS listener with a test CA, a password file and an ACL, and
turns anonymous access off. `dynsec=` replaces the password file and ACL file with
mosquitto's dynamic security plugin and the given ACLs: unlike an ACL file (checked
when a message is delivered), it refuses a SUBSCRIBE it does not allow in the SUBACK.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from glob import glob
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


# dynamic security ACLs: user -> [(acltype, topic)], each allowed, e.g.
# ("subscribePattern", "edgeslm/#"); everything else gets dynsec's defaults (no
# publishing, no subscribing)
DynsecAcls = dict[str, list[tuple[str, str]]]


def dynsec_plugin() -> str:
    """The path of mosquitto's dynamic security plugin (packaged with mosquitto)."""
    for pattern in (
        "/usr/lib/*/mosquitto_dynamic_security.so",
        "/usr/lib/mosquitto_dynamic_security.so",
        "/usr/local/lib/mosquitto_dynamic_security.so",
    ):
        found = sorted(glob(pattern))
        if found:
            return found[0]
    raise RuntimeError(
        "mosquitto_dynamic_security.so not found: it ships with mosquitto 2.0 "
        "(apt-get install -y mosquitto)"
    )


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

    def __init__(
        self, folder: Path, secure: bool = False, dynsec: DynsecAcls | None = None
    ) -> None:
        if not Path(MOSQUITTO).exists():
            raise RuntimeError(
                "mosquitto is not installed: "
                "apt-get install -y mosquitto mosquitto-clients"
            )
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        secure = secure or dynsec is not None
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
        if dynsec is not None:
            self._test_users()
            lines[-1:-1] = self._dynsec(dynsec)  # global: before the first listener
            lines += self._tls_listener()
        elif secure:
            self._test_users()
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
                *self._tls_listener(),
                "allow_anonymous false",
                f"password_file {self.folder}/passwd",
                f"acl_file {acl}",
            ]
            lines.insert(0, "per_listener_settings true")
        else:
            lines.append("allow_anonymous true")
        self.conf = self.folder / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def _test_users(self) -> None:
        """The test CA and certificate, and the users with their passwords."""
        from bridge.tls import make_test_pki

        self.pki = make_test_pki(self.folder / "pki")
        self.users = {
            "bridge": "bridge-secret",
            "device": "device-secret",
            "observer": "observer-secret",
        }

    def _tls_listener(self) -> list[str]:
        return [
            f"listener {self.tls_port} 127.0.0.1",
            f"cafile {self.pki['ca']}",
            f"certfile {self.pki['cert']}",
            f"keyfile {self.pki['key']}",
        ]

    def _dynsec(self, acls: DynsecAcls) -> list[str]:
        """Write the dynamic security file (a role per user); its config lines."""
        clients, roles = [], []
        for user, password in self.users.items():
            salt = os.urandom(12)
            digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
            clients.append(
                {
                    "username": user,
                    "password": base64.b64encode(digest).decode(),
                    "salt": base64.b64encode(salt).decode(),
                    "iterations": 101,
                    "roles": [{"rolename": user}],
                }
            )
            allowed = acls.get(user, [])
            roles.append(
                {
                    "rolename": user,
                    "acls": [
                        {"acltype": kind, "topic": topic, "allow": True}
                        for kind, topic in allowed
                    ],
                }
            )
        config = {
            "clients": clients,
            "roles": roles,
            "defaultACLAccess": {
                "publishClientSend": False,
                "publishClientReceive": True,
                "subscribe": False,
                "unsubscribe": True,
            },
        }
        path = self.folder / "dynamic-security.json"
        path.write_text(json.dumps(config, indent=1))
        return [
            "allow_anonymous false",
            f"plugin {dynsec_plugin()}",
            f"plugin_opt_config_file {path}",
        ]

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
