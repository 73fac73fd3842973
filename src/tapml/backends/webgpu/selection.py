"""Ops whose result depends on what the data selects: nonzero, boolean masks (as indices, `masked_scatter`),
`repeat_interleave.Tensor`, `_is_all_true`, `count_nonzero`, and reductions into data-chosen destinations
(`index_add`, `scatter_add`, `scatter_reduce`, `index_put_(accumulate=True)`, `bincount`, `segment_reduce`).

An output whose size the data decides (nonzero, a mask's selection, repeat_interleave without output_size,
bincount) is counted on the device (`kernels.compact.prefix`, or a max reduction), the count read back to the
host (one small read: the only host round trip of these handlers, and the shape the next kernel needs), then
the values written by a kernel. Reductions into destinations run on `kernels.segment` (a stable counting sort
by destination, then a deterministic in-order reduction per destination), never float atomics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tapml.backends.webgpu import kernels as K
from tapml.backends.webgpu.kernels import compact, segment
from tapml.backends.webgpu.ops import broadcast, norm_dim, opmath, register
from tapml.backends.webgpu.runtime import Runtime, WGTensor
from tapml.backends.webgpu.transfer import download
from tapml.ops import OpCall


def _read_int(rt: Runtime, t: WGTensor, at: int) -> int:
    """Element `at` of a contiguous int tensor, read back to the host (a data-dependent size)."""
    return int(download(rt, t.view_as((), (), t.offset + at)).item())


def nonzero_positions(rt: Runtime, x: WGTensor, shape: Sequence[int] | None = None) -> tuple[WGTensor, int]:
    """(the exclusive positions of x's nonzero elements in row-major order, their count read back)."""
    pos = compact.prefix(rt, x, "nonzero", None if shape is None else tuple(shape))
    return pos, _read_int(rt, pos, pos.shape[0] - 1)


@register("aten.nonzero.default")
def _nonzero(rt: Runtime, x: WGTensor) -> WGTensor:
    """The coordinates of x's nonzero elements: counted on the device, the count read back, then written."""
    pos, count = nonzero_positions(rt, x)
    return compact.nonzero(rt, x, pos, count)


def expand_masks(rt: Runtime, indices: Sequence[WGTensor | None]) -> list[WGTensor | None]:
    """Advanced indices with each boolean (or uint8) mask replaced by its nonzero coordinates, one int64 index
    per masked dim, as torch does: a k-d mask indexes k dims. Reads each mask's count back (the selection's
    size is the data's)."""
    out: list[WGTensor | None] = []
    for t in indices:
        if t is None or t.dtype not in (torch.bool, torch.uint8):
            out.append(t)
            continue
        pos, count = nonzero_positions(rt, t)
        coords = compact.nonzero(rt, t, pos, count)
        k = t.dim()
        out.extend(coords.view_as((count,), (k,), coords.offset + d) for d in range(k))
    return out


@register("aten._is_all_true.default")
def _is_all_true(rt: Runtime, x: WGTensor) -> WGTensor:
    return K.reduce(rt, "all", x, None, False, torch.bool, "bool")


def _masked_scatter(inplace: bool):
    def run(rt: Runtime, x: WGTensor, mask: WGTensor, source: WGTensor) -> WGTensor:
        """The k-th selected position takes source's k-th element: positions by a prefix count over the mask
        (no read-back: the output has self's shape)."""
        shape = broadcast(x.shape, mask.shape)
        out = compact.masked_scatter(rt, x, mask, source, tuple(shape))
        return K.copy(rt, out, x) if inplace else out
    return run


register("aten.masked_scatter.default")(_masked_scatter(False))
register("aten.masked_scatter_.default")(_masked_scatter(True))


@register("aten.repeat_interleave.Tensor")
def _repeat_interleave(rt: Runtime, repeats: WGTensor, *, output_size: int | None = None) -> WGTensor:
    """Index i repeated repeats[i] times: the repeats' exclusive prefix on the device, its total read back
    unless output_size gives it, then each output position finds its index by binary search."""
    n = repeats.numel()
    pos = compact.prefix(rt, repeats, "count", (n,))
    total = output_size if output_size is not None else _read_int(rt, pos, n)
    return compact.expand(rt, pos, n, total, repeats.dtype)


def _count_nonzero(rt: Runtime, x: WGTensor, dim: Any = None) -> WGTensor:
    nonzero = x if x.dtype == torch.bool else K.copy(rt, x, K.new(rt, x.shape, torch.bool))  # NaN counts, as torch
    dims = None if dim is None else [dim] if isinstance(dim, int) else list(dim)
    return K.reduce(rt, "sum", nonzero, dims, False, torch.int64, opmath(torch.int64))


register("aten.count_nonzero.default", "aten.count_nonzero.dim_IntList")(_count_nonzero)


# --- reductions into destinations --------------------------------------------------------------------------

def _check_scatter_reduce(call: OpCall) -> str | None:
    reduce = call.args[4] if len(call.args) > 4 else call.kwargs.get("reduce")
    if reduce not in segment.REDUCE:
        return f"scatter_reduce with reduce={reduce!r} is not implemented on WebGPU"
    if reduce == "mean" and not call.args[0].dtype.is_floating_point:
        return "scatter_reduce mean of an integer tensor (its rounding) is not implemented on WebGPU"
    if call.args[0].dtype == torch.bool:
        return "scatter_reduce into a bool tensor is not implemented on WebGPU"
    return None


def _check_add(call: OpCall) -> str | None:
    if call.args[0].dtype == torch.bool:
        return f"{call.op} into a bool tensor is not implemented on WebGPU"
    return None


def _contiguous_strides(shape: Sequence[int]) -> list[int]:
    return list(K.contiguous_strides(shape))


def _scatter_into(rt: Runtime, kind: str, x: WGTensor, dim: int, index: WGTensor, src: WGTensor,
                  include_self: bool = True) -> WGTensor:
    """scatter_add / scatter_reduce: source element c goes to x's element c with coordinate `dim` replaced by
    index[c]; each destination reduces its contributions in row-major order of the index."""
    if x.dim() == 0:
        x, index, src = (t.view_as((1,), (0,), t.offset) for t in (x, index, src))
    d = norm_dim(dim, x.dim())
    cs = _contiguous_strides(x.shape)
    kc = [0 if i == d else cs[i] for i in range(index.dim())]
    offs, perm, _ = segment.bucket(rt, index.shape, kc, [(index, index.stride, cs[d], 0)], x.numel())
    return segment.segment_reduce(rt, kind, x, src, offs, perm, cs, [0] * x.dim(), index.shape,
                                  [src.stride[i] for i in range(index.dim())], include_self=include_self)


def accumulate_into(rt: Runtime, dst: WGTensor, values: WGTensor, shape: Sequence[int], coef: Sequence[int],
                    entries: Sequence[tuple[WGTensor, Sequence[int], int, int]]) -> WGTensor:
    """index_put_(accumulate=True) over an advanced-index plan (structured._index_plan: the index space
    `shape`, dst's coefficients over it, per index tensor its strides, dim stride and size): contributions
    keyed by the dst element they reach (its memory offset), each dst element summing its own in index order;
    the sums written back into dst."""
    span = 1 + sum((n - 1) * st for n, st in zip(dst.shape, dst.stride) if n > 0)
    if values.dtype != dst.dtype:
        values = K.copy(rt, values, K.new(rt, values.shape, dst.dtype))
    offs, perm, _ = segment.bucket(rt, shape, coef, [(t, st, dstride, dsize) for t, st, dstride, dsize in entries],
                                   span if dst.numel() else 0)
    out = segment.segment_reduce(rt, "sum", dst, values, offs, perm, dst.stride, [0] * dst.dim(), shape,
                                 K.bcast_strides(values, shape))
    return K.copy(rt, out, dst)


def _scatter_add(inplace: bool):
    def run(rt: Runtime, x: WGTensor, dim: int, index: WGTensor, src: WGTensor) -> WGTensor:
        out = _scatter_into(rt, "sum", x, dim, index, src)
        return K.copy(rt, out, x) if inplace else out
    return run


register("aten.scatter_add.default", check=_check_add)(_scatter_add(False))
register("aten.scatter_add_.default", check=_check_add)(_scatter_add(True))


def _scatter_reduce(inplace: bool):
    def run(rt: Runtime, x: WGTensor, dim: int, index: WGTensor, src: WGTensor, reduce: str, *,
            include_self: bool = True) -> WGTensor:
        out = _scatter_into(rt, reduce, x, dim, index, src, include_self)
        return K.copy(rt, out, x) if inplace else out
    return run


register("aten.scatter_reduce.two", check=_check_scatter_reduce)(_scatter_reduce(False))
register("aten.scatter_reduce_.two", check=_check_scatter_reduce)(_scatter_reduce(True))


def _index_add(inplace: bool):
    def run(rt: Runtime, x: WGTensor, dim: int, index: WGTensor, source: WGTensor, *, alpha: Any = 1) -> WGTensor:
        """x's slice index[i] along `dim` += alpha * source's slice i, each destination slice summing its
        sources in index order."""
        if x.dim() == 0:
            x, source = (t.view_as((1,), (0,), t.offset) for t in (x, source))
        d = norm_dim(dim, x.dim())
        n = index.numel()
        idx = index.view_as((n,), (index.stride[0] if index.dim() else 0,), index.offset)
        src = source if source.dim() == x.dim() else source.view_as((1,) * (x.dim() - source.dim()) + source.shape,
                                                                    (0,) * (x.dim() - source.dim()) + source.stride,
                                                                    source.offset)
        offs, perm, _ = segment.bucket(rt, (n,), (0,), [(idx, (idx.stride[0],), 1, 0)], x.shape[d])
        ke = [1 if i == d else 0 for i in range(x.dim())]
        sa = [0 if i == d else src.stride[i] for i in range(x.dim())]
        out = segment.segment_reduce(rt, "sum", x, src, offs, perm, ke, sa, (n,), (src.stride[d],), alpha)
        return K.copy(rt, out, x) if inplace else out
    return run


register("aten.index_add.default", check=_check_add)(_index_add(False))
register("aten.index_add_.default", check=_check_add)(_index_add(True))


def _check_bincount(call: OpCall) -> str | None:
    x = call.args[0]
    weights = call.args[1] if len(call.args) > 1 else call.kwargs.get("weights")
    if x.dim() != 1:
        return "bincount needs a 1-d input"
    if weights is not None and weights.dtype != torch.float32:
        return f"bincount with {weights.dtype} weights returns float64, which WGSL lacks"
    return None


@register("aten.bincount.default", check=_check_bincount)
def _bincount(rt: Runtime, x: WGTensor, weights: WGTensor | None = None, minlength: int = 0) -> WGTensor:
    """Counts (integer atomics) or weight sums (summed per bin in input order) of x's values; the bin count,
    max(x) + 1 or minlength, is read back."""
    n = x.numel()
    top = _read_int(rt, K.reduce(rt, "amax", x, None, False, x.dtype, opmath(x.dtype)), 0) + 1 if n else 0
    bins = max(top, minlength)
    offs, perm, cnt = segment.bucket(rt, (n,), (0,), [(x, (x.stride[0],), 1, 0)], bins, counts_only=weights is None)
    if weights is None:
        return K.copy(rt, cnt, K.new(rt, (bins,), torch.int64))
    zeros = K.fill(rt, K.new(rt, (bins,), torch.float32), 0)
    return segment.segment_reduce(rt, "sum", zeros, weights, offs, perm, [1], [0], (n,), (weights.stride[0],))


_EMPTY_SEGMENT = {"sum": 0.0, "mean": float("nan"), "max": float("-inf"), "min": float("inf"), "prod": 1.0}
_SEGMENT_KIND = {"sum": "sum", "mean": "mean", "max": "amax", "min": "amin", "prod": "prod"}


def _check_segment_reduce(call: OpCall) -> str | None:
    data, reduce = call.args[0], call.args[1]
    kw = call.kwargs
    lengths, offsets = kw.get("lengths"), kw.get("offsets")
    if reduce not in _SEGMENT_KIND:
        return f"segment_reduce with reduce={reduce!r} is not implemented on WebGPU"
    if not data.dtype.is_floating_point:
        return "segment_reduce of an integer tensor is not implemented on WebGPU"
    if kw.get("indices") is not None or (lengths is None) == (offsets is None):
        return "segment_reduce needs exactly one of lengths and offsets on WebGPU"
    if (lengths if lengths is not None else offsets).dim() != 1:
        return "segment_reduce with batched (n-d) lengths or offsets is not implemented on WebGPU"
    return None


@register("aten.segment_reduce.default", check=_check_segment_reduce)
def _segment_reduce(rt: Runtime, data: WGTensor, reduce: str, *, lengths: WGTensor | None = None,
                    indices: WGTensor | None = None, offsets: WGTensor | None = None, axis: int = 0,
                    unsafe: bool = False, initial: Any = None) -> WGTensor:
    """Contiguous segments along `axis` reduced in order: the segment offsets are the lengths' exclusive
    prefix (or the offsets given), each output element walks its own segment (`kernels.segment`)."""
    d = norm_dim(axis, data.dim())
    n = data.shape[d]
    offs = (compact.prefix(rt, lengths, "count") if lengths is not None
            else K.copy(rt, offsets, K.new(rt, offsets.shape, torch.int32)))
    segs = offs.shape[0] - 1
    shape = list(data.shape)
    shape[d] = segs
    base = K.fill(rt, K.new(rt, shape, data.dtype), _EMPTY_SEGMENT[reduce] if initial is None else initial)
    perm = K.ew(rt, "IT(idx)", [], K.new(rt, (n,), torch.int32), [], "i32")
    ke = [1 if i == d else 0 for i in range(data.dim())]
    sa = [0 if i == d else data.stride[i] for i in range(data.dim())]
    return segment.segment_reduce(rt, _SEGMENT_KIND[reduce], base, data, offs, perm, ke, sa, (n,), (data.stride[d],),
                                  include_self=0 if initial is None else 2)
