"""OpCall helpers: argument encoding round-trips, compact capture and rebuild keep exact layouts (size-1 dims'
strides and storage offsets included), signatures."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tapml.ops import (
    clone_layout,
    compact,
    content_hash,
    decode_args,
    default_layout,
    encode_args,
    odd_layout,
    rebuild,
    resolve_op,
    signature,
    tensor_meta,
)


def test_encode_decode_roundtrip_keeps_non_tensor_args():
    t = torch.ones(2)
    args = (t, [1, 2], -math.inf, None, "tanh", torch.float16, (3, t))
    kwargs = {"memory_format": torch.contiguous_format, "layout": torch.strided, "x": 1.5}
    spec, tensors = encode_args(args, kwargs)
    assert len(tensors) == 2
    a, k = decode_args(spec, tensors)
    assert a[1] == [1, 2] and a[2] == -math.inf and a[3] is None and a[4] == "tanh"
    assert a[5] is torch.float16 and a[6][1] is t and k == kwargs


def test_compact_stores_broadcast_values_once():
    bias = torch.randn(64)
    expanded = bias.expand(1024, 64)
    c, span = compact(expanded)
    assert c.numel() == 64 and not span
    back = rebuild(c, tensor_meta(expanded))
    assert torch.equal(back, expanded) and back.stride() == expanded.stride()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 6), start=st.integers(0, 2), transpose=st.booleans())
def test_rebuild_restores_strided_views(rows, cols, start, transpose):
    base = torch.arange(float((rows + 3) * (cols + 3))).reshape(rows + 3, cols + 3)
    view = base[start:start + rows, 1:1 + cols]
    if transpose:
        view = view.t()
    meta = tensor_meta(view)
    values, span = compact(view)
    back = rebuild(values, {**meta, "span": True} if span else meta)
    assert torch.equal(back, view)
    assert back.stride() == view.stride() and back.storage_offset() == view.storage_offset()


def _kv_slice() -> torch.Tensor:
    """A decode step's query as Llama makes it: [2,1,4,32] transposed to [2,4,1,32], stride 128 on the size-1 dim
    (`is_contiguous()` says True: torch ignores size-1 strides)."""
    return torch.arange(256.0).reshape(2, 1, 4, 32).transpose(1, 2)


def _views() -> list[torch.Tensor]:
    base = torch.arange(600.0)
    return [_kv_slice(), base[32:64].view(1, 32), base[5:].view(5, 1, 119)[:, :, 3:], base.view(20, 30).t()[2:9],
            base[7:17].expand(3, 10), torch.ones(3, 0, 2)[:, :, 1:]]


def test_tensor_meta_keeps_the_live_layout_of_views_torch_calls_contiguous():
    q = _kv_slice()
    assert q.is_contiguous() and q.stride() == (128, 32, 128, 1)
    meta = tensor_meta(q)
    assert meta["stride"] == [128, 32, 128, 1] and meta["offset"] == 0
    off = torch.arange(100.0)[32:64].view(1, 32)
    assert off.is_contiguous() and tensor_meta(off)["offset"] == 32
    fresh = torch.ones(2, 4, 1, 32)
    assert default_layout(fresh) and "stride" not in tensor_meta(fresh)  # as stores have always held them
    assert odd_layout(q) and odd_layout(off) and not odd_layout(fresh)


@settings(max_examples=60, deadline=None)
@given(which=st.integers(0, 5), whole=st.booleans())
def test_rebuild_and_clone_layout_give_back_the_exact_layout(which, whole):
    view = _views()[which]
    values, span = compact(view)
    meta = tensor_meta(view)
    for back in (rebuild(values.clone(), {**meta, "span": True} if span else meta), clone_layout(view, whole)):
        assert torch.equal(back, view)
        assert (back.shape, back.stride(), back.storage_offset()) == (view.shape, view.stride(),
                                                                      view.storage_offset())
        assert view.numel() == 0 or back.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()
    if whole:  # the storage around the view too (as_strided reads it)
        w = clone_layout(view, whole=True)
        assert w.untyped_storage().nbytes() == view.untyped_storage().nbytes()


def test_a_layout_is_part_of_the_signature():
    def sig(t):
        spec, ts = encode_args((t, 2.0), {})
        return signature("aten.mul.Tensor", spec, ts)

    q = _kv_slice()
    assert sig(q) != sig(q.clone(memory_format=torch.contiguous_format))
    assert sig(q) == sig(torch.zeros(2, 1, 4, 32).transpose(1, 2))  # values do not matter
    base = torch.arange(100.0)
    assert sig(base[32:64].view(1, 32)) != sig(base[:32].view(1, 32))


def test_transposed_weight_is_kept_as_its_memory_span():
    w = torch.randn(64, 32)
    values, span = compact(w.t())
    assert span and values.data_ptr() == w.data_ptr()  # no transposing copy
    back = rebuild(values.clone(), {**tensor_meta(w.t()), "span": True})
    assert torch.equal(back, w.t()) and back.stride() == w.t().stride()


def test_signature_depends_on_shapes_dtypes_and_scalars():
    def sig(*args):
        spec, ts = encode_args(args, {})
        return signature("aten.add.Tensor", spec, ts)

    a = torch.ones(2, 3)
    assert sig(a, a) == sig(torch.zeros(2, 3), torch.zeros(2, 3))  # values do not matter
    assert sig(a, a) != sig(torch.ones(3, 2), torch.ones(3, 2))
    assert sig(a, a) != sig(a.double(), a.double())
    assert sig(a, 1.0) != sig(a, 2.0)
    assert sig(a.t(), a.t()) != sig(a.t().contiguous(), a.t().contiguous())  # strides matter when not contiguous


def test_content_hash_is_content_addressed():
    x = torch.randn(10)
    assert content_hash(x) == content_hash(x.clone())
    assert content_hash(x) != content_hash(x + 1)
    assert content_hash(x) == content_hash(x.reshape(2, 5))  # values, not layout: the meta holds the shape
    assert content_hash(torch.zeros(3, dtype=torch.bool)) != content_hash(torch.zeros(3, dtype=torch.uint8))


def test_resolve_op_names_overloads():
    assert resolve_op("aten.mm.default") is torch.ops.aten.mm.default


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(op=st.text(max_size=12), spec=_json_values, metas=st.lists(_json_values, max_size=3))
def test_signature_is_the_hash_of_canonical_json(op, spec, metas):
    """Signatures stay what stores already hold: blake2b of `[op, spec, metas]` as compact key-sorted JSON, and
    the case's spec/metas columns are exactly the two inner parts."""
    import hashlib
    import json

    from tapml.ops import signature_parts

    sig, spec_json, metas_json = signature_parts(op, spec, metas)
    canonical = json.dumps([op, spec, metas], separators=(",", ":"), sort_keys=True)
    assert sig == hashlib.blake2b(canonical.encode(), digest_size=12).hexdigest()
    assert spec_json == json.dumps(spec, separators=(",", ":"), sort_keys=True)
    assert metas_json == json.dumps(metas, separators=(",", ":"), sort_keys=True)
