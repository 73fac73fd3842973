"""The WebGPU kernel library's text, no device needed: parameter slots named once (`Slots`); every kernel
family's WGSL reads only the parameter words its declaration lays out and leaves no declared slot unread, and
the storage bindings it declares are the ones the runtime lays out."""

import re

import pytest
import torch

from tapml.backends.webgpu.kernels import (
    bitcast,
    compact,
    conv,
    elementwise,
    gemm,
    index,
    norm,
    reduction,
    scan,
    sdpa,
    segment,
    sort,
)
from tapml.backends.webgpu.kernels.prelude import Slots


def test_slots_lay_out_names_and_runs_in_declaration_order():
    slots = Slots("M N", "x_off x_st:nd", "scale:2")
    lay = slots.bind(nd=3)
    assert lay.at == {"M": 0, "N": 1, "x_off": 2, "x_st": 3, "scale": 6}
    assert lay.words == 8
    assert (lay.u.N, lay.i.x_off, lay.u["x_off"]) == ("pu(1u)", "pi(2u)", "pu(2u)")
    assert lay.u.x_st == ("pu(3u)", "pu(4u)", "pu(5u)")
    assert lay.f.scale == ("pf(6u)", "pf(7u)")
    assert lay.pack(scale=[4, 5], x_st=(1, 2, 3), M=7, x_off=9, N=8) == [7, 8, 9, 1, 2, 3, 4, 5]
    assert slots.bind(nd=3) is lay
    assert slots.bind(nd=0).u.x_st == () and slots.bind(nd=0).at["scale"] == 3


def test_slots_refuse_a_packing_that_would_misplace_words():
    lay = Slots("a b:n c:2").bind(n=2)
    with pytest.raises(TypeError, match="missing .* 'b'"):
        lay.pack(a=1, c=[0, 0])
    with pytest.raises(TypeError, match="unexpected .* 'd'"):
        lay.pack(a=1, b=[1, 2], c=[0, 0], d=3)
    with pytest.raises(ValueError, match="b takes 2 words, got 1$"):
        lay.pack(a=1, b=[1], c=[0, 0])
    with pytest.raises(ValueError, match="declared twice"):
        Slots("a", "a").bind()
    with pytest.raises(ValueError, match="not a plain name"):
        Slots("in").bind()
    with pytest.raises(AttributeError, match="no parameter slot"):
        _ = lay.u.d
    assert Slots().bind().pack() == []


F32, I64 = ("t", "f32", "f32"), ("t", "i64", "i64")
OUT = ("f32", "", "f32")

# family -> (its layout, [WGSL of the specializations that together read every word], words no kernel reads)
FAMILIES = {
    "elementwise": lambda: (
        elementwise.ew_slots((F32, ("s", "f32"), ("s", "i64"), ("s", "bool")), 2, False),
        [elementwise.elementwise_wgsl(2, (F32, ("s", "f32"), ("s", "i64"), ("s", "bool")), OUT, "a", False)],
        set()),
    "elementwise-vec4": lambda: (
        elementwise.ew_slots((F32, F32, ("s", "i32")), 1, True),
        [elementwise.elementwise_wgsl(1, (F32, F32, ("s", "i32")), OUT, "a + b", True)], set()),
    "elementwise-in-place": lambda: (  # an input in the output's buffer is read through the output binding
        elementwise.ew_slots((("o", "f32", "f32"), F32), 2, False),
        [elementwise.elementwise_wgsl(2, (("o", "f32", "f32"), F32), OUT, "a + b", False)], set()),
    "reduce": lambda: (
        reduction.SLOTS.bind(no=2, nr=2, ne=0),
        [reduction.reduce_wgsl(k, 2, 2, ("f32", "f32"), ("f32", ""), 64) for k in ("sum", "argmax")], set()),
    "reduce-extra": lambda: (
        reduction.SLOTS.bind(no=2, nr=2, ne=1),
        [reduction.reduce_wgsl(k, 2, 2, ("f32", "f32"), ("f32", ""), 64) for k in ("normp", "var", "max")],
        set()),
    "softmax": lambda: (norm.SOFTMAX.bind(no=2), [norm.softmax_wgsl("softmax", 2, "f32", "f32", "", 64)],
                        set()),
    "layer_norm": lambda: (norm.LAYER_NORM.bind(no=2),
                           [norm.layer_norm_wgsl(2, "f32", "f32", "", True, True, 64)], set()),
    "cumulative": lambda: (scan.SLOTS.bind(no=2),
                           [scan.cumulative_wgsl("cumsum", 2, "f32", "f32", "f32", "")], set()),
    "rank_sort": lambda: (sort.SLOTS.bind(no=2), [sort.rank_sort_wgsl(2, "f32", "f32", "f32", "", "i32")],
                          set()),
    "matmul": lambda: (
        gemm.MATMUL,
        [gemm.matmul_wgsl(gemm.Tile(32, 32, 16, 4, 4), True, False, "f32", "f32", "f32", "f32", ""),
         gemm.matmul_fast_wgsl(gemm.FAST_CFG)],
        {"pad"}),
    "grouped_mm": lambda: (gemm.GROUPED_MM, [gemm.grouped_mm_wgsl("f32", "f32", "")], set()),
    "attention": lambda: (sdpa.SLOTS, [sdpa.attention_wgsl("f32", "b", 1, 64)], set()),
    "conv": lambda: (conv.CONV, [conv.conv_wgsl("f32", "f32", "", True)], set()),
    "pool2d": lambda: (conv.POOL2D,
                       [conv.pool2d_wgsl(k, "f32", "f32", "") for k in ("max", "avg", "adaptive_avg")],
                       set()),
    "gather": lambda: (index.gather_slots(3, 2),
                       [index.gather_wgsl(3, 2, "f32", "f32", "f32", "", ("i32", "i64"), scatter)
                        for scatter in (False, True)], set()),
    "isin": lambda: (index.ISIN, [index.isin_wgsl("f32", "i32", "f32")], set()),
    "histc": lambda: (index.HISTC, [index.histc_wgsl("f32")], set()),
    "prefix": lambda: (compact.prefix_slots(2), [compact.prefix_wgsl(2, "u32", m) for m in ("nonzero", "count")],
                       set()),
    "nonzero": lambda: (compact.nonzero_slots(2), [compact.nonzero_wgsl(2, "u32", "i64")], set()),
    "masked_scatter": lambda: (compact.masked_scatter_slots(2), [compact.masked_scatter_wgsl(2, "f32", "u32")],
                               set()),
    "repeat_interleave": lambda: (compact.EXPAND, [compact.expand_wgsl("i64")], set()),
    "segment-keys": lambda: (segment.keys_slots(2, 2), [segment.keys_wgsl(2, ("i64", "i32"))], set()),
    "segment-place": lambda: (segment.PLACE, [segment.place_wgsl(f) for f in (False, True)], set()),
    "segment-reduce": lambda: (segment.reduce_slots(2, 2),
                               [segment.segment_wgsl(k, 2, 2, "f32", "f32", "f32", "f32", "") for k in ("sum", "amax")],
                               set()),
    "bitcast": lambda: (bitcast.bitcast_slots(2),
                        [bitcast.bitcast_wgsl(2, (torch.uint8, "i32"), (torch.float16, "u32")),
                         bitcast.bitcast_wgsl(2, (torch.float16, "f16"), (torch.int8, "i32"))], set()),
}
_READ = re.compile(r"\bp[uif]\((\d+)u\)")
_STORAGE = re.compile(r"@binding\(\d+\) var<storage, (read_write|read)>")


@pytest.mark.parametrize("family", FAMILIES)
def test_each_kernel_reads_its_declared_slots_and_declares_its_bindings(family):
    lay, sources, unread = FAMILIES[family]()
    read = set()
    for src, bindings in sources:
        declared = "".join("w" if mode == "read_write" else "r" for mode in _STORAGE.findall(src))
        assert bindings == declared, f"{family}: launched as {bindings!r}, declared {declared!r}"
        words = {int(w) for w in _READ.findall(src)}
        assert words and max(words) < lay.words, f"{family} reads a word past its declaration"
        read |= words
    words_of = {name: {lay.at[name] + d for d in range(1 if run is None else run)}
                for name, run in lay.runs.items()}
    never = sorted(name for name, words in words_of.items() if words and not words & read)
    # (a slot, not every word: the outermost extent of a decomposed shape is never needed)
    assert never == sorted(unread), f"{family}: slots declared but never read: {never}"
