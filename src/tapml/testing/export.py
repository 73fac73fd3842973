"""`tapml export-pytest`: write a standalone pytest file that replays a store's cases on one backend.

The file holds case ids and the store path only; tensors stay in the store and are read at test time.
"""

from __future__ import annotations

from pathlib import Path

from tapml.store import CaseStore

_TEMPLATE = '''"""Carved op tests: {n} cases from {store} replayed on backend {backend!r} (written by `tapml export-pytest`)."""

import pytest

from tapml.backends import get_backend
from tapml.backends.reference import Float64Backend
from tapml.replay import run_case
from tapml.store import CaseStore

STORE = {store!r}
BACKEND = {backend!r}
CASES = {cases!r}


@pytest.fixture(scope="module")
def env():
    store = CaseStore.open(STORE)
    backend = get_backend(BACKEND)
    yield store, backend, Float64Backend(narrow=False), {{c.id: c for c in store.cases()}}
    backend.close()
    store.close()


@pytest.mark.parametrize("case_id", [c[0] for c in CASES], ids=[c[1] for c in CASES])
def test_case(env, case_id):
    store, backend, oracle, by_id = env
    result = run_case(store, backend, oracle, by_id[case_id])
    if result.status == "unsupported":
        pytest.skip(result.reason)
    assert result.status == "pass", f"{{result.op}} {{result.args}}: {{result.status}}: {{result.reason}}"
'''


def export_pytest(store_path: str, backend: str, out: str, pattern: str | None = None) -> int:
    """Write the pytest file; returns the number of cases it replays."""
    with CaseStore.open(store_path) as store:
        cases = [(c.id, f"{c.id}-{c.op}") for c in store.cases(pattern)]
    text = _TEMPLATE.format(n=len(cases), store=str(Path(store_path).resolve()), backend=backend, cases=cases)
    from tapml.report import write_atomic

    write_atomic(out, text)
    return len(cases)
