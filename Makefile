# Two commands: `make demo` and `make test`. Each creates .venv if missing and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.vtok-installed
# offline real data from Debian (labelled images for the eval ViT); installed on first use
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
SUDO   ?= $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,plot,video,hf]"
	@touch $(STAMP)

$(FMNIST):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q dataset-fashion-mnist

demo: $(STAMP)
	$(BIN)/vtok methods
	$(BIN)/vtok demo --out outputs/demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint $(FMNIST)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/strategies.py

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache .hypothesis
