# Two commands on a fresh machine:
#   make demo   set up .venv, train the char-level nano model on built-in Shakespeare, sample
#   make test   set up .venv, run the test suite
PYTHON ?= python3
VENV ?= .venv
# torch goes in first, pinned, so that installing smolgpt does not pull a build of pip's
# choosing; TORCH=... picks another (e.g. a CUDA wheel from PyTorch's index).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test chromium clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .

DEMO_DIR := checkpoints/demo_char_nano

demo: setup
	rm -rf $(DEMO_DIR)  # the demo's own run directory: each demo starts afresh
	$(BIN)/python train.py --level char --preset nano --time_budget 60 --out_dir $(DEMO_DIR)
	$(BIN)/python generate.py $(DEMO_DIR)/best_model.pth --prompt "ROMEO:" --max_new_tokens 300

test: setup chromium  # with every optional extra: the tests cover them all
	$(BIN)/pip install -q -e ".[test,bench,hf,bpe,plot,tensorboard,notebook,serve]"
	$(BIN)/python -m pytest -q

# The playground's browser test drives Debian's chromium. Installed where we may (root, with
# apt-get); elsewhere that one test is skipped, and this says so.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { $(APT) || { apt-get update -q >/dev/null 2>&1 && $(APT); }; }; } \
	  || echo "chromium is not installed: the playground's browser test will be skipped"

APT = DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1

clean:
	rm -rf $(VENV) checkpoints build *.egg-info
