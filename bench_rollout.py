"""
bench_rollout.py -- how much the shared prompt saves in rollout.py's two hot paths (issue 4, deliverable 3).

In long-context RL a group is G completions of ONE long prompt. rollout.py processes that prompt once per group;
the usual code processes it G times. This script measures both ways, side by side in one run, on the embedded
SmolLM2-135M-Instruct (1024-token prompt of essay text, G = 8, 48 new tokens, bf16 autocast, 2 CPU threads):

  1. sampling         `sample_groups` (one prefill, KV cache expanded to G rows)
                      vs `model.generate(num_return_sequences=G)` (G prefills)                       target >= 3x
  2. fwd + backward   `group_logprobs(...).sum().backward()` (one prompt forward shared by G rows)
                      vs `full_sequence_logprobs` (G full [prompt; completion] rows in one batch; with
                      --separate also as G single-row passes, what a trainer does when G rows do not fit) target >= 4x
  3. memory           bytes saved for backward by `group_logprobs` at prompt lengths 512/1024/2048, against a naive
                      trainer that takes log_softmax over the logits of every position (P x V): ours must grow
                      with P x hidden only (nothing x V), its largest saved tensor staying <= G x chunk x V.

Choices (engineering, not method; the paper is silent):
  1. Equal work when sampling: EOS is put into `generation_config.suppress_tokens` for both paths (its logit becomes
     -inf), so every row generates exactly `--new-tokens` tokens. `min_new_tokens` would do the same but cannot be
     passed through `sample_groups`. The suppression costs one masked write per step in both paths.
  2. Timings are interleaved: every round runs each contender once, alternating which goes first, after one
     warm-up round; we report medians. The CPU is shared with other jobs, so single rounds can be noisy. The
     sampling warm-up generates 2 tokens instead of T: it only has to meet every kernel shape once.
  3. Saved-tensor bytes come from `torch.autograd.graph.saved_tensors_hooks`, counting each storage once (views
     such as the expanded prompt KV share one storage). Tensors saved INSIDE `torch.utils.checkpoint` regions are
     invisible to an outer hook -- that is the point of checkpointing: rollout's per-chunk logits are recomputed
     in backward, not stored. Saved tensors shaped like a parameter are booked as "weights" (fp32 parameters and
     their bf16 autocast copies), the rest as activations.
  4. The naive memory baseline is measured on ONE row (G = 1) and scaled by G: a batched pass saves G times the
     activations of one row (same weights), and one row at P = 2048 with full logits already takes ~2 GiB.
  5. Peak RSS (Linux only) is reset through /proc/self/clear_refs; glibc is told to return large blocks to the OS
     (mallopt) so a freed buffer does not hide the next peak. Only the memory part does this, after the timings.

  6. Threads: the issue fixes 2. On 2 cores that other jobs also use, 2 OpenMP threads wait on each other at
     every op (measured: ~10x slower, ratios distorted); the script warns, and `--threads 1` gives sane numbers.

What a correct run printed here (2 shared CPU cores, `--threads 1`, 11 min; full log in figures/bench_rollout.txt):
  sampling 1.6x (target 3x missed: 89% of sample_groups is the 48 decode steps, which both paths run, so the bound
  is 1.75x; bf16 sdpa decode on this CPU is 0.4-0.7 s per step), fwd+bwd 4.8x (11.4 s vs 54.7 s), saved
  activations of ours 1088 / 1817 / 3274 MiB at P = 512 / 1024 / 2048 against 5293 / 9645 / 18351 MiB for the
  naive G rows, largest saved tensor 18 MiB (the repeated K/V) against 393 MiB of log-softmax per naive row.

Run:   .venv/bin/python bench_rollout.py                 (the issue's 2 threads; fine on an idle machine)
       .venv/bin/python bench_rollout.py --threads 1     (when other jobs share the cores)
       .venv/bin/python bench_rollout.py --quick         (1 timed round per pair, memory at 512 and 1024 only, ~5 min)
"""

import argparse
import ctypes
import os
import statistics
import sys
import time
from contextlib import contextmanager

os.environ.setdefault("LONGACT_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "longact"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on the network

import torch  # noqa: E402  (after the environment above)
from transformers import DynamicCache  # noqa: E402

from evaluate import calibration_prompts  # noqa: E402
from rollout import eos_ids, full_sequence_logprobs, group_logprobs, load_policy, sample_groups  # noqa: E402

# Letters: G group size, P prompt tokens, T completion tokens, V vocab, C hidden channels, L layers.
MIB = 2**20
CHUNK = 256  # rollout.token_logprobs' default chunk of positions whose logits exist at once


# -----------------------------------------------------------------------------
# timing

def autocast():
    """bf16 autocast on CPU: fp32 master weights, bf16 matmuls -- how training runs here (facts.md §6)."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


def interleaved(contenders: dict, repeats: int, before=None, warmup=None) -> dict:
    """Median seconds of each contender (name -> zero-arg function), run side by side.

    A warm-up round (allocator, oneDNN kernel choice) runs first and is not timed; `warmup` may give cheaper
    stand-ins for it (same names). Odd rounds reverse the order, so a slow drift of the shared machine does not
    always land on the same contender. `before` (untimed) runs ahead of every call, e.g. to clear gradients.
    """
    for name, fn in (warmup or contenders).items():
        if before:
            before()
        fn()
    times = {name: [] for name in contenders}
    for r in range(repeats):
        names = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in names:
            if before:
                before()
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


@contextmanager
def eos_suppressed(model, eos: list):
    """Make EOS impossible in every `generate` call on this model (its logit -> -inf), so all rows run to the end."""
    old = model.generation_config.suppress_tokens
    model.generation_config.suppress_tokens = list(eos)
    try:
        yield
    finally:
        model.generation_config.suppress_tokens = old


def bench_sampling(model, tok, prompt: list, G: int, T: int, repeats: int):
    """Part 1: sample_groups vs generate(num_return_sequences=G) with identical sampling settings and length.

    Also times the one prefill that sample_groups does (the same call as rollout._generate_chunk), so the report
    can split sampling into prefill and decode: the T decode steps are the same work in both paths.
    """
    eos = eos_ids(model, tok)
    x = torch.tensor([prompt])  # (1, P)
    # The same processors as sample_groups builds for temperature 1, top_p 1: plain sampling from the softmax.
    naive_kwargs = dict(input_ids=x, attention_mask=torch.ones_like(x), num_return_sequences=G, do_sample=True,
                        temperature=1.0, top_p=1.0, top_k=0, pad_token_id=tok.pad_token_id, eos_token_id=eos)
    out = {}

    def shared(n=T):
        out["rollout"] = sample_groups(model, tok, [prompt], group_size=G, max_new_tokens=n, temperature=1.0,
                                       top_p=1.0, seed=0)

    def naive(n=T):
        torch.manual_seed(0)
        out["naive"] = model.generate(max_new_tokens=n, **naive_kwargs)[:, len(prompt):]  # (G, n)

    @torch.no_grad()
    def prefill():
        model(input_ids=x[:, :-1], cache=DynamicCache(config=model.config), use_cache=True)

    model.eval()
    names = ("sample_groups", "generate(num_return_sequences)", "  of which: one prefill (sample_groups)")
    # The warm-up only needs every kernel shape once: 2 new tokens instead of T saves ~2 x T decode steps.
    warm = {names[0]: lambda: shared(2), names[1]: lambda: naive(2), names[2]: prefill}
    with eos_suppressed(model, eos), autocast():
        med = interleaved(dict(zip(names, (shared, naive, prefill))), repeats, warmup=warm)
    r = out["rollout"]
    # Check that the two did the same work: G rows of exactly T tokens each, no EOS anywhere.
    assert r.completion_ids.shape == (G, T) and out["naive"].shape == (G, T), (r.completion_ids.shape,
                                                                              out["naive"].shape)
    assert bool(r.truncated.all()), "an EOS was sampled although it was suppressed"
    return med, r.completion_ids


def bench_fwd_bwd(model, prompt: list, completion: torch.Tensor, repeats: int, separate: bool):
    """Part 2: forward + backward of one group, ours vs G full-sequence rows (batched, and optionally one by one)."""
    G = completion.shape[0]
    logps = {}

    def ours():
        with autocast():
            lp = group_logprobs(model, prompt, completion)  # (G, T)
        lp.sum().backward()
        logps["ours"] = lp.detach()

    def batched(rows=G):
        with autocast():
            lp = full_sequence_logprobs(model, prompt, completion[:rows])  # (G, T), one batch of G rows of P + T
        lp.sum().backward()
        logps["full"] = lp.detach()

    def one_by_one(rows=G):
        for g in range(rows):  # what a trainer does when G rows of P + T tokens do not fit in one batch
            with autocast():
                lp = full_sequence_logprobs(model, prompt, completion[g:g + 1])  # (1, T)
            lp.sum().backward()

    contenders = {"group_logprobs (shared prompt)": ours, "full_sequence_logprobs, G rows batched": batched}
    if separate:
        contenders["full_sequence_logprobs, G separate passes"] = one_by_one
    # The baselines warm up on 2 rows / 1 pass: the same kernels, a quarter of the ~1 min a full G-row call costs.
    names = list(contenders)
    warm = dict(zip(names, (ours, lambda: batched(2), lambda: one_by_one(1))))
    model.train()
    med = interleaved(contenders, repeats, before=lambda: model.zero_grad(set_to_none=True), warmup=warm)
    model.zero_grad(set_to_none=True)
    diff = (logps["ours"] - logps["full"]).abs()  # (G, T) bf16 rounding differs between the two paths
    return med, (diff.max().item(), diff.mean().item())


# -----------------------------------------------------------------------------
# memory

class SavedTensors:
    """Context manager that records every tensor autograd saves for backward, each storage counted once."""

    def __init__(self, model):
        self.param_shapes = {tuple(p.shape) for p in model.parameters()}
        self.storages = {}  # data_ptr -> (bytes, shape, is_weight)

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.storages:
            self.storages[s.data_ptr()] = (s.nbytes(), tuple(t.shape), tuple(t.shape) in self.param_shapes)
        return t

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def summary(self) -> dict:
        acts = [(b, shape) for b, shape, w in self.storages.values() if not w]
        return {"weights": sum(b for b, _, w in self.storages.values() if w), "acts": sum(b for b, _ in acts),
                "largest": max(acts)}


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process in MiB; nan where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> float:
    """Give freed memory back, reset the peak-RSS counter; return the RSS to measure from."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets VmHWM to the current RSS (proc(5))
    except OSError:
        pass
    return rss_mib("VmRSS")


def naive_logprobs(model, prompt_ids: list, completion_ids: torch.Tensor) -> torch.Tensor:
    """What minimal GRPO repos do (tiny-grpo `sequences_log_probs`): logits at EVERY position, log_softmax over all
    of them in fp32, gather, then keep the completion -- the (G, P+T-1, V) log-softmax is saved for backward."""
    G, T = completion_ids.shape
    ids = torch.cat([torch.tensor([prompt_ids]).expand(G, -1), completion_ids], 1)  # (G, P + T)
    logits = model(input_ids=ids).logits[:, :-1].float()  # (G, P+T-1, V)
    logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (G, P+T-1)
    return logp[:, len(prompt_ids) - 1:]  # (G, T)


def measure_memory(model, fn, prompt: list, completion: torch.Tensor) -> dict:
    """Saved-for-backward bytes of one forward of `fn`, then the peak-RSS rise over forward + backward."""
    model.zero_grad(set_to_none=True)
    start = reset_peak_rss()
    with SavedTensors(model) as saved, autocast():
        lp = fn(model, prompt, completion)
    lp.sum().backward()
    out = saved.summary()
    out["peak_rss"] = rss_mib("VmHWM") - start
    out["grad_bytes"] = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    del lp, saved
    model.zero_grad(set_to_none=True)
    return out


def bench_memory(model, tok, lengths: list, completion: torch.Tensor) -> list:
    """Part 3: ours at G rows vs the naive trainer on one row, for each prompt length."""
    libc = _libc()
    if libc is not None:
        # M_MMAP_THRESHOLD (-3) = 1 MiB: big tensors get their own mmap and go back to the OS when freed, so a peak
        # is not hidden by memory glibc kept from the previous measurement. Also turns off the dynamic threshold.
        libc.mallopt(-3, 1 << 20)
    model.train()
    rows = []
    for P in lengths:
        prompt = calibration_prompts(tok, P, 1, seed=1)[0]
        ours = measure_memory(model, group_logprobs, prompt, completion)
        naive = measure_memory(model, naive_logprobs, prompt, completion[:1])
        rows.append((P, ours, naive))
    return rows


# -----------------------------------------------------------------------------
# report

def print_timings(title: str, med: dict, baselines: list, target: float):
    """Medians, then the speed-up of the first contender over each baseline."""
    names = list(med)
    print(f"\n{title}")
    for name in names:
        print(f"  {name:<44} {med[name]:8.2f} s")
    for name in baselines:
        ratio = med[name] / med[names[0]]
        verdict = "met" if ratio >= target else "MISSED"
        print(f"  speed-up vs {name:<32} {ratio:8.2f}x   (target >= {target:.0f}x: {verdict})")


def print_sampling_split(med: dict, G: int, T: int):
    """Split sampling into prefill and decode: the decode steps are shared work that caps the speed-up."""
    ours, naive, prefill = med.values()
    decode = max(ours - prefill, 0.0)
    print(f"  decode = sample_groups - prefill = {decode:.2f} s ({decode / T:.3f} s per step for {G} rows), "
          f"{100 * decode / ours:.0f}% of sample_groups; both paths run these {T} steps, so the speed-up is "
          f"at most (G x prefill + decode) / (prefill + decode) = {(G * prefill + decode) / ours:.2f}x here")


def print_memory(rows: list, G: int, T: int, cfg):
    """The saved-for-backward table, the growth per prompt token, and the largest-tensor bound."""
    V, C, L = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    grads_mib = rows[0][1]["grad_bytes"] / MIB
    H = cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or C // H
    print(f"\n3. memory saved for backward (G={G}, T={T}, V={V}, C={C}, L={L}); MiB; 'largest' = largest activation;\n"
          f"   peak RSS+ = rise of peak RSS over forward + backward (includes {grads_mib:.0f} MiB of fp32 grads)")
    print(f"  {'P':>5} | {'ours: acts':>10} {'largest':>8} {'shape':<18} {'peak RSS+':>9} | "
          f"{'naive 1 row: acts':>17} {'largest':>8} {'shape':<18} {'peak RSS+':>9} | {'naive x G acts':>14}")
    for P, o, n in rows:
        print(f"  {P:>5} | {o['acts'] / MIB:10.0f} {o['largest'][0] / MIB:8.1f} {str(o['largest'][1]):<18} "
              f"{o['peak_rss']:9.0f} | {n['acts'] / MIB:17.0f} {n['largest'][0] / MIB:8.1f} "
              f"{str(n['largest'][1]):<18} {n['peak_rss']:9.0f} | {G * n['acts'] / MIB:14.0f}")
    print(f"  weights saved (fp32 params + bf16 autocast copies), the same at every P: ours "
          f"{rows[0][1]['weights'] / MIB:.0f} MiB, naive {rows[0][2]['weights'] / MIB:.0f} MiB")
    (P0, o0, n0), (P1, o1, n1) = rows[-2], rows[-1]
    ours_tok = (o1["acts"] - o0["acts"]) / (P1 - P0)  # bytes per extra prompt token, the whole group
    naive_tok = (n1["acts"] - n0["acts"]) / (P1 - P0)  # bytes per extra prompt token, one row
    # sdpa saves its key/value inputs; the completion rows attend to the prompt's K/V repeated to G rows and (by
    # transformers' repeat_kv) to all H query heads: G x H x D x (k, v) x 2 bytes x L per prompt token.
    kv = G * H * D * 2 * 2 * L
    print(f"  per extra prompt token ({P0}->{P1}): ours {ours_tok / 1024:.0f} KiB for the whole group = "
          f"{ours_tok / (L * C * 2):.1f} bf16 C-vectors per layer, of which G-fold K/V for the completions "
          f"{kv / 1024:.0f} KiB (G x H x D x 2 x 2 B x L); nothing x V")
    print(f"  naive: {naive_tok / 1024:.0f} KiB per row (x G = {G * naive_tok / 1024:.0f} KiB), of which the fp32 "
          f"log-softmax over V: {V * 4 / 1024:.0f} KiB per row (x G = {G * V * 4 / 1024:.0f} KiB)")
    bound = G * min(T, CHUNK) * V * 4
    worst = max(o["largest"][0] for _, o, _ in rows)
    print(f"  largest saved tensor of ours {worst / MIB:.1f} MiB <= G x min(T, chunk) x V x 4 B = "
          f"{bound / MIB:.0f} MiB: {'ok' if worst <= bound else 'EXCEEDED'} (it is the repeated K/V, linear in "
          f"P x H x D; the chunk logits are recomputed in backward, never saved)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 timed round per pair (after the warm-up), memory at "
                   "512 and 1024 only (~1/3 of the time)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per pair (median); default 3")
    p.add_argument("--separate", action="store_true", help="also time G separate single-row passes in part 2 "
                   "(adds ~4 min)")
    p.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens for parts 1-2")
    p.add_argument("--group", type=int, default=8, help="G, completions per prompt")
    p.add_argument("--new-tokens", type=int, default=48, help="T, completion tokens (EOS suppressed)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the issue fixes 2; use 1 when "
                   "other jobs share the cores, see the warning it prints)")
    a = p.parse_args()
    repeats = 1 if a.quick else a.repeats
    lengths = [512, 1024] if a.quick else [512, 1024, 2048]
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()

    model, tok = load_policy("smollm2-135m")  # fp32 weights
    prompt = calibration_prompts(tok, a.prompt_len, 1, seed=0)[0]  # real essay text, exactly prompt_len tokens
    load = os.getloadavg()[0]
    print(f"bench_rollout: SmolLM2-135M-Instruct, P={a.prompt_len}, G={a.group}, T={a.new_tokens}, bf16 autocast, "
          f"{torch.get_num_threads()} threads, medians of {repeats} after 1 warm-up, torch {torch.__version__}")
    print(f"  machine: {os.cpu_count()} CPU cores shared with other jobs; 1-min load average at start {load:.1f}")
    if a.threads > 1 and load + a.threads > os.cpu_count() + 0.5:
        # Measured here: with 2 threads on 2 busy cores every OpenMP region waits for a descheduled thread, so each
        # small op costs ~5 ms and runs are ~10x slower with distorted ratios (decode and many-small-op paths
        # suffer most). One thread does not wait on anyone.
        print(f"  WARNING: {a.threads} threads on a loaded machine oversubscribe the cores; numbers will be slow "
              f"and skewed. Rerun with --threads 1 (or when the machine is idle).")

    med, completion = bench_sampling(model, tok, prompt, a.group, a.new_tokens, repeats)
    names = list(med)
    print_timings(f"1. sampling {a.group} x {a.new_tokens} tokens (EOS suppressed in both)", med, names[1:2], 3)
    print_sampling_split(med, a.group, a.new_tokens)

    med, (dmax, dmean) = bench_fwd_bwd(model, prompt, completion, repeats, separate=a.separate)
    print_timings("2. forward + backward of one group (model.train(), fp32 weights, bf16 autocast)", med,
                  list(med)[1:], 4)
    print(f"  |logp(ours) - logp(full)|: max {dmax:.3f}, mean {dmean:.4f} nats -- bf16 rounding; in fp32 the two "
          f"agree to ~2e-5 (tests/test_rollout.py)")

    rows = bench_memory(model, tok, lengths, completion)
    print_memory(rows, a.group, a.new_tokens, model.config)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s, 1-min load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
