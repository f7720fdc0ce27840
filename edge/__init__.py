"""tillsight edge daemon: camera -> face -> age -> MQTT.

One module per pipeline stage: capture, detect, crop, infer, track, policy,
publish; `service` wires them together and `cli` is the command line.
"""

__version__ = "0.1.0"
