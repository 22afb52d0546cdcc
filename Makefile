# Two commands do everything: `make demo` (the LongAct RL loop on the embedded model) and
# `make test`. Each creates .venv if missing and installs exactly what requirements.lock says
# (dev/lock.py); once installed the set-up is a quick no-op, and a .venv built from an older lock
# is rebuilt. `make lock` moves the lock forward; `make test-latest` tries the newest releases.
#
# On a GPU machine: `make setup TORCH_INDEX=<an index with a CUDA build of the locked torch>`
# (README, "Install"); the rest of the lock installs unchanged.

PY      := .venv/bin/python
STAMP   := .venv/.installed
export TORCH_INDEX ?=
# Converted models live in .cache/longact with make or without (plumbing/policy.py's default);
# hub downloads go to your usual Hugging Face cache. The tests keep even those inside the work
# tree, so that tests and CI never write to ~/.cache or need the network.
export LONGACT_CACHE ?= $(CURDIR)/.cache/longact
TEST_CACHES := HF_HOME=$(CURDIR)/.cache/hf HF_DATASETS_CACHE=$(CURDIR)/.cache/hf/datasets \
               TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/.cache/inductor MPLCONFIGDIR=$(CURDIR)/.cache/mpl
# A passing test's tmp_path is deleted when it ends: the suite writes about 0.9 GB of checkpoints
# and pytest would keep three runs of them in /tmp.
PYTEST  := -m pytest -q -o tmp_path_retention_policy=failed tests

.PHONY: setup test demo bench causal ab ab-dapo ab2 ab2b ab3 plan clean lock test-latest gpu-wheels \
        gpu-rehearsal

setup: $(STAMP)

# The stamp holds the lock's hash: a moved lock makes it stale and dev/lock.py rebuilds .venv.
$(STAMP): requirements.lock dev/lock.py
	python3 dev/lock.py install .venv

test: $(STAMP)
	$(TEST_CACHES) HF_HUB_OFFLINE=1 $(PY) $(PYTEST)

demo: $(STAMP)
	$(PY) train.py --algo grpo

# Benchmarks print medians and ratios measured side by side (README, "Measured").
bench: $(STAMP)
	$(PY) -m bench.masking --threads 1
	$(PY) -m bench.rollout --threads 1

# The causal channel-removal test on the embedded model (resumable; README, "Causal test").
CAUSAL := --tasks niah_single_2 niah_multikey_1 --lengths 1024 2048 --samples 10 --ns 1 4 16 \
          --out experiments/runs/causal/causal.jsonl
causal: $(STAMP)
	$(PY) -m experiments.causal $(CAUSAL)
	$(PY) -m experiments.causal $(CAUSAL) --summary

# The A/B grid, setting 1: five GRPO arms x 3 seeds, resumable; then the table and figures.
ab: $(STAMP)
	$(PY) -m experiments.ab run
	$(PY) -m experiments.ab summary

# The DAPO pair (LongAct and uniform) x 3 seeds on the same setting, then the summary again.
ab-dapo: $(STAMP)
	$(PY) -m experiments.ab run --arms dapo-longact dapo-uniform
	$(PY) -m experiments.ab summary

# Setting 2: only the q/k projections train (the positive control and the pre-registered grid,
# experiments/ab2_preregistration.md); eleven arms x 3 seeds, resumable, then its summary.
ab2: $(STAMP)
	$(PY) -m experiments.ab run --setting 2
	$(PY) -m experiments.ab summary --setting 2

# Setting 2b (experiments/ab2b_preregistration.md): three arms, each at its own best rate.
ab2b: $(STAMP)
	$(PY) -m experiments.ab run --setting 2b
	$(PY) -m experiments.ab summary --setting 2b

# Setting 3 (experiments/ab3_preregistration.md): LongAct, uniform and fixed random rows where
# the uniform update damaged an untrained family; 3 arms x 3 seeds (5 if the rule asks).
ab3: $(STAMP)
	$(PY) -m experiments.ab run --setting 3
	$(PY) -m experiments.ab summary --setting 3

# The memory plan of Qwen3-8B at the paper setting (no weights, no GPU).
plan: $(STAMP)
	$(PY) train.py --preset paper-8b --plan

# A new lock: pip resolves the newest versions requirements.txt allows, a fresh venv installs
# them by hash, the whole suite runs there, and only then does the candidate replace the lock.
lock:
	python3 dev/lock.py resolve .cache/lock/candidate.lock
	rm -rf .cache/lock/venv
	python3 dev/lock.py install .cache/lock/venv --lock .cache/lock/candidate.lock
	$(TEST_CACHES) HF_HUB_OFFLINE=1 .cache/lock/venv/bin/python $(PYTEST)
	python3 dev/lock.py adopt .cache/lock/candidate.lock

# Drift seen early: the newest releases the ranges allow, in a throw-away venv, and the suite
# there. Not part of `make test` or CI: an upstream release must not block a submission.
test-latest:
	python3 dev/lock.py latest .cache/latest/venv
	python3 dev/lock.py diff .cache/latest/venv
	$(TEST_CACHES) HF_HUB_OFFLINE=1 .cache/latest/venv/bin/python $(PYTEST)

# For a GPU node without network: the locked wheels a run imports (not torch, not the model
# wheel) for its CPython (GPU_PYTHON), into .whl/ (ignored); install there with
# pip install --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site
GPU_PYTHON ?= 3.12
gpu-wheels: $(STAMP)
	python3 dev/lock.py wheels .whl --python $(GPU_PYTHON)

# bench/gpu_node.sh word for word on this CPU with --dry-run, set up as a GPU node is: CPython
# 3.12 with torch 2.11 and transformers 5.17 preinstalled, the carried wheels installed offline;
# then train.main's preflight with each card's figures. Downloads torch: not part of CI.
REHEARSAL := $(CURDIR)/.cache/rehearsal
REHEARSAL_PY ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/$(GPU_PYTHON).*/bin/python3) \
                python$(GPU_PYTHON))
gpu-rehearsal: gpu-wheels
	rm -rf $(REHEARSAL)/site $(REHEARSAL)/out
	test -x $(REHEARSAL)/venv/bin/python || $(REHEARSAL_PY) -m venv $(REHEARSAL)/venv
	$(REHEARSAL)/venv/bin/python -m pip install -q torch==2.11.0 transformers==5.17.0
	PYTHON=$(REHEARSAL)/venv/bin/python SITE=$(REHEARSAL)/site OUT=$(REHEARSAL)/out \
	  bash bench/gpu_node.sh --dry-run
	PYTHONPATH=$(REHEARSAL)/site HF_HUB_OFFLINE=1 $(REHEARSAL)/venv/bin/python \
	  -m bench.gpu_check --simulate-preflight >$(REHEARSAL)/out/preflight.txt 2>&1 \
	  || { cat $(REHEARSAL)/out/preflight.txt; exit 1; }
	cat $(REHEARSAL)/out/preflight.txt

clean:
	rm -rf .cache runs __pycache__ plumbing/__pycache__ tests/__pycache__
