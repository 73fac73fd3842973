"""The WebGPU backend, kernel by kernel against torch: elementwise with broadcasting and strides, reductions,
matmul, views and in-place writes, dtypes (int64 narrowing, bfloat16, float16), and what it turns down."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tapml.backends import get_backend, registered
from tapml.errors import TapmlError
from tapml.ops import OpCall

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _usable() -> str | None:
    info = {b.name: b for b in registered()}.get("webgpu")
    return None if info and info.available else (info.reason if info else "webgpu backend not registered")


if _usable():
    pytest.skip(f"webgpu unusable here: {_usable()}", allow_module_level=True)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def be():
    return get_backend("webgpu")


def run(be, op: str, *args, **kwargs):
    """Host tensors in, host tensors out, through upload -> kernel -> download."""
    return be.execute(OpCall(op, args, kwargs))


def ref(op: str, *args, **kwargs):
    return OpCall(op, args, kwargs).func()(*args, **kwargs)


def close(got, want, atol=1e-5, rtol=1e-5):
    if isinstance(want, (tuple, list)):
        for g, w in zip(got, want):
            close(g, w, atol, rtol)
        return
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    if want.is_floating_point():
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True)
    else:
        assert torch.equal(got, want), (got, want)


# --- strategies --------------------------------------------------------------------------------------------

@st.composite
def broadcast_pair(draw, max_dims=4):
    """Two shapes that broadcast, and a layout for the first (contiguous, transposed or sliced)."""
    nd = draw(st.integers(1, max_dims))
    shape = draw(st.lists(st.integers(1, 6), min_size=nd, max_size=nd))
    other = [1 if draw(st.booleans()) else n for n in shape]
    other = other[draw(st.integers(0, nd - 1)):]
    return shape, other, draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))


def layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as `t` in another memory layout."""
    if how == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "sliced":
        big = torch.zeros([n + 2 for n in t.shape], dtype=t.dtype)
        view = big[tuple(slice(1, 1 + n) for n in t.shape)]
        view.copy_(t)
        return view
    if how == "expanded" and t.dim() >= 1 and t.shape[0] > 1 and bool((t == t[:1]).all()):
        return t[:1].expand(t.shape)
    return t


def make(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype in (torch.int64, torch.int32):
        return torch.randint(-20, 20, shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


# --- elementwise -------------------------------------------------------------------------------------------

BINARY = ["aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor", "aten.maximum.default",
          "aten.minimum.default", "aten.eq.Tensor", "aten.lt.Tensor", "aten.ge.Tensor", "aten.remainder.Tensor"]


@FAST
@given(broadcast_pair(), st.sampled_from(BINARY), st.sampled_from([torch.float32, torch.int64]))
def test_binary_broadcasting_matches_torch(be, pair, op, dtype):
    shape, other, how = pair
    a = layout(make(shape, dtype, 1), how)
    b = make(other, dtype, 2)
    if op.startswith(("aten.div", "aten.remainder")):
        b = torch.where(b == 0, torch.ones_like(b), b)
    close(run(be, op, a, b), ref(op, a, b))


UNARY = ["aten.exp.default", "aten.log.default", "aten.sin.default", "aten.cos.default", "aten.tanh.default",
         "aten.erf.default", "aten.sqrt.default", "aten.rsqrt.default", "aten.sigmoid.default",
         "aten.silu.default", "aten.gelu.default", "aten.relu.default", "aten.neg.default", "aten.abs.default",
         "aten.reciprocal.default"]


@pytest.mark.parametrize("op", UNARY)
def test_unary_math_is_accurate(be, op):
    x = torch.linspace(-30, 30, 4001)
    if op in ("aten.log.default", "aten.sqrt.default", "aten.rsqrt.default"):
        x = x.abs() + 1e-3
    got, want = run(be, op, x), ref(op, x)
    if op not in ("aten.gelu.default", "aten.silu.default"):  # (their formulas cancel in the tails, in torch too)
        exact = ref(op, x.double())
        # within a few float32 ulps of the float64 result, like torch's own kernels
        ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(1e-30)
        assert ((got.double() - exact).abs() <= 4 * ulp + 1e-37).float().mean() > 0.999, op
    close(got, want, atol=1e-6, rtol=4e-6)


def test_gelu_tanh_pow_clamp_where_masked_fill(be):
    x = torch.randn(5, 7)
    close(run(be, "aten.gelu.default", x, approximate="tanh"), ref("aten.gelu.default", x, approximate="tanh"))
    for e in (2, 3.0, 0.5, -1, 1.7):
        close(run(be, "aten.pow.Tensor_Scalar", x.abs(), e), ref("aten.pow.Tensor_Scalar", x.abs(), e))
    close(run(be, "aten.pow.Tensor_Scalar", x, 3), ref("aten.pow.Tensor_Scalar", x, 3))
    close(run(be, "aten.clamp.default", x, -0.5, 0.5), ref("aten.clamp.default", x, -0.5, 0.5))
    close(run(be, "aten.clamp_min.default", x, 0.1), ref("aten.clamp_min.default", x, 0.1))
    m = x > 0
    close(run(be, "aten.where.self", m, x, torch.tensor(-1.0)), ref("aten.where.self", m, x, torch.tensor(-1.0)))
    close(run(be, "aten.masked_fill.Scalar", x, m, -math.inf), ref("aten.masked_fill.Scalar", x, m, -math.inf))
    close(run(be, "aten.add.Tensor", x, x, alpha=0.5), ref("aten.add.Tensor", x, x, alpha=0.5))
    close(run(be, "aten.rsub.Scalar", x, 1.0), ref("aten.rsub.Scalar", x, 1.0))
    i = torch.arange(-7, 8)
    for a, b in ((i, 2), (i, -3), (x, 0.7), (x, -1.3)):
        close(run(be, "aten.floor_divide.default", a, b), ref("aten.floor_divide.default", a, b))
        close(run(be, "aten.remainder.Scalar", a, b), ref("aten.remainder.Scalar", a, b), atol=1e-5)
        close(run(be, "aten.fmod.Scalar", a, b), ref("aten.fmod.Scalar", a, b), atol=1e-5)
        for mode in ("trunc", "floor"):
            close(run(be, "aten.div.Tensor_mode", a, b, rounding_mode=mode),
                  ref("aten.div.Tensor_mode", a, b, rounding_mode=mode))
    close(run(be, "aten.bitwise_and.Tensor", m, ~m), ref("aten.bitwise_and.Tensor", m, ~m))
    close(run(be, "aten.bitwise_not.default", m), ref("aten.bitwise_not.default", m))


def test_conversions_and_factories(be):
    x = torch.tensor([-2.7, -0.5, 0.0, 0.4, 3.9, float("inf"), float("-inf"), float("nan")])
    close(run(be, "aten._to_copy.default", x, dtype=torch.bool), x.to(torch.bool))
    close(run(be, "aten._to_copy.default", x[:5], dtype=torch.int64), x[:5].to(torch.int64))
    close(run(be, "aten._to_copy.default", torch.arange(5), dtype=torch.float32), torch.arange(5).float())
    close(run(be, "aten.arange.start_step", 2, 11, 3, dtype=torch.int64), torch.arange(2, 11, 3))
    close(run(be, "aten.arange.default", 5, dtype=torch.float32), torch.arange(5, dtype=torch.float32))
    close(run(be, "aten.full.default", [2, 3], 7.5, dtype=torch.float32), torch.full([2, 3], 7.5))
    close(run(be, "aten.zeros_like.default", torch.ones(3, dtype=torch.int64)), torch.zeros(3, dtype=torch.int64))
    close(run(be, "aten.scalar_tensor.default", -math.inf, dtype=torch.float32), torch.tensor(-math.inf))
    close(run(be, "aten.triu.default", torch.ones(4, 5), 1), torch.ones(4, 5).triu(1))
    assert run(be, "aten._local_scalar_dense.default", torch.tensor(True)) is True


# --- reductions, softmax, norms ----------------------------------------------------------------------------

@FAST
@given(st.lists(st.integers(1, 7), min_size=1, max_size=4), st.data(),
       st.sampled_from(["sum", "mean", "amax", "argmax", "var", "any"]), st.booleans())
def test_reductions_match_torch(be, shape, data, kind, keepdim):
    nd = len(shape)
    dims = sorted(data.draw(st.sets(st.integers(0, nd - 1), min_size=1, max_size=nd)))
    x = layout(make(shape, torch.float32, 3), data.draw(st.sampled_from(["contiguous", "transposed", "sliced"])))
    if kind == "sum":
        close(run(be, "aten.sum.dim_IntList", x, dims, keepdim), x.sum(dims, keepdim))
    elif kind == "mean":
        close(run(be, "aten.mean.dim", x, dims, keepdim), x.mean(dims, keepdim))
    elif kind == "amax":
        close(run(be, "aten.amax.default", x, dims, keepdim), x.amax(dims, keepdim))
    elif kind == "argmax":
        close(run(be, "aten.argmax.default", x, dims[0], keepdim), x.argmax(dims[0], keepdim))
    elif kind == "var":
        close(run(be, "aten.var.correction", x, dims, correction=1, keepdim=keepdim),
              torch.var(x, dims, correction=1, keepdim=keepdim))
    else:
        b = x > 0.5
        close(run(be, "aten.any.dims", b, dims, keepdim), torch.any(b, dims, keepdim))


def test_softmax_layernorm_cumsum_sort(be):
    x = torch.randn(3, 5, 33)
    close(run(be, "aten._softmax.default", x, -1, False), torch.softmax(x, -1))
    close(run(be, "aten._softmax.default", x, 1, False), torch.softmax(x, 1))
    close(run(be, "aten._log_softmax.default", x, -1, False), torch.log_softmax(x, -1))
    w, b = torch.randn(33), torch.randn(33)
    close(run(be, "aten.native_layer_norm.default", x, [33], w, b, 1e-5),
          ref("aten.native_layer_norm.default", x, [33], w, b, 1e-5), atol=1e-5, rtol=1e-4)
    i = torch.randint(0, 5, (2, 9))
    close(run(be, "aten.cumsum.default", i, -1), i.cumsum(-1))
    close(run(be, "aten.sort.default", i, -1, True)[0], i.sort(-1, True)[0])
    vals, idx = run(be, "aten.topk.default", x, 4)
    close(vals, x.topk(4)[0])
    assert torch.equal(x.gather(-1, idx), vals)


# --- matmul ------------------------------------------------------------------------------------------------

@FAST
@given(st.integers(1, 70), st.integers(1, 70), st.integers(1, 70), st.booleans(), st.booleans(),
       st.sampled_from([None, "row", "full"]))
def test_matmul_matches_torch(be, m, n, k, ta, tb, bias):
    a = torch.randn(k, m).t() if ta else torch.randn(m, k)
    b = torch.randn(n, k).t() if tb else torch.randn(k, n)
    if bias is None:
        close(run(be, "aten.mm.default", a, b), a @ b, atol=1e-4, rtol=1e-4)
    else:
        c = torch.randn(n) if bias == "row" else torch.randn(m, n)
        close(run(be, "aten.addmm.default", c, a, b, beta=0.5, alpha=2.0),
              torch.addmm(c, a, b, beta=0.5, alpha=2.0), atol=1e-4, rtol=1e-4)


def test_bmm_baddbmm_and_the_fast_kernel(be):
    a, b = torch.randn(3, 17, 9), torch.randn(3, 9, 21)
    close(run(be, "aten.bmm.default", a, b), a @ b, atol=1e-4, rtol=1e-4)
    c = torch.randn(1, 21)
    close(run(be, "aten.baddbmm.default", c, a, b), torch.baddbmm(c, a, b), atol=1e-4, rtol=1e-4)
    # the register-blocked vec4 kernel the GPU uses for aligned shapes, forced here on lavapipe
    from tapml.backends.webgpu import kernels as K

    a, b = torch.randn(256, 64), torch.randn(64, 128)
    out = K.matmul(be.rt, be.upload(a), be.upload(b), fast=True)
    close(be.download(out), a @ b, atol=1e-4, rtol=1e-4)


# --- attention, convolution, pooling, indexing -------------------------------------------------------------

def test_attention_matches_torch(be):
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    mask = torch.randn(2, 1, 5, 7)
    op = "aten._scaled_dot_product_flash_attention_for_cpu.default"
    close(run(be, op, q, k, v, attn_mask=mask), ref(op, q, k, v, attn_mask=mask), atol=1e-5, rtol=1e-4)
    close(run(be, op, q, k, v, 0.0, True, scale=0.3), ref(op, q, k, v, 0.0, True, scale=0.3), atol=1e-5, rtol=1e-4)


def test_convolution_and_pooling(be):
    x = torch.randn(2, 4, 9, 11)
    for w, stride, pad, dil, groups in [(torch.randn(6, 4, 3, 3), [2, 1], [1, 1], [1, 1], 1),
                                        (torch.randn(4, 1, 3, 3), [1, 1], [1, 1], [2, 2], 4)]:
        bias = torch.randn(w.shape[0])
        args = (x, w, bias, stride, pad, dil, False, [0, 0], groups)
        close(run(be, "aten.convolution.default", *args), ref("aten.convolution.default", *args), atol=1e-4,
              rtol=1e-4)
    close(run(be, "aten.max_pool2d_with_indices.default", x, [3, 3], [2, 2], [1, 1]),
          ref("aten.max_pool2d_with_indices.default", x, [3, 3], [2, 2], [1, 1]))
    close(run(be, "aten.avg_pool2d.default", x, [2, 2]), ref("aten.avg_pool2d.default", x, [2, 2]))
    close(run(be, "aten._adaptive_avg_pool2d.default", x, [1, 1]), ref("aten._adaptive_avg_pool2d.default", x, [1, 1]))


def test_indexing_gather_scatter(be):
    w = torch.randn(10, 6)
    i = torch.tensor([[1, 9, -1], [0, 2, 2]])
    close(run(be, "aten.embedding.default", w, i.abs()), torch.nn.functional.embedding(i.abs(), w))
    close(run(be, "aten.index.Tensor", w, [i]), w[i])
    close(run(be, "aten.index.Tensor", w, [None, torch.tensor([5, 0])]), w[:, [5, 0]])
    close(run(be, "aten.index_select.default", w, 1, torch.tensor([3, 1])), w.index_select(1, torch.tensor([3, 1])))
    g = torch.randint(0, 6, (10, 3))
    close(run(be, "aten.gather.default", w, 1, g), w.gather(1, g))
    x = torch.zeros(8, dtype=torch.int64)
    perm = torch.randperm(8)
    close(run(be, "aten.index_put_.default", x, [perm], torch.arange(8)),
          torch.zeros(8, dtype=torch.int64).index_put_([perm], torch.arange(8)))
    close(run(be, "aten.cat.default", [w[:2], w[3:5].t().contiguous().t()], 0), torch.cat([w[:2], w[3:5]], 0))
    close(run(be, "aten.isin.Tensor_Tensor", torch.arange(6), torch.tensor([1, 4])),
          torch.isin(torch.arange(6), torch.tensor([1, 4])))


def fp64_close(got, x_args, op, *rest, **kw):
    """got within the fp64 rule against torch's float32 result (what a replay judges); each reference runs on
    its own copy of the inputs (in-place ops write them)."""
    from tapml.backends.reference import oracle
    from tapml.compare import judge
    from tapml.replay import clone_call

    call = OpCall(op, x_args + rest, kw)
    want = clone_call(call)
    want = want.func()(*want.args, **want.kwargs)
    v = judge(op, call.args, got, want, oracle().execute(clone_call(call)))
    assert v.passed, v.reason


def test_convolution_3d_as_qwen2_vl_patch_embed(be):
    """Qwen2-VL embeds [t=2, 14, 14] patches with a 3-d convolution whose stride is its kernel; and a padded,
    dilated, grouped 3-d case."""
    op = "aten.convolution.default"
    x, w = torch.randn(112, 3, 2, 14, 14), torch.randn(64, 3, 2, 14, 14)
    fp64_close(run(be, op, x, w, None, [2, 14, 14], [0, 0, 0], [1, 1, 1], False, [0, 0, 0], 1), (x, w), op,
                None, [2, 14, 14], [0, 0, 0], [1, 1, 1], False, [0, 0, 0], 1)
    x, w, b = torch.randn(2, 4, 5, 7, 6), torch.randn(6, 2, 3, 3, 2), torch.randn(6)
    args = (x, w, b, [1, 2, 1], [1, 0, 1], [1, 1, 2], False, [0, 0, 0], 2)
    close(run(be, op, *args), ref(op, *args), atol=1e-4, rtol=1e-4)
    if be.rt.f16:
        h = tuple(a.half() if isinstance(a, torch.Tensor) else a for a in args)
        close(run(be, op, *h), ref(op, *args).half(), atol=2e-2, rtol=2e-2)


def test_argsort_dispatches_to_a_stable_sort(be):
    x = torch.tensor([[3, 1, 3, 0, 1, 3]])
    vals, idx = run(be, "aten.sort.stable", x, stable=True, dim=-1, descending=True)
    want = torch.sort(x, stable=True, dim=-1, descending=True)
    close(vals, want.values)
    close(idx, want.indices)  # stable: tied elements keep their order


def test_q4_0_dequantize_ops_view_dtype_and_shifts(be):
    """GGUF Q4_0's dequantize as carved: a uint8 buffer viewed as float16 scales, low and high nibbles by
    bitwise_and and bitwise_right_shift; and the shifts' edges (amounts of the width or more, negative)."""
    from tapml.zoo.quant import Q4_0Linear

    layer = Q4_0Linear.from_weight(torch.randn(8, 64))
    blocks = layer.blocks  # [out, blocks, 18] uint8: a float16 scale, then 16 bytes of two 4-bit codes
    close(run(be, "aten.view.dtype", blocks[..., :2], torch.float16), blocks[..., :2].view(torch.float16))
    qs = blocks[..., 2:]
    close(run(be, "aten.bitwise_right_shift.Tensor_Scalar", qs, 4), torch.bitwise_right_shift(qs, 4))
    for dt in (torch.uint8, torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dt)
        a = torch.tensor([info.min, -3 if info.min else 3, 0, 1, 100, info.max], dtype=dt)
        for amount in (-9, -1, 0, 3, 7, 8, 9, 16, 31, 32, 64, 259):
            for op in ("aten.bitwise_left_shift.Tensor_Scalar", "aten.bitwise_right_shift.Tensor_Scalar",
                       "aten.__lshift__.Scalar", "aten.__rshift__.Scalar"):
                close(run(be, op, a, amount), ref(op, a, amount))
    raw = torch.randint(0, 256, (3, 16), dtype=torch.uint8)
    for dt in (torch.int16, torch.int32, torch.float32, torch.int8):
        close(run(be, "aten.view.dtype", raw, dt), raw.view(dt))
    assert "not implemented" in be.supports(OpCall("aten.view.dtype", (raw, torch.int64), {}))
    assert "not defined" in be.supports(OpCall("aten.bitwise_left_shift.Tensor_Scalar", (torch.ones(2), 1), {}))


# --- views, residency, in-place writes ---------------------------------------------------------------------

def test_views_are_metadata_and_chains_stay_on_device(be):
    x = torch.randn(4, 6, 5)
    h = be.upload(x)
    before = be.rt.stats.dispatches
    v = be.run(OpCall("aten.transpose.int", (h, 0, 2), {}))
    v = be.run(OpCall("aten.slice.Tensor", (v, 1, 1, 5, 2), {}))
    v = be.run(OpCall("aten.unsqueeze.default", (v, 0), {}))
    v = be.run(OpCall("aten.expand.default", (v, [3, 5, 2, 4]), {}))
    assert be.rt.stats.dispatches == before and v.storage is h.storage  # no kernel, same buffer
    want = x.transpose(0, 2)[:, 1:5:2].unsqueeze(0).expand(3, 5, 2, 4)
    close(be.download(v), want.contiguous())
    s = be.run(OpCall("aten.mul.Tensor", (v, 2.0), {}))
    close(be.download(s), want * 2)


def test_inplace_ops_write_through_views_into_the_base_buffer(be):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    h = be.upload(base)
    col = be.run(OpCall("aten.select.int", (h, 1, 2), {}))
    be.run(OpCall("aten.add_.Tensor", (col, 100.0), {}))
    row = be.run(OpCall("aten.select.int", (h, 0, 0), {}))
    be.run(OpCall("aten.fill_.Scalar", (row, -1.0), {}))
    want = base.clone()
    want[:, 2] += 100
    want[0] = -1
    close(be.download(h), want)
    m = be.upload(torch.tensor([True, False, True]))
    be.run(OpCall("aten.masked_fill_.Scalar", (col, m, 0.5), {}))
    want[:, 2] = torch.where(torch.tensor([True, False, True]), 0.5, want[:, 2])
    close(be.download(h), want)


def test_a_handle_dropped_inside_a_reference_cycle_leaves_its_buffer_usable(be):
    """A failing case's traceback holds its handles in a reference cycle: the GC finalized the wgpu buffer and
    Storage.__del__ then pooled it dead, so a later case of that size class failed to upload (a TypeError from
    wgpu), a case after a failure erroring for nothing."""
    import gc

    class Frame:  # stands in for a traceback's frames
        pass

    cycle = Frame()
    cycle.handle, cycle.self = be.upload(torch.ones(1000)), cycle
    del cycle
    gc.collect()
    close(be.download(be.upload(torch.full((1000,), 2.0))), torch.full((1000,), 2.0))


# --- dtypes ------------------------------------------------------------------------------------------------

def test_int64_is_narrowed_with_a_range_check_in_narrow_mode():
    be = get_backend("webgpu", int64="narrow")
    x = torch.tensor([1, -5, 2**31 - 1], dtype=torch.int64)
    h = be.upload(x)
    assert h.info.storage == "i32" and h.dtype == torch.int64
    out = be.download(h)
    assert out.dtype == torch.int64 and torch.equal(out, x)
    close(run(be, "aten.add.Tensor", x[:2], 7), x[:2] + 7)
    with pytest.raises(TapmlError, match=r"indices .*2199023255552.*int32"):
        be.execute(OpCall("aten.embedding.default", (torch.randn(3, 2), torch.tensor([0, 2**41])), {}))


def test_int64_native_mode_is_exact(be):
    if not be.rt.int64_native:
        pytest.skip("adapter lacks shader-int64")
    x = torch.tensor([2**40, -(2**62), 3], dtype=torch.int64)
    close(run(be, "aten.add.Tensor", x, 5), x + 5)
    close(run(be, "aten.mul.Tensor", x[2:], 2**33), x[2:] * 2**33)


@pytest.mark.parametrize("value", [2**31, 2**31 + 5, 2**32 - 1, 3 * 2**31, -(2**31) - 1, -(2**63), 2**63 - 1])
def test_int64_scalars_whose_low_word_has_the_top_bit_set(be, value):
    """A scalar's low 32 bits with the top bit set were sign-extended: `x + 2**31` gave `x - 2**31`, while
    supports() accepted the call. Narrow mode must refuse what it cannot hold instead."""
    x = torch.tensor([-2, 0, 7, 2**40], dtype=torch.int64)
    call = OpCall("aten.add.Tensor", (x, value), {})
    if not be.rt.int64_native:
        assert be.supports(call) is not None
        return
    assert be.supports(call) is None
    close(be.execute(call), x + value)
    close(run(be, "aten.full.default", [3], value, dtype=torch.int64), torch.full([3], value))
    close(run(be, "aten.where.self", x > 0, x, value), torch.where(x > 0, x, value))


@pytest.mark.parametrize("op", ["abs", "neg", "relu", "sign"])
def test_int64_unary_ops_keep_the_high_word(be, op):
    """Found by amplified cases (an int64 input shifted past 2^31): unary int ops computed in i32, so
    `abs(-(2**40))` gave 0."""
    if not be.rt.int64_native:
        pytest.skip("adapter lacks shader-int64")
    x = torch.tensor([-3, 5, 2**31 + 7, -(2**31) - 9, 2**40, -(2**40)], dtype=torch.int64)
    close(run(be, f"aten.{op}.default", x), getattr(torch, op)(x))


def test_cumsum_of_a_long_sum_meets_the_fp64_rule(be):
    """4,001 elements from 1e4 up: the compensation of the f32 running sum was folded away by the shader
    compiler, leaving an error hundreds of times the reference's."""
    from tapml.backends.reference import oracle
    from tapml.compare import judge

    g = torch.Generator().manual_seed(0)
    for x in (1e4 + torch.arange(4001, dtype=torch.float32), 1e4 + torch.rand(3, 4001, generator=g)):
        call = OpCall("aten.cumsum.default", (x, -1), {})
        v = judge(call.op, call.args, be.execute(call), x.cumsum(-1), oracle().execute(call))
        assert v.passed, v.reason


def test_bfloat16_is_emulated_exactly(be):
    x, y = torch.randn(64).bfloat16(), torch.randn(64).bfloat16()
    for op in ("aten.add.Tensor", "aten.mul.Tensor", "aten.div.Tensor"):
        close(run(be, op, x, y), ref(op, x, y), atol=0, rtol=0)
    x32 = torch.randn(50)
    close(run(be, "aten._to_copy.default", x32, dtype=torch.bfloat16), x32.bfloat16(), atol=0, rtol=0)
    close(run(be, "aten.sum.dim_IntList", x.reshape(8, 8), [1]), x.reshape(8, 8).sum(1), atol=1e-2, rtol=1e-2)


def test_float16_when_the_adapter_has_shader_f16(be):
    if not be.rt.f16:
        pytest.skip("adapter lacks shader-f16")
    x, y = torch.randn(40).half(), torch.randn(40).half()
    close(run(be, "aten.add.Tensor", x, y), x + y, atol=1e-3, rtol=1e-3)
    close(run(be, "aten.mm.default", x.reshape(5, 8), y.reshape(8, 5)), (x.reshape(5, 8) @ y.reshape(8, 5)),
          atol=2e-2, rtol=2e-2)


def test_batch_norm_saved_outputs_take_torch_cpu_dtypes(be):
    """A float16 ResNet's batch norm: the (empty, in eval) saved mean/invstd are float16 like CPU torch's,
    float32 only when the parameters are (torch's meta kernel says float32 for both)."""
    for dt, pdt, training in ((torch.float16, torch.float16, False), (torch.bfloat16, torch.bfloat16, True),
                              (torch.float16, torch.float32, True)):
        x, w = torch.randn(2, 4, 3, 3).to(dt), torch.randn(4).to(pdt)
        args = (x, w, w, torch.zeros(4, dtype=pdt), torch.ones(4, dtype=pdt), training, 0.1, 1e-5)
        close(run(be, "aten.native_batch_norm.default", *args), ref("aten.native_batch_norm.default", *args),
              atol=2e-2, rtol=2e-2)


def test_unsupported_is_reported_with_a_reason_never_run(be):
    f64 = OpCall("aten.add.Tensor", (torch.ones(3, dtype=torch.float64), 1.0), {})
    assert "float64" in be.supports(f64)
    assert "no WebGPU kernel" in be.supports(OpCall("aten._unique2.default", (torch.ones(3),), {}))
    drop = OpCall("aten._scaled_dot_product_flash_attention_for_cpu.default",
                  (torch.randn(1, 1, 2, 4),) * 3 + (0.1,), {})
    assert "dropout" in be.supports(drop)
    assert be.supports(OpCall("aten.add.Tensor", (torch.ones(3), 1.0), {})) is None


def test_replay_reports_unsupported_cases_as_unsupported(be, tmp_path):
    from tapml.recorder import carve
    from tapml.replay import run_tests
    from tapml.workload import Workload

    class Mixed(torch.nn.Module):
        def forward(self, x):
            return (x.double() * 2).float() + torch.unique(x).sum()

    x = torch.tensor([[0.0, 1.5], [2.0, 0.0]])
    model = Mixed()
    carve("mixed", tmp_path / "s", workload=Workload(model, lambda: model(x), False, "mixed"), progress=False)
    res = run_tests(str(tmp_path / "s"), be, progress=False)
    status = {r.op: (r.status, r.reason) for r in res.results}
    assert status["aten.mul.Tensor"][0] == "unsupported" and "float64" in status["aten.mul.Tensor"][1]
    assert status["aten._unique2.default"][0] == "unsupported"
    assert res.totals()["pass"] >= 1 and res.totals()["fail"] == 0 and res.totals()["error"] == 0


def test_a_host_view_keeps_its_storage_offset_on_the_device(be):
    """A replayed input at a small storage offset reaches the kernels at that offset, as a view made on the device
    would (an offset-ignoring kernel is then caught by a case, not only by a migration); a view far into a large
    storage is sent without what precedes it."""
    base = torch.arange(40, dtype=torch.float32)
    view = base[5:17].view(3, 4)
    h = be.upload(view)
    assert h.offset == 5 and torch.equal(be.download(h), view)
    far = torch.zeros(100_000)[90_000:90_012]
    h = be.upload(far)
    assert h.offset == 0 and h.storage.nbytes == 12 * 4
    out = be.execute(OpCall("aten.mul.Tensor", (view, 2.0), {}))
    assert torch.equal(out, view * 2)


def test_log1p_and_softplus_keep_their_relative_accuracy_near_zero(be):
    """Mamba2's softplus of very negative dt takes log1p of exp(dt) ~ 1e-5: the amplified cuts of a carved case
    found a 3e-3 relative error there (1 + x rounded, and the shader compiler folding the u - 1 correction)."""
    x = -torch.linspace(3.0, 16.0, 64)
    for op, arg in (("aten.log1p.default", torch.exp(x)), ("aten.softplus.default", x)):
        out = be.execute(OpCall(op, (arg,), {}))
        want = OpCall(op, (arg.double(),), {}).func()(arg.double())
        assert float(((out.double() - want) / want).abs().max()) < 1e-6, op
