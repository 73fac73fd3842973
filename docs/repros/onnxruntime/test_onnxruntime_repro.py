"""Carved op tests: 33 cases from /work/main/docs/repros/onnxruntime/store replayed on backend 'onnxruntime' (written by `tapml export-pytest`)."""

import pytest

from tapml.backends import get_backend
from tapml.backends.reference import Float64Backend
from tapml.replay import run_case
from tapml.store import CaseStore

STORE = str(__import__('pathlib').Path(__file__).parent / 'store')
BACKEND = 'onnxruntime'
CASES = [(1, '1-aten._scaled_dot_product_flash_attention_for_cpu.default'), (2, '2-aten._scaled_dot_product_flash_attention_for_cpu.default'), (3, '3-aten._scaled_dot_product_flash_attention_for_cpu.default'), (4, '4-aten._scaled_dot_product_flash_attention_for_cpu.default'), (5, '5-aten._scaled_dot_product_flash_attention_for_cpu.default'), (6, '6-aten._scaled_dot_product_flash_attention_for_cpu.default'), (7, '7-aten._scaled_dot_product_flash_attention_for_cpu.default'), (8, '8-aten._scaled_dot_product_flash_attention_for_cpu.default'), (9, '9-aten._scaled_dot_product_flash_attention_for_cpu.default'), (10, '10-aten._scaled_dot_product_flash_attention_for_cpu.default'), (11, '11-aten._scaled_dot_product_flash_attention_for_cpu.default'), (12, '12-aten._scaled_dot_product_flash_attention_for_cpu.default'), (13, '13-aten._scaled_dot_product_flash_attention_for_cpu.default'), (14, '14-aten.native_batch_norm.default'), (15, '15-aten.native_batch_norm.default'), (16, '16-aten.native_batch_norm.default'), (17, '17-aten.native_batch_norm.default'), (18, '18-aten.native_batch_norm.default'), (19, '19-aten.native_batch_norm.default'), (20, '20-aten.native_batch_norm.default'), (21, '21-aten.native_batch_norm.default'), (22, '22-aten.native_batch_norm.default'), (23, '23-aten.native_batch_norm.default'), (24, '24-aten.native_batch_norm.default'), (25, '25-aten.native_batch_norm.default'), (26, '26-aten._scaled_dot_product_flash_attention_for_cpu.default'), (27, '27-aten._scaled_dot_product_flash_attention_for_cpu.default'), (28, '28-aten._scaled_dot_product_flash_attention_for_cpu.default'), (29, '29-aten._scaled_dot_product_flash_attention_for_cpu.default'), (30, '30-aten._scaled_dot_product_flash_attention_for_cpu.default'), (31, '31-aten._scaled_dot_product_flash_attention_for_cpu.default'), (32, '32-aten._scaled_dot_product_flash_attention_for_cpu.default'), (33, '33-aten._scaled_dot_product_flash_attention_for_cpu.default')]


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
