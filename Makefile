# The targets people, the README and CI call. Every target installs what it needs on first use.
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
# Data: MEMREC_DATA_DIR if set, else ../shared/data or ./data when present.
MEMREC_DATA_DIR ?= $(firstword $(wildcard ../shared/data ./data) ./data)
export MEMREC_DATA_DIR
MODEL_DIR ?= artifacts/ml-100k
PYTEST_ARGS ?=

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch pulls the CUDA build. Set TORCH_INDEX to a wheel index
	# (for example the PyTorch CPU index) to choose the build on a machine without a local wheel.
	$(PY) -m pip install --quiet "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Until the service lands: train a small model on ml-100k (if none exists) and evaluate it.
run: install
	@test -f $(MODEL_DIR)/model.safetensors || \
		$(VENV)/bin/memrec train --dataset ml-100k --objective pretrain --out $(MODEL_DIR) --epochs 30
	$(VENV)/bin/memrec evaluate --model $(MODEL_DIR) --dataset ml-100k

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) -m bench.accuracy --datasets ml-100k beauty --seeds 0 1 2
	$(PY) -m bench.retrieval --datasets ml-100k beauty --seeds 0 1 2

clean:
	rm -rf $(VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
