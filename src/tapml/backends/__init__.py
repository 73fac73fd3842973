"""The backend registry: the `Backend` interface (base.py), the entry points (`tapml.backends`) through which every
backend is found, and `open_backend`, the one way to open a target (here, remote, or with an injected fault).

A backend runs OpCalls; it must not know about stores, verdicts or reports. Built-ins register the same way
third-party backends do, in pyproject's `[project.entry-points."tapml.backends"]`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from tapml.backends.base import Backend
from tapml.backends.faults import Fault, FaultyBackend, parse_fault
from tapml.errors import TapmlError, first_line

__all__ = ["GROUP", "Backend", "BackendInfo", "backend_class", "get_backend", "open_backend", "registered"]

GROUP = "tapml.backends"


@dataclass
class BackendInfo:
    name: str
    target: str  # "module:Class"
    available: bool
    reason: str | None
    description: str


def _entry_points() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def registered() -> list[BackendInfo]:
    """Every installed backend, whether it can run here, and why not when it cannot."""
    out = []
    for name, ep in sorted(_entry_points().items()):
        try:
            cls = ep.load()
            reason = cls.unavailable()
            desc = cls.description
        except Exception as e:  # a broken third-party plug-in must not break the listing
            reason, desc = f"failed to load {ep.value}: {type(e).__name__}: {e}", ""
        out.append(BackendInfo(name, ep.value, reason is None, reason, desc))
    return out


def backend_class(name: str) -> type[Backend]:
    """The class registered as `name`, checked usable here; a one-line TapmlError when unknown or unusable."""
    eps = _entry_points()
    if name not in eps:
        raise TapmlError(f"unknown backend {name!r}; installed: {', '.join(sorted(eps))} (see `tapml backends`)")
    try:
        cls = eps[name].load()
    except Exception as e:
        raise TapmlError(f"backend {name} failed to load: {type(e).__name__}: {e}") from None
    reason = cls.unavailable()
    if reason:
        raise TapmlError(f"backend {name} is not usable here: {reason}")
    return cls


def get_backend(name: str, **options: Any) -> Backend:
    """Instantiate the backend registered as `name`; a one-line TapmlError when unknown, unusable, or given an
    option it does not take."""
    cls = backend_class(name)
    try:
        return cls(**options)
    except TypeError as e:
        if options and "argument" in str(e):
            raise TapmlError(f"backend {name} does not take the option(s) {', '.join(sorted(options))} "
                             f"({first_line(e)})") from None
        raise


def open_backend(name: str, *, remote: str | None = None, token_file: str | os.PathLike | None = None,
                 inject: str | Fault | None = None, **options: Any) -> Backend:
    """The one way to open a target: the backend registered as `name` here, or with `remote` (ws://HOST:PORT)
    the one `tapml serve` hosts there (`name` "remote" takes whatever it hosts; another name must match it),
    wrapped with a known fault when `inject` is given (a spec such as `noise:aten.mm.default@3`, or a Fault).
    `options` go to the backend's constructor; for a remote one they are set where it is served."""
    fault = parse_fault(inject) if isinstance(inject, str) else inject
    if fault is not None and not isinstance(fault, Fault):
        raise TapmlError(f"inject must be a fault spec such as noise:aten.mm.default@3, not {type(inject).__name__}")
    if remote is not None:
        if options:
            raise TapmlError(f"options for backend {name} ({', '.join(sorted(options))}) are set where it is "
                             "served (`tapml serve --option KEY=VALUE`), not with --remote")
        backend = get_backend("remote", url=remote, token_file=token_file, expect=None if name == "remote" else name)
    elif name == "remote":
        backend = get_backend("remote", token_file=token_file, **options)
    else:
        if token_file is not None:
            raise TapmlError(f"--token-file is for a remote target; backend {name} runs here (add --remote URL)")
        backend = get_backend(name, **options)
    return FaultyBackend(backend, fault) if fault is not None else backend
