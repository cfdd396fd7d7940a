# FedOCR: one install, the tests, the services.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.install-stamp
TORCH   := torch==2.13.0

.PHONY: install test lint proto run-aggregator demo experiment owners bench learning generalization general-recipe soak clean

install: $(STAMP)

# Font families for the synthetic renderer's train / held-out sets (recognizer/fonts.py): Debian's
# font packages, installed only where apt-get exists and we are root; without them the renderer has
# the font packages of pyproject's recognizer extra and matplotlib's fonts, and the build goes on.
APT_FONTS := \
	fonts-liberation fonts-urw-base35 fonts-texgyre fonts-freefont-ttf fonts-crosextra-carlito \
	fonts-crosextra-caladea fonts-dejavu-core fonts-open-sans fonts-cantarell fonts-linuxlibertine \
	fonts-ebgaramond fonts-hack fonts-firacode fonts-inconsolata fonts-comic-neue fonts-cabin \
	fonts-oldstandard fonts-yanone-kaffeesatz fonts-dkg-handwriting fonts-humor-sans fonts-lato \
	fonts-roboto fonts-adf-accanthis fonts-adf-baskervald fonts-adf-berenis fonts-adf-gillius \
	fonts-adf-ikarius fonts-adf-irianis fonts-adf-libris fonts-adf-mekanus fonts-adf-oldania \
	fonts-adf-romande fonts-adf-switzera fonts-adf-tribun fonts-adf-universalis fonts-adf-verana \
	fonts-sil-gentium fonts-sil-charis fonts-sil-andika fonts-go fonts-croscore fonts-quicksand \
	fonts-jura fonts-averia-gwf fonts-averia-sans-gwf fonts-averia-serif-gwf fonts-junicode \
	fonts-lobster fonts-lobstertwo fonts-goudybookletter fonts-f500 fonts-stix fonts-play \
	fonts-prociono fonts-rufscript fonts-tomsontalks fonts-femkeklaver fonts-kristi \
	fonts-mph-2b-damase fonts-beteckna fonts-breip fonts-radisnoir fonts-anonymous-pro \
	fonts-century-catalogue fonts-bebas-neue fonts-inter fonts-courier-prime fonts-jetbrains-mono \
	fonts-roboto-slab fonts-karla fonts-vollkorn fonts-gfs-didot fonts-gfs-baskerville \
	fonts-gfs-artemisia fonts-fanwood fonts-league-mono fonts-league-spartan fonts-oxygen \
	fonts-hermit fonts-agave fonts-monoid fonts-tuffy fonts-yrsa-rasa fonts-routed-gothic \
	fonts-blankenburg fonts-staypuft fonts-lindenhill fonts-sora fonts-dosis fonts-comfortaa \
	fonts-noto-mono

# torch first and exactly: that spec takes the local CPU build; anything looser pulls CUDA.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	-@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q --no-install-recommends $(APT_FONTS) >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && \
		  apt-get install -y -q --no-install-recommends $(APT_FONTS) >/dev/null 2>&1; } || \
		echo "font packages not installed: the renderer keeps to the Python font packages"; fi
	touch $(STAMP)

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q --durations=15

# The whole federation on this machine: data, PKI, key, one aggregator and 2 edge agents as
# processes over mutual TLS, and a single-edge model beside them (experiments/demo.py). Its files stay
# in $(DEMO_DIR).
DEMO_DIR ?= runs/demo
demo: install
	$(BIN)/python -m experiments.demo --work-dir $(DEMO_DIR)

# The paper's experiments in miniature: 5 models x single/centralized/federated, then
# docs/results/experiment-SCALE.md and Fig. 3. SCALE=smoke (minutes), mini-pre (the CPU run
# reported: pretrained models fine-tuned), mini-cpu and mini (from scratch) or paper (an
# accelerator). Resumable: finished runs (results/SCALE/*.json) are not repeated.
SCALE ?= mini-pre
experiment: install
	$(BIN)/python -m experiments --scale $(SCALE)

# Four owners who differ (receipts, signs, meters, tags), alone and federated, with warm-up, server
# optimizers, FedProx and personalization; and the mini data split Dirichlet(0.1) (experiments/owners.py,
# docs/results/owners.md). Resumable: results/owners/RUN.json per finished run. OWNERS_SCALE=smoke: minutes.
OWNERS_SCALE ?= owners
owners: install
	$(BIN)/python -m experiments.owners --scale $(OWNERS_SCALE)

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

# Measured figures, not tests (docs/results/); each prints a table.
bench: install
	$(BIN)/python -m benchmarks.model_speed
	$(BIN)/python -m benchmarks.synth
	$(BIN)/python -m benchmarks.aggregator
	$(BIN)/python -m benchmarks.load
	$(BIN)/python -m benchmarks.secure_aggregation

# How fast the training recipes learn to read (docs/results/learning.md): one row per recipe choice,
# steps and CPU seconds to 50% and 90% held-out word accuracy; resumable (results/learning/*.json).
LEARNING_BUDGET ?= 900
learning: install
	$(BIN)/python -m benchmarks.learning --budget $(LEARNING_BUDGET)

# The generalization table (benchmarks/generalization.py): each model of GEN_MODELS (its key beside it)
# on held-out sets that differ from training in one way each (fonts, backgrounds, word length, the
# rasterizer), GEN_COUNT images a row, rendered once into $(GEN_WORK); the general-purpose recipe's
# commands are in docs/recognizer.md. Writes results/generalization/$(GEN_NAME).json.
GEN_MODELS ?=
GEN_COUNT  ?= 1000
GEN_WORK   ?= runs/generalization
GEN_NAME   ?= generalization
generalization: install
	$(BIN)/python -m benchmarks.generalization $(foreach m,$(GEN_MODELS),--model $(m)) \
		--count $(GEN_COUNT) --work-dir $(GEN_WORK) --name $(GEN_NAME)

# The general-purpose recipe end to end, each stage timed (experiments/general_recipe.py): the first
# stage with the recipe's data rendered beside it, then the recipe; resumable. Its model is then
# scored with `make generalization GEN_MODELS=runs/general-recipe/general.npz`.
general-recipe: install
	$(BIN)/python -m experiments.general_recipe

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
