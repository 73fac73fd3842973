"""GraphPipe on torch.distributed (gloo, 3 ranks launched by torchrun): gradients after one step and 5-step loss
curves equal the single-process run for all three models, the baselines through torch.distributed.pipelining
too; a rank that dies or hangs ends the launch with a clear error, never a hang."""

import time

import pytest
from test_graphpipe_runtime import group_plan, max_error

from tapml.errors import TapmlError
from tapml.graphpipe.cost import CHAIN
from tapml.graphpipe.launch import Job, launch, train_reference

pytestmark = pytest.mark.slow


def jobs() -> list[Job]:
    out = []
    for name, groups, reps in (("mmt4", [["text", "image"], ["audio", "table"], ["fuse"]], [1, 1, 1]),
                               ("dlrm", [["dense"], ["sparse"], ["inter", "over", "out"]], [1, 1, 1]),
                               ("uno", [["cell", "desc", "fp"], ["top", "out"]], [1, 2])):
        p = group_plan(name, groups, reps)
        out.append(Job(f"{name}-graphpipe", name, p.to_json(), dtype="float64", steps=5, dump_grads=True))
    chain = group_plan("dlrm", [["dense"], ["sparse", "inter"], ["over", "out"]], [1, 1, 1], topology=CHAIN)
    for sched in ("1f1b", "gpipe"):
        out.append(Job(f"dlrm-{sched}", "dlrm", chain.to_json(), dtype="float64", steps=5, dump_grads=True,
                       engine="pipelining", schedule=sched))
    return out


def test_gloo_training_equals_one_process(tmp_path):
    js = jobs()
    res = launch(js, 3, "cpu", tmp_path, timeout_s=60, limit_s=400)
    for j in js:
        got, want = res[j.label], train_reference(j)
        assert max_error(got.grads, want.grads) <= 1e-10, j.label
        assert len(got.losses) == 5 and max(abs(a - b) for a, b in zip(got.losses, want.losses)) <= 1e-10, j.label
        assert set(got.records) == {0, 1, 2} and all(got.records.values()), j.label  # every rank's timeline


def uno_job() -> Job:
    p = group_plan("uno", [["cell", "desc", "fp"], ["top"], ["out"]], [1, 1, 1])
    return Job("uno", "uno", p.to_json(), steps=3)


def test_a_dead_rank_ends_the_launch_with_its_reason(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(TapmlError) as e:
        launch([uno_job()], 3, "cpu", tmp_path, timeout_s=20, limit_s=120,
               fault={"job": "uno", "rank": 1, "step": 1, "kind": "die"})
    assert "graphpipe rank 1: injected fault: die at step 1" in str(e.value)
    assert time.monotonic() - t0 < 100


def test_a_hung_rank_times_out_on_the_others(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(TapmlError) as e:
        launch([uno_job()], 3, "cpu", tmp_path, timeout_s=5, limit_s=120,
               fault={"job": "uno", "rank": 2, "step": 1, "kind": "hang"})
    msg = str(e.value)
    assert "rank 2 died or stopped answering" in msg and "graphpipe rank 1:" in msg
    assert time.monotonic() - t0 < 100
