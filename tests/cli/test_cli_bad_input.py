"""Bad input through the real `tapml` command: every bad value, path, environment variable or result file a user
can give is one line on stderr (`tapml: error: ...` naming it), exit code 2, before any work, and nothing written.

Fast: every case fails before a model runs (the tiny model of tests/models is the only one loaded); the few
tests that need a run (repro files, the carve time limit) use the tiny model too.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TAPML, model_ref

TINY = model_ref("make_model")
LONG = "a" * 300  # one name longer than NAME_MAX (255 on every common file system)


def tapml(*args, env=None, cwd=None, timeout=300):
    return subprocess.run([*TAPML, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-input") / "store"
    r = tapml("carve", TINY, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def _tree(root: Path) -> set[str]:
    # SQLite's -wal/-shm side files come and go with any reader of a store: not something a command wrote.
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.name.endswith(("-wal", "-shm"))}


def _expect_one_line_error(r, *needles):
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tapml: error:"), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "Traceback" not in r.stderr


# (id, arguments, what the one line must contain, environment). Placeholders: {tmp} the test's folder (its tree
# must not change), {file} a file in it, {dir} a non-empty directory in it, {store} a real case store, {model}
# the tiny model, {long} a 300-byte name. {tmp}/x.culprit is a folder of the user's; {tmp}/r.json a result
# without a culprit.
CASES = [
    # usage errors: click's messages as one line, not a rich panel
    ("int-option-not-a-number", ["carve", "{model}", "--out", "{tmp}/o", "--samples", "abc"],
     ["Invalid value for '--samples'", "tapml carve --help"], None),
    ("missing-required-option", ["carve", "{model}"], ["Missing option '--out'"], None),
    ("unknown-option", ["carve", "{model}", "--out", "{tmp}/o", "--bogus"], ["No such option: --bogus"], None),
    ("float-option-not-a-number", ["migrate", "{model}", "--target", "torch", "--tol", "abc"],
     ["Invalid value for '--tol'"], None),
    ("unknown-command", ["frobnicate"], ["No such command 'frobnicate'"], None),
    # numbers: finite, in range, checked in the API before anything runs
    ("migrate-tol-nan", ["migrate", "{model}", "--target", "torch", "--tol", "nan"], ["--tol", "nan"], None),
    ("migrate-tol-inf", ["migrate", "{model}", "--target", "torch", "--tol", "inf"], ["--tol", "inf"], None),
    ("debug-tol-negative", ["debug", "{model}", "--target", "torch", "--tol", "-1"], ["--tol", "-1"], None),
    ("debug-tol-nan", ["debug", "{model}", "--target", "torch", "--tol", "nan"], ["--tol", "nan"], None),
    ("migrate-max-new-tokens-0", ["migrate", "{model}", "--target", "torch", "--max-new-tokens", "0"],
     ["--max-new-tokens", "got 0"], None),
    ("debug-max-new-tokens-negative", ["debug", "{model}", "--target", "torch", "--max-new-tokens", "-3"],
     ["--max-new-tokens", "got -3"], None),
    ("carve-samples-0", ["carve", "{model}", "--out", "{tmp}/o", "--samples", "0"], ["--samples"], None),
    ("carve-timeout-nan", ["carve", "{model}", "--out", "{tmp}/o", "--timeout", "nan"], ["--timeout"], None),
    ("carve-timeout-negative", ["carve", "{model}", "--out", "{tmp}/o", "--timeout", "-1"], ["--timeout"], None),
    # precisions: named with the choices, before a model is built or a target opens
    ("carve-dtype-unknown", ["carve", "{model}", "--out", "{tmp}/o", "--dtype", "float64"],
     ["unknown --dtype 'float64'", "float32, float16, bfloat16"], None),
    ("carve-weights-unknown", ["carve", "{model}", "--out", "{tmp}/o", "--weights", "q8_0"],
     ["unknown --weights 'q8_0'", "q4_0"], None),
    ("migrate-dtype-unknown", ["migrate", "{model}", "--target", "torch", "--dtype", "half"],
     ["unknown --dtype 'half'"], None),
    ("debug-weights-unknown", ["debug", "{model}", "--target", "torch", "--weights", "int4"],
     ["unknown --weights 'int4'"], None),
    ("debug-strategy-up-front", ["debug", "{model}", "--target", "torch", "--strategy", "bogus"],
     ["unknown strategy 'bogus'"], None),
    ("fault-param-nan", ["migrate", "{model}", "--target", "torch", "--inject", "noise=nan:aten.addmm.default"],
     ["bad fault", "finite"], None),
    ("fault-param-on-kind-without-one", ["debug", "{model}", "--target", "torch", "--inject",
                                         "offbyone=3:aten.addmm.default"], ["bad fault", "takes no =PARAM"], None),
    ("debug-fault-never-runs", ["debug", "{model}", "--target", "torch", "--inject", "noise:aten.mm.default",
                                "--out", "{tmp}/d"], ["never runs"], None),
    # output files: under a file, a directory, a name too long, a device, twice the same
    ("test-json-under-a-file", ["test", "{store}", "--backend", "torch", "--json", "{file}/x.json"],
     ["--json", "is a file, not a directory"], None),
    ("test-json-is-a-dir", ["test", "{store}", "--backend", "torch", "--json", "{dir}"],
     ["--json", "is a directory"], None),
    ("test-html-name-too-long", ["test", "{store}", "--backend", "torch", "--html", "{tmp}/{long}.html"],
     ["--html", "longer than the file system allows"], None),
    # a FIFO stands for /dev/null & co.: replacing those is never meant (a root run of the old code replaced
    # /dev/null with a file), and the test must be safe to run against code that gets it wrong
    ("test-json-a-fifo", ["test", "{store}", "--backend", "torch", "--json", "{tmp}/fifo"],
     ["--json", "not a regular file"], None),
    ("test-json-and-html-one-file", ["test", "{store}", "--backend", "torch", "--json", "{tmp}/r",
                                     "--html", "{tmp}/r"], ["--json and --html name the same file"], None),
    ("test-json-inside-the-store", ["test", "{store}", "--backend", "torch", "--json", "{store}/r.json"],
     ["--json", "inside the case store"], None),
    ("export-out-inside-the-store", ["export-pytest", "{store}", "--backend", "torch", "--out", "{store}/t.py"],
     ["--out", "inside the case store"], None),
    ("export-out-under-a-file", ["export-pytest", "{store}", "--backend", "torch", "--out", "{file}/t.py"],
     ["--out", "is a file, not a directory"], None),
    ("export-out-is-a-dir", ["export-pytest", "{store}", "--backend", "torch", "--out", "{dir}"],
     ["--out", "is a directory"], None),
    ("export-out-name-too-long", ["export-pytest", "{store}", "--backend", "torch", "--out", "{tmp}/{long}.py"],
     ["--out", "longer than the file system allows"], None),
    ("export-pattern-matches-nothing", ["export-pytest", "{store}", "--backend", "torch", "--out", "{tmp}/t.py",
                                        "-k", "zzz"], ["-k 'zzz' matches no case"], None),
    ("migrate-json-under-a-file", ["migrate", "{model}", "--target", "torch", "--json", "{file}/r.json"],
     ["--json", "is a file, not a directory"], None),
    ("migrate-json-is-a-dir", ["migrate", "{model}", "--target", "torch", "--json", "{dir}"],
     ["--json", "is a directory"], None),
    ("migrate-json-name-too-long", ["migrate", "{model}", "--target", "torch", "--json", "{tmp}/{long}.json"],
     ["--json", "longer than the file system allows"], None),
    ("migrate-culprit-store-not-ours", ["migrate", "{model}", "--target", "torch", "--json", "{tmp}/x.json"],
     ["culprit store", "not a culprit store tapml wrote"], None),
    ("migrate-json-named-like-its-culprit-store", ["migrate", "{model}", "--target", "torch", "--json",
                                                   "{tmp}/y.culprit"], ["same name"], None),
    ("debug-html-under-a-file", ["debug", "{model}", "--target", "torch", "--html", "{file}/x.html"],
     ["--html", "is a file, not a directory"], None),
    ("debug-html-is-a-dir", ["debug", "{model}", "--target", "torch", "--html", "{dir}"],
     ["--html", "is a directory"], None),
    ("debug-out-is-a-file", ["debug", "{model}", "--target", "torch", "--out", "{file}"],
     ["--out", "not a directory"], None),
    ("debug-out-under-a-file", ["debug", "{model}", "--target", "torch", "--out", "{file}/d"],
     ["--out", "is a file, not a directory"], None),
    ("debug-out-name-too-long", ["debug", "{model}", "--target", "torch", "--out", "{tmp}/{long}"],
     ["--out", "longer than the file system allows"], None),
    ("repro-out-is-a-dir", ["repro", "{tmp}/r.json", "--out", "{dir}"], ["--out", "is a directory"], None),
    ("repro-result-name-too-long", ["repro", "{tmp}/{long}.json"], ["RESULT", "longer than"], None),
    ("test-pattern-matches-nothing", ["test", "{store}", "--backend", "torch", "-k", "zzz"],
     ["-k 'zzz' matches no case"], None),
    # remote targets: the URL and the token are checked before anything dials
    ("remote-port-out-of-range", ["test", "{store}", "--backend", "remote", "--remote", "ws://host:99999"],
     ["bad remote URL", "99999"], None),
    ("remote-url-unclosed-ipv6", ["test", "{store}", "--backend", "remote", "--remote", "ws://[::1"],
     ["bad remote URL"], None),
    ("remote-url-not-websocket", ["test", "{store}", "--backend", "remote", "--remote", "http://x:1"],
     ["must start with ws://"], None),
    ("token-file-without-remote", ["test", "{store}", "--backend", "torch", "--token-file", "{file}"],
     ["--token-file is for a remote target"], None),
    # store arguments
    ("show-store-name-too-long", ["show", "{tmp}/{long}"], ["STORE", "longer than the file system allows"], None),
    ("show-store-under-a-file", ["show", "{file}/x"], ["no case store"], None),
    ("test-store-name-too-long", ["test", "{tmp}/{long}", "--backend", "torch"], ["STORE", "longer than"], None),
    ("carve-out-name-too-long", ["carve", "{model}", "--out", "{tmp}/{long}"], ["--out", "longer than"], None),
    ("carve-out-under-a-file", ["carve", "{model}", "--out", "{file}/x"], ["--out", "is a file"], None),
    # data is not rich markup, and a message stays one line whatever the path holds
    ("path-with-markup", ["show", "{tmp}/[/b]"], ["no case store at", "[/b]"], None),
    ("path-with-newline", ["show", "{tmp}/a\nb"], ["no case store at", "a\\nb"], None),
    ("path-not-utf8", ["show", os.fsdecode(b"{tmp}/\xff")], ["no case store at", "\\udcff"], None),
    # environment
    ("env-cache-dir-is-a-file", ["test", "{store}", "--backend", "inductor", "-k", "relu"],
     ["TAPML_CACHE_DIR", "not a directory"], {"TAPML_CACHE_DIR": "{file}"}),
    ("env-cache-dir-under-a-file", ["test", "{store}", "--backend", "inductor", "-k", "relu"],
     ["TAPML_CACHE_DIR", "is a file, not a directory"], {"TAPML_CACHE_DIR": "{file}/cache"}),
    ("env-webgpu-flag-not-a-flag", ["test", "{store}", "--backend", "webgpu", "-k", "relu"],
     ["TAPML_WEBGPU_NO_F16", "'maybe'"], {"TAPML_WEBGPU_NO_F16": "maybe"}),
]


@functools.cache
def _usable(name: str) -> bool:
    from tapml.backends import registered

    return any(b.name == name and b.available for b in registered())


@pytest.mark.parametrize("args, needles, env", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, store, args, needles, env):
    for backend in ("inductor", "webgpu"):
        if backend in args and not _usable(backend):
            pytest.skip(f"backend {backend} is not usable here")
    (tmp_path / "afile").write_text("not a directory\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "keep").write_text("the user's\n")
    (tmp_path / "x.culprit").mkdir()  # where `--json x.json` would keep its culprit store: someone else's folder
    (tmp_path / "x.culprit" / "keep").write_text("the user's\n")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "tmp").mkdir()  # TMPDIR of the command: a temp dir it leaves behind shows in the tree
    (tmp_path / "r.json").write_text(json.dumps({"culprit": None, "strategy": "bisect"}))
    subst = {"tmp": str(tmp_path), "file": str(tmp_path / "afile"), "dir": str(tmp_path / "adir"),
             "store": str(store), "model": TINY, "long": LONG}

    def fill(a: str) -> str:
        for k, v in subst.items():
            a = a.replace("{" + k + "}", v)
        return a

    before, store_before = _tree(tmp_path), _tree(store)
    full_env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), **{k: fill(v) for k, v in (env or {}).items()}}
    r = tapml(*[fill(a) for a in args], env=full_env)
    _expect_one_line_error(r, *[fill(n) for n in needles])
    assert _tree(tmp_path) == before, "a failed command left files behind"
    assert _tree(store) == store_before, "a failed command wrote into the store"


def test_help_and_exit_codes_still_work(store):
    r = tapml("--help")
    assert r.returncode == 0 and "carve" in r.stdout and r.stderr == ""
    r = tapml("carve", "--help")
    assert r.returncode == 0 and "--timeout" in r.stdout
    r = tapml()  # no arguments: the help, exit 2 (click's no_args_is_help)
    assert r.returncode == 2 and "Usage" in r.stdout + r.stderr
    r = tapml("test", store, "--backend", "torch")
    assert r.returncode == 0, r.stderr  # typer.Exit(0) of a command comes back as the exit code


def test_paths_with_markup_print_as_they_are(tmp_path):
    """A store path with `[/b]` in it is data: carve and show print it instead of failing in rich's markup."""
    out = tmp_path / "[b]x[/b]"
    r = tapml("carve", TINY, "--out", out)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout.replace("\n", "")
    r = tapml("show", out, "--cases")
    assert r.returncode == 0 and "[b]x[/b]" in r.stdout, r.stderr


_SLOW = """
import time
import torch

class Slow(torch.nn.Module):
    def forward(self, x):
        end = time.monotonic() + 60
        while time.monotonic() < end:
            x = torch.tanh(x + 1)
        return x

def make_model():
    return Slow(), (torch.ones(4),)
"""


def test_carve_timeout_stops_the_run_and_keeps_no_store(tmp_path):
    """`--timeout` reaches tapml.recorder.carve: the run is stopped, one line, no store left."""
    (tmp_path / "slow.py").write_text(_SLOW)
    r = tapml("carve", f"{tmp_path / 'slow.py'}:make_model", "--out", tmp_path / "s", "--timeout", "1",
              timeout=60)
    _expect_one_line_error(r, "time limit")
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------------------------- repro files


@pytest.fixture(scope="module")
def migrated(tmp_path_factory):
    """`tapml migrate --json` of the tiny model with a known fault: a real result and its culprit store."""
    d = tmp_path_factory.mktemp("migrated")
    r = tapml("migrate", TINY, "--target", "torch", "--inject", "offbyone:aten.addmm.default@1", "--json",
              d / "r.json")
    assert r.returncode == 1, r.stderr
    return d / "r.json"


def _pytest(path: Path):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                          capture_output=True, text=True, cwd=path.parent, timeout=300)


def test_a_legit_repro_still_fails_on_the_bug(migrated, tmp_path):
    r = tapml("repro", migrated, "--out", tmp_path / "test_r.py")
    assert r.returncode == 0, r.stderr
    run = _pytest(tmp_path / "test_r.py")
    assert "1 failed" in run.stdout, run.stdout[-2000:]


def test_migrate_again_replaces_the_culprit_store(migrated, tmp_path):
    """A rerun's culprit gets a store of its own inputs (an extended store would keep the old sample)."""
    j = tmp_path / "r.json"
    for fault in ("offbyone:aten.addmm.default@1", "offbyone:aten.addmm.default@2"):
        r = tapml("migrate", TINY, "--target", "torch", "--inject", fault, "--json", j)
        assert r.returncode == 1, r.stderr
    from tapml.store import CaseStore

    with CaseStore.open(tmp_path / "r.culprit") as st:
        runs = st.runs()
    assert len(runs) == 1 and "aten.addmm.default@2" in runs[0]["description"]
    assert json.loads(j.read_text())["culprit"]["index"] == 2


_INJECTED = 'import os; open(os.path.join(os.path.dirname(__file__), "PWNED"), "w").close()'


@pytest.mark.parametrize("field, value", [
    ("culprit.module", f'"""\n{_INJECTED}\n"""'),
    ("culprit.phase", f'"""\n{_INJECTED}\n"""'),
    ("model", f'"""\n{_INJECTED}\n"""'),
    ("culprit.verdict", f'"""\n{_INJECTED}\n"""'),
])
def test_crafted_result_runs_no_code_when_the_repro_is_collected(migrated, tmp_path, field, value):
    """Text fields of a migrate result land in the repro file as literals: collecting it runs nothing."""
    data = json.loads(migrated.read_text())
    obj, key = (data["culprit"], field.split(".")[1]) if "." in field else (data, field)
    obj[key] = value
    (tmp_path / "evil.json").write_text(json.dumps(data))
    r = tapml("repro", tmp_path / "evil.json", "--out", tmp_path / "test_evil.py")
    if r.returncode == 2:
        _expect_one_line_error(r)
        assert not (tmp_path / "test_evil.py").exists()
    else:
        assert r.returncode == 0, r.stderr
        _pytest(tmp_path / "test_evil.py")
    assert not (tmp_path / "PWNED").exists()


def test_an_exported_file_runs_no_code_from_its_store_path(tmp_path):
    """The store path lands in the exported test file as a literal, not in its docstring."""
    store = tmp_path / 'x"""+__import__("os").system("touch PWNED")+"""'
    assert tapml("carve", TINY, "--out", store).returncode == 0
    r = tapml("export-pytest", store, "--backend", "torch", "--out", tmp_path / "test_carved.py")
    assert r.returncode == 0, r.stderr
    run = _pytest(tmp_path / "test_carved.py")
    assert "6 passed" in run.stdout, run.stdout[-2000:]
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("field, value, message", [
    ("culprit.op", 'aten.mm.default"; import os #', "culprit.op"),
    ("culprit.op", "aten.mm", "culprit.op"),
    ("culprit.index", "7", "culprit.index"),
    ("culprit.call", -1, "culprit.call"),
    ("culprit", "aten.mm.default", "culprit must be an object"),
    ("culprit_case", True, "culprit_case"),
    ("culprit_case", 999, "is not a case of"),
    ("culprit_store", 5, "culprit_store"),
    ("culprit_store", "/nonexistent/store", "no case store"),
    ("backend", "torch'); import os #", "backend"),
    ("inject", "warp:aten.mm.default", "inject"),
])
def test_malformed_result_is_refused(migrated, tmp_path, field, value, message):
    data = json.loads(migrated.read_text())
    obj, key = (data["culprit"], field.split(".")[1]) if "." in field else (data, field)
    obj[key] = value
    (tmp_path / "bad.json").write_text(json.dumps(data))
    r = tapml("repro", tmp_path / "bad.json", "--out", tmp_path / "test_bad.py")
    _expect_one_line_error(r, message)
    assert not (tmp_path / "test_bad.py").exists()


# ----------------------------------------------------------------------------------------------- the API


def test_write_atomic_failure_is_one_line_and_leaves_nothing(tmp_path):
    from tapml.errors import TapmlError
    from tapml.report import write_atomic

    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    for bad in (tmp_path / "afile" / "x.json", tmp_path / "adir", tmp_path / LONG):
        with pytest.raises(TapmlError, match="--json"):
            write_atomic(bad, "{}", "--json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]
    assert list((tmp_path / "adir").iterdir()) == []
    write_atomic(tmp_path / "new" / "deep" / "r.json", "{}")  # folders are made for a good path
    assert (tmp_path / "new" / "deep" / "r.json").read_text() == "{}"
    assert oct((tmp_path / "new" / "deep" / "r.json").stat().st_mode & 0o777) == "0o644"


def test_localize_refuses_a_tolerance_that_judges_nothing():
    """A NaN tolerance fails every comparison (a false culprit); the API refuses it, not just the CLI."""
    from tapml.errors import TapmlError
    from tapml.migration import localize
    from tapml.migration.localize import check_settings

    for tol in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(TapmlError, match="--tol"):
            localize(None, "m", None, strategy="bisect", tol=tol)  # refused before it touches the workload or target
    with pytest.raises(TapmlError, match="unknown strategy"):
        check_settings("guess")
    with pytest.raises(TapmlError, match="--max-new-tokens"):
        check_settings(max_new_tokens=True)
