"""`tapml export-pytest`: write a standalone pytest file that replays a store's cases on one backend.

The file holds case ids and the store path only; tensors stay in the store and are read at test time. It must
not splice data into code: the store path, backend name and case names (from the store, which anyone may hand
over) appear only as Python literals (repr), never in its docstring or code text.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tapml.errors import TapmlError
from tapml.paths import check_not_inside, check_output_file, check_path, short
from tapml.store import CaseStore

_HEADER = '''"""Carved op tests: the cases CASES of the store STORE replayed on backend BACKEND (written by
`tapml export-pytest`)."""

import pytest

from tapml.backends import open_backend
from tapml.backends.reference import oracle
from tapml.replay import run_case
from tapml.store import CaseStore

'''

_BODY = '''

@pytest.fixture(scope="module")
def env():
    store = CaseStore.open(STORE)
    backend = open_backend(BACKEND)
    yield store, backend, oracle(), {c.id: c for c in store.cases()}
    backend.close()
    store.close()


@pytest.mark.parametrize("case_id", [c[0] for c in CASES], ids=[c[1] for c in CASES])
def test_case(env, case_id):
    store, backend, fp64, by_id = env
    result = run_case(store, backend, fp64, by_id[case_id])
    if result.status == "unsupported":
        pytest.skip(result.reason)
    assert result.status == "pass", f"{result.op} {result.args}: {result.status}: {result.reason}"
'''


def export_pytest(store_path: str, backend: str, out: str, pattern: str | None = None) -> int:
    """Write the pytest file; returns the number of cases it replays. The output path is checked before the
    store is read; the backend must be one that can run here; a -k PATTERN that matches no case writes
    nothing."""
    check_output_file(out, "--out")
    check_path(store_path, "STORE")
    check_not_inside(out, store_path, "--out", "the case store")
    from tapml.backends import open_backend

    open_backend(backend).close()  # it must be one that can run here
    with CaseStore.open(store_path) as store:
        cases = [(c.id, f"{c.id}-{c.op}") for c in store.cases(pattern)]
    if not cases:
        what = f"-k {pattern!r} matches no case of" if pattern else "there is no case in"
        raise TapmlError(f"{what} {short(store_path)}; nothing to export (see `tapml show {short(store_path)} "
                         "--cases`)")
    consts = {"STORE": str(Path(store_path).resolve()), "BACKEND": backend, "CASES": cases}
    text = _HEADER + "".join(f"{k} = {v!r}\n" for k, v in consts.items()) + _BODY
    ast.parse(text)  # Python whatever the data (a failure here is a tapml bug)
    from tapml.report import write_atomic

    write_atomic(out, text, "--out")
    return len(cases)
