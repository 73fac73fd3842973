"""Carved op tests: 46 cases from /work/main/docs/repros/iree-vulkan/store replayed on backend 'iree-vulkan' (written by `tapml export-pytest`)."""

import pytest

from tapml.backends import get_backend
from tapml.backends.reference import Float64Backend
from tapml.replay import run_case
from tapml.store import CaseStore

STORE = str(__import__('pathlib').Path(__file__).parent / 'store')
BACKEND = 'iree-vulkan'
CASES = [(1, '1-aten.eq.Scalar'), (2, '2-aten.bitwise_and.Tensor'), (3, '3-aten.where.self'), (4, '4-aten.bitwise_or.Tensor'), (5, '5-aten.isin.Tensor_Tensor'), (6, '6-aten.bitwise_not.default'), (7, '7-aten.bitwise_and.Tensor'), (8, '8-aten.eq.Scalar'), (9, '9-aten._to_copy.default'), (10, '10-aten.sum.default'), (11, '11-aten.eq.Scalar'), (12, '12-aten.bitwise_and.Tensor'), (13, '13-aten.index.Tensor'), (14, '14-aten.bitwise_and.Tensor'), (15, '15-aten.where.self'), (16, '16-aten.isin.Tensor_Tensor'), (17, '17-aten.empty.memory_format'), (18, '18-aten.all.default'), (19, '19-aten.ge.Scalar'), (20, '20-aten.bitwise_and.Tensor'), (21, '21-aten.bitwise_and.Tensor'), (22, '22-aten.convolution.default'), (23, '23-aten.convolution.default'), (24, '24-aten.isin.Tensor_Tensor'), (25, '25-aten.where.self'), (26, '26-aten.bitwise_and.Tensor'), (27, '27-aten.where.self'), (28, '28-aten.bitwise_and.Tensor'), (29, '29-aten.lt.Scalar'), (30, '30-aten._to_copy.default'), (31, '31-aten.where.self'), (32, '32-aten.lt.Scalar'), (33, '33-aten._to_copy.default'), (34, '34-aten.where.self'), (35, '35-aten.all.default'), (36, '36-aten.any.default'), (37, '37-aten._to_copy.default'), (38, '38-aten.sum.default'), (39, '39-aten.eq.Scalar'), (40, '40-aten.isin.Tensor_Tensor'), (41, '41-aten.isin.Tensor_Tensor'), (42, '42-aten.index.Tensor'), (43, '43-aten.bitwise_and.Tensor'), (44, '44-aten.index.Tensor'), (45, '45-aten.gelu.default'), (46, '46-aten.gelu.default')]


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
