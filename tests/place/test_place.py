"""The placed model end to end on the CPU: its outputs pass the fp64 verdict over torch, inductor, onnxruntime,
tvm and iree (three small models, one of them forced across all five backends so every hand-off is exercised); a
backend injected to be wrong on one op kind never receives it; save/load; the dynamo backend; the report."""

import time

import pytest
import torch

from tapml.place import rules as R
from tapml.place.api import Session, load, place
from tapml.place.engines import Eager
from tapml.place.placed import Partition

ALL = ["torch", "inductor", "onnxruntime", "tvm", "iree"]


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return torch.tanh(self.b(torch.nn.functional.gelu(self.a(x))))


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return torch.sigmoid(torch.relu(self.c(x)).mean((2, 3)))


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        s = self.q(x) @ self.k(x).transpose(1, 2)
        return torch.softmax(s * 0.35, -1) @ x


def _inputs(model):
    g = torch.Generator().manual_seed(0)
    if isinstance(model, ConvNet):
        from tapml.zoo.inputs import image_batch

        return (image_batch(8),)
    shape = (2, 16) if isinstance(model, Mlp) else (2, 5, 8)
    return (torch.randn(*shape, generator=g),)


# Compiles take seconds each on 2 cores: here the compilers offer the whole graph only (always a candidate) and
# torch every op, so placements still mix backends; the round-robin test above compiles single ops on each.
LEAN = {b: [R.Region(supported=lambda n: False)] for b in ALL[1:]}
LEAN["torch"] = [R.Chain(anchors=(R.ANY,), max_ops=1)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("artifacts"))


def test_every_backend_in_one_placed_model_passes_the_fp64_verdict(cache_dir):
    """Each op on a different backend, round robin: every backend hands tensors to every other one."""
    torch.manual_seed(0)
    model = Mlp()
    s = Session(model, _inputs(model), ALL, "cpu", cache_dir, repeats=1)
    n = len(s.graph)
    assert n >= 4
    parts = [Partition(ALL[(i + 1) % len(ALL)], frozenset({i})) for i in range(n)]
    placed = s.build(parts)
    assert {p.backend for p in placed.partitions} >= set(ALL[1:n + 1])
    v = s.whole_verdict(placed)
    assert v.passed, v.reason
    out = placed(*s.inputs)
    assert out.shape == (2, 8) and not torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("make", [Mlp, ConvNet, Attention])
def test_placed_model_passes_the_fp64_verdict(make, cache_dir):
    torch.manual_seed(0)
    model = make()
    inputs = _inputs(model)
    p = place(model, inputs, ALL, "cpu", budget=0, rules=LEAN, cache_dir=cache_dir, repeats=2, cost_cache=False)
    assert p.verdict.passed, p.verdict.reason
    with torch.no_grad():
        want = model(*inputs)
    got = p.placed(*inputs)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert set(p.single) == set(ALL)
    best = p.best_single
    assert best is not None and p.candidates >= len(ALL) and p.measured >= len(ALL)
    # the search's space holds every single-backend placement: its own estimate never loses to one of them
    assert p.predicted <= min(c for c in p.single.values() if isinstance(c, float)) * 3 + 1e-3


class _Sleepy(Eager):
    """Honest but slow eager torch: the fault below would win everything on speed if it were allowed to."""

    def __init__(self):
        super().__init__("cpu")
        self.name = "torch"

    def compile(self, module, example, constants):
        run = super().compile(module, example, constants)
        ops = sum(n.op == "call_function" for n in module.graph.nodes)

        def slow(*xs):
            # slow per op by a margin no scheduler hiccup on a loaded 2-core machine closes, so no grouping makes
            # it competitive
            time.sleep(0.005 * ops)
            return run(*xs)

        return slow


class _WrongOnTanh(Eager):
    """Fast and right everywhere except on aten.tanh, whose outputs it perturbs (a test double injecting a fault)."""

    def __init__(self):
        super().__init__("cpu")
        self.name = "faulty"

    def compile(self, module, example, constants):
        run = super().compile(module, example, constants)
        if not any(str(getattr(n.target, "overloadpacket", "")) == "aten.tanh" for n in module.graph.nodes):
            return run
        return lambda *xs: [o + 1e-2 * o.abs().max() for o in run(*xs)]


def test_a_backend_wrong_on_one_op_kind_never_receives_it():
    torch.manual_seed(0)
    model = Mlp()
    inputs = _inputs(model)
    R.register("faulty", [R.Chain(anchors=(R.ANY,), epilogue=(R.ANY,), max_ops=3), R.Region()])
    try:
        p = place(model, inputs, ["torch", "faulty"], "cpu", budget=1.0, repeats=3, cost_cache=False,
                  engines={"torch": _Sleepy(), "faulty": _WrongOnTanh()})
    finally:
        R.unregister("faulty")
    g = p.placed.graph
    faulty = [i for part in p.partitions if part.backend == "faulty" for i in part.ops]
    assert faulty, f"the fast backend should take every op it computes correctly: {p.summary()}"
    assert all(g.kind(i) != "aten.tanh" for i in faulty)
    assert any(g.kind(i) == "aten.tanh" for part in p.partitions if part.backend == "torch" for i in part.ops)
    assert p.excluded and all("faulty" in k and "tanh" in k for k in p.excluded)
    assert isinstance(p.single["faulty"], str)  # the whole model on it is wrong too: excluded with its reason
    assert p.verdict.passed


def test_save_and_load_round_trip(tmp_path, cache_dir):
    torch.manual_seed(0)
    model = ConvNet()
    inputs = _inputs(model)
    p = place(model, inputs, ["torch", "onnxruntime"], "cpu", budget=0, rules=LEAN, cache_dir=cache_dir,
              repeats=2, cost_cache=False)
    path = p.placed.save(tmp_path / "placement.json", p.summary())
    again = load(path, model, inputs, cache_dir=cache_dir)
    assert [(q.backend, q.ops) for q in again.partitions] == [(q.backend, q.ops) for q in p.partitions]
    assert torch.equal(again(*inputs), p.placed(*inputs))
    from tapml.errors import TapmlError

    with pytest.raises(TapmlError, match="different model"):
        load(path, Mlp(), _inputs(Mlp()), cache_dir=cache_dir)


def test_dynamo_backend_runs():
    from tapml.place.dynamo import register, tapml_backend

    register()
    torch.manual_seed(0)
    model = Attention()
    x = _inputs(model)[0]
    fn = torch.compile(model, backend="tapml", options={"backends": ["torch"], "budget": 0, "repeats": 2,
                                                         "cost_cache": False})
    torch._dynamo.reset()
    with torch.no_grad():
        got = fn(x)
        want = model(x)
    assert torch.allclose(got, want, atol=1e-6)
    assert tapml_backend.last.verdict.passed and len(tapml_backend.last.partitions) >= 1


def test_report_and_rules_registry(tmp_path):
    from tapml.errors import TapmlError
    from tapml.place import report

    with pytest.raises(TapmlError, match="non-empty list"):
        R.register("x", [])
    torch.manual_seed(0)
    model = Mlp()
    p = place(model, _inputs(model), ["torch"], "cpu", budget=0, repeats=2, cost_cache=False)
    page, picture = report.write(p, tmp_path / "r.html")
    assert picture.read_bytes()[:4] == b"\x89PNG"
    text = page.read_text()
    assert "Whole-model time per backend" in text and "placed" in text and "<img" in text
    assert "speedup over the best single backend" in report.text(p)


def test_host_crossings_are_charged_on_a_device_and_free_on_the_cpu():
    from tapml.place.api import crossing_seconds
    from tapml.place.candidates import enumerate_candidates

    torch.manual_seed(0)
    model = Mlp()
    s = Session(model, _inputs(model), ["torch"], "cpu", repeats=1)
    cands = enumerate_candidates(s.graph, ["torch"])
    c = next(c for c in cands.items if len(c.ops) == len(s.graph))
    s.engines["torch"].host_crossing = True
    assert crossing_seconds(s, cands, c) == 0.0  # the CPU is the host
    s.device = torch.device("meta")  # stands for a device whose memory is not the host's
    bytes_moved = 2 * 4 * (2 * 16 + 2 * 8)  # input [2,16] and output [2,8], float32, there and back
    assert crossing_seconds(s, cands, c) == pytest.approx(bytes_moved / 25e9)
