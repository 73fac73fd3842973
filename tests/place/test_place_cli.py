"""`tapml place` as a typer app: a small model placed on torch with an HTML report and a saved placement; bad
input is a one-line TapmlError; importing the CLI module imports no torch."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tapml.errors import TapmlError
from tapml.place.cli import app, parse_budget


def test_budget_durations():
    assert parse_budget("90") == 90 and parse_budget("10m") == 600 and parse_budget("1.5h") == 5400
    with pytest.raises(TapmlError, match="--budget"):
        parse_budget("soon")


def test_cli_module_is_light():
    code = "import sys, tapml.place.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_place_command_writes_report_and_placement(tmp_path, monkeypatch):
    monkeypatch.setenv("TAPML_CACHE_DIR", str(tmp_path / "cache"))  # the cost cache lands here, not in ~/.cache
    html, plan = tmp_path / "r.html", tmp_path / "p.json"
    r = CliRunner().invoke(app, ["dcgan", "--small", "--backends", "torch", "--budget", "0", "--repeats", "2",
                                 "--html", str(html), "--save", str(plan)])
    assert r.exit_code == 0, r.output
    assert "placed" in r.output and "speedup over the best single backend (torch)" in r.output
    assert html.exists() and html.with_suffix(".png").exists()
    data = json.loads(plan.read_text())
    assert data["partitions"] and all(p["backend"] == "torch" for p in data["partitions"])
    assert (tmp_path / "cache" / "place" / "costs.json").exists()


def test_unknown_model_is_a_user_error():
    r = CliRunner().invoke(app, ["nosuch", "--backends", "torch"])
    assert isinstance(r.exception, TapmlError) and "choose one of" in str(r.exception)
