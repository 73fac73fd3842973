"""OpCall helpers: argument encoding round-trips, compact capture and rebuild keep strides, signatures."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tapml.ops import (
    compact,
    content_hash,
    decode_args,
    encode_args,
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
