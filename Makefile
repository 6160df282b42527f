# The two set-up commands of the README: `make demo` (main job, embedded offline default) and `make test`.
# Each installs what it needs from nothing: a venv, torch 2.13.0 first, then the rest under a constraint pinning it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
FMNIST_DIR := /usr/share/datasets/fashion-mnist
FORTUNES_DIR := /usr/share/games/fortunes

.PHONY: demo demo-lm test test-fast docs install data fortunes lint

install: $(VENV)/.installed

# The last step puts the checkout's root on the venv's path, so that the recipes, benchmarks and tests import
# as packages from the checkout; the installed library itself is only `hf_ens` (trainers/ as hf_ens.trainers).
$(VENV)/.installed: pyproject.toml
	@echo "[install 1/4] creating the virtual environment $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@echo "[install 2/4] upgrading pip"
	@$(BIN)/python -m pip install -q --upgrade pip
	@echo "[install 3/4] installing $(TORCH_PIN) (CPU wheel where pip picks it; ~1 min)"
	@$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	@echo "$(TORCH_PIN)" > $(VENV)/constraints.txt
	@echo "[install 4/4] installing hf-ens and its dependencies (transformers, accelerate, datasets, ...) with torch pinned"
	@$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	@$(BIN)/python -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'hf_ens_checkout.pth').write_text('$(CURDIR)\\n')"
	@touch $@
	@echo "[install] done: $(VENV)"

# Real Fashion-MNIST from Debian's package when apt is there; elsewhere the loader falls back to the Hub.
data:
	@if [ ! -d $(FMNIST_DIR) ] && command -v apt-get >/dev/null; then \
	  echo "[data] installing Debian's dataset-fashion-mnist (real Fashion-MNIST into $(FMNIST_DIR))"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi

# Offline whenever the Debian data is there; elsewhere the loader may fetch Fashion-MNIST from the Hub.
# Every launch value is passed (no "values were not passed ... defaults used" block); --quiet: a failing run
# shows its own one-line error, not accelerate's CalledProcessError traceback. The thread count is fixed in
# offline.yaml (torch_threads), so the table does not depend on OMP_NUM_THREADS.
LAUNCH := $(BIN)/accelerate launch --quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

demo: install data
	@echo "[demo] $(LAUNCH) recipes/vit_cifar.py --config recipes/configs/offline.yaml --overwrite_output_dir true"
	@HF_HUB_OFFLINE=$$( [ -d $(FMNIST_DIR) ] && echo 1 || echo 0 ) $(LAUNCH) recipes/vit_cifar.py --config recipes/configs/offline.yaml --overwrite_output_dir true

# The LM demo's real English text: Debian's `fortunes` quotations (recipes/pretrain_lm.py reads the plain files).
fortunes:
	@if [ ! -d $(FORTUNES_DIR) ] && command -v apt-get >/dev/null; then \
	  echo "[fortunes] installing Debian's fortunes (quotations into $(FORTUNES_DIR))"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq fortunes >/dev/null; \
	fi

# The offline LM demo (recipes/configs/lm_lora_offline.yaml): pre-trains a tiny Llama on fortunes (cached), then
# StarSSE LoRA members, and prints member / ensemble / soup / best-merge perplexity, NLL, ECE and samples.
demo-lm: install fortunes
	@echo "[demo-lm] $(LAUNCH) recipes/lm_lora.py --overwrite_output_dir true"
	@HF_HUB_OFFLINE=1 $(LAUNCH) recipes/lm_lora.py --overwrite_output_dir true

# The whole suite (CI runs this); the 15 slowest tests are listed at the end.
test: install data fortunes
	@echo "[test] HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=15 tests"
	@HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --durations=15 tests

# The inner loop: everything but the multi-process and end-to-end runs (marked `slow`).
test-fast: install data fortunes
	@echo "[test-fast] HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m 'not slow' tests"
	@HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m 'not slow' tests

# The documentation site (mkdocs.yml, docs/) into site/, warnings as errors; tests/test_docs.py runs the same build.
docs: install
	@echo "[docs] $(BIN)/python -m mkdocs build --strict --site-dir site"
	@NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
