"""Test tooling built on the core: standalone pytest files exported from a store (`tapml export-pytest`).
It must never be imported by the core."""
