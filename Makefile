# Two commands on a fresh machine:
#   make demo   set up .venv, train the char-level nano model on built-in Shakespeare, sample
#   make test   set up .venv, run the test suite
PYTHON ?= python3
VENV ?= .venv
# torch goes in first, pinned, so that installing smolgpt does not pull a build of pip's
# choosing; TORCH=... picks another (e.g. a CUDA wheel from PyTorch's index).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test clean

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

test: setup  # with every optional extra: the tests cover them all
	$(BIN)/pip install -q -e ".[test,bench,hf,bpe,plot,tensorboard,notebook]"
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) checkpoints build *.egg-info
