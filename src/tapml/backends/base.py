"""The Backend interface: what every backend implements and everything the core reads of one. It must not know
the registry, stores, verdicts or reports."""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from tapml.errors import UnknownOp
from tapml.ops import OpCall


class Backend:
    """Runs ATen op calls. Subclasses set `name`, implement `run`, and may refine the rest.

    Residency: `upload` turns a host tensor into whatever the backend keeps (a device buffer), `download`
    turns it back; `run` takes a call whose tensor leaves are such handles and returns handles, so a chain
    of target ops keeps its tensors on the device. `execute` is the host-in/host-out convenience.

    Everything the core reads of a backend is declared here: `name`, `description`, `device` (where it runs, for
    reports), `replays_torch_rng` (it replays a seeded random op's recorded CPU generator state exactly; others
    report those cases unsupported), `int64_bits()`, `supported_ops()`, `compiles_ahead`, and the methods below.
    """

    name = "?"
    description = ""
    device: object = None
    replays_torch_rng = False

    def int64_bits(self) -> int:
        """The width its int64 tensors really hold (32 where int64 is narrowed, as WebGPU without shader-int64
        does): amplified variants that move int64 values past that range are out of its declared domain."""
        return 64

    def supported_ops(self) -> list[str] | None:
        """The op overloads it can run, when it knows them up front (None: ask `supports` per call)."""
        return None

    @classmethod
    def unavailable(cls) -> str | None:
        """None when this backend can run here, else the reason it cannot (missing package, no device)."""
        return None

    def supports(self, call: OpCall) -> str | None:
        """None when `call` can run, else why not (reported as `unsupported`, never as pass)."""
        try:
            call.func()
        except UnknownOp as e:  # not an ATen overload of this torch (e.g. a TVM kernel case)
            return str(e)
        return None

    # True when `prepare` does work: the replay then hands it the calls it is about to run.
    compiles_ahead = False

    def prepare(self, calls: list[OpCall]) -> None:
        """A hint before `calls` run: a compiling backend may compile what they need together (many per
        compile). It changes no verdict; every call still goes through `supports` and `run`."""

    def upload(self, t: torch.Tensor) -> Any:
        return t

    def download(self, h: Any) -> torch.Tensor:
        return h

    def run(self, call: OpCall) -> Any:
        raise NotImplementedError

    def execute(self, call: OpCall) -> Any:
        """Upload the call's tensors, run it, download the outputs as CPU tensors."""
        args, kwargs = pytree.tree_map_only(torch.Tensor, self.upload, (call.args, call.kwargs))
        staged = OpCall(call.op, args, kwargs, None, call.provenance, call.rng_state)
        out = self.run(staged)
        return pytree.tree_map(lambda x: self.download(x) if self.is_handle(x) else x, out)

    def is_handle(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def close(self) -> None:
        """Release device resources."""
