"""
bench/gpu_check.py -- does the paper setting fit one GPU? Measured peak memory and time per phase,
next to plan.py's prediction.

For Qwen3-4B (fp32 master weights + torch AdamW, bf16 autocast) and Qwen3-8B (bf16 weights +
optim.AdamWSR), built from their published configs with random weights (no download), it runs the
paper's update (SOURCES.md §1.6, §3): one group = a 16384-token prompt + G = 8 completions of 1024
random tokens, GRPO with beta = 0.04 against a frozen bf16 reference model, gradient
checkpointing, LongAct masks (30% of the rows of every head, from random statistics), masked
AdamW step with frozen rows outside the mask. Two update steps (the second one has optimizer state
and shows the real peak), then a short sampling phase (one group, 32 new tokens). It uses the
project's own functions throughout: rollout.group_logprobs / sample_groups, grpo.grpo_loss,
masking.build_masks / mask_grads / masked_step, optim.AdamWSR, plan.plan.

Per phase it records torch.cuda.max_memory_allocated (reset before the phase), the reserved
memory, and the seconds; `<out>.json` holds everything, `<out>.md` the table.

Choices:
  1. Random weights and token ids: memory and time do not depend on the values. Completions never
     stop early (mask of ones), the largest case.
  2. One group per micro-batch and one micro-batch per optimizer step: the paper step has 32
     groups, but gradients accumulate in place, so the peak of one group is the step's peak; the
     update time per group is what multiplies by 32.
  3. A phase that runs out of memory is recorded ("out of memory" with the peak reached), the
     model is dropped, and the next model still runs: one run answers as much as it can.
  4. lr 1e-6, weight decay 0.1, grad clip 1.0 (the paper preset of train.py).

Run on one GPU (about 2-4 minutes for both models on an H200; needs about 110 GB free):
    python -m bench.gpu_check                     # writes figures/gpu_check.json and .md
Dry run of the same code path on a CPU (tiny Qwen3 configs, 64-token prompts, seconds):
    python -m bench.gpu_check --dry-run --out runs/gpu_check_dry
Test: .venv/bin/python -m pytest -q tests/test_gpu_check.py
"""

import argparse
import gc
import platform
import sys
import time
from contextlib import contextmanager, nullcontext

if not __package__:  # run as a file, `import rollout` would not find the repository's modules
    sys.exit("run from the repository root as a module: python -m bench.gpu_check")

import torch
import transformers

import grpo
import masking
import optim
import plan
import rollout
from common import QK_SUFFIXES, mix_seed, write_json_atomic, write_text_atomic

CHECKS = {"qwen3-4b": "adamw", "qwen3-8b": "bf16-sr"}  # model -> optimizer (plan.OPTIMIZERS)
TINY = {  # dry-run stand-ins: same code path, a 4b-like (tied) and an 8b-like (untied) shape
    "qwen3-4b": dict(vocab_size=256, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     max_position_embeddings=512, tie_word_embeddings=True, eos_token_id=2),
    "qwen3-8b": dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=2),
}
PAPER = dict(prompt_len=16384, group_size=8, new_tokens=1024, sample_tokens=32)
DRY = dict(prompt_len=64, group_size=4, new_tokens=16, sample_tokens=4)
LR, WEIGHT_DECAY, GRAD_CLIP, BETA, RATIO = 1e-6, 0.1, 1.0, 0.04, 0.3
WEIGHT_DTYPE = {"adamw": torch.float32, "bf16-sr": torch.bfloat16,
                "bf16-sr-fp32-moments": torch.bfloat16}  # the policy's weights per optimizer
PLAN_PHASE = {"update (forward + backward)": "update", "optimizer step": "step",
              "sampling": "sampling"}  # measured phase -> plan.py phase


class IdTokenizer:
    """What rollout.sample_groups asks of a tokenizer, for a model that has none here."""

    def __init__(self, config):
        self.pad_token_id = self.eos_token_id = config.eos_token_id

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(map(str, row.tolist())) for row in ids]


# -----------------------------------------------------------------------------
# measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def measure(records: list, phase: str, device, step=None):
    """Append {phase, step, peak_gb, reserved_gb, seconds} for the code inside (peaks: CUDA only).
    An out-of-memory error is recorded with the peak reached, then re-raised."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rec = dict(phase=phase, step=step, peak_gb=None, reserved_gb=None, seconds=None, error=None)
    records.append(rec)
    start = time.perf_counter()
    try:
        yield rec
    except torch.OutOfMemoryError:
        rec["error"] = "out of memory"
        raise
    finally:
        sync(device)
        rec["seconds"] = round(time.perf_counter() - start, 3)
        if device.type == "cuda":
            rec["peak_gb"] = round(torch.cuda.max_memory_allocated(device) / plan.GB, 2)
            rec["reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / plan.GB, 2)


# -----------------------------------------------------------------------------
# model, masks, optimizer

def build(config, dtype, device):
    """A model with random weights, created on the device directly (no CPU copy of 8B)."""
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                              attn_implementation="sdpa")
    return model.to(device)


def random_masks(model, config, seed: int) -> dict:
    """LongAct masks (30% of the rows of every head) from random statistics."""
    gen = torch.Generator().manual_seed(seed)
    stats = {n: torch.rand(m.weight.shape[0], generator=gen)
             for n, m in model.named_modules() if n.endswith(QK_SUFFIXES)}
    return masking.build_masks(stats, ratio=RATIO, per_head=True, head_dim=config.head_dim)


def make_optimizer(model, name: str, seed: int):
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                                 foreach=False)
    return optim.AdamWSR(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY,
                         seed=mix_seed(seed, "optimizer"))


# -----------------------------------------------------------------------------
# the phases

def update_step(model, ref, opt, masks, batch, records, device, step, autocast) -> dict:
    """Reference log-probs, masked GRPO forward + backward, masked optimizer step."""
    prompt, comp, mask, adv = batch
    with measure(records, "reference log-probs", device, step), torch.no_grad(), autocast():
        ref_lp = rollout.group_logprobs(ref, prompt, comp)  # (G, T)
    with measure(records, "update (forward + backward)", device, step):
        with autocast():
            logp = rollout.group_logprobs(model, prompt, comp)  # (G, T) with gradients
        loss, m = grpo.grpo_loss(logp, logp.detach(), ref_lp, adv, mask, beta=BETA)
        loss.backward()
        del logp, ref_lp
    probe = next(iter(masks))  # one q_proj: did its trainable rows move, and only those?
    w = model.get_submodule(probe).weight
    before = w.detach().to("cpu", copy=True)
    with measure(records, "optimizer step", device, step):
        masking.mask_grads(model, masks)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        drift = masking.masked_step(opt, model, masks, "frozen")
        opt.zero_grad(set_to_none=True)  # sampling must not hold gradients (plan.py choice 3)
    moved = (w.detach().cpu() != before).any(-1)  # (C,) rows that changed
    keep = masks[probe]
    return dict(step=step, loss=loss.item(), kl=m["kl"], grad_norm=float(grad_norm),
                frozen_drift=drift, trainable_rows_moved=moved[keep].float().mean().item(),
                frozen_rows_moved=moved[~keep].float().mean().item())


def check_model(name: str, config, optimizer: str, shape: dict, device, steps: int,
                seed: int) -> dict:
    """Build, update `steps` times, sample once; every phase measured. Returns the record."""
    s = plan.Settings(prompt_len=shape["prompt_len"], group_size=shape["group_size"],
                      new_tokens=shape["new_tokens"], optimizer=optimizer, mask_ratio=RATIO)
    sampling_plan = plan.Settings(**{**vars(s), "new_tokens": shape["sample_tokens"]})
    predicted = {**plan.peaks(plan.plan(config, s)),
                 "sampling": plan.peaks(plan.plan(config, sampling_plan))["sampling"]}
    out = dict(model=name, optimizer=optimizer, params=plan.param_counts(config)["total"],
               plan_gb=predicted, phases=[], steps=[],
               error=None)
    records = out["phases"]
    dtype = WEIGHT_DTYPE[optimizer]
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16))
                if dtype == torch.float32 else nullcontext)  # bf16 compute over fp32 weights
    gen = torch.Generator().manual_seed(seed)
    G, P, T, V = shape["group_size"], shape["prompt_len"], shape["new_tokens"], config.vocab_size
    prompt = torch.randint(0, V, (P,), generator=gen).tolist()
    comp = torch.randint(0, V, (G, T), generator=gen)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0] * (G // 4) + [0.0] * (G % 4))  # (G,) not all equal
    adv, _ = grpo.group_advantages(rewards, G)
    batch = (prompt, comp, torch.ones(G, T, device=device), adv.to(device))
    model = ref = opt = None
    try:
        with measure(records, "build policy + reference + masks", device):
            model = build(config, dtype, device)
            model.activation_checkpointing_enable({"use_reentrant": False})
            model.train()
            ref = build(config, torch.bfloat16, device)
            ref.load_state_dict(model.state_dict())
            ref.eval().requires_grad_(False)
            masks = random_masks(model, config, seed)
            opt = make_optimizer(model, optimizer, seed)
        for step in range(1, steps + 1):
            out["steps"].append(update_step(model, ref, opt, masks, batch, records, device, step,
                                            autocast))
        with measure(records, "sampling", device), autocast():
            r = rollout.sample_groups(model, IdTokenizer(config), [prompt], G,
                                      shape["sample_tokens"], seed=seed)
        out["sampled_tokens"] = int(r.completion_mask.sum())
    except torch.OutOfMemoryError:
        out["error"] = f"out of memory in '{records[-1]['phase']}'"
    finally:
        del model, ref, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out



def format_table(results: list) -> str:
    """Markdown: one line per measured phase, with the plan's prediction where it has one."""
    lines = ["| model | optimizer | phase | step | peak GB (measured) | reserved GB | "
             "plan GB | seconds |", "|---|---|---|---:|---:|---:|---:|---:|"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}" if v >= 1 else f"{v:.2g}"  # noqa: E731
    for res in results:
        for ph in res["phases"]:
            planned = res["plan_gb"].get(PLAN_PHASE.get(ph["phase"], ""))
            peak = "OOM" if ph["error"] else fmt(ph["peak_gb"])
            lines.append(f"| {res['model']} | {res['optimizer']} | {ph['phase']} | "
                         f"{ph['step'] or ''} | {peak} | {fmt(ph['reserved_gb'])} | "
                         f"{fmt(planned)} | {ph['seconds']:.2f} |")
    return "\n".join(lines)


def environment(device) -> dict:
    env = dict(torch=torch.__version__, transformers=transformers.__version__,
               python=platform.python_version(), device=str(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_total_gb=round(props.total_memory / plan.GB, 1))
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description="Peak memory and time of the paper setting on a GPU.")
    p.add_argument("--dry-run", action="store_true", help="tiny configs on the CPU, seconds")
    p.add_argument("--models", nargs="+", choices=sorted(CHECKS), default=sorted(CHECKS))
    p.add_argument("--steps", type=int, default=2, help="update steps per model")
    p.add_argument("--out", default=None, help="output prefix (default figures/gpu_check, "
                   "runs/gpu_check_dry for --dry-run)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    device = torch.device("cpu" if a.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --dry-run to exercise the code path on the CPU")
    out = a.out or ("runs/gpu_check_dry" if a.dry_run else "figures/gpu_check")
    shape = DRY if a.dry_run else PAPER
    results = []
    for name in a.models:
        config = (transformers.Qwen3Config(**TINY[name]) if a.dry_run
                  else plan.model_config(name))
        print(f"{name} ({CHECKS[name]}): P = {shape['prompt_len']}, G = {shape['group_size']}, "
              f"T = {shape['new_tokens']}", flush=True)
        results.append(check_model(name, config, CHECKS[name], shape, device, a.steps, a.seed))
    table = format_table(results)
    write_json_atomic(f"{out}.json", dict(environment=environment(device), shape=shape,
                                          dry_run=a.dry_run, results=results))
    write_text_atomic(f"{out}.md", table + "\n")
    print(table)
    for res in results:
        planned = ", ".join(f"{k} {v:.3g}" for k, v in res["plan_gb"].items())
        print(f"{res['model']}: {res['error'] or 'ok'}; plan (GB): {planned}")
    return results


if __name__ == "__main__":
    main()
