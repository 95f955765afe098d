# Two commands do all the set-up on a fresh machine (see README, Quick start):
#   make train   -> 4 DiLoCo workers on the embedded data (CPU)
#   make test    -> the test suite (make test-all adds the slow end-to-end runs)
# Both create .venv and install what they need. On a GPU machine with its own torch,
# skip this file: `pip install -e .[test]` keeps the torch you have.

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/quickstart-$(shell date +%Y%m%d-%H%M%S)
WORKERS ?= 4

.PHONY: install train test test-all clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python -m dilo.torchrun --nproc-per-node $(WORKERS) -m dilo.train --config configs/tiny.toml --run.dir $(RUN_DIR)

# What CI runs: everything but the long end-to-end runs marked slow (~10 min on 2 cores).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
