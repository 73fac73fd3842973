"""Every zoo model, carved small (2 new tokens, 1 sample) and replayed on the WebGPU backend: every case must
pass — none failing, none erroring, none unsupported."""

import pytest

from tapml.backends import get_backend, registered
from tapml.carve import carve
from tapml.replay import check_sample, clone_call, run_tests
from tapml.store import CaseStore
from tapml.zoo import names

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_info = {b.name: b for b in registered()}.get("webgpu")
if not (_info and _info.available):
    pytest.skip(f"webgpu unusable here: {_info.reason if _info else 'not registered'}", allow_module_level=True)


@pytest.fixture(scope="session")
def zoo_stores(tmp_path_factory):
    """Carve each zoo model once per session, on first use (the stores are shared by every test)."""
    root = tmp_path_factory.mktemp("webgpu-zoo")
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            out = root / name
            carve(name, out, max_new_tokens=2, samples=1, progress=False)
            made[name] = str(out)
        return made[name]

    return get


@pytest.fixture(scope="session")
def webgpu():
    return get_backend("webgpu")


def _reference_reproduces(store: str, case_id: int) -> bool:
    """Whether the CPU reference itself reproduces the recorded outputs of a case (a case it cannot
    reproduce judges the recording, not the backend)."""
    torch_be, oracle = get_backend("torch"), get_backend("torch64")
    with CaseStore.open(store) as s:
        case = next(c for c in s.cases() if c.id == case_id)
        for sample in s.samples(case.id):
            status, _, _ = check_sample(torch_be, oracle, case, clone_call(s.load_call(case, sample)))
            if status != "pass":
                return False
    return True


@pytest.mark.parametrize("model", names())
def test_zoo_model_passes_on_webgpu(model, zoo_stores, webgpu):
    store = zoo_stores(model)
    res = run_tests(store, webgpu, progress=False)
    bad = [r for r in res.results if r.status != "pass"]
    unjudgeable = [r for r in bad if r.status == "fail" and not _reference_reproduces(store, r.case_id)]
    real = [r for r in bad if r not in unjudgeable]
    report = "\n".join(f"{r.status} {r.op} {r.args[:90]}: {r.reason[:160]}" for r in real)
    assert not real, f"{model}: {len(real)} of {len(res.results)} cases not passing on webgpu\n{report}"
    # a store the reference cannot reproduce is a carve bug; it must stay rare and visible
    assert len(unjudgeable) <= 2, [f"{r.op} {r.args}" for r in unjudgeable]
    assert res.totals()["pass"] + len(unjudgeable) == res.totals()["cases"] > 0
