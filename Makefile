# MNIST deployment kit. `make help` lists every target with one line each.
#
# Every target that runs Python first makes the virtual environment it needs (`make setup`),
# from the pinned files in requirements/, so `make train` and `make test` work on a fresh clone.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# tflite-runtime 2.14.0 needs Python <= 3.11 and numpy < 2: it gets a venv of its own.
VENV_TFLITE_RUNTIME ?= .venv-tflite-runtime

# Knobs (override on the command line: make train DATA_DIR=../shared/datasets/mnist).
DATA_DIR ?=
REQUIRE_GPU ?=
ARGS ?=
RUN ?= artifacts/runs/latest
EXPORT_ARGS ?=
REST_PORT ?= 8501
GRPC_PORT ?= 8500
MODEL_BASE ?= artifacts/serving
TEST_ARGS ?=

TRAIN_FLAGS := $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(filter 1 true yes,$(REQUIRE_GPU)),--require-gpu)

# Quiet TensorFlow's C++ start-up chatter (INFO lines); warnings and errors still show.
export TF_CPP_MIN_LOG_LEVEL ?= 1

SETUP_STAMP := $(VENV)/.setup-done
TFLITE_RUNTIME_STAMP := $(VENV_TFLITE_RUNTIME)/.setup-done

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "Variables: DATA_DIR=<IDX folder>  REQUIRE_GPU=1  ARGS=\"--flag value ...\"  RUN=<run folder>"
	@echo "           REST_PORT=$(REST_PORT) GRPC_PORT=$(GRPC_PORT) MODEL_BASE=$(MODEL_BASE)"

# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------
.PHONY: setup
setup: $(SETUP_STAMP) ## Make .venv: the training machine's pinned dependencies (+ serving, client, dev)

$(SETUP_STAMP): pyproject.toml requirements/constraints.txt
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 on PATH" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip==26.3"
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[train,serve,client-grpc,dev]"
	@touch $@

.PHONY: lock
lock: ## Re-resolve requirements/constraints.txt after editing pyproject.toml's pins (fresh venv)
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade "pip==26.3"
	.venv-lock/bin/python -m pip install --quiet -e ".[train,serve,client-grpc,dev]"
	{ head -n 2 requirements/constraints.txt; .venv-lock/bin/python -m pip freeze --exclude-editable; } > requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt
	rm -rf .venv-lock

.PHONY: setup-tflite-runtime
setup-tflite-runtime: $(TFLITE_RUNTIME_STAMP) ## Make .venv-tflite-runtime: tflite-runtime 2.14.0 + numpy<2 (32-bit Pi OS's runtime)

$(TFLITE_RUNTIME_STAMP): requirements/pi-tflite-runtime.txt
	@test -x $(VENV_TFLITE_RUNTIME)/bin/python || $(PYTHON) -m venv $(VENV_TFLITE_RUNTIME)
	$(VENV_TFLITE_RUNTIME)/bin/python -m pip install --quiet -r requirements/pi-tflite-runtime.txt
	@touch $@

# ---------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------
.PHONY: gpu-check
gpu-check: setup ## Report what TensorFlow sees (GPU, CUDA, cuDNN); REQUIRE_GPU=1 fails without a GPU
	$(PY) -m model.gpu $(if $(filter 1 true yes,$(REQUIRE_GPU)),--require-gpu) --out artifacts/gpu_report.json

.PHONY: train
train: setup setup-tflite-runtime ## Check the GPU, train on MNIST, evaluate, then export the run (DATA_DIR=, REQUIRE_GPU=1, ARGS=)
	$(PY) -m model.train $(TRAIN_FLAGS) $(ARGS)
	$(PY) -m export --run artifacts/runs/latest $(EXPORT_ARGS)

.PHONY: bench-train
bench-train: setup ## Benchmark training: per-epoch time, samples/s, tf.data throughput, accuracy (JSON)
	$(PY) -m model.bench $(TRAIN_FLAGS) $(ARGS)

# ---------------------------------------------------------------------------------------------
# Test
# ---------------------------------------------------------------------------------------------
.PHONY: test
test: setup setup-tflite-runtime ## Run the test suite (about 15 minutes on 2 CPU cores)
	$(PY) -m pytest $(TEST_ARGS)

.PHONY: clean
clean: ## Remove artifacts/ (runs, exports, benchmarks); keeps the virtual environments
	rm -rf artifacts

.PHONY: distclean
distclean: clean ## Remove artifacts/ and the virtual environments
	rm -rf $(VENV) $(VENV_TFLITE_RUNTIME)

# ---------------------------------------------------------------------------------------------
# Export (issue 3)
# ---------------------------------------------------------------------------------------------
.PHONY: export
export: setup setup-tflite-runtime ## Export a run again: next SavedModel version + TFLite files (RUN=<run folder>, EXPORT_ARGS=)
	$(PY) -m export --run $(RUN) $(EXPORT_ARGS)

# ---------------------------------------------------------------------------------------------
# Serve (issue 4)
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# Raspberry Pi (issue 5)
# ---------------------------------------------------------------------------------------------
# pi-smoke: RUNTIME@RELEASE pairs run under arm64 emulation (Bookworm = Python 3.11, Trixie =
# Python 3.13; tflite-runtime has no wheels past 3.11). Needs .ci/install-pi-tools (as root).
PI_TARGETS ?= ai-edge-litert@bookworm,tflite-runtime@bookworm,ai-edge-litert@trixie
PI_DIGITS ?= 300

.PHONY: pi-smoke
pi-smoke: setup setup-tflite-runtime ## Run the Pi bundle under arm64 emulation (qemu) per runtime, compare with x86 (PI_TARGETS=, PI_DIGITS=)
	$(MAKE) pi-bundle
	$(PY) -m tests.arm64.smoke --targets $(PI_TARGETS) --digits $(PI_DIGITS) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS)
