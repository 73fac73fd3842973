"""Migration and localization: mixed runs, placements, end-to-end verdicts, fault injection, localizers,
repro files and `tapml migrate` / `tapml repro` / `tapml debug` end to end. Targets are fault-injected
reference backends, so every bug's location is known."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import TAPML, model_ref
from torch.utils._python_dispatch import TorchDispatchMode

from tapml.backends import open_backend
from tapml.backends.faults import parse_fault
from tapml.backends.reference import TorchBackend
from tapml.errors import TapmlError
from tapml.migration import Placement, compare_runs, localize, run_mixed
from tapml.migration.localize import Session
from tapml.migration.repro import save_culprit, write_repro
from tapml.workload import load_workload

MODELS = ["llama", "gpt2", "qwen2", "mistral"]
MATMUL = {"gpt2": "aten.addmm.default"}
SDPA = "aten._scaled_dot_product_flash_attention_for_cpu.default"
STEPS = 3


@pytest.fixture(scope="module")
def workloads():
    return {m: load_workload(m, None, STEPS)[1] for m in MODELS}


@pytest.fixture(scope="module")
def traces(workloads):
    return {m: run_mixed(w, None, Placement.none()).trace for m, w in workloads.items()}


class _CatDims(TorchDispatchMode):
    """Records the dim argument of every aten.cat call (to find the KV-cache appends)."""

    def __init__(self):
        super().__init__()
        self.dims = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) == "aten.cat.default":
            self.dims.append(args[1] if len(args) > 1 else (kwargs or {}).get("dim", 0))
        return func(*args, **(kwargs or {}))


def _instances(trace, op, phase_prefix=""):
    return [k for o, k, _m, p in trace if o == op and p.startswith(phase_prefix)]


def _fault_for(kind, model, trace, workload):
    mm = MATMUL.get(model, "aten.mm.default")
    if kind in ("noise", "offbyone", "zero", "fp16", "bf16"):
        ks = _instances(trace, mm)
        return f"{kind}:{mm}@{ks[len(ks) * 2 // 3]}", mm, ks[len(ks) * 2 // 3]
    if kind == "decode-only":
        ks = _instances(trace, mm, "decode:")
        return f"decode-only:noise:{mm}@{ks[len(ks) // 2]}", mm, ks[len(ks) // 2]
    if kind == "dropmask":
        return f"dropmask:{SDPA}@0", SDPA, 0  # prefill, where the left padding is masked
    if kind == "stalekv":
        mode = _CatDims()
        with torch.no_grad(), mode:
            workload.run()
        phases = [p for o, _k, _m, p in trace if o == "aten.cat.default"]
        modules = [m for o, _k, m, _p in trace if o == "aten.cat.default"]
        k = next(i for i, (d, p, m) in enumerate(zip(mode.dims, phases, modules))
                 if d in (-2, 2) and p.startswith("decode:") and m.endswith("attn"))
        return f"stalekv:aten.cat.default@{k}", "aten.cat.default", k
    raise AssertionError(kind)


# ----------------------------------------------------------------------------------------------- mixed runs


class _Boxed:
    def __init__(self, t):
        self.t = t


class _DenseMemoryTarget(TorchBackend):
    """The reference's arithmetic in a memory of its own that holds every result dense (as a GPU backend does):
    outputs lose torch's layouts, e.g. CPU flash attention's permuted output."""

    name = "dense"

    def upload(self, t):
        return _Boxed(t.detach().clone())

    def download(self, h):
        return h.t.clone()

    def is_handle(self, x):
        return isinstance(x, _Boxed)

    def run(self, call):
        args, kwargs = pytree.tree_map_only(_Boxed, lambda b: b.t, (call.args, call.kwargs))
        out = call.func()(*args, **kwargs)
        return pytree.tree_map_only(torch.Tensor, lambda t: _Boxed(t.contiguous().clone()), out)


def test_a_target_with_dense_outputs_keeps_the_run_aligned(workloads):
    """Downloaded outputs take the reference's strides, so composite ops (reshape: view or copy) decide alike
    and call indices line up with the reference run."""
    w = workloads["llama"]
    golden = run_mixed(w, None, Placement.none())
    run = run_mixed(w, _DenseMemoryTarget(), Placement.all())
    assert run.trace == golden.trace
    assert run.on_target == run.calls and torch.equal(run.output, golden.output)


def test_all_on_the_reference_target_is_exact_and_aligned(workloads):
    w = workloads["llama"]
    golden = run_mixed(w, None, Placement.none(), keep_outputs=True)
    run = run_mixed(w, open_backend("torch"), Placement.all(), local_check=Placement(ops=frozenset(["aten.mm"])),
                    golden=golden.golden)
    assert run.trace == golden.trace  # call indices line up across runs
    assert run.on_target == run.calls
    assert torch.equal(run.output, golden.output)
    assert len(run.logits) == STEPS  # prefill + decode steps through generate() with the KV cache
    v = compare_runs(golden, run, True, 1e-6)
    assert v.passed and v.first_divergent_token is None and len(v.steps) == STEPS
    checked = [r for r in run.records if r.op == "aten.mm.default"]
    assert checked and all(r.local_error == 0 and r.local_pass for r in checked)
    # weights cross once, not once per step; a reference-only run crosses nothing
    params = sum(p.numel() * p.element_size() for p in w.model.parameters())
    assert params <= run.crossings.upload_bytes < 1.5 * params


def test_placement_by_kind_module_phase_and_range(workloads, traces):
    w, trace = workloads["gpt2"], traces["gpt2"]
    run = run_mixed(w, open_backend("torch"), Placement(ops=frozenset(["aten.addmm"]), phases=("decode:*",)))
    assert {(r.op, r.phase.split(":")[0]) for r in run.records} == {("aten.addmm.default", "decode")}
    run = run_mixed(w, open_backend("torch"), Placement(modules=("transformer.h.1.*",)))
    assert run.records and all(r.module.startswith("transformer.h.1.") for r in run.records)
    run = run_mixed(w, open_backend("torch"), Placement(calls=range(10, 20)))
    assert [r.call for r in run.records] == list(range(10, 20))
    assert run.crossings.uploads > 0 and run.crossings.downloads > 0  # tensors crossed at both boundaries
    p = Placement(ops=frozenset(["aten.addmm.default"]), op_indices=range(3))
    assert [r.op_index for r in run_mixed(w, open_backend("torch"), p).records] == [0, 1, 2]
    assert len(trace) == len(run.trace)


def test_in_place_ops_on_the_target_mutate_the_host_tensor():
    _, w = load_workload(model_ref("make_inplace"))
    golden = run_mixed(w, None, Placement.none())
    run = run_mixed(w, open_backend("torch", inject="noise=0.5:aten.add_.Tensor"), Placement.all())
    assert [r.op for r in run.records] == ["aten.clone.default", "aten.add_.Tensor", "aten.mul_.Tensor"]
    assert not torch.equal(run.output, golden.output)  # the corrupted add_ landed in the mutated tensor
    clean = run_mixed(w, open_backend("torch"), Placement.all())
    assert torch.equal(clean.output, golden.output)


def test_local_vs_accumulated_error_along_the_run(workloads, traces):
    w = workloads["gpt2"]
    fault, op, k = _fault_for("noise", "gpt2", traces["gpt2"], w)
    session = Session(w, open_backend("torch", inject=fault))
    run, v = session.trial(Placement.all(), local_check=Placement.all())
    assert not v.passed
    bad = next(r for r in run.records if r.op == op and r.op_index == k)
    assert bad.local_pass is False and bad.local_error > 1e-3
    later = [r for r in run.records if r.call > bad.call and r.local_error is not None]
    drifted = [r for r in later if r.local_pass and r.accumulated_error and r.accumulated_error > 1e-4]
    assert drifted, "ops after the fault compute right on drifted inputs: accumulated, not local, error"
    assert all(r.local_pass for r in run.records if r.call < bad.call)


# ----------------------------------------------------------------------------------------------- faults


@pytest.mark.parametrize("spec,msg", [("noise", "expected"), ("warp:aten.mm.default", "unknown kind"),
                                      ("noise:aten.mm.default@x", "@x"), ("noise=abc:aten.mm.default", "abc"),
                                      ("noise:mm", "not an op overload")])
def test_bad_fault_specs(spec, msg):
    with pytest.raises(TapmlError, match=msg):
        parse_fault(spec)


def test_composite_ops_alias_to_what_the_dispatcher_sees():
    assert parse_fault("fp16:aten.softmax.int").op == "aten._softmax.default"
    assert parse_fault("decode-only:noise=0.1:aten.mul.Tensor@3").spec == "decode-only:noise=0.1:aten.mul.Tensor@3"


def test_a_fault_on_an_op_the_model_never_runs_is_bad_input(workloads):
    with pytest.raises(TapmlError, match="never runs"):
        fault = parse_fault("fp16:aten.softmax.int")
        localize(workloads["llama"], "llama", open_backend("torch", inject=fault), fault=fault)


# ----------------------------------------------------------------------------------------------- localizers


@pytest.mark.parametrize("kind", ["noise", "offbyone", "zero", "fp16", "bf16", "dropmask", "stalekv", "decode-only"])
@pytest.mark.parametrize("model", MODELS)
def test_bisect_names_the_faulty_instance_within_log2_runs(workloads, traces, model, kind):
    w, trace = workloads[model], traces[model]
    fault, op, k = _fault_for(kind, model, trace, w)
    loc = localize(w, model, open_backend("torch", inject=fault), strategy="bisect", tol=1e-6,
                   fault=parse_fault(fault))
    assert loc.culprit is not None, f"{fault} was not found"
    assert (loc.culprit.op, loc.culprit.index) == (op, k)
    assert loc.culprit.phase == trace[loc.culprit.call][3]
    if kind == "decode-only":
        assert loc.culprit.phase.startswith("decode:")
    assert loc.runs <= math.ceil(math.log2(len(trace))) + 2
    assert loc.culprit.local_pass is False  # the injected op is wrong on its own inputs


@pytest.mark.parametrize("strategy", ["by-kind", "by-module"])
def test_other_strategies_find_the_same_instance(workloads, traces, strategy):
    fault, op, k = _fault_for("noise", "qwen2", traces["qwen2"], workloads["qwen2"])
    loc = localize(workloads["qwen2"], "qwen2", open_backend("torch", inject=fault), strategy=strategy, tol=1e-6,
                   fault=parse_fault(fault))
    assert (loc.culprit.op, loc.culprit.index) == (op, k)


def test_carved_strategy_finds_kind_bugs_but_not_instance_bugs(workloads):
    w = workloads["gpt2"]
    fault = parse_fault("offbyone:aten.addmm.default")
    loc = localize(w, "gpt2", open_backend("torch", inject=fault), strategy="carved", fault=fault)
    assert loc.culprit is not None and loc.culprit.op == "aten.addmm.default"
    fault = parse_fault("offbyone:aten.addmm.default@17")
    loc = localize(w, "gpt2", open_backend("torch", inject=fault), strategy="carved", fault=fault)
    assert loc.culprit is None and "carved cases pass" in loc.note


def test_no_divergence_on_a_correct_target(workloads):
    loc = localize(workloads["gpt2"], "gpt2", open_backend("torch"), strategy="bisect")
    assert loc.culprit is None and loc.exit_code == 0 and loc.runs == 2


def test_repro_file_replays_the_culprit_and_fails(tmp_path, workloads, traces):
    fault, _op, _k = _fault_for("offbyone", "gpt2", traces["gpt2"], workloads["gpt2"])
    loc = localize(workloads["gpt2"], "gpt2", open_backend("torch", inject=fault), strategy="bisect", tol=1e-6,
                   fault=parse_fault(fault))
    case = save_culprit(loc, tmp_path / "culprit")
    from tapml.migration.repro import migration_json

    path = write_repro(migration_json(loc, "torch", fault, str(tmp_path / "culprit"), case), tmp_path / "test_r.py")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "1 failed" in r.stdout, r.stdout[-2000:]
    # the same file passes on the correct backend: it tests the op, not the file
    text = path.read_text().replace(f"FAULT = {fault!r}", "FAULT = None")
    path.write_text(text)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:]


# ----------------------------------------------------------------------------------------------- CLI


def tapml(*args, cwd=None):
    return subprocess.run([*TAPML, *args], capture_output=True, text=True, cwd=cwd)


def test_cli_migrate_json_and_repro(tmp_path):
    j = tmp_path / "r.json"
    r = tapml("migrate", "gpt2", "--target", "torch", "--inject", "noise:aten.addmm.default@7", "--json", str(j),
              "--max-new-tokens", "3")
    assert r.returncode == 1, r.stderr
    d = json.loads(j.read_text())
    c = d["culprit"]
    assert (c["op"], c["index"]) == ("aten.addmm.default", 7)
    assert isinstance(c["call"], int) and c["module"].startswith("transformer.h.") and c["phase"]
    assert d["runs"] >= 2 and d["seconds"] > 0
    assert "crossings in the widest run" in r.stdout
    x = d["crossings"]
    assert x["uploads"] > 0 and x["upload_bytes"] > 0 and x["downloads"] >= 0  # all on the target: few come back
    r = tapml("repro", str(j), "--out", str(tmp_path / "test_repro.py"))
    assert r.returncode == 0, r.stderr
    assert "aten.addmm.default" in (tmp_path / "test_repro.py").read_text()
    r = tapml("migrate", "gpt2", "--target", "torch", "--max-new-tokens", "2")
    assert r.returncode == 0 and "no divergence" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["migrate", "gpt2", "--target", "torch", "--inject", "bogus"], "bad fault"),
    (["migrate", "gpt2", "--target", "nope"], "unknown backend"),
    (["migrate", "gpt2", "--target", "torch", "--strategy", "guess"], "unknown strategy"),
    (["migrate", "gpt2", "--target", "torch", "--inject", "noise:aten.mm.default@999"], "runs only"),
    (["repro", "/nonexistent.json"], "no such file"),
])
def test_cli_bad_input_is_one_line_exit_2(args, msg):
    r = tapml(*args)
    assert r.returncode == 2, r.stderr
    # Progress lines may come first (the out-of-range check needs one reference run); the error is one line.
    errors = [line for line in r.stderr.splitlines() if line.startswith("tapml: error:")]
    assert len(errors) == 1 and msg in errors[0] and r.stderr.strip().splitlines()[-1] == errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_debug_whole_flow_with_html(tmp_path):
    html = tmp_path / "d.html"
    r = tapml("debug", "gpt2", "--target", "torch", "--inject", "offbyone:aten.addmm.default@9", "--html",
              str(html), "--out", str(tmp_path / "d"), "--max-new-tokens", "2")
    assert r.returncode == 1, r.stderr
    assert "culprit: aten.addmm.default @9" in r.stdout
    text = html.read_text()
    assert "<svg" in text and "aten.addmm.default" in text and "test_culprit" in text
    assert (tmp_path / "d" / "test_repro.py").exists()


class _MulLayouts(TorchDispatchMode):
    """Whether each aten.mul.Tensor call of a run has an input laid out as `odd_layout` says (a storage offset,
    or a size-1 dim with a stride torch's `is_contiguous()` ignores)."""

    def __init__(self):
        super().__init__()
        self.odd = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from tapml.ops import odd_layout

        if str(func) == "aten.mul.Tensor":
            self.odd.append(any(odd_layout(t) for t in pytree.tree_leaves((args, kwargs or {}))
                                if isinstance(t, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def test_a_layout_only_fault_is_named_by_migrate_and_its_repro_fails_under_it(tmp_path):
    """A fault that shows only on views (Llama's decode-step query [2,4,1,32] has stride 128 on its size-1 dim):
    migrate names its first instance, and the repro, replaying the culprit's inputs in their live layout, fails
    under the fault (an older tapml stored them contiguous: its repro passed while saying it fails) and passes
    without it."""
    work, mode = load_workload("llama", None, 2)[1], _MulLayouts()
    with torch.no_grad(), mode:
        work.run()
    k = mode.odd.index(True)
    assert not any(mode.odd[:k]) and k > 0
    j = tmp_path / "r.json"
    fault = "layout:aten.mul.Tensor"
    r = tapml("migrate", "llama", "--target", "torch", "--inject", fault, "--json", str(j), "--max-new-tokens", "2",
              "--tol", "1e-6")
    assert r.returncode == 1, r.stderr
    c = json.loads(j.read_text())["culprit"]
    assert (c["op"], c["index"]) == ("aten.mul.Tensor", k) and c["phase"] == "decode:0"
    path = tmp_path / "test_repro.py"
    r = tapml("repro", str(j), "--out", str(path))
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "1 failed" in r.stdout, r.stdout[-2000:]
    path.write_text(path.read_text().replace(f"FAULT = {fault!r}", "FAULT = None"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:]
