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

# torch is installed first, alone, at the version pyproject.toml pins. TORCH_INDEX, when set, is the
# package index of that one line, e.g. make run TORCH_INDEX=https://download.pytorch.org/whl/cpu for the
# CPU build (on Linux the default index serves the much larger CUDA build); every other package comes
# from the default index either way. It counts when .venv is created: remove .venv to switch builds.
install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The newcomer's command: fetch MovieLens-100k if no copy is found (MEMREC_DATA_DIR, ../shared/data,
# ./data; offline, the message names the file to put where), train a model on it if none exists, then
# serve it on http://$(HOST):$(PORT) with the embedded store (set MEMREC_REDIS_URL to use Redis instead).
# The default training (TRAIN_ARGS) is short, for a first answer within about 3 minutes on two CPU
# cores (about 160 CPU seconds on one): the SASRec encoder (all-position loss) in batches of 64, stopping
# 3 epochs after its validation NDCG@10 last rose (at most 30), then at most 10 fine-tuning epochs of the
# retrieval fusion with patience 2, the transition channel chosen on validation, the memory vote not
# tried (--no-vote). The benchmarks' full-length training takes 4–5 minutes on a quiet 2-core machine:
#   make run TRAIN_ARGS='--objective sasrec --scheme allpos --ft-epochs 20'
# Training uses the cores other processes leave free (the load average); memrec train --threads N sets it.
# STORE_DIR is the embedded store's folder.
HOST ?= 127.0.0.1
PORT ?= 8000
STORE_DIR ?= artifacts/store
TRAIN_ARGS ?= --objective sasrec --scheme allpos --batch-size 64 --epochs 30 --patience 3 \
	--ft-epochs 10 --ft-patience 2 --no-vote
run: install
	@test -f $(MODEL_DIR)/config.json || { \
		$(PY) -m service.movielens --data-dir "$(MEMREC_DATA_DIR)" && \
		$(VENV)/bin/memrec train --dataset ml-100k --data-dir "$(MEMREC_DATA_DIR)" $(TRAIN_ARGS) \
			--out $(MODEL_DIR); }
	$(VENV)/bin/memrec serve --model $(MODEL_DIR) --host $(HOST) --port $(PORT) --store-dir $(STORE_DIR)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) -m pip install --quiet -e '.[bench]'  # matplotlib: the long-tail chart
	$(PY) -m bench.accuracy --datasets ml-100k beauty --seeds 0 1 2
	$(PY) -m bench.retrieval --datasets ml-100k beauty --seeds 0 1 2
	$(PY) -m bench.transition_mix --runs ml-100k.sasrec_allpos beauty.pretrain --seeds 0 1 2

clean:
	rm -rf $(VENV) artifacts .pytest_cache .mypy_cache .ruff_cache
