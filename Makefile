# Two entry points: `make demo` and `make test`. Both set everything up first; setup is idempotent.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip -q --disable-pip-version-check
TAPML   := $(VENV)/bin/tapml
STAMP   := $(VENV)/.tapml-installed
DEMO    ?= demo-out

.PHONY: setup system demo test lint bench clean

setup: system $(STAMP)
	@# The carving hook (C++, torch's extension loader): built once into the cache, a no-op when built.
	@$(PY) -c "from tapml._native import carve_hook; carve_hook()"

# System packages the tests use: lavapipe (WebGPU without a GPU), Chromium (browser target), espeak-ng (speech
# for the zoo's Whisper).
system:
	@bash scripts/ensure-debs.sh mesa-vulkan-drivers chromium espeak-ng

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@# torch==2.13.0 is the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	@# The compiler extras must not replace the torch installed above: pin it as pip's constraint.
	@$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt
	$(PIP) install -c $(VENV)/torch-constraint.txt -e '.[webgpu,remote,test,onnxruntime,tvm,iree]'
	@touch $(STAMP)

demo: setup
	rm -rf $(DEMO)
	$(TAPML) zoo
	$(TAPML) backends
	@# The whole top-down flow on zoo Llama against WebGPU (lavapipe without a GPU): carve, replay the
	@# carved cases, run the model with every op on WebGPU, localize any divergence, write the report.
	$(TAPML) debug llama --target webgpu --out $(DEMO)/webgpu --html $(DEMO)/debug-webgpu.html
	@# The same flow with a known bug injected into WebGPU (relative noise on one matmul instance in a decode
	@# step), to show localization at work: exit 1 (a culprit) is the expected outcome here.
	$(TAPML) debug llama --target webgpu --inject decode-only:noise:aten.mm.default@40 \
		--out $(DEMO)/injected --html $(DEMO)/debug-injected.html; test $$? -eq 1
	@echo "reports: $(DEMO)/debug-webgpu.html $(DEMO)/debug-injected.html"

# Two workers, each test file on one of them (module fixtures are built once): about 2x on two cores, because
# much of the suite waits on subprocesses, servers and the browser. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts

bench: setup
	$(PY) benchmarks/carve_overhead.py

clean:
	rm -rf $(DEMO) build src/*.egg-info
