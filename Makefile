# FedOCR: one install, the tests, the services.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.install-stamp
TORCH   := torch==2.13.0
PROTOS  := $(wildcard proto/fedocr/v1/*.proto)

.PHONY: install test lint proto run-aggregator clean

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

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check . || true

# Regenerate the gRPC stubs from proto/fedocr/v1/*.proto (committed; a test checks for drift).
proto: install
	$(BIN)/python -m fedocr.protogen

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
