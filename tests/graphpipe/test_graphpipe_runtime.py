"""The GraphPipe executor in one process (every stage in schedule order, a mailbox for transport): gradients and
loss curves equal the single-process run for all three models, in float64; and the chain stages of the
baselines compose to the model."""

import torch

from tapml.graphpipe.baselines import chain_stages
from tapml.graphpipe.cost import CHAIN, DAG
from tapml.graphpipe.graph import Program
from tapml.graphpipe.launch import Job, _structure, train_local, train_reference
from tapml.graphpipe.models import get_model
from tapml.graphpipe.planner import Plan, make_plan

# Stages by the first name of each layer's module path, with replicas per stage.
PLANS = {
    "mmt4": ([["text"], ["image"], ["audio", "table"], ["fuse"]], [1, 2, 1, 1]),
    "dlrm": ([["dense"], ["sparse"], ["inter", "over", "out"]], [1, 1, 2]),
    "uno": ([["cell"], ["desc", "fp"], ["top"], ["out"]], [1, 2, 1, 1]),
}


def group_plan(name: str, groups: list[list[str]], replicas: list[int], micro: int = 2, batch: int = 8,
               topology: str = DAG) -> Plan:
    spec = get_model(name)
    prog = Program(spec.build("tiny", torch.float64), tuple(t[:micro] for t in spec.batch(micro, "tiny",
                                                                                             torch.float64)[0]))
    lg = _structure(prog)
    stages = [[i for i, lay in enumerate(lg.layers) if lay.name.split(".")[0] in g] for g in groups]
    return make_plan(lg, stages, replicas, micro, batch, topology=topology)


def max_error(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_pipelined_gradients_and_losses_equal_one_process():
    for name, (groups, replicas) in PLANS.items():
        p = group_plan(name, groups, replicas)
        assert p.estimate.depth >= 2 and len(p.stages) == len(groups)
        job = Job(name, name, p.to_json(), dtype="float64", steps=5, dump_grads=True)
        got, want = train_local(job), train_reference(job)
        assert max_error(got.grads, want.grads) <= 1e-10, name
        assert len(got.grads) == len(list(get_model(name).build("tiny").parameters()))
        assert max(abs(a - b) for a, b in zip(got.losses, want.losses)) <= 1e-10, name
        assert got.losses[0] != got.losses[-1]  # it trained
        # one record per action of the last step: a forward and a backward per micro-batch and stage
        assert len(got.records[0]) == 2 * p.n_micro * len(p.stages)


def test_simulated_order_and_gpipe_give_the_same_gradients():
    groups, replicas = PLANS["uno"]
    p = group_plan("uno", groups, replicas, micro=1)
    base = Job("uno", "uno", p.to_json(), dtype="float64", steps=1, dump_grads=True)
    ref = train_reference(base).grads
    assert max_error(train_local(base, order="simulated").grads, ref) <= 1e-10
    gp = Job("uno", "uno", p.to_json(), dtype="float64", steps=1, dump_grads=True, schedule="gpipe")
    assert max_error(train_local(gp).grads, ref) <= 1e-10


def test_chain_stages_compose_to_the_model():
    spec = get_model("dlrm")
    model = spec.build("tiny", torch.float64)
    inputs, _ = spec.batch(4, "tiny", torch.float64)
    prog = Program(model, tuple(t[:2] for t in inputs))  # exported at the micro-batch, as the ranks do
    p = group_plan("dlrm", [["dense"], ["sparse"], ["inter", "over", "out"]], [1, 1, 1], micro=2, batch=4,
                   topology=CHAIN)
    stages = chain_stages(prog, p.stages)
    # stage 1 reads the sparse indices (a model input) from its own batch: only activations cross stages
    assert "sparse_idx" not in stages[1].live_in and stages[1].reads == ["sparse_idx"]
    for st in stages:
        st.set_batch(list(prog.inputs), inputs, 2)
    for chunk in range(2):
        x = tuple(torch.tensor_split(t, 2, 0)[chunk] for t in inputs)
        for st in stages:
            st.chunk = chunk
            x = st(*x) if isinstance(x, tuple) else st(x)
            assert all(t.is_floating_point() for t in (x if isinstance(x, tuple) else (x,)))
        assert torch.equal(x, model(*(torch.tensor_split(t, 2, 0)[chunk] for t in inputs)))


class Skip(torch.nn.Module):
    """A value read by two later stages (a skip connection: what PyTorch's pipelining cannot train)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(6, 6) for _ in range(3))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return (self.c(torch.tanh(self.b(h))) + h).sum(-1)


def test_gradients_from_two_consumers_add_up():
    from tapml.graphpipe.runtime import StageRunner, run_local, wire
    from tapml.graphpipe.schedule import build

    torch.manual_seed(0)
    model = Skip().double()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    prog = Program(model, (x[:2],))
    lg = _structure(prog)
    names = [lay.name for lay in lg.layers]
    assert names == ["a", "b", "c", "model~add"]  # the residual add joins two layers: a layer of its own
    p = make_plan(lg, [[0], [1], [2, 3]], [1, 2, 1], 2, 8)
    sched = build(p, lg)
    assert (0, 1) in sched.edges and (0, 2) in sched.edges  # h goes to both later stages
    loss = torch.nn.functional.mse_loss
    runners = {s: StageRunner(s, w, prog, p.n_micro, loss, torch.device("cpu"))
               for s, w in wire(prog, p.stages, sched.edges).items()}
    run_local(sched, runners, (x,), y, 2)
    loss(model(x), y).backward()
    got = {k: q.grad for r in runners.values() for k, q in r.w.module.parameters().items()}
    want = {k: q.grad for k, q in model.named_parameters()}
    assert max_error(got, want) <= 1e-12
