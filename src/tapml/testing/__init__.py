"""Test tooling built on the core: standalone pytest files exported from a store (`tapml export-pytest`); never imported by the core itself."""
