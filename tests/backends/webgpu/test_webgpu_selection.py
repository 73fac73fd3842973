"""The WebGPU backend's data-dependent ops against torch (`selection.py`, `kernels/compact.py`,
`kernels/segment.py`): nonzero and boolean masks, masked_scatter, repeat_interleave, reductions into
data-chosen destinations (index_add, scatter_add, scatter_reduce, bincount), and MoE routing and SSM code
carved and replayed whole."""

import pytest
import torch
from test_webgpu import close, fp64_close, ref, run

from tapml.backends import get_backend, registered
from tapml.ops import OpCall

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_info = {b.name: b for b in registered()}.get("webgpu")
if not (_info and _info.available):
    pytest.skip(f"webgpu unusable here: {_info.reason if _info else 'not registered'}", allow_module_level=True)


@pytest.fixture(scope="module")
def be():
    return get_backend("webgpu")


def test_nonzero_and_boolean_masks(be):
    """Data-dependent shapes: nonzero, x[mask] and x[mask] = v (masks of rows, of every element, of a later
    dim, all-true, all-false), Qwen2-VL's position write through a row mask."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    m = x > 0
    for mask in (m, m.t(), torch.zeros(3, 4, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool),
                 torch.tensor(True), torch.rand(300, 37, generator=g) > 0.3):
        close(run(be, "aten.nonzero.default", mask), torch.nonzero(mask))
    close(run(be, "aten.nonzero.default", x * m), torch.nonzero(x * m))
    for idx in ([m], [m[:, 0]], [None, m[0]], [torch.ones(6, 5, dtype=torch.bool)], [torch.zeros(6, dtype=torch.bool)]):
        close(run(be, "aten.index.Tensor", x, idx), ref("aten.index.Tensor", x, idx))
    n = int(m.sum())
    for vals in (torch.tensor(0.5), torch.arange(n, dtype=torch.float32)):
        close(run(be, "aten.index_put_.default", x.clone(), [m], vals), x.clone().index_put_([m], vals))
    pos, row = torch.zeros(3, 34, dtype=torch.int64), torch.arange(34) >= 9  # a left-padded row
    vals = torch.arange(3 * 25).reshape(3, 25)
    close(run(be, "aten.index_put_.default", pos.clone(), [None, row], vals),
          ref("aten.index_put_.default", pos.clone(), [None, row], vals))
    close(run(be, "aten.index.Tensor", torch.arange(34), [row]), torch.arange(34)[row])


def test_masked_scatter_fills_selected_rows_in_order(be):
    """Qwen2-VL's image features into the token embeddings: a [2, 34, 1] mask broadcast over 64 features."""
    g = torch.Generator().manual_seed(1)
    emb, mask = torch.randn(2, 34, 64, generator=g), torch.zeros(2, 34, 1, dtype=torch.bool)
    mask[0, 3:19], mask[1, 5:17] = True, True
    feats = torch.randn(28, 64, generator=g)
    close(run(be, "aten.masked_scatter.default", emb, mask, feats), emb.masked_scatter(mask, feats))
    full, more = torch.ones(3, 4, dtype=torch.bool), torch.randn(20, generator=g)  # a longer source: its first 12
    close(run(be, "aten.masked_scatter.default", torch.zeros(3, 4), full, more),
          torch.zeros(3, 4).masked_scatter(full, more))
    close(run(be, "aten.masked_scatter.default", emb, ~full[:1, :1, None].expand(2, 34, 1), feats), emb)
    if be.rt.f16:
        close(run(be, "aten.masked_scatter.default", emb.half(), mask, feats.half()),
              emb.half().masked_scatter(mask, feats.half()), atol=0, rtol=0)


def test_repeat_interleave_counts_and_all_true(be):
    for reps in (torch.tensor([64, 48]), torch.tensor([1, 0, 3, 2, 0]), torch.tensor([0, 0]),
                 torch.tensor([2, 0, 1], dtype=torch.int32)):
        close(run(be, "aten.repeat_interleave.Tensor", reps), torch.repeat_interleave(reps))
    reps = torch.tensor([3, 1, 2])
    close(run(be, "aten.repeat_interleave.Tensor", reps, output_size=6), torch.repeat_interleave(reps, output_size=6))
    for v in (True, False):
        close(run(be, "aten._is_all_true.default", torch.tensor(v)), torch.tensor(v))


def test_index_add_and_scatter_add_sum_duplicates_in_order(be):
    """MoE combine (index_add_ of each expert's tokens) and routing counts (scatter_add_): duplicate
    destinations sum deterministically, within the fp64 rule; empty selections leave self."""
    g = torch.Generator().manual_seed(2)
    out, top = torch.randn(48, 64, generator=g), torch.randint(0, 48, (37,), generator=g)
    src = torch.randn(37, 64, generator=g)
    got = run(be, "aten.index_add_.default", out.clone(), 0, top, src)
    fp64_close(got, (out, 0, top, src), "aten.index_add.default")
    assert torch.equal(got, run(be, "aten.index_add_.default", out.clone(), 0, top, src))  # deterministic
    idx, base = torch.tensor([0, 2, 2, 1, 2]), torch.randn(4, 3, generator=g)
    close(run(be, "aten.index_add.default", base, 1, idx, torch.ones(4, 5), alpha=2),
          ref("aten.index_add.default", base, 1, idx, torch.ones(4, 5), alpha=2))
    close(run(be, "aten.index_add.default", out, 0, torch.tensor([], dtype=torch.int64), torch.zeros(0, 64)), out)
    close(run(be, "aten.index_add_.default", torch.zeros(3, dtype=torch.int64), 0, idx, torch.arange(5)),
          torch.zeros(3, dtype=torch.int64).index_add_(0, idx, torch.arange(5)))
    counts = torch.zeros(8, dtype=torch.int64)
    experts = torch.randint(0, 8, (48 * 2,), generator=g)
    close(run(be, "aten.scatter_add_.default", counts.clone(), 0, experts, torch.ones(96, dtype=torch.int64)),
          counts.clone().scatter_add_(0, experts, torch.ones(96, dtype=torch.int64)))
    sidx, sv = torch.randint(0, 3, (5, 4), generator=g), torch.randn(5, 6, generator=g)
    base = torch.randn(3, 6, generator=g)
    fp64_close(run(be, "aten.scatter_add.default", base, 0, sidx, sv), (base, 0, sidx, sv), "aten.scatter_add.default")
    if be.rt.f16:
        h = (out.half(), 0, top, src.half())
        fp64_close(run(be, "aten.index_add.default", *h), h, "aten.index_add.default")


@pytest.mark.parametrize("reduce", ["sum", "prod", "amax", "amin", "mean"])
def test_scatter_reduce_with_and_without_self(be, reduce):
    g = torch.Generator().manual_seed(3)
    x, src = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    idx = torch.randint(0, 3, (5, 4), generator=g)
    idx[:, 3] = 0  # a column whose rows 1 and 2 no source reaches: they keep self
    for include_self in (True, False):
        args = (x, 0, idx, src, reduce)
        close(run(be, "aten.scatter_reduce.two", *args, include_self=include_self),
              ref("aten.scatter_reduce.two", *args, include_self=include_self), atol=1e-5, rtol=1e-5)


def test_bincount_sizes_from_the_data(be):
    x = torch.tensor([0, 3, 3, 1, 7, 3])
    close(run(be, "aten.bincount.default", x), torch.bincount(x))
    close(run(be, "aten.bincount.default", x, None, 12), torch.bincount(x, minlength=12))
    close(run(be, "aten.bincount.default", torch.tensor([], dtype=torch.int64), None, 3),
          torch.bincount(torch.tensor([], dtype=torch.int64), minlength=3))
    w = torch.randn(6)
    close(run(be, "aten.bincount.default", x, w), torch.bincount(x, w))
    assert "float64" in be.supports(OpCall("aten.bincount.default", (x, w.half()), {}))


class RoutingAndScan(torch.nn.Module):
    """The MoE routing and SSM code of real models, written as they write it: Mixtral's expert loop (one_hot,
    where -> nonzero, index_add_), DeepSeek-style token counts and sort (bincount, argsort, scatter_add_,
    repeat_interleave), a boolean-mask select, Mamba2's segment_sum (cumsum under masks) and a selective-scan
    recurrence step by step."""

    def __init__(self, experts: int = 4, hidden: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.router = torch.nn.Linear(hidden, experts)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(experts))

    def forward(self, h, dt, a_log, bc):
        n_exp = len(self.experts)
        w, sel = torch.topk(torch.softmax(self.router(h), dim=1, dtype=torch.float), 2, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(h)
        mask = torch.nn.functional.one_hot(sel, num_classes=n_exp).permute(2, 1, 0)
        for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
            idx, top_x = torch.where(mask[e])
            out.index_add_(0, top_x, self.experts[e](h[top_x]) * w[top_x, idx, None])
        counts = torch.bincount(sel.flatten(), minlength=n_exp)
        order = sel.view(-1).argsort(stable=True)
        per_token = torch.zeros(h.shape[0], dtype=torch.int64).scatter_add_(0, order // 2, torch.ones_like(order))
        owners = torch.repeat_interleave(torch.arange(n_exp), counts)
        busy = h[counts[sel[:, 0]] > counts.float().mean()]
        da = dt * -torch.exp(a_log)  # [B, L]
        seg = da[..., None].repeat(1, 1, da.shape[-1])
        seg = seg.masked_fill(~torch.tril(torch.ones(da.shape[-1], da.shape[-1], dtype=torch.bool), -1), 0)
        seg = torch.cumsum(seg, dim=-2).masked_fill(
            ~torch.tril(torch.ones(da.shape[-1], da.shape[-1], dtype=torch.bool), 0), -torch.inf)
        state, ys = torch.zeros(dt.shape[0], 4), []
        for t in range(dt.shape[1]):
            state = torch.exp(da[:, t, None]) * state + dt[:, t, None] * bc[:, t]
            ys.append((state * bc[:, t]).sum(-1))
        return out, counts, per_token, owners, busy, torch.exp(seg), torch.stack(ys, 1)


def test_moe_routing_and_ssm_code_runs_whole_on_webgpu(be, tmp_path):
    from tapml.recorder import carve
    from tapml.replay import run_tests
    from tapml.workload import Workload

    g = torch.Generator().manual_seed(4)
    model = RoutingAndScan()
    inputs = (torch.randn(24, 16, generator=g), torch.rand(2, 9, generator=g), torch.randn(2, 9, generator=g) * 0.1,
              torch.randn(2, 9, 4, generator=g))
    carve("moe", tmp_path / "s", workload=Workload(model, lambda: model(*inputs), False, "moe"), progress=False)
    res = run_tests(str(tmp_path / "s"), be, progress=False)
    bad = [f"{r.status} {r.op}: {r.reason[:120]}" for r in res.results if r.status != "pass"]
    assert not bad, bad
    ops = {r.op for r in res.results}
    assert {"aten.nonzero.default", "aten.index_add_.default", "aten.bincount.default", "aten.sort.stable",
            "aten.scatter_add_.default", "aten.repeat_interleave.Tensor", "aten.aminmax.default",
            "aten.cumsum.default"} <= ops, ops
    assert any(r.op == "aten.index.Tensor" and "b8" in r.args for r in res.results)


def test_index_put_accumulate_sums_duplicates_in_order(be):
    """x.index_put_(idx, v, accumulate=True): floats (no atomics for them), two index tensors, a mask, a strided
    view, float16, and int64 (its atomic kernel did not compile with shader-int64)."""
    g = torch.Generator().manual_seed(5)
    op = "aten.index_put_.default"
    x = torch.randn(8, 6, generator=g)
    for dst, idx, vals in ((x, [torch.tensor([0, 5, 0, -1, 2])], torch.randn(5, 6, generator=g)),
                           (x, [torch.tensor([0, 5, 0]), torch.tensor([1, 1, 1])], torch.randn(3, generator=g)),
                           (x, [None, torch.tensor([0, 0, 2])], torch.tensor(1.5)),
                           (x, [torch.rand(8, 6, generator=g) > 0.5], torch.tensor(2.0)),
                           (x[1:7, ::2], [torch.tensor([0, 5, 0])], torch.randn(3, 3, generator=g))):
        fp64_close(run(be, op, dst.clone(), idx, vals, True), (dst.clone(), idx, vals, True), op)
    counts = torch.zeros(5, dtype=torch.int64)
    close(run(be, op, counts.clone(), [torch.tensor([1, 1, 3])], torch.tensor([2, 3, 4]), True),
          counts.clone().index_put_([torch.tensor([1, 1, 3])], torch.tensor([2, 3, 4]), accumulate=True))
    if be.rt.f16:
        h = (x.half(), [torch.tensor([0, 5, 0])], torch.randn(3, 6, generator=g).half(), True)
        fp64_close(run(be, op, h[0].clone(), *h[1:]), (h[0].clone(), *h[1:]), op)


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min", "prod"])
def test_segment_reduce_over_uneven_and_empty_segments(be, reduce):
    """torch.segment_reduce (a segment sum's own op): lengths or offsets, an empty segment (its value: 0, nan,
    -inf, inf, 1, or `initial`), `initial` reduced in (mean divides by the count without it), n-d data."""
    g = torch.Generator().manual_seed(6)
    op, data = "aten.segment_reduce.default", torch.randn(9, 3, generator=g)
    for kw in ({"lengths": torch.tensor([2, 0, 4, 3])}, {"lengths": torch.tensor([2, 0, 4, 3]), "initial": 0.5},
               {"offsets": torch.tensor([0, 0, 5, 9])}):
        close(run(be, op, data, reduce, **kw), ref(op, data, reduce, **kw), atol=1e-5, rtol=1e-5)
    assert "one of lengths and offsets" in be.supports(OpCall(op, (data, reduce), {}))


def test_masked_select_and_count_nonzero(be):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 6, 4, generator=g)
    for mask in (x > 0, torch.tensor([True, False, True, True]), torch.zeros(4, dtype=torch.bool)):
        close(run(be, "aten.masked_select.default", x, mask), torch.masked_select(x, mask))
    y = x * (x > 0)
    close(run(be, "aten.count_nonzero.default", y), torch.count_nonzero(y))
    close(run(be, "aten.count_nonzero.dim_IntList", x > 0, [0, 2]), torch.count_nonzero(x > 0, [0, 2]))
