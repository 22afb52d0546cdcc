"""
bench_masking.py -- what LongAct's row masking costs per optimizer step (issue 2, deliverable 7). Not a test.

One optimizer step = zero_grad, forward+backward of one batch under bf16 autocast, global grad-norm clipping and an
AdamW step (weight decay 0.1). "masked" adds masking.py's machinery: gradient hooks that zero the frozen q/k rows,
the separate param group, and apply_row_weight_decay before the step. Both variants run on the same model in one
process, interleaved A B B A so slow drifts (other jobs, CPU clocks) hit both alike; we report medians.

Choices:
  1. The masks come from random statistics: the cost of masking depends on the mask's shape, not on which rows it
     keeps, so this needs no calibration run.
  2. Each variant has its own AdamW (own moments) over the same parameters; lr 1e-6 so the model stays sane.
  3. Hooks are attached before and removed after each masked step, outside the timed region (train.py attaches
     them once for the whole run).

Run: python bench_masking.py [--batch 2 --seq-len 256 --repeats 7] [--threads 1]

Measured (2 shared CPU cores busy with other jobs, --threads 1, torch 2.13 CPU; ~4 min):
    without masks: median 9.536 s/step
    with masks:    median 9.454 s/step
    ratio with/without: 0.991  (target <= 1.02)
The step-to-step noise on that busy machine (8.8-11.1 s) is far larger than the masking work itself (one masked_fill
per masked gradient and one where per masked matrix in apply_row_weight_decay, ~60 small matrices), so read the
ratio as "no measurable cost". On a busy CPU, torch's default 2 threads oversubscribe the cores: steps took 50-70 s.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("LONGACT_CACHE", str(Path(__file__).resolve().parent / ".cache" / "longact"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from masking import apply_row_weight_decay, attach_grad_masks, build_masks, param_groups  # noqa: E402


def timed_step(model, opt, ids, masked: bool) -> float:
    """Seconds for one full optimizer step (forward+backward, clip, [row decay], AdamW)."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if masked:
        apply_row_weight_decay(opt)
    opt.step()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7, help="timed steps per variant, after one warm-up each")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0 = torch's default); on a busy shared CPU, 1 avoids OpenMP oversubscription")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rollout import load_policy
    torch.manual_seed(0)
    model, _ = load_policy(args.model)  # fp32 weights
    model.train()
    stats = {n: torch.rand(m.weight.shape[0]) for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj"))}
    masks = build_masks(stats, args.ratio, "topk")
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len))  # (B, T)
    plain = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.1)
    masked = torch.optim.AdamW(param_groups(model, masks, 0.1), lr=1e-6)

    def step(is_masked: bool) -> float:
        handles = attach_grad_masks(model, masks) if is_masked else []
        try:
            return timed_step(model, masked if is_masked else plain, ids, is_masked)
        finally:
            for h in handles:
                h.remove()

    warm = step(False), step(True)  # warm-up: allocator, optimizer state, autocast caches
    print(f"warm-up steps: {warm[0]:.2f} s, {warm[1]:.2f} s", file=sys.stderr, flush=True)
    times = {False: [], True: []}
    for r in range(args.repeats):
        for is_masked in ((False, True) if r % 2 == 0 else (True, False)):  # A B, then B A
            times[is_masked].append(step(is_masked))
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)

    plain_s, masked_s = statistics.median(times[False]), statistics.median(times[True])
    print(f"model {args.model}, batch {args.batch} x {args.seq_len} tokens, bf16 autocast, AdamW wd 0.1, clip 1.0, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats per variant")
    print(f"without masks: median {plain_s:.3f} s/step  (all: {' '.join(f'{t:.3f}' for t in times[False])})")
    print(f"with masks:    median {masked_s:.3f} s/step  (all: {' '.join(f'{t:.3f}' for t in times[True])})")
    print(f"ratio with/without: {masked_s / plain_s:.3f}  (target <= 1.02)")


if __name__ == "__main__":
    main()
