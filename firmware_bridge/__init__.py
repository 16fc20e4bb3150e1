"""MQTT bridge from recognized intents to device firmware.

Empty for now: the bridge is built on top of the intent layer in a later issue.
"""
