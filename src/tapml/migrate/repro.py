"""Repro files: the culprit op of a localization, with its real (drifted) inputs saved in a case store, as a
standalone pytest file that replays it on the target. Knows nothing of strategies; reads a Localization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tapml.carve import Workload, carve
from tapml.errors import TapmlError
from tapml.migrate.localize import Localization
from tapml.ops import resolve_op


class _OneCall(torch.nn.Module):
    """A module whose forward is exactly one op call: carving it stores that call as a case."""

    def __init__(self, op: str, args: tuple, kwargs: dict):
        super().__init__()
        self.func, self.args, self.kwargs = resolve_op(op), args, kwargs

    def forward(self) -> Any:
        return self.func(*self.args, **self.kwargs)


def save_culprit(result: Localization, store: str | Path) -> int:
    """Write the culprit call (its inputs as the target saw them, the reference's outputs on them) into
    `store`; returns the case id."""
    c = result.culprit
    if c is None or result.culprit_inputs is None:
        raise TapmlError("no culprit with recorded inputs to save (the localizer found no divergence)")
    args, kwargs = result.culprit_inputs
    mod = _OneCall(c.op, args, kwargs)
    work = Workload(mod, mod, False, f"culprit {c.op}@{c.index} (call {c.call}, {c.module}, {c.phase}) of "
                    f"{result.model} on {result.target}")
    carve(f"{result.model}:culprit", store, workload=work, progress=False)
    from tapml.store import CaseStore

    with CaseStore.open(store) as st:
        ids = [case.id for case in st.cases() if case.op == c.op]
    if not ids:
        raise TapmlError(f"{c.op} could not be stored as a case (see `tapml show {store}`)")
    return ids[-1]


_TEMPLATE = '''"""Repro: {op} instance @{index} (call {call} of the run; module {module}; phase {phase}) breaks {model}
on backend {backend!r}{fault_note}. Its real inputs, as the target received them, are in the case store
{store}. Written by `tapml repro`; `pytest {name}` fails while the bug is there.

Localization verdict: {verdict} (local error {local}, accumulated error {acc}).
"""

import pytest

from tapml.backends import get_backend
from tapml.backends.reference import Float64Backend
from tapml.ops import Provenance
from tapml.replay import check_sample
from tapml.store import CaseStore

STORE = {store!r}
CASE_ID = {case_id!r}
BACKEND = {backend!r}
FAULT = {fault!r}  # the fault injected with --inject, None for a real target
PROVENANCE = Provenance(0, {module!r}, {phase!r}, {call!r}, {index!r})


@pytest.fixture(scope="module")
def backend():
    be = get_backend(BACKEND)
    if FAULT:
        from tapml.testing.faults import FaultyBackend, parse_fault

        be = FaultyBackend(be, parse_fault(FAULT))
    yield be
    be.close()


def test_culprit_matches_the_reference_on_its_real_inputs(backend):
    with CaseStore.open(STORE) as store:
        case = next(c for c in store.cases() if c.id == CASE_ID)
        call = store.load_call(case, store.samples(case.id)[0])
    call.provenance = PROVENANCE
    status, verdict, reason = check_sample(backend, Float64Backend(narrow=False), case, call)
    if status == "unsupported":
        pytest.skip(reason)
    assert status == "pass", f"{{case.op}}: {{status}}: {{reason}} {{verdict.metrics if verdict else ''}}"
'''


def write_repro(result: dict[str, Any], out: str | Path) -> Path:
    """Write the pytest file for the culprit of a localization (its JSON as `tapml migrate --json` wrote it)."""
    c = result.get("culprit")
    store = result.get("culprit_store")
    if not c:
        raise TapmlError("the localization found no culprit: nothing to reproduce")
    if not store or not Path(store, "cases.sqlite").exists():
        raise TapmlError("the localization has no culprit store; rerun `tapml migrate` with --json FILE")
    out = Path(out)
    text = _TEMPLATE.format(
        op=c["op"], index=c["index"], call=c["call"], module=c["module"], phase=c["phase"], model=result["model"],
        backend=result["backend"], fault=result.get("inject"), store=str(Path(store).resolve()),
        case_id=result["culprit_case"], name=out.name, verdict=c.get("verdict", ""),
        local=_fmt(c.get("local_error")), acc=_fmt(c.get("accumulated_error")),
        fault_note=f" with the injected fault {result['inject']}" if result.get("inject") else "")
    from tapml.report import write_atomic

    write_atomic(out, text)
    return out


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def load_result(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise TapmlError(f"{p}: no such file; pass the JSON written by `tapml migrate --json FILE`")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TapmlError(f"{p}: not a tapml migrate result ({e})") from None
    if not isinstance(data, dict) or "culprit" not in data or "strategy" not in data:
        raise TapmlError(f"{p}: not a tapml migrate result (no culprit/strategy fields)")
    return data
