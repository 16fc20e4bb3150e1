"""Socket settings shared by every MQTT client of the bridge, its simulator and tools.

MQTT exchanges are small messages answered by small messages, the case Nagle's
algorithm delays: with it on, a device's PUBACK followed by its ack waits for the
broker's delayed TCP ACK, about 40 ms per hop on Linux. `low_latency` turns it off
on the client's socket each time one opens (the broker side is mosquitto's
`set_tcp_nodelay true`, docs/BRIDGE.md).
"""

from __future__ import annotations

import logging
import socket

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)


def low_latency(client: mqtt.Client) -> None:
    """Set TCP_NODELAY on `client`'s socket whenever it connects (TLS included)."""

    def on_socket_open(client: mqtt.Client, userdata: object, sock: object) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError) as exc:  # not a TCP socket (e.g. a proxy)
            log.debug("TCP_NODELAY not set: %s", exc)

    client.on_socket_open = on_socket_open
