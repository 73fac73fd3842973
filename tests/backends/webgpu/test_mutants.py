"""The mutation harness's mutants (benchmarks/bugfinding.py) still apply to the WebGPU kernels, change what they
compute while applied and leave no trace after: the harness must not rot silently as the kernels change."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tapml.backends import get_backend
from tapml.ops import OpCall

HARNESS = Path(__file__).parents[3] / "benchmarks" / "bugfinding.py"


@pytest.fixture(scope="module")
def bf():
    spec = importlib.util.spec_from_file_location("bugfinding", HARNESS)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bugfinding"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def be():
    return get_backend("webgpu")


def test_every_mutant_applies_exactly_once_and_is_argued_when_it_survives(bf, be):
    names = [m.name for m in bf.MUTANTS]
    assert len(names) == len(set(names)) >= 25
    assert len({m.family for m in bf.MUTANTS}) >= 8
    for m in bf.MUTANTS:
        bf.Patch(m)  # exits naming the mutant when its edit no longer matches the kernel text exactly once
    assert set(bf.EQUIVALENT) | set(bf.UNOBSERVED_HERE) <= set(names)


@pytest.mark.parametrize("name,op,args", [
    ("mean-divisor", "aten.mean.dim", (torch.arange(8.0).reshape(2, 4), [-1])),
    ("i64-scalar-sign-extend", "aten.add.Tensor", (torch.tensor([1, 2], dtype=torch.int64), 2**31)),
    ("tree-last-step", "aten.sum.default", (torch.ones(4096),)),
])
def test_a_mutant_changes_results_while_applied_and_not_after(bf, be, name, op, args):
    if name.startswith("i64") and not be.rt.int64_native:
        pytest.skip("adapter lacks shader-int64")
    call = OpCall(op, args, {})
    want = call.func()(*args)
    assert torch.equal(be.execute(call), want)
    with bf.Patch(next(m for m in bf.MUTANTS if m.name == name)):
        assert not torch.equal(be.execute(call), want)
    assert torch.equal(be.execute(call), want)


def test_a_write_past_the_end_of_a_tensor_is_an_error_of_the_case(bf, be):
    """topk writing the element of rank k too: in every row but the last it lands in the next row's first slot
    (which that row's own thread overwrites on lavapipe), in the last row past the end of the output, where the
    driver's robust buffer access would drop it unseen. The guard band after every buffer of `execute` sees it."""
    from tapml.backends.webgpu.runtime import OutOfBounds

    x = torch.randn(6, 32)
    call = OpCall("aten.topk.default", (x, 4), {})
    values, _ = be.execute(call)
    assert torch.equal(values, x.topk(4).values)
    mutant = next(m for m in bf.MUTANTS if m.name == "topk-rank-guard")
    with bf.Patch(mutant), pytest.raises(OutOfBounds, match="wrote past the end"):
        be.execute(call)
    assert torch.equal(be.execute(call)[0], x.topk(4).values)  # nothing left behind: the next case is clean
