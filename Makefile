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
# The address both servers listen on (the container's published ports, the local server's
# --host): this machine only by default; BIND_ADDRESS=0.0.0.0 exposes them on every interface.
BIND_ADDRESS ?= 127.0.0.1
MODEL_BASE ?= artifacts/serving
TEST_ARGS ?=

TRAIN_FLAGS := $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(filter 1 true yes,$(REQUIRE_GPU)),--require-gpu)

# Quiet TensorFlow's C++ start-up chatter (INFO lines); warnings and errors still show.
export TF_CPP_MIN_LOG_LEVEL ?= 1

SETUP_STAMP := $(VENV)/.setup-done
TFLITE_RUNTIME_STAMP := $(VENV_TFLITE_RUNTIME)/.setup-done

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-22s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "Variables: DATA_DIR=<IDX folder>  REQUIRE_GPU=1  ARGS=\"--flag value ...\"  RUN=<run folder>"
	@echo "           REST_PORT=$(REST_PORT) GRPC_PORT=$(GRPC_PORT) BIND_ADDRESS=$(BIND_ADDRESS) MODEL_BASE=$(MODEL_BASE) DEMO_PORT=$(DEMO_PORT)"

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

# PyTorch for bench-train's speed reference (model/torch_reference.py): large, so opt-in and in
# its own venv. On PyPI plain torch is the CUDA build (several GB); TORCH_INDEX=
# https://download.pytorch.org/whl/cpu takes the CPU build instead (this machine has it on disk).
VENV_TORCH ?= .venv-torch
TORCH_INDEX ?=
TORCH_STAMP := $(VENV_TORCH)/.setup-done

.PHONY: setup-torch
setup-torch: $(TORCH_STAMP) ## Make .venv-torch: PyTorch 2.13 (CPU) + numpy, for bench-train's Keras-vs-PyTorch comparison

$(TORCH_STAMP): requirements/torch.txt
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 on PATH" >&2; exit 1; }
	@test -x $(VENV_TORCH)/bin/python || $(PYTHON) -m venv $(VENV_TORCH)
	$(VENV_TORCH)/bin/python -m pip install --quiet $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -r requirements/torch.txt
	@touch $@

# Docker Compose v2 for tests/test_serving_compose.py: `docker compose` where it works, else
# Debian's static build, pinned by checksum in .ci/fetch-compose (no Docker engine needed).
COMPOSE_TOOL := .tools/docker-compose

.PHONY: setup-compose
setup-compose: ## Docker Compose v2 to check serving/compose.yaml: `docker compose`, else Debian's binary in .tools/
	@docker compose version >/dev/null 2>&1 || $(MAKE) --no-print-directory -s $(COMPOSE_TOOL)

$(COMPOSE_TOOL): .ci/fetch-compose
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 on PATH" >&2; exit 1; }
	$(PYTHON) .ci/fetch-compose $@

# ---------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------
.PHONY: gpu-check
gpu-check: setup ## Report what TensorFlow sees (GPU, CUDA, cuDNN); REQUIRE_GPU=1 fails without a GPU
	$(PY) -m model.gpu $(if $(filter 1 true yes,$(REQUIRE_GPU)),--require-gpu) --out artifacts/gpu_report.json

.PHONY: train
# The run the training wrote, wherever ARGS="--out ..." put it, as model.train records it for
# this make (every recipe line's shell has make as its parent: $PPID). Only the chief of a
# multi-worker run records one: the other workers do not export.
TRAIN_RECORD = artifacts/.train-run-$$PPID

train: setup setup-tflite-runtime ## Check the GPU, train on MNIST, evaluate, then export the run (DATA_DIR=, REQUIRE_GPU=1, ARGS=)
	$(PY) -m model.train $(TRAIN_FLAGS) $(ARGS) --run-record $(TRAIN_RECORD)
	@run=$$(cat $(TRAIN_RECORD) 2>/dev/null); rm -f $(TRAIN_RECORD); \
	if [ -z "$$run" ]; then echo "train: not the chief worker: the chief exports the run"; \
	else set -x; $(PY) -m export --run "$$run" $(EXPORT_ARGS); fi

.PHONY: bench
bench: ## Every benchmark: bench-train, bench-export, bench-serve, bench-mobile (JSON under artifacts/bench/)
	$(MAKE) --no-print-directory bench-train
	$(MAKE) --no-print-directory bench-export
	$(MAKE) --no-print-directory bench-serve ARGS=
	$(MAKE) --no-print-directory bench-mobile ARGS=

.PHONY: bench-train
bench-train: setup ## Benchmark training: accuracy and ECE per seed, train time, tf.data vs step throughput, Keras vs PyTorch if make setup-torch ran (JSON)
	$(PY) -m model.bench $(TRAIN_FLAGS) --torch-python $(VENV_TORCH)/bin/python $(ARGS)

.PHONY: bench-multiworker
bench-multiworker: setup ## 2 workers (--strategy multiworker, localhost) vs 1, same global batch, per seed: accuracy, time (JSON)
	$(PY) -m model.bench_multiworker $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS)

# ---------------------------------------------------------------------------------------------
# Test
# ---------------------------------------------------------------------------------------------
.PHONY: test
test: setup setup-tflite-runtime setup-compose ## Run the test suite (5-10 minutes on 2 CPU cores)
	$(PY) -m pytest $(TEST_ARGS)

.PHONY: clean
clean: ## Remove artifacts/ (runs, exports, benchmarks); keeps the virtual environments
	rm -rf artifacts

.PHONY: distclean
distclean: clean ## Remove artifacts/, the virtual environments and fetched tools (.tools/)
	rm -rf $(VENV) $(VENV_TFLITE_RUNTIME) $(VENV_TORCH) .tools

# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
.PHONY: export
export: setup setup-tflite-runtime ## Export a run again: next SavedModel version + TFLite files (RUN=<run folder>, EXPORT_ARGS=)
	$(PY) -m export --run $(RUN) $(EXPORT_ARGS)

.PHONY: bench-export
bench-export: setup setup-tflite-runtime ## Time a full export of RUN into a scratch base; size/accuracy/latency targets (JSON)
	$(PY) -m export.bench --run $(RUN)

# ---------------------------------------------------------------------------------------------
# Serve
# ---------------------------------------------------------------------------------------------
# TF Serving in Docker (serving/compose.yaml) or, where no Docker engine answers, the local
# stand-in (python -m serving.server) with the same models.config, batching and metrics.
TF_SERVING_TAG ?= 2.21.0
GPU ?=
SERVE_STATE := artifacts/serving-local
# `docker compose`, else the standalone binary from make setup-compose (evaluated on use).
COMPOSE = $(shell docker compose version >/dev/null 2>&1 && echo docker compose || { test -x $(COMPOSE_TOOL) && echo $(COMPOSE_TOOL); } || echo docker compose) -f serving/compose.yaml
COMPOSE_ENV := MODEL_BASE=$(abspath $(MODEL_BASE)) REST_PORT=$(REST_PORT) GRPC_PORT=$(GRPC_PORT) BIND_ADDRESS=$(BIND_ADDRESS) TF_SERVING_TAG=$(TF_SERVING_TAG)
USE_GPU := $(filter 1 true yes,$(GPU))

.PHONY: serve serve-docker serve-local serve-stop query bench-serve
serve: setup ## Serve MODEL_BASE: TF Serving in Docker if a Docker engine answers, else the local server
	@if docker info >/dev/null 2>&1; then \
	  echo "serve: a Docker engine answers: TF Serving in a container (make serve-docker)"; \
	  $(MAKE) --no-print-directory serve-docker; \
	else \
	  echo "serve: no Docker engine answers (docker info failed): the local server (make serve-local)"; \
	  $(MAKE) --no-print-directory serve-local; \
	fi

serve-docker: setup setup-compose ## TF Serving container in the foreground (TF_SERVING_TAG=, GPU=1 for the -gpu image)
	@docker info >/dev/null 2>&1 || { echo "error: no Docker engine answers (docker info failed); try make serve-local" >&2; exit 1; }
	$(PY) -m serving.docker_check --image tensorflow/serving:$(TF_SERVING_TAG)$(if $(USE_GPU),-gpu) --models-root $(MODEL_BASE)
	$(COMPOSE_ENV) $(COMPOSE) $(if $(USE_GPU),--profile gpu up tfserving-gpu,up tfserving)

serve-local: setup ## Local TF Serving stand-in in the foreground until Ctrl-C/SIGTERM (REST_PORT, GRPC_PORT, BIND_ADDRESS, MODEL_BASE)
	$(PY) -m serving.server --models-root $(MODEL_BASE) --host $(BIND_ADDRESS) --rest-api-port $(REST_PORT) --port $(GRPC_PORT) --state-dir $(SERVE_STATE) $(ARGS)

serve-stop: ## Stop what make serve started: the local server (SIGTERM via its pid file) and the container
	@pidfile=$(SERVE_STATE)/server.pid; \
	if [ ! -f $$pidfile ]; then echo "serve-stop: no local server ($$pidfile absent)"; \
	else pid=$$(cat $$pidfile); \
	  if ! kill -0 $$pid 2>/dev/null || ! grep -q serving.server /proc/$$pid/cmdline 2>/dev/null; then \
	    echo "serve-stop: stale $$pidfile (process $$pid is not a local server): removing it"; rm -f $$pidfile; \
	  else echo "serve-stop: SIGTERM to the local server (pid $$pid)"; kill -TERM $$pid; \
	    for i in $$(seq 1 120); do kill -0 $$pid 2>/dev/null || break; sleep 0.5; done; \
	    if kill -0 $$pid 2>/dev/null; then echo "error: pid $$pid still running after 60 s" >&2; exit 1; fi; \
	    echo "serve-stop: the local server stopped"; \
	  fi; \
	fi
	@if docker info >/dev/null 2>&1; then $(COMPOSE_ENV) $(COMPOSE) --profile gpu down; \
	else echo "serve-stop: no Docker engine answers: no container to stop"; fi

query: setup ## Ask the server: make query ARGS="status|metadata|predict FILE...|testset [--protocol grpc]"
	$(PY) -m serving.query --rest-port $(REST_PORT) --grpc-port $(GRPC_PORT) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS)

bench-serve: setup ## Benchmark the local server (REST/gRPC, batch 1/64, 1/8/32 clients) -> artifacts/bench/serve.json
	$(PY) -m serving.bench --model-base $(MODEL_BASE) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS)

# ---------------------------------------------------------------------------------------------
# The web page
# ---------------------------------------------------------------------------------------------
# make demo: the model server as make serve starts it, with CORS on, plus the page in
# serving/web/ on 127.0.0.1:DEMO_PORT. DEMO_BACKEND=auto|docker|local|none (none: only the
# page, for a TF Serving that already runs with CORS: ARGS="--server-url http://host:8501").
DEMO_PORT ?= 8080
DEMO_BACKEND ?= auto

.PHONY: demo setup-browser
demo: setup ## Web page: draw/upload/photograph a digit, see TF Serving's answer (server as make serve, CORS on; Ctrl-C stops both)
	@if [ "$(DEMO_BACKEND)" != none ] && ! ls $(MODEL_BASE)/mnist 2>/dev/null | grep -qE '^[0-9]+$$'; then \
	  if [ "$(MODEL_BASE)" = artifacts/serving ]; then \
	    echo "demo: no model in $(MODEL_BASE)/mnist yet: training one first (make train)"; \
	    $(MAKE) --no-print-directory train || exit $$?; \
	  else echo "error: no model version in $(MODEL_BASE)/mnist (make train publishes to artifacts/serving)" >&2; exit 1; fi; \
	fi
	$(PY) -m serving.demo --backend $(DEMO_BACKEND) --page-port $(DEMO_PORT) --rest-port $(REST_PORT) \
	  --grpc-port $(GRPC_PORT) --models-root $(MODEL_BASE) --state-dir $(SERVE_STATE) $(ARGS)

setup-browser: ## Debian's Chromium for the browser tests (.ci/install-browser, as root or through sudo)
	@if [ -x /usr/bin/chromium ]; then echo "setup-browser: $$(/usr/bin/chromium --version 2>/dev/null)"; \
	elif [ "$$(id -u)" = 0 ]; then .ci/install-browser; \
	else sudo .ci/install-browser; fi

# ---------------------------------------------------------------------------------------------
# Raspberry Pi
# ---------------------------------------------------------------------------------------------
# pi-bundle / classify use PI_MODEL (default: the export's recommended model); the bundle's own
# flags go in PI_BUNDLE_ARGS (ARGS belongs to whichever target runs it, e.g. pi-smoke).
PI_MODEL ?= artifacts/mobile/mnist.tflite
PI_BUNDLE ?= artifacts/mnist-pi.tar.gz
PI_BUNDLE_ARGS ?=
PICTURES ?=

.PHONY: pi-bundle bench-mobile classify
pi-bundle: setup ## Build artifacts/mnist-pi.tar.gz: Pi code, recommended model, labels, samples, requirements, README (PI_MODEL=)
	$(PY) -m pi.bundle --model $(PI_MODEL) --out $(PI_BUNDLE) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(PI_BUNDLE_ARGS)

bench-mobile: setup setup-tflite-runtime ## Benchmark the Pi code here: accuracy per variant and on photos, CLI latency -> artifacts/bench/mobile.json (DATA_DIR=)
	$(PY) -m pi.bench_mobile $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS)

classify: setup ## Classify pictures with the Pi CLI: make classify PICTURES="a.jpg b.png" [ARGS="--json --benchmark 1000"]
	$(PY) -m mobile.classify --model $(PI_MODEL) $(ARGS) $(PICTURES)

# pi-smoke: RUNTIME@RELEASE pairs run under arm64 emulation (Bookworm = Python 3.11, Trixie =
# Python 3.13; tflite-runtime has no wheels past 3.11). Needs .ci/install-pi-tools (as root).
PI_TARGETS ?= ai-edge-litert@bookworm,tflite-runtime@bookworm,ai-edge-litert@trixie
PI_DIGITS ?= 300

.PHONY: pi-smoke
pi-smoke: setup setup-tflite-runtime ## Run the Pi bundle under arm64 emulation (qemu) per runtime, compare with x86 (PI_TARGETS=, PI_DIGITS=)
	$(MAKE) pi-bundle
	$(PY) -m pi.smoke --targets $(PI_TARGETS) --digits $(PI_DIGITS) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS)
