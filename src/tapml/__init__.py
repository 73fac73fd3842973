"""TapML: carve real operator tests from a model run on a reference, replay them on a target backend, migrate the
model op by op and name the first op instance that breaks it.

The front door (imported lazily, so `import tapml` and `tapml --help` stay fast):

    tapml.carve(model, out)                     record every op call of a run into a case store
    tapml.run_tests(store, backend)             replay a store on a backend, judged against an fp64 oracle
    tapml.migrate(model, target=...)            localize the first op instance that breaks the result
    tapml.debug(model, target=...)              carve, test, migrate, localize, report in one call
    tapml.open_backend(name, remote=..., inject=...)    the one way to open a target
    tapml.CaseStore, tapml.Placement, tapml.Workload, tapml.load_workload, tapml.TapmlError
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from tapml.errors import TapmlError

__version__ = "0.1.0"

_LAZY = {
    "carve": "tapml.recorder",
    "run_tests": "tapml.replay",
    "migrate": "tapml.migration.localize",
    "debug": "tapml.migration.debug",
    "open_backend": "tapml.backends",
    "CaseStore": "tapml.store",
    "Placement": "tapml.migration.placement",
    "Workload": "tapml.workload",
    "load_workload": "tapml.workload",
}

__all__ = ["CaseStore", "Placement", "TapmlError", "Workload", "__version__", "carve", "debug", "load_workload",
           "migrate", "open_backend", "run_tests"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tapml' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
