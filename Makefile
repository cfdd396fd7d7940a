# FedOCR: one install, the tests, the services.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.install-stamp
TORCH   := torch==2.13.0

.PHONY: install test lint proto run-aggregator demo experiment bench learning soak clean

install: $(STAMP)

# torch first and exactly: that spec takes the local CPU build; anything looser pulls CUDA.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# The whole federation on this machine: data, PKI, key, one aggregator and 2 edge agents as
# processes over mutual TLS, and a single-edge model beside them (deploy/demo.py). Its files stay
# in $(DEMO_DIR).
DEMO_DIR ?= runs/demo
demo: install
	$(BIN)/python deploy/demo.py --work-dir $(DEMO_DIR)

# The paper's experiments in miniature: 5 models x single/centralized/federated, then
# docs/results.md and Fig. 3. SCALE=smoke (minutes), mini-pre (the CPU run reported: pretrained
# models fine-tuned), mini-cpu and mini (from scratch) or paper (an accelerator). Resumable:
# finished runs (results/SCALE/*.json) are not repeated.
SCALE ?= mini-pre
experiment: install
	$(BIN)/python -m experiments --scale $(SCALE)

# The aggregator SIGKILLed at random points of rounds, SOAK_KILLS times (the test suite does 20),
# restarted each time on the same port and state; SOAK_SEED picks the kill timing.
SOAK_KILLS ?= 200
SOAK_SEED  ?= 20261122
soak: install
	FEDOCR_CRASH_KILLS=$(SOAK_KILLS) FEDOCR_CRASH_SEED=$(SOAK_SEED) $(BIN)/pytest -q -s \
		tests/faults/test_crashes.py -k killed_at_random

lint: install
	$(BIN)/ruff check .

# Regenerate the gRPC stubs in fedocr/v1/ from proto/fedocr/v1/*.proto (committed; a test checks for drift).
proto: install
	$(BIN)/python -m fedocr.protogen

# Measured figures, not tests (README "Measured results"); each prints a table.
bench: install
	$(BIN)/python -m benchmarks.model_speed
	$(BIN)/python -m benchmarks.synth
	$(BIN)/python -m benchmarks.aggregator
	$(BIN)/python -m benchmarks.load
	$(BIN)/python -m benchmarks.secure_aggregation

# How fast the training recipes learn to read (README "How fast it learns"): one row per recipe choice,
# steps and CPU seconds to 50% and 90% held-out word accuracy; resumable (results/learning/*.json).
LEARNING_BUDGET ?= 900
learning: install
	$(BIN)/python -m benchmarks.learning --budget $(LEARNING_BUDGET)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# A local aggregator on $(AGG_LISTEN) with deploy/aggregator.toml; the first run makes a PKI
# (CA, server cert for 127.0.0.1/localhost, observer "ops") under $(AGG_DIR)/pki (ignored by git).
AGG_DIR    ?= runs/aggregator
AGG_PKI    := $(AGG_DIR)/pki
AGG_LISTEN ?= 127.0.0.1:50051
AGG_CONFIG ?= deploy/aggregator.toml

run-aggregator: install
	test -f $(AGG_PKI)/ca.pem || $(BIN)/fedocr-pki init --dir $(AGG_PKI)
	test -f $(AGG_PKI)/aggregator.pem || \
		$(BIN)/fedocr-pki server --name aggregator --host 127.0.0.1 --host localhost --dir $(AGG_PKI)
	test -f $(AGG_PKI)/ops.pem || $(BIN)/fedocr-pki observer --name ops --dir $(AGG_PKI)
	$(BIN)/aggregator serve --config $(AGG_CONFIG) --listen $(AGG_LISTEN) \
		--state-dir $(AGG_DIR)/state --cert $(AGG_PKI)/aggregator.pem \
		--key $(AGG_PKI)/aggregator.key --ca $(AGG_PKI)/ca.pem
