"""Repro files: the culprit op of a localization, with its real (drifted) inputs saved in a case store, as a
standalone pytest file that replays it on the target; and the files of `tapml migrate --json`.

Knows nothing of strategies; reads a Localization or its JSON. The JSON is untrusted input (anyone may hand
over a crafted one): its fields are validated, and the pytest file carries them only as Python literals
(repr of checked strings and integers), never spliced into code, comments or docstrings.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tapml.errors import TapmlError
from tapml.ops import resolve_op
from tapml.paths import check_output_dir, check_output_file, check_path, same_file, short
from tapml.recorder import carve
from tapml.workload import Workload

if TYPE_CHECKING:
    from tapml.migration.localize import Localization


class _OneCall(torch.nn.Module):
    """A module whose forward is exactly one op call: carving it stores that call as a case."""

    def __init__(self, op: str, args: tuple, kwargs: dict):
        super().__init__()
        self.func, self.args, self.kwargs = resolve_op(op), args, kwargs

    def forward(self) -> Any:
        return self.func(*self.args, **self.kwargs)


def culprit_store_for(json_out: str | os.PathLike) -> Path:
    """Where `tapml migrate --json FILE` keeps the culprit's inputs: FILE without its suffix + `.culprit`."""
    return Path(str(Path(json_out).with_suffix("")) + ".culprit")


def check_culprit_store(store: Path, what: str) -> None:
    """A culprit store is replaced on every run (its inputs are the new culprit's): it may be absent or empty,
    or a store holding only culprit runs (one `save_culprit` wrote). Anything else is the user's and stays."""
    check_output_dir(store, what)
    if not store.is_dir() or not any(store.iterdir()):
        return
    from tapml.store import CaseStore

    try:
        with CaseStore.open(store) as st:
            models = [r["model"] for r in st.runs()]
    except TapmlError:
        models = None
    if models is None or not all(str(m).endswith(":culprit") for m in models):
        raise TapmlError(f"{what}: {short(store)} exists and is not a culprit store tapml wrote; move it away or "
                         "choose another path")


def check_migration_out(json_out: str | os.PathLike) -> Path:
    """Check `tapml migrate --json FILE` before the run: FILE can be written, and its culprit store beside it
    can be (re)made. Returns the culprit store's path."""
    p = check_output_file(json_out, "--json")
    store = culprit_store_for(p)
    if same_file(store, p):
        raise TapmlError(f"--json {short(p)}: its culprit store would have the same name; use a name ending in .json")
    check_culprit_store(store, f"--json {short(p)}: its culprit store")
    return store


def save_culprit(result: Localization, store: str | Path) -> int:
    """Write the culprit call (its inputs as the target saw them, the reference's outputs on them) into a fresh
    store at `store`, replacing a culprit store already there; returns the case id.

    Fresh, not extended: a store keeps one sample per signature, so an old culprit of the same signature would
    keep its inputs and the repro would replay those."""
    c = result.culprit
    if c is None or result.culprit_inputs is None:
        raise TapmlError("no culprit with recorded inputs to save (the localizer found no divergence)")
    final = Path(store)
    check_culprit_store(final, "culprit store")
    parent = final.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=".tapml-culprit-"))  # short: final's name may be long
    try:
        args, kwargs = result.culprit_inputs
        mod = _OneCall(c.op, args, kwargs)
        work = Workload(mod, mod, False, f"culprit {c.op}@{c.index} (call {c.call}, {c.module}, {c.phase}) of "
                        f"{result.model} on {result.target}", **result.precision)
        carve(f"{result.model}:culprit", tmp, workload=work, progress=False)
        from tapml.store import CaseStore

        with CaseStore.open(tmp) as st:
            ids = [case.id for case in st.cases() if case.op == c.op]
        if not ids:
            raise TapmlError(f"{c.op} could not be stored as a case (its inputs cannot be recorded)")
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ids[-1]


def _swap_in(new: Path, final: Path) -> None:
    """Put the directory `new` at `final`, replacing the (checked) culprit store there."""
    old = None
    try:
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=final.absolute().parent, prefix=".tapml-old-"))
            os.replace(final, old / "store")
        os.replace(new, final)
    except OSError as e:
        if old is not None:
            with contextlib.suppress(OSError):
                if (old / "store").exists() and not final.exists():
                    os.replace(old / "store", final)  # put the old one back: nothing half-done
                old.rmdir()  # only when empty: a store that could not be put back stays where it is
        raise TapmlError(f"cannot write the culprit store {short(final)}: {e.strerror or e}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def migration_json(loc: Localization, target: str, inject: str | None, store: str | None,
                   case: int | None) -> dict[str, Any]:
    """The JSON `tapml migrate --json` writes (and `tapml repro` reads)."""
    d = loc.as_dict()
    d.update(backend=target, inject=inject, culprit_store=store, culprit_case=case)
    return d


def save_migration(loc: Localization, json_out: str | os.PathLike, target: str, inject: str | None) -> str | None:
    """Write `tapml migrate --json FILE`: the culprit's store beside FILE (when there is a culprit with recorded
    inputs), then FILE itself. Returns the culprit store's path or None."""
    from tapml.report import write_atomic

    store = check_migration_out(json_out)
    path, case = None, None
    if loc.culprit is not None and loc.culprit_inputs is not None:
        case = save_culprit(loc, store)
        path = str(store)
    loc.culprit_store = path
    write_atomic(json_out, json.dumps(migration_json(loc, target, inject, path, case), indent=1, default=str),
                 "--json")
    return path


def save_failure(json_out: str | os.PathLike, model: str, target: str, inject: str | None, e: BaseException) -> None:
    """Write the JSON a migration stopped by a tapml bug can: what ran and the error's type and first line (exit 3).
    A user error (TapmlError, exit 2) writes nothing: bad input leaves nothing half-written, and its one-line
    message says all there is. Never raises: the error itself is what the caller reports."""
    from tapml.errors import TapmlError, first_line
    from tapml.report import write_atomic

    if isinstance(e, TapmlError):
        return
    data = {"model": model, "backend": target, "inject": inject, "culprit": None,
            "error": {"kind": "internal", "type": type(e).__name__, "message": first_line(e), "exit_code": 3}}
    try:
        write_atomic(json_out, json.dumps(data, indent=1, default=str), "--json")
    except Exception:  # noqa: S110 - the original error is the one to report
        pass


_HEADER = '''"""Repro of one culprit op instance found by `tapml migrate`: CULPRIT names it, the case store STORE holds
its real inputs as the target received them. Written by `tapml repro`; the test fails while the bug is there.
"""

import pytest

from tapml.backends import open_backend
from tapml.backends.reference import oracle
from tapml.ops import Provenance
from tapml.replay import check_sample
from tapml.store import CaseStore

'''

_BODY = '''
PROVENANCE = Provenance(0, CULPRIT["module"], CULPRIT["phase"], CULPRIT["call"], CULPRIT["index"])


@pytest.fixture(scope="module")
def backend():
    be = open_backend(BACKEND, inject=FAULT)  # FAULT: the --inject spec, or None for a real target
    yield be
    be.close()


def test_culprit_matches_the_reference_on_its_real_inputs(backend):
    with CaseStore.open(STORE) as store:
        case = next(c for c in store.cases() if c.id == CASE_ID)
        call = store.load_call(case, store.samples(case.id)[0])
    call.provenance = PROVENANCE
    status, verdict, reason = check_sample(backend, oracle(), case, call)
    if status == "unsupported":
        pytest.skip(reason)
    assert status == "pass", f"{case.op}: {status}: {reason} {verdict.metrics if verdict else ''}"
'''

_OP = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*")
_BACKEND = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_TEXT_MAX = 4096  # module paths, phases, model names: longer is not something tapml wrote


def _bad(field: str, why: str) -> TapmlError:
    return TapmlError(f"the migrate result's {field} {why}; pass the JSON written by `tapml migrate --json FILE`")


def _int(d: dict, key: str, field: str, optional: bool = False) -> int | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _bad(field, f"must be an integer ≥ 0 (got {v!r:.60})")
    return v


def _text(d: dict, key: str, field: str, optional: bool = False) -> str | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or len(v) > _TEXT_MAX:
        raise _bad(field, f"must be a string of at most {_TEXT_MAX} characters (got {type(v).__name__})")
    return v


def _number(d: dict, key: str, field: str) -> str:
    v = d.get(key)
    if v is None:
        return "n/a"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(field, f"must be a number or null (got {v!r:.60})")
    return f"{v:.3g}" if math.isfinite(v) else str(v)


def repro_fields(result: dict[str, Any]) -> dict[str, Any]:
    """The checked fields of a migrate result that a repro file carries: strings and integers of known shape,
    the fault parsed, the culprit store opened and the case found in it. A TapmlError names the first bad one."""
    if not isinstance(result, dict):
        raise _bad("top level", "must be an object")
    c = result.get("culprit")
    if c is None:
        raise TapmlError("the localization found no culprit: nothing to reproduce")
    if not isinstance(c, dict):
        raise _bad("culprit", f"must be an object (got {type(c).__name__})")
    op = _text(c, "op", "culprit.op")
    if not _OP.fullmatch(op):
        raise _bad("culprit.op", f"{op[:80]!r} is not an op name such as aten.mm.default")
    culprit = {"op": op, "index": _int(c, "index", "culprit.index", optional=True),
               "call": _int(c, "call", "culprit.call"), "module": _text(c, "module", "culprit.module"),
               "phase": _text(c, "phase", "culprit.phase"), "model": _text(result, "model", "model"),
               "verdict": _text(c, "verdict", "culprit.verdict", optional=True) or "",
               "local_error": _number(c, "local_error", "culprit.local_error"),
               "accumulated_error": _number(c, "accumulated_error", "culprit.accumulated_error")}
    backend = _text(result, "backend", "backend")
    if not _BACKEND.fullmatch(backend):
        raise _bad("backend", f"{backend[:80]!r} is not a backend name (see `tapml backends`)")
    fault = _text(result, "inject", "inject", optional=True)
    if fault:
        from tapml.backends.faults import parse_fault

        try:
            parse_fault(fault)
        except TapmlError as e:
            raise _bad("inject", f"is not a fault spec ({e})") from None
    store = result.get("culprit_store")
    if store is None:
        raise TapmlError("the localization has no culprit store; rerun `tapml migrate` with --json FILE")
    store = check_path(_text(result, "culprit_store", "culprit_store"), "the migrate result's culprit_store")
    case_id = _int(result, "culprit_case", "culprit_case")
    from tapml.store import CaseStore

    with CaseStore.open(store) as st:
        case = next((k for k in st.cases() if k.id == case_id), None)
    if case is None or case.op != op:
        raise _bad("culprit_case", f"{case_id} is not a case of {op} in {short(store)}")
    return {"STORE": str(store.resolve()), "CASE_ID": case_id, "BACKEND": backend, "FAULT": fault or None,
            "CULPRIT": culprit}


def write_repro(result: dict[str, Any], out: str | Path) -> Path:
    """Write the pytest file for the culprit of a localization (its JSON as `tapml migrate --json` wrote it)."""
    out = check_output_file(out, "--out")
    fields = repro_fields(result)
    # Data only as literals: repr() of checked str/int/None (and a dict of them) is always one Python literal.
    lines = [f"{name} = {value!r}" for name, value in fields.items()]
    text = _HEADER + "\n".join(lines) + "\n" + _BODY
    ast.parse(text)  # it is Python whatever the data was (a failure here is a tapml bug)
    from tapml.report import write_atomic

    write_atomic(out, text, "--out")
    return out


_RESULT_MAX = 64 << 20  # a migrate result is a few KiB to a few MiB (its trials)


def load_result(path: str | Path) -> dict[str, Any]:
    p = check_path(path, "RESULT")
    if not p.is_file():
        raise TapmlError(f"{short(p)}: no such file; pass the JSON written by `tapml migrate --json FILE`")
    try:
        if p.stat().st_size > _RESULT_MAX:
            raise TapmlError(f"{short(p)}: {p.stat().st_size >> 20} MiB is too large to be a tapml migrate result")
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise TapmlError(f"{short(p)}: cannot be read ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise TapmlError(f"{short(p)}: not a tapml migrate result ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(data, dict) or "culprit" not in data or "strategy" not in data:
        raise TapmlError(f"{short(p)}: not a tapml migrate result (no culprit/strategy fields)")
    return data


def repro(result: str | os.PathLike, out: str | os.PathLike = "test_repro.py") -> Path:
    """`tapml repro`: the standalone pytest file for the culprit of the migrate result JSON at `result`."""
    return write_repro(load_result(result), out)
