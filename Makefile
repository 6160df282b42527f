# The two set-up commands of the README: `make demo` (main job, embedded offline default) and `make test`.
# Each installs what it needs from nothing: a venv, torch 2.13.0 first, then the rest under a constraint pinning it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: demo test install data lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	echo "$(TORCH_PIN)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $@

# Real Fashion-MNIST from Debian's package when apt is there; elsewhere the loader falls back to the Hub.
data:
	@if [ ! -d $(FMNIST_DIR) ] && command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi

# Offline whenever the Debian data is there; elsewhere the loader may fetch Fashion-MNIST from the Hub.
demo: install data
	HF_HUB_OFFLINE=$$( [ -d $(FMNIST_DIR) ] && echo 1 || echo 0 ) $(BIN)/accelerate launch --num_processes 1 recipes/vit_cifar.py --config recipes/configs/offline.yaml --overwrite_output_dir true

test: install data
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
