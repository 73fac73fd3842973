"""Amplified cases: each kind of variant is built from a real sample as a valid call of its op, bounded and
deterministic; replayed with `amplify=True`, a bug that only a variant reaches is reported apart from the real
cases, saying which variant and how it was made."""

import json
import math

import pytest
import torch
from conftest import model_ref

from tapml.amplify import ELEMENT_BUDGET, MIN_VARIANTS, variants
from tapml.backends.reference import TorchBackend
from tapml.ops import OpCall
from tapml.recorder import carve
from tapml.replay import run_tests, with_reference

REF = TorchBackend()
g = torch.Generator().manual_seed(0)


def call(op, *args, **kwargs):
    return OpCall(op, args, kwargs)


def by_name(c, **kw):
    return {v.name: v for v in variants(c, **kw)}


def runs(v):
    """The variant is a valid call of its op: the reference runs it."""
    return with_reference(v.call, REF, v.layout_only) is not None


def test_softmax_rows_are_cut_around_tiles_and_get_extremes_shifts_masks_and_layouts():
    x = torch.randn(3, 300, generator=g)
    vs = by_name(call("aten._softmax.default", x, -1, False), limit=40)
    cuts = sorted(int(n.split("=")[1]) for n in vs if n.startswith("cut:"))
    assert {255, 256, 257, 127, 128, 129} <= set(cuts) and max(cuts) < 300
    assert vs["cut:dim-1=257"].description == "dim 1 cut from 300 to 257 (tile 256 + 1)"
    assert vs["cut:dim-1=257"].call.args[0].shape == (3, 257)
    last = vs["extremes:max-last"].call.args[0]
    assert torch.equal(last.argmax(-1), torch.full((3,), 299)) and torch.equal(last.argmin(-1), torch.zeros(3))
    assert torch.equal(last.sort(-1).values, x.sort(-1).values)  # the same values, moved
    ties = vs["extremes:ties"].call.args[0]
    assert torch.equal(ties[:, 0], x.max(-1).values) and torch.equal(ties[:, -1], x.max(-1).values)
    shifted = vs["shift:+10000rms"].call.args[0]
    assert float((shifted - x).mean()) > 1e3 * float(x.std())  # the mean dwarfs the spread
    masked = vs["mask:row--inf"].call.args[0]
    assert int(torch.isinf(masked).all(-1).sum()) == 1
    assert vs["layout:transposed"].call.args[0].stride() == (1, 3)
    assert vs["layout:offset"].call.args[0].storage_offset() == 5
    assert all(runs(v) for v in vs.values())


def test_matmul_cuts_k_in_both_operands_and_m_n_with_the_bias():
    bias, a, b = torch.randn(70), torch.randn(40, 130), torch.randn(70, 130).t()  # b: a transposed weight
    vs = by_name(call("aten.addmm.default", bias, a, b), limit=40)
    k = vs["cut:K=129"].call.args
    assert k[1].shape == (40, 129) and k[2].shape == (129, 70) and k[2].stride() == (1, 129)  # still transposed
    n = vs["cut:N=65"].call.args
    assert n[0].shape == (65,) and n[2].shape == (130, 65)
    assert vs["cut:M=33"].call.args[1].shape == (33, 130)
    assert all(runs(v) for v in vs.values())


def test_layer_norm_cut_keeps_normalized_shape_weight_and_bias_in_step():
    x, w, b = torch.randn(2, 5, 100), torch.randn(100), torch.randn(100)
    vs = by_name(call("aten.native_layer_norm.default", x, [100], w, b, 1e-5), limit=40)
    args = vs["cut:normalized-dim=65"].call.args
    assert args[0].shape == (2, 5, 65) and args[1] == [65] and args[2].shape == (65,) and args[3].shape == (65,)
    assert "scale:x0.001" in vs and "shift:+10000rms" in vs
    assert all(runs(v) for v in vs.values())


def test_attention_gets_masked_rows_causal_l_below_s_and_cuts_of_the_keys_with_the_mask():
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.zeros(1, 1, 6, 6)
    c = call("aten._scaled_dot_product_flash_attention_for_cpu.default", q, k, v, 0.0, False, attn_mask=mask,
             scale=0.3)
    vs = by_name(c, limit=40)
    causal = next(v for n, v in vs.items() if n.startswith("causal:"))
    assert causal.call.args[4] is True and causal.call.kwargs["attn_mask"] is None
    assert causal.call.args[0].shape[2] == 3 and "L=3 < S=6" in causal.description
    inf = vs["mask:row-inf"].call.kwargs["attn_mask"]
    assert int(torch.isinf(inf).all(-1).sum()) == 1
    assert torch.finfo(torch.float32).min in vs["mask:row-min"].call.kwargs["attn_mask"]
    s = vs["cut:keys-S=5"].call
    assert s.args[1].shape[2] == s.args[2].shape[2] == s.kwargs["attn_mask"].shape[-1] == 5
    assert all(runs(x) for x in vs.values() if not x.layout_only)


def test_integer_boundaries_and_long_context_positions():
    pos = torch.arange(24).expand(2, 24)
    vs = by_name(call("aten.add.Tensor", pos, 1), limit=40)
    big = vs["int:+2^31"].call
    assert int(big.args[0].min()) == 2**31 and big.args[1] == 2**31 + 1
    assert int(vs["int:near-int32-max"].call.args[0].max()) == 2**31 - 1
    assert vs["int:scalar-2^32+"].call.args[1] == 1 + 3 * 2**31
    assert int(vs["positions:128k"].call.args[0].max()) == 131071
    # rotary angles (positions x frequencies), left-padded: the trailing run is advanced by its step
    steps = torch.cat([torch.zeros(10), torch.arange(14.0)])
    angles = steps[:, None] * torch.tensor([1.0, 0.1, 0.01])
    moved = by_name(call("aten.cos.default", angles))["positions:8k"].call.args[0]
    assert torch.allclose(moved - angles, (8192 - 24) * torch.tensor([1.0, 0.1, 0.01]).expand(24, 3))


def test_variants_are_bounded_deterministic_and_absent_where_nothing_applies():
    x = torch.randn(4, 200, generator=g)
    c = call("aten._log_softmax.default", x, 1, False)
    a, b = variants(c, seed=3), variants(c, seed=3)
    assert [v.name for v in a] == [v.name for v in b] and len(a) == 12
    assert all(torch.equal(u.call.args[0], v.call.args[0]) for u, v in zip(a, b))
    assert len({v.name.split(":")[0] for v in a}) >= 5  # round robin: every kind that applies is represented
    assert [v.name for v in variants(c, seed=3, limit=4)] == [v.name for v in a[:4]]
    huge = torch.zeros(ELEMENT_BUDGET // 2 + 1)
    assert len(variants(call("aten.neg.default", huge))) == MIN_VARIANTS
    assert variants(call("aten.zeros.default", [3, 4])) == []  # no tensor input
    assert variants(call("aten.bernoulli.p", torch.rand(8), 0.5)) == []  # draws random numbers


def test_a_layout_the_reference_kernel_cannot_take_is_dropped_not_judged():
    """torch's CPU flash attention assumes a unit-stride last dim (its callers make it so): fed a transposed
    query it returns garbage, so that variant is no valid call of the op."""
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    layouts = by_name(call("aten._scaled_dot_product_flash_attention_for_cpu.default", q, k, v))
    assert not runs(layouts["layout:transposed"]) and not runs(layouts["layout:strided"])
    assert runs(layouts["layout:offset"])
    assert with_reference(call("aten.view.default", torch.randn(4, 6), [8, 4]), REF) is None  # refused


class OddSoftmax(TorchBackend):
    """Test double: softmax's last element is dropped when a row's length is odd (a tail bug)."""

    name = "odd-softmax"

    def run(self, c):
        out = super().run(c)
        if c.kind == "aten._softmax" and out.shape[-1] % 2:
            out = out.clone()
            out[..., -1] = 0
        return out


def test_run_tests_reports_a_bug_only_amplification_reaches_apart_from_the_real_cases(tmp_path):
    carve(model_ref("make_model"), tmp_path / "s", progress=False)  # softmax rows of 4: the bug is not hit
    plain = run_tests(str(tmp_path / "s"), OddSoftmax(), progress=False)
    assert plain.exit_code == 0 and plain.amplified == [] and "amplified" not in plain.as_dict()
    run = run_tests(str(tmp_path / "s"), OddSoftmax(), progress=False, amplify=True, json_out=tmp_path / "r.json",
                    html_out=tmp_path / "r.html")
    assert all(r.status == "pass" for r in run.results)
    bad = [r for r in run.amplified if r.status == "fail"]
    assert bad and {r.op for r in bad} == {"aten._softmax.default"}
    assert any(r.reason.startswith("amplified: dim 1 cut from 4 to 3 (tile 4 - 1): RMSE") for r in bad)
    assert run.exit_code == 1
    t = run.amplified_totals()
    assert t["fail"] == len(bad) and t["pass"] > 20 and t["variants"] == len(run.amplified)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["totals"]["fail"] == 0 and data["amplified"]["totals"]["fail"] == len(bad)
    assert {"variant", "description", "args", "reason"} <= set(data["amplified"]["variants"][0])
    page = (tmp_path / "r.html").read_text()
    assert 'id="amplified"' in page and "tile 4 - 1" in page
    again = run_tests(str(tmp_path / "s"), OddSoftmax(), progress=False, amplify=True)
    assert [(r.variant, r.status) for r in again.amplified] == [(r.variant, r.status) for r in run.amplified]


def test_advanced_indices_are_also_counted_from_the_end():
    x = torch.randn(5, 7)
    rows, cols = torch.tensor([[0], [4]]), torch.tensor([[1, 6]])
    v = by_name(call("aten.index.Tensor", x, [rows, cols]))["index:from-the-end"]
    r, c = v.call.args[1]
    assert torch.equal(r, rows - 5) and torch.equal(c, cols - 7)
    assert torch.equal(with_reference(v.call, REF).outputs, x[rows, cols])


@pytest.mark.parametrize("op,args", [
    ("aten.mean.dim", (torch.randn(2, 3, 70), [-1], True)),
    ("aten.cumsum.default", (torch.randn(2, 70), 1)),
    ("aten.topk.default", (torch.randn(2, 70), 5)),
    ("aten.argmax.default", (torch.randn(2, 70), -1)),
    ("aten.where.self", (torch.rand(4, 9) > 0.5, torch.randn(4, 9), torch.tensor(-math.inf))),
    ("aten.native_group_norm.default", (torch.randn(2, 4, 3, 20), None, None, 2, 4, 60, 2, 1e-5)),
    ("aten.bmm.default", (torch.randn(2, 17, 40), torch.randn(2, 40, 9))),
])
def test_every_variant_of_common_ops_is_a_valid_call(op, args):
    """(Layouts excepted: a kernel may demand one, as group norm's does; replay drops those.)"""
    vs = [v for v in variants(call(op, *args), limit=40) if not v.layout_only]
    assert len(vs) >= 4 and all(runs(v) for v in vs), [v.name for v in vs if not runs(v)]


def test_logits_with_masked_vocabulary_are_still_shifted():
    """Generation masks logits to -inf; the shift's range check reads the finite values, so the row is still
    shifted below zero (every finite value negative: a max reduction whose init is 0 is caught)."""
    x = torch.randn(2, 300)
    x[:, :7] = -math.inf
    v = by_name(call("aten.argmax.default", x, -1))["shift:-10000rms"]
    y = v.call.args[0]
    assert torch.equal(torch.isinf(y), torch.isinf(x)) and float(y[torch.isfinite(y)].max()) < 0


def test_an_in_place_variant_in_another_layout_keeps_its_inputs():
    """A storage offset leaves a tensor dense, so the reference's contiguous check ran the in-place op on the
    variant's own input: the case then expected `x + y` from inputs already holding it."""
    x, y = torch.arange(12).reshape(3, 4), torch.full((3, 4), 100)
    v = by_name(call("aten.add_.Tensor", x, y))["layout:offset"]
    before = v.call.args[0].clone()
    c = with_reference(v.call, REF, v.layout_only)
    assert v.call.args[0].storage_offset() > 0 and torch.equal(v.call.args[0], before)
    assert torch.equal(c.outputs, x + y)


class NarrowInt64(TorchBackend):
    """A target that declares int64 held as int32 (WebGPU without shader-int64, e.g. in a browser)."""

    name = "narrow-int64"

    def int64_bits(self) -> int:
        return 32


def test_a_target_that_narrows_int64_gets_integer_boundary_variants_as_unsupported_with_why(tmp_path):
    carve(model_ref("make_positions"), tmp_path / "s", progress=False)
    wide = run_tests(str(tmp_path / "s"), "torch", progress=False, amplify=True)
    assert any(r.variant.startswith("int:") and r.status == "pass" for r in wide.amplified)
    run = run_tests(str(tmp_path / "s"), NarrowInt64(), progress=False, amplify=True)
    ints = [r for r in run.amplified if r.variant.startswith("int:")]
    assert ints and all(r.status == "unsupported" and "holds int64 as int32" in r.reason for r in ints)
    others = [r for r in run.amplified if not r.variant.startswith("int:")]
    assert others and all(r.status == "pass" for r in others) and run.exit_code == 0


def test_scans_get_a_long_context_and_exp_its_overflow_edge():
    """Two values the carved calls never have: a running sum over thousands of steps (the real row repeated along
    the scanned dim) and exp's inputs just under its overflow edge (the output still finite)."""
    dt = -torch.rand(3, 24)
    long = {v.name: v for v in variants(OpCall("aten.cumsum.default", (dt, -1), {}))}["long:dim-1=4096"]
    x = long.call.args[0]
    assert x.shape == (3, 4096) and torch.equal(x[:, 24:48], dt) and torch.equal(x[:, :24], dt)
    for dtype, edge in ((torch.float32, 88.72), (torch.float16, 11.09)):
        logits = torch.randn(4, 8).to(dtype)
        v = {v.name: v for v in variants(OpCall("aten.exp.default", (logits,), {}))}["edge:overflow"]
        y = v.call.args[0]
        assert edge * 0.998 < float(y.max()) < edge and torch.isfinite(torch.exp(y.float()).to(dtype)).all()
        spread = (y.double() - y.double().max()) - (logits.double() - logits.double().max())
        assert float(spread.abs().max()) < 0.05 * max(1.0, edge)  # the real spread, moved
    assert not any(v.name.startswith(("long:", "edge:"))
                   for v in variants(OpCall("aten.tanh.default", (torch.randn(4, 8),), {})))
