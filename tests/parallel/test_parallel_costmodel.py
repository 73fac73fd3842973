"""The analytic model of a decode step: its byte counts for known shapes, how each plan divides them, its
choice where the answer is known (8 KV heads: tp; one KV head: the hybrid), and the measured calibration."""

from __future__ import annotations

import pytest

from tapml.errors import TapmlError
from tapml.parallel import costmodel as cm
from tapml.parallel import models

GIB = 1 << 30
B8, MQA = models.shape("llama3-8b"), models.shape("llama3-8b-mqa")


def test_llama3_8b_shape_reads_what_the_issue_says():
    assert B8.kv_bytes_per_token() == 128 * 1024  # 128 KiB of bf16 KV per token
    assert abs(B8.params() - 8.03e9) < 0.01e9
    c = cm.estimate("single", B8, 1 << 20)
    assert c.kv_bytes == 128 * GIB and not c.fits  # 2^20 tokens: 128 GiB of KV, beyond one H200
    assert abs(c.weight_bytes - 2 * (B8.params() - B8.vocab * B8.hidden)) < 0.01 * GIB  # all but the embedding


def test_plans_divide_weights_kv_and_collectives_as_built():
    ctx, n = 1 << 17, 8
    single = cm.estimate("single", MQA, ctx)
    tp, cp, hy = (cm.estimate(p, MQA, ctx, devices=n) for p in ("tp", "cp", "hybrid"))
    assert tp.kv_duplication == 8 and tp.kv_bytes == single.kv_bytes  # one KV head: every rank holds all of it
    assert cp.kv_bytes == single.kv_bytes / n and cp.weight_bytes == single.weight_bytes
    assert hy.kv_bytes == cp.kv_bytes and tp.weight_bytes < hy.weight_bytes < cp.weight_bytes
    assert cp.comm_count == 2 * MQA.layers  # tree merge: max then sums, per layer
    assert tp.comm_count == 2 * MQA.layers + 1 and hy.comm_count == 3 * MQA.layers + 1
    ag = cm.estimate("cp", MQA, ctx, devices=n, form="all-gather")
    assert ag.comm_count == MQA.layers and ag.comm_bytes > cp.comm_bytes  # fewer calls, n-fold volume
    gqa_tp = cm.estimate("tp", B8, ctx, devices=n)
    assert gqa_tp.kv_duplication == 1 and gqa_tp.kv_bytes == cm.estimate("single", B8, ctx).kv_bytes / n


def test_step_time_grows_with_context_and_the_host_bounds_eager_steps():
    dev = cm.DEVICES["h200"]
    t = [cm.estimate("single", B8, c).t_device for c in (1 << 15, 1 << 17, 1 << 19)]
    assert t[0] < t[1] < t[2]
    # doubling the context adds one context's worth of KV bandwidth time
    extra = cm.estimate("single", B8, 1 << 18).t_device - cm.estimate("single", B8, 1 << 17).t_device
    assert extra == pytest.approx((1 << 17) * B8.kv_bytes_per_token() / (dev.hbm_bytes_per_s * dev.bw_efficiency))
    small = cm.estimate("single", B8, 1024)
    assert small.t_step == max(small.t_host, small.t_device)  # a GPU's host runs ahead: overlap
    cpu = cm.estimate("single", B8, 1024, dev=cm.DEVICES["cpu"])
    assert cpu.t_step == pytest.approx(cpu.t_host + cpu.t_device)  # the CPU does both in turn


@pytest.mark.parametrize(("shape", "ctx", "best"), [(B8, 1 << 20, "tp"), (MQA, 1 << 20, "hybrid"),
                                                    (B8, 1 << 12, "tp")])
def test_advise_names_the_known_winner(shape, ctx, best):
    a = cm.advise(shape, ctx, devices=8)
    assert a.best == best and a.why.startswith(best)
    assert {c.plan for c in a.costs} == {"single", "tp", "cp", "hybrid"}


def test_advise_when_nothing_fits_says_what_to_change():
    a = cm.advise(B8, 1 << 24, devices=2)  # 16M tokens: 2 TiB of KV
    assert a.best is None and "nothing fits" in a.why and "add devices" in a.why


def test_one_device_is_the_single_plan_only_and_bad_plans_are_refused():
    assert [c.plan for c in cm.advise(B8, 4096, devices=1).costs] == ["single"]
    with pytest.raises(TapmlError, match="unknown plan"):
        cm.estimate("pipeline", B8, 10)
    with pytest.raises(TapmlError, match="unknown device"):
        cm.device("tpu")


def test_calibration_measures_this_machine_and_replaces_the_nominal_figures():
    m = cm.measure("cpu", "float32", mib=8, repeat=2)
    assert m["hbm_bytes_per_s"] > 1e8 and m["flops"] > 1e8
    dev = cm.calibrated(cm.DEVICES["cpu"], {**m, "host_s_per_layer": 0.002})
    assert dev.hbm_bytes_per_s == m["hbm_bytes_per_s"] and dev.bw_efficiency == 1.0
    assert dev.host_s_per_layer == 0.002 and dev.calibrated.startswith("measured")
