"""Remote targets: the TapML wire protocol, `tapml serve`, the `remote` client backend and the browser target.

The host keeps the model and the reference; a device runs a small server (or a browser page) that executes
op calls on its backend. Only data crosses the wire (docs/PROTOCOL.md).
"""
