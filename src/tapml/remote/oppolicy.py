"""Which operators `tapml serve` runs for a client: an allow-list of ATen overloads that are pure tensor
computations, and a deny-list that no list or flag can override (docs/SECURITY.md).

It only answers "may this op name run here, and if not, why"; it must not resolve names it has not allowed.
"""

from __future__ import annotations

import fnmatch
from functools import cache
from pathlib import Path

import torch

from tapml.errors import TapmlError

ALLOWED_FILE = Path(__file__).with_name("allowed_ops.txt")

# Refused by name whatever an allow-list says: each reaches something other than the tensors a client sent.
# Patterns match the op without its overload (`aten.from_file`).
DENIED: dict[str, str] = {
    "aten.from_file": "reads and writes files on the server",
    "aten._print": "writes to the server's log",
    "aten.*seed*": "reseeds the server's random generator",
    "aten.set_": "points a tensor at arbitrary storage",
    "aten.set_data": "points a tensor at arbitrary storage",
    "aten._reshape_alias*": "builds a view without checking it against its storage",
    "aten.resize*": "grows a storage without initializing it",
    "aten._resize_output*": "grows a storage without initializing it",
    "aten._copy_from_and_resize": "grows a storage without initializing it",
    "aten.sparse_resize*": "grows a storage without initializing it",
    "aten._unsafe_index*": "indexes without bounds checks",
    "aten._unsafe_masked_index*": "indexes without bounds checks",
    "aten.*_unsafe": "builds tensors without invariant checks",
    "aten._nested_view_from_buffer*": "builds a view without checking it against its storage",
    "aten._nested_*": "nested tensors built from raw offsets",
    "aten.record_stream": "manipulates the device allocator",
    "aten._cufft_*": "changes process-wide library state",
    "aten._cudnn_init_dropout_state": "changes process-wide library state",
    "aten._fw_primal*": "forward-mode autograd internals",
    "aten.*pin_memory": "pins host memory",
    "aten.empty_quantized": "returns uninitialized memory",
    "aten._empty_*quantized": "returns uninitialized memory",
    "aten._make_per_*": "builds quantized tensors from raw storage",
}

_OP_NAME_PARTS = 3


def denied_reason(name: str) -> str | None:
    """Why `name` (namespace.op.overload) is denied whatever the lists say, or None."""
    kind = name.rsplit(".", 1)[0] if name.count(".") >= _OP_NAME_PARTS - 1 else name
    for pattern, why in DENIED.items():
        if fnmatch.fnmatchcase(kind, pattern):
            return why
    return None


def read_list(path: str | Path) -> set[str]:
    """Op names from a file, one per line (`#` starts a comment); a TapmlError naming the bad line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TapmlError(f"cannot read the op list {p}: {getattr(e, 'strerror', None) or e}") from None
    names = set()
    for i, line in enumerate(text.splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if name.count(".") != _OP_NAME_PARTS - 1 or not name.startswith(("aten.", "prims.")):
            raise TapmlError(f"{p}:{i}: {name[:80]!r} is not an ATen overload name (aten.OP.OVERLOAD, e.g. "
                             "aten.mm.default)")
        why = denied_reason(name)
        if why:
            raise TapmlError(f"{p}:{i}: {name} cannot be allowed: it {why}")
        names.add(name)
    return names


@cache
def shipped() -> frozenset[str]:
    """The shipped allow-list (scripts/allowlist.py writes it)."""
    return frozenset(read_list(ALLOWED_FILE))


class OpPolicy:
    """The allow-list one server applies: the shipped list plus what `--allow-ops FILE` adds."""

    def __init__(self, extra: set[str] | frozenset[str] = frozenset()):
        self.allowed = shipped() | frozenset(extra)

    @classmethod
    def from_files(cls, files: list[str | Path] | None = None) -> OpPolicy:
        extra: set[str] = set()
        for f in files or ():
            extra |= read_list(f)
        return cls(extra)

    def refusal(self, name: str) -> str | None:
        """None when `name` may run, else a one-line reason for the client."""
        why = denied_reason(name)
        if why:
            return f"op {name} is refused by this server: it {why}"
        if name not in self.allowed:
            return (f"op {name} is not on this server's allow-list (pure tensor computations only); if it is one, "
                    "start `tapml serve` with --allow-ops FILE naming it (docs/SECURITY.md)")
        return None

    def __len__(self) -> int:
        return len(self.allowed)


def resolvable(names: frozenset[str] | set[str]) -> int:
    """How many of `names` exist in this torch (the figure the security note reports)."""
    n = 0
    for name in names:
        ns, op, overload = name.split(".")
        try:
            getattr(getattr(getattr(torch.ops, ns), op), overload)
            n += 1
        except (AttributeError, RuntimeError):
            pass
    return n
