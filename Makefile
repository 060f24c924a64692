# Two commands on a fresh machine:
#   make demo   set up .venv, train the char-level nano model on built-in Shakespeare, sample
#   make test   set up .venv with every extra, lint, run the whole test suite (what CI runs)
# and, before every commit:
#   make check  lint and the fast tier of the tests (under a minute on 2 cores)
# and, while writing the manual (docs/, mkdocs.yml):
#   make docs   serve the site at http://127.0.0.1:8000, rebuilt at every save
PYTHON ?= python3
VENV ?= .venv
# torch goes in first, pinned, so that installing smolgpt does not pull a build of pip's
# choosing; TORCH=... picks another (e.g. a CUDA wheel from PyTorch's index).
TORCH ?= torch==2.13.0
# pytest-xdist processes: one per core of the 2-core machines the timings were taken on.
WORKERS ?= 2
BIN := $(VENV)/bin
EXTRAS := test,bench,hf,bpe,plot,tensorboard,notebook,serve,docs,gguf,eval,hub

.PHONY: setup setup-test demo docs lint check test chromium clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files: installing again only when pyproject.toml changes keeps `make check` fast.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

# The core and every extra in one pip run (each run costs seconds of resolving).
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# (without llama.cpp's multimodal library, which the tests do not use: a shorter build)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(BIN)/pip install -q -e ".[llamacpp]" \
	  || echo "llama-cpp-python could not be built here: the llama.cpp tests will be skipped"
	touch $(VENV)/.installed $(VENV)/.installed-docs $@

# The demo ends with a loss curve to look at: the plot extra too.
$(VENV)/.installed-plot: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[plot]"
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

DEMO_DIR := checkpoints/demo_char_nano

demo: $(VENV)/.installed-plot
	rm -rf $(DEMO_DIR)  # the demo's own run directory: each demo starts afresh
	$(BIN)/python train.py --level char --preset nano --time_budget 60 --out_dir $(DEMO_DIR)
	$(BIN)/python generate.py $(DEMO_DIR)/best_model.pth --prompt "ROMEO:" --max_new_tokens 300
	@echo "loss curve: $(DEMO_DIR)/loss.png"
	@echo "next: source $(VENV)/bin/activate, and the README's commands run as written"

$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

# The command-line reference is generated: written afresh first, so the site shows this code.
docs: $(VENV)/.installed-docs
	$(BIN)/python -m smolgpt.docs
	$(BIN)/mkdocs serve

lint: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The fast tier: pytest's default selection (-m "not slow", set in pyproject.toml).
check: lint
	$(BIN)/python -m pytest -q -n $(WORKERS)

# Everything: -m "" clears the default selection. --dist loadscope keeps each module's
# tests on one worker, so a module's shared trained models are made once.
test: lint chromium
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadscope -m ""

# The playground's browser test drives Debian's chromium. Installed where we may (root, with
# apt-get); elsewhere that one test is skipped, and this says so.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { $(APT) || { apt-get update -q >/dev/null 2>&1 && $(APT); }; }; } \
	  || echo "chromium is not installed: the playground's browser test will be skipped"

APT = DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1

clean:
	rm -rf $(VENV) checkpoints build site *.egg-info
