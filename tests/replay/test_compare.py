"""Verdict rules: fp64 oracle, exact integers, NaN/Inf positions, ties, half precision."""

import torch

from tapml.compare import compare_tensor, judge


def _oracle_case(op, *inputs):
    ref = op(*inputs)
    oracle = op(*[x.double() for x in inputs])
    return ref, oracle


def test_reference_passes_and_a_perturbed_result_fails():
    torch.manual_seed(0)
    a, b = torch.randn(64, 128), torch.randn(128, 32)
    ref, oracle = _oracle_case(torch.mm, a, b)
    v = compare_tensor(ref.clone(), ref, oracle)
    assert v.passed and v.rule.startswith("fp64-oracle")
    bad = ref * (1 + 1e-4 * torch.randn_like(ref))
    v = compare_tensor(bad, ref, oracle)
    assert not v.passed and v.metrics["e_tgt"] > v.metrics["bound"]


def test_more_precise_target_passes():
    torch.manual_seed(0)
    a, b = torch.randn(64, 512), torch.randn(512, 64)
    ref, oracle = _oracle_case(torch.mm, a, b)
    better = oracle.float()  # correctly rounded: better than the reference, must pass
    assert compare_tensor(better, ref, oracle).passed


def test_exact_ops_need_exact_results():
    x = torch.randn(100)
    v = compare_tensor(x.clone(), x, x.double())
    assert v.passed
    y = x.clone()
    y[3] += 1e-3  # a pure copy with one wrong element
    assert not compare_tensor(y, x, x.double()).passed
    z = x * (1 + 2.0**-23)  # rounding noise of an ulp everywhere stays inside the dtype floor
    assert compare_tensor(z, x, x.double()).passed


def test_integers_and_bools_compare_exactly():
    i = torch.arange(10)
    assert compare_tensor(i.clone(), i, None).rule == "exact"
    j = i.clone()
    j[0] = 1
    v = compare_tensor(j, i, None)
    assert not v.passed and v.metrics["mismatched"] == 1
    assert not compare_tensor(i.to(torch.int32), i, None).passed  # dtype must match


def test_nan_and_inf_positions_must_match():
    ref = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    assert compare_tensor(ref.clone(), ref, ref.double()).passed
    moved = torch.tensor([float("nan"), 1.0, float("inf"), -float("inf")])
    assert compare_tensor(moved, ref, ref.double()).rule == "nonfinite"
    flipped = torch.tensor([1.0, float("nan"), -float("inf"), -float("inf")])
    assert not compare_tensor(flipped, ref, ref.double()).passed


def test_argmax_ties_compare_selected_values():
    x = torch.tensor([[1.0, 5.0, 5.0, 0.0], [2.0, 2.0, 1.0, 2.0]])
    ref = torch.tensor([1, 0])
    other_tie = torch.tensor([2, 3])  # different indices, same maxima: must pass
    assert judge("aten.argmax.default", (x, 1), other_tie, ref, None).passed
    wrong = torch.tensor([0, 2])
    v = judge("aten.argmax.default", (x, 1), wrong, ref, None)
    assert not v.passed and v.rule == "ties:selected-values"


def test_max_dim_values_by_oracle_and_indices_by_selection():
    x = torch.tensor([[3.0, 3.0, 1.0]])
    ref = torch.max(x, 1)
    out = (ref.values.clone(), torch.tensor([1]))
    v = judge("aten.max.dim", (x, 1), out, tuple(ref), (ref.values.double(), ref.indices))
    assert v.passed and v.rule.startswith("ties")


def test_half_precision_gets_a_larger_multiplier():
    torch.manual_seed(0)
    a, b = torch.randn(32, 64, dtype=torch.float16), torch.randn(64, 32, dtype=torch.float16)
    ref, oracle = torch.mm(a, b), torch.mm(a.double(), b.double())
    v = compare_tensor(ref.clone(), ref, oracle)
    assert v.passed and v.metrics["k"] == 3.0


def test_shape_mismatch_fails_with_reason():
    v = compare_tensor(torch.ones(2, 3), torch.ones(3, 2), None)
    assert not v.passed and "shape" in v.reason


def test_uninitialized_outputs_are_judged_by_shape_and_dtype_only():
    ref = torch.full((2, 3), 7.0)
    v = judge("aten.empty_like.default", (ref,), torch.full((2, 3), -1.0), ref, None)
    assert v.passed and v.rule == "uninitialized:shape-dtype"
    v = judge("aten.empty.memory_format", ([2, 3],), torch.zeros(3, 2), ref, None)
    assert not v.passed and "[3, 2]" in v.reason
    assert not judge("aten.empty_like.default", (ref,), torch.zeros(2, 3, dtype=torch.float16), ref, None).passed


def test_unsorted_topk_compares_what_is_determined():
    """topk(sorted=False) leaves the order of its k results unspecified (CPU torch keeps a heap's order): a
    backend's permutation of the same selection passes; other values, other indices, or values that are not
    what the indices select fail."""
    torch.manual_seed(0)
    x = torch.randn(6, 9)
    args = (x, 4, -1, True, False)
    ref = torch.topk(x, 4, -1, True, False)
    oracle = tuple(t.double() if t.is_floating_point() else t for t in torch.topk(x.double(), 4, -1, True, False))
    perm = torch.tensor([2, 0, 3, 1])
    permuted = (ref.values[:, perm], ref.indices[:, perm])
    v = judge("aten.topk.default", args, permuted, tuple(ref), oracle)
    assert v.passed and v.rule.startswith("topk-unsorted:multiset"), v.reason
    sorted_out = tuple(torch.topk(x, 4))  # sorted is a permutation too
    assert judge("aten.topk.default", args, sorted_out, tuple(ref), oracle).passed
    # the 5th largest in place of the 4th: a wrong selection
    wrong = torch.topk(x, 5)
    bad = (wrong.values[:, [0, 1, 2, 4]], wrong.indices[:, [0, 1, 2, 4]])
    assert not judge("aten.topk.default", args, bad, tuple(ref), oracle).passed
    # the right values, indices that point elsewhere
    assert not judge("aten.topk.default", args, (ref.values, ref.indices.flip(-1)), tuple(ref), oracle).passed
    # sorted=True still compares positions: the same permutation fails there
    sorted_ref = torch.topk(x, 4)
    moved = (sorted_ref.values[:, perm], sorted_ref.indices[:, perm])
    assert not judge("aten.topk.default", (x, 4, -1, True, True), moved, tuple(sorted_ref), None).passed
