"""Carved op tests: 37 cases from /work/main/docs/repros/tvm/store replayed on backend 'tvm' (written by `tapml export-pytest`)."""

import pytest

from tapml.backends import get_backend
from tapml.backends.reference import Float64Backend
from tapml.replay import run_case
from tapml.store import CaseStore

STORE = str(__import__('pathlib').Path(__file__).parent / 'store')
BACKEND = 'tvm'
CASES = [(1, '1-aten.select.int'), (2, '2-aten.select.int'), (3, '3-aten.select.int'), (4, '4-aten.tanh.default'), (5, '5-aten.tanh.default'), (6, '6-aten.tanh.default'), (7, '7-aten.tanh.default'), (8, '8-aten.native_layer_norm.default'), (9, '9-aten.native_layer_norm.default'), (10, '10-aten.native_layer_norm.default'), (11, '11-aten.native_layer_norm.default'), (12, '12-aten.index.Tensor'), (13, '13-aten.index.Tensor'), (14, '14-aten.native_layer_norm.default'), (15, '15-aten.native_layer_norm.default'), (16, '16-aten.native_layer_norm.default'), (17, '17-aten.native_layer_norm.default'), (18, '18-aten.native_batch_norm.default'), (19, '19-aten.max_pool2d_with_indices.default'), (20, '20-aten.native_batch_norm.default'), (21, '21-aten.native_batch_norm.default'), (22, '22-aten.native_batch_norm.default'), (23, '23-aten.native_batch_norm.default'), (24, '24-aten.native_batch_norm.default'), (25, '25-aten.native_batch_norm.default'), (26, '26-aten.native_batch_norm.default'), (27, '27-aten.native_batch_norm.default'), (28, '28-aten.native_batch_norm.default'), (29, '29-aten.native_batch_norm.default'), (30, '30-aten.native_batch_norm.default'), (31, '31-aten.native_layer_norm.default'), (32, '32-aten.native_layer_norm.default'), (33, '33-aten.native_layer_norm.default'), (34, '34-aten.native_layer_norm.default'), (35, '35-aten.native_layer_norm.default'), (36, '36-aten.native_layer_norm.default'), (37, '37-aten.select.int')]


@pytest.fixture(scope="module")
def env():
    store = CaseStore.open(STORE)
    backend = get_backend(BACKEND)
    yield store, backend, Float64Backend(narrow=False), {c.id: c for c in store.cases()}
    backend.close()
    store.close()


@pytest.mark.parametrize("case_id", [c[0] for c in CASES], ids=[c[1] for c in CASES])
def test_case(env, case_id):
    store, backend, oracle, by_id = env
    result = run_case(store, backend, oracle, by_id[case_id])
    if result.status == "unsupported":
        pytest.skip(result.reason)
    assert result.status == "pass", f"{result.op} {result.args}: {result.status}: {result.reason}"
