"""The MQTT bridge: spoken or typed commands to devices that acknowledge them.

    edgeslm bridge --config bridge.yaml        (docs/BRIDGE.md)

Modules: `service` (the bridge: MQTT in and out, the worker), `intake` (messages to
recognized requests) and `delivery` (commands on the wire, acks, replies), `requests`
(what the command topic accepts), `recognizer` (text to intent), `commands` (the
safety gate against the registry), `adapters` (JSON protocol, Zigbee2MQTT, Tasmota,
Home Assistant discovery), `store` (the SQLite outbound queue), `hermes` (Rhasspy's
NLU protocol), `protocol` (the JSON command/ack protocol and its reference device,
docs/PROTOCOL.md), `simulator` (simulated devices), `config`, `cli`, `demo`.
`device/` holds the protocol's device side in C for firmware authors.

Not yet: devices announced to Home Assistant (only the bridge's own entities are),
colour and media intents, coordination between bridges commanding one device.
"""
