"""Placement: which op calls of a run go to the target backend (the rest run on the reference).

Every criterion that is set must hold (they combine with AND); an unset criterion matches everything.
Calls are identified the same way in every run of a workload: `call` is the position in the whole run,
`op_index` the n-th call of that overload (both from 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from tapml.ops import op_kind


@dataclass(frozen=True)
class Placement:
    ops: frozenset[str] | None = None  # overloads, op kinds (aten.mm) or fnmatch patterns
    modules: tuple[str, ...] | None = None  # module-path globs, e.g. "model.layers.3.*"
    phases: tuple[str, ...] | None = None  # "prefill", "decode:2", "decode:*", "forward"
    calls: range | None = None  # positions in the whole run
    op_indices: range | None = None  # per-overload counts (useful with one op in `ops`)
    instances: frozenset[int] | None = None  # explicit positions in the run
    everything: bool = False
    nothing: bool = False

    @classmethod
    def all(cls) -> Placement:
        return cls(everything=True)

    @classmethod
    def none(cls) -> Placement:
        return cls(nothing=True)

    def selects(self, op: str, module: str, phase: str, call: int, op_index: int) -> bool:
        if self.nothing:
            return False
        if self.everything:
            return True
        if self.calls is not None and call not in self.calls:
            return False
        if self.instances is not None and call not in self.instances:
            return False
        if self.op_indices is not None and op_index not in self.op_indices:
            return False
        if self.ops is not None and not any(op == p or op_kind(op) == p or fnmatchcase(op, p)
                                            for p in self.ops):
            return False
        if self.modules is not None and not any(fnmatchcase(module, g) for g in self.modules):
            return False
        return self.phases is None or any(fnmatchcase(phase, g) for g in self.phases)

    def describe(self) -> str:
        if self.nothing:
            return "nothing (reference only)"
        if self.everything:
            return "every op"
        parts = []
        if self.ops is not None:
            parts.append("ops " + ",".join(sorted(self.ops)))
        if self.modules is not None:
            parts.append("modules " + ",".join(self.modules))
        if self.phases is not None:
            parts.append("phases " + ",".join(self.phases))
        if self.calls is not None:
            parts.append(f"calls [{self.calls.start}, {self.calls.stop})")
        if self.op_indices is not None:
            parts.append(f"instances [{self.op_indices.start}, {self.op_indices.stop}) of the op")
        if self.instances is not None:
            parts.append(f"{len(self.instances)} explicit calls")
        return "; ".join(parts) or "every op"
