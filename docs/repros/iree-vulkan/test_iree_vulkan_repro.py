"""Carved op tests: 67 cases from /work/main/docs/repros/iree-vulkan/store replayed on backend 'iree-vulkan' (written by `tapml export-pytest`)."""

import pytest

from tapml.backends import get_backend
from tapml.backends.reference import Float64Backend
from tapml.replay import run_case
from tapml.store import CaseStore

STORE = str(__import__('pathlib').Path(__file__).parent / 'store')
BACKEND = 'iree-vulkan'
CASES = [(1, '1-aten.eq.Scalar'), (2, '2-aten.bitwise_and.Tensor'), (3, '3-aten.where.self'), (4, '4-aten.bitwise_or.Tensor'), (5, '5-aten.isin.Tensor_Tensor'), (6, '6-aten.bitwise_not.default'), (7, '7-aten.bitwise_and.Tensor'), (8, '8-aten.eq.Scalar'), (9, '9-aten._to_copy.default'), (10, '10-aten.sum.default'), (11, '11-aten.eq.Scalar'), (12, '12-aten.bitwise_and.Tensor'), (13, '13-aten.index.Tensor'), (14, '14-aten.bitwise_and.Tensor'), (15, '15-aten.where.self'), (16, '16-aten.isin.Tensor_Tensor'), (17, '17-aten._scaled_dot_product_flash_attention_for_cpu.default'), (18, '18-aten._scaled_dot_product_flash_attention_for_cpu.default'), (19, '19-aten.empty.memory_format'), (20, '20-aten._scaled_dot_product_flash_attention_for_cpu.default'), (21, '21-aten.all.default'), (22, '22-aten.ge.Scalar'), (23, '23-aten.bitwise_and.Tensor'), (24, '24-aten.bitwise_and.Tensor'), (25, '25-aten._scaled_dot_product_flash_attention_for_cpu.default'), (26, '26-aten.convolution.default'), (27, '27-aten.convolution.default'), (28, '28-aten.isin.Tensor_Tensor'), (29, '29-aten.where.self'), (30, '30-aten._scaled_dot_product_flash_attention_for_cpu.default'), (31, '31-aten._scaled_dot_product_flash_attention_for_cpu.default'), (32, '32-aten.bitwise_and.Tensor'), (33, '33-aten.where.self'), (34, '34-aten.bitwise_and.Tensor'), (35, '35-aten.lt.Scalar'), (36, '36-aten._to_copy.default'), (37, '37-aten.where.self'), (38, '38-aten.lt.Scalar'), (39, '39-aten._to_copy.default'), (40, '40-aten.where.self'), (41, '41-aten._scaled_dot_product_flash_attention_for_cpu.default'), (42, '42-aten._scaled_dot_product_flash_attention_for_cpu.default'), (43, '43-aten._scaled_dot_product_flash_attention_for_cpu.default'), (44, '44-aten._scaled_dot_product_flash_attention_for_cpu.default'), (45, '45-aten.all.default'), (46, '46-aten.any.default'), (47, '47-aten._to_copy.default'), (48, '48-aten.sum.default'), (49, '49-aten.eq.Scalar'), (50, '50-aten.isin.Tensor_Tensor'), (51, '51-aten.isin.Tensor_Tensor'), (52, '52-aten._scaled_dot_product_flash_attention_for_cpu.default'), (53, '53-aten._scaled_dot_product_flash_attention_for_cpu.default'), (54, '54-aten._scaled_dot_product_flash_attention_for_cpu.default'), (55, '55-aten._scaled_dot_product_flash_attention_for_cpu.default'), (56, '56-aten._scaled_dot_product_flash_attention_for_cpu.default'), (57, '57-aten._scaled_dot_product_flash_attention_for_cpu.default'), (58, '58-aten.index.Tensor'), (59, '59-aten.bitwise_and.Tensor'), (60, '60-aten.index.Tensor'), (61, '61-aten._scaled_dot_product_flash_attention_for_cpu.default'), (62, '62-aten.gelu.default'), (63, '63-aten.gelu.default'), (64, '64-aten._scaled_dot_product_flash_attention_for_cpu.default'), (65, '65-aten._scaled_dot_product_flash_attention_for_cpu.default'), (66, '66-aten._scaled_dot_product_flash_attention_for_cpu.default'), (67, '67-aten._scaled_dot_product_flash_attention_for_cpu.default')]


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
