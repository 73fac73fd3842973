"""Test tooling built on the core: pytest export now, fault injection later; never imported by the core itself."""
