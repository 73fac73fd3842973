"""Carved op tests: 58 cases from /work/main/docs/repros/tvm/store replayed on backend 'tvm' (written by `tapml export-pytest`)."""

import pytest

from tapml.backends import get_backend
from tapml.backends.reference import Float64Backend
from tapml.replay import run_case
from tapml.store import CaseStore

STORE = str(__import__('pathlib').Path(__file__).parent / 'store')
BACKEND = 'tvm'
CASES = [(1, '1-aten.select.int'), (2, '2-aten.select.int'), (3, '3-aten._scaled_dot_product_flash_attention_for_cpu.default'), (4, '4-aten._scaled_dot_product_flash_attention_for_cpu.default'), (5, '5-aten.select.int'), (6, '6-aten._scaled_dot_product_flash_attention_for_cpu.default'), (7, '7-aten._scaled_dot_product_flash_attention_for_cpu.default'), (8, '8-aten._scaled_dot_product_flash_attention_for_cpu.default'), (9, '9-aten.tanh.default'), (10, '10-aten.tanh.default'), (11, '11-aten.tanh.default'), (12, '12-aten.tanh.default'), (13, '13-aten._scaled_dot_product_flash_attention_for_cpu.default'), (14, '14-aten.native_layer_norm.default'), (15, '15-aten.native_layer_norm.default'), (16, '16-aten._scaled_dot_product_flash_attention_for_cpu.default'), (17, '17-aten._scaled_dot_product_flash_attention_for_cpu.default'), (18, '18-aten._scaled_dot_product_flash_attention_for_cpu.default'), (19, '19-aten.native_layer_norm.default'), (20, '20-aten.native_layer_norm.default'), (21, '21-aten._scaled_dot_product_flash_attention_for_cpu.default'), (22, '22-aten._scaled_dot_product_flash_attention_for_cpu.default'), (23, '23-aten.index.Tensor'), (24, '24-aten.index.Tensor'), (25, '25-aten.native_layer_norm.default'), (26, '26-aten.native_layer_norm.default'), (27, '27-aten.native_layer_norm.default'), (28, '28-aten._scaled_dot_product_flash_attention_for_cpu.default'), (29, '29-aten.native_layer_norm.default'), (30, '30-aten._scaled_dot_product_flash_attention_for_cpu.default'), (31, '31-aten.native_batch_norm.default'), (32, '32-aten.max_pool2d_with_indices.default'), (33, '33-aten.native_batch_norm.default'), (34, '34-aten.native_batch_norm.default'), (35, '35-aten.native_batch_norm.default'), (36, '36-aten.native_batch_norm.default'), (37, '37-aten.native_batch_norm.default'), (38, '38-aten.native_batch_norm.default'), (39, '39-aten.native_batch_norm.default'), (40, '40-aten.native_batch_norm.default'), (41, '41-aten.native_batch_norm.default'), (42, '42-aten.native_batch_norm.default'), (43, '43-aten.native_batch_norm.default'), (44, '44-aten.native_layer_norm.default'), (45, '45-aten.native_layer_norm.default'), (46, '46-aten.native_layer_norm.default'), (47, '47-aten.native_layer_norm.default'), (48, '48-aten.native_layer_norm.default'), (49, '49-aten.native_layer_norm.default'), (50, '50-aten._scaled_dot_product_flash_attention_for_cpu.default'), (51, '51-aten._scaled_dot_product_flash_attention_for_cpu.default'), (52, '52-aten._scaled_dot_product_flash_attention_for_cpu.default'), (53, '53-aten._scaled_dot_product_flash_attention_for_cpu.default'), (54, '54-aten.select.int'), (55, '55-aten._scaled_dot_product_flash_attention_for_cpu.default'), (56, '56-aten._scaled_dot_product_flash_attention_for_cpu.default'), (57, '57-aten._scaled_dot_product_flash_attention_for_cpu.default'), (58, '58-aten._scaled_dot_product_flash_attention_for_cpu.default')]


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
