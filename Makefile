# Two entry points: `make demo` and `make test`. Both set everything up first; setup is idempotent.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip -q --disable-pip-version-check
TAPML   := $(VENV)/bin/tapml
STAMP   := $(VENV)/.tapml-installed
DEMO    ?= demo-out

.PHONY: setup system demo test lint bench clean

setup: system $(STAMP)

# System packages the tests use: lavapipe (WebGPU without a GPU) and Chromium (browser target).
system:
	@bash scripts/ensure-debs.sh mesa-vulkan-drivers chromium

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@# torch==2.13.0 is the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e '.[webgpu,remote,test]'
	@touch $(STAMP)

demo: setup
	rm -rf $(DEMO)/llama
	$(TAPML) zoo
	$(TAPML) carve llama --out $(DEMO)/llama --max-new-tokens 8
	$(TAPML) show $(DEMO)/llama
	$(TAPML) test $(DEMO)/llama --backend torch --json $(DEMO)/llama-torch.json --html $(DEMO)/llama-torch.html
	@echo "report: $(DEMO)/llama-torch.html"

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/carve_overhead.py

clean:
	rm -rf $(DEMO) build src/*.egg-info
