"""
bench/rollout.py -- rollout.py's hot paths, each measured side by side with the slower way.

In long-context RL a step samples G completions of each of N long prompts, then runs forward and
backward through them. On the embedded SmolLM2-135M-Instruct (essay text, SOURCES.md §7):

  1. sampling        `sample_groups` today (each prompt prefilled alone, N x G rows in one
                     generate call, engine.decode with cascade attention, oneDNN linears in fp32)
                     vs its per-group path (one call per prompt) vs the previous code (the
                     prompt cache repeated to every row, transformers' own loop, torch's
                     linears). --more splits the gain; --ragged varies the prompt lengths.
                     Default: the demo's shape at 1024 tokens, G = 8, T = 32, fp32 (--bf16).
  2. fwd + backward  `group_logprobs(...).sum().backward()` (one prompt forward shared by G rows)
                     vs `full_sequence_logprobs` (G full rows in one batch; --separate: G passes)
  3. memory          bytes saved for backward by `group_logprobs` at several prompt lengths,
                     against a naive trainer's log_softmax over every position (P x V)

It prints medians and ratios (RESULTS.md holds them). How it measures (equal work, interleaved
rounds, precision, saved-tensor accounting, peak RSS, threads): SOURCES.md §9.41.

Shapes: N prompts, G rows per prompt, P prompt tokens, T new tokens, V vocabulary.
Run (from the repository root):
    .venv/bin/python -m bench.rollout --threads 1
    .venv/bin/python -m bench.rollout --threads 1 --repeats 1 --parts sampling
    .venv/bin/python -m bench.rollout --parts sampling --more --ragged 40    (alone on the machine)
"""

import argparse
import ctypes
import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

if not __package__:  # run as a file, `import rollout` below would find this file itself
    sys.exit("run from the repository root as a module: python -m bench.rollout")

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LONGACT_CACHE", str(ROOT / ".cache" / "longact"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on the network

import torch  # noqa: E402  (after the environment above)
import transformers  # noqa: E402

from plumbing import engine  # noqa: E402
from plumbing.common import cpu_name, mix_seed  # noqa: E402
from plumbing.policy import load_policy  # noqa: E402
from rollout import (completion_mask_from_positions, eos_ids, full_sequence_logprobs,  # noqa: E402
                     generation_config, group_logprobs, only_config)
from tasks.haystack import calibration_prompts  # noqa: E402

# Letters: N prompts, G group size, P prompt tokens, T completion tokens, V vocab, C hidden,
# L layers.
MIB = 2**20
CHUNK = 256  # rollout.token_logprobs' default chunk of positions whose logits exist at once
PARTS = ("sampling", "fwd-bwd", "memory")


# -----------------------------------------------------------------------------
# timing

def bf16():
    """bf16 autocast on CPU: fp32 master weights, bf16 matmuls."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


def interleaved(contenders: dict, repeats: int, before=None, warmup=None) -> dict:
    """Median seconds of each contender (name -> zero-arg function), run side by side.

    One untimed warm-up round first (`warmup` may give cheaper stand-ins, same names). Odd rounds
    reverse the order, so a slow drift of a shared machine does not always land on the same
    contender. `before` (untimed) runs ahead of every call, e.g. to clear gradients.
    """
    for name, fn in (warmup or contenders).items():
        if before:
            before()
        fn()
    times = {name: [] for name in contenders}
    for r in range(repeats):
        for name in (list(contenders) if r % 2 == 0 else list(reversed(contenders))):
            if before:
                before()
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


@contextmanager
def eos_suppressed(model, eos: list):
    """EOS logits -> -inf in every forward of the LM head, so all rows run to max_new_tokens."""
    idx = torch.tensor(eos)
    handle = model.get_output_embeddings().register_forward_hook(
        lambda mod, inp, out: out.index_fill(-1, idx.to(out.device), float("-inf")))
    try:
        yield
    finally:
        handle.remove()


class PrefillClock:
    """A prefill_hook for sample_groups that adds up the seconds spent in prefill forwards."""

    def __init__(self):
        self.seconds = 0.0

    @contextmanager
    def __call__(self, attention_mask):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0


def sample_path(model, tok, prompts: list, G: int, T: int, prefill_hook=None, per_group=False,
                **switches):
    """rollout.sample_groups' sampling (temperature 1, top_p 1, seed 0) with the engine's
    switches exposed: cascade, hf_loop, onednn (engine.generate), and per_group = one generate call
    per prompt seeded by its index (the previous code). -> (completion ids (N*G, T'), truncated)."""
    eos = eos_ids(model, tok)
    config = generation_config(T, 1.0, 1.0, tok.pad_token_id, eos)
    chunks = [[p] for p in prompts] if per_group else [prompts]
    pieces = []
    with torch.random.fork_rng(), only_config(model, config):
        for i, chunk in enumerate(chunks):
            torch.manual_seed(mix_seed(0, "sample", i) if per_group else mix_seed(0, "sample"))
            pieces.append(engine.generate(model, chunk, G, config, prefill_hook, **switches))
    width = max(x.shape[1] for x in pieces)
    ids = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1]), value=tok.pad_token_id)
                     for x in pieces])  # (N*G, T')
    return ids, completion_mask_from_positions(ids, eos)[1]


def bench_sampling(model, tok, prompts: list, G: int, T: int, repeats: int, use_bf16: bool,
                   more: bool = False):
    """Part 1: today's batched sample_groups, its per-group path, and the previous code (one call
    per prompt, prompt cache repeated to every row, transformers' decoding loop); with `more` also
    the batched call without oneDNN linears, also on transformers' loop, and on the repeated
    cache, to split the gains.
    -> (medians, prefill medians, (decode steps, rows per step) of each path, completions)."""
    N = len(prompts)
    paths = {"batched: 1 generate call (default)": dict(),
             f"per group: {N} generate calls": dict(per_group=True),
             "previous code: per group, repeated cache, transformers' loop":
                 dict(per_group=True, cascade=False, hf_loop=True, onednn=False)}
    steps = [(T, N * G), (N * T, G), (N * T, G)]  # (decode steps, rows per step) of each path
    if more:
        paths["batched, torch linears"] = dict(onednn=False)
        paths["batched, torch linears, transformers' loop"] = dict(onednn=False, hf_loop=True)
        paths["batched, repeated prompt cache"] = dict(cascade=False)
        steps += [(T, N * G)] * 3
    out, clocks = {}, {name: [] for name in paths}

    def run(name, n=T, timed=True):
        clock = PrefillClock()
        with bf16() if use_bf16 else nullcontext():
            out[name] = sample_path(model, tok, prompts, G, n, clock, **paths[name])
        if timed:
            clocks[name].append(clock.seconds)

    contenders = {name: (lambda name=name: run(name)) for name in paths}
    warm = {name: (lambda name=name: run(name, 2, False)) for name in paths}
    with eos_suppressed(model, eos_ids(model, tok)):
        med = interleaved(contenders, repeats, warmup=warm)
    for ids, truncated in out.values():  # the same work: N*G rows of exactly T tokens, no EOS
        assert ids.shape == (N * G, T) and bool(truncated.all()), ids.shape
    prefill = {name: statistics.median(clocks[name]) for name in paths}
    return med, prefill, dict(zip(paths, steps)), out[next(iter(paths))][0]


def bench_fwd_bwd(model, prompt: list, completion: torch.Tensor, repeats: int, separate: bool):
    """Part 2: forward + backward of one group, ours vs G full-sequence rows."""
    G = completion.shape[0]
    logps = {}

    def ours():
        with bf16():
            lp = group_logprobs(model, prompt, completion)  # (G, T)
        lp.sum().backward()
        logps["ours"] = lp.detach()

    def batched(rows=G):
        with bf16():
            lp = full_sequence_logprobs(model, prompt, completion[:rows])  # (rows, T)
        lp.sum().backward()
        logps["full"] = lp.detach()

    def one_by_one(rows=G):
        for g in range(rows):  # what a trainer does when G rows of P + T tokens do not fit
            with bf16():
                lp = full_sequence_logprobs(model, prompt, completion[g:g + 1])  # (1, T)
            lp.sum().backward()

    contenders = {"group_logprobs (shared prompt)": ours,
                  "full_sequence_logprobs, G rows batched": batched}
    if separate:
        contenders["full_sequence_logprobs, G separate passes"] = one_by_one
    # The baselines warm up on 2 rows / 1 pass: the same kernels at a fraction of the cost.
    warm = dict(zip(contenders, (ours, lambda: batched(2), lambda: one_by_one(1))))
    model.train()
    med = interleaved(contenders, repeats, before=lambda: model.zero_grad(set_to_none=True),
                      warmup=warm)
    model.zero_grad(set_to_none=True)
    diff = (logps["ours"] - logps["full"]).abs()  # (G, T) bf16 rounding differs between paths
    return med, (diff.max().item(), diff.mean().item())


# -----------------------------------------------------------------------------
# memory

class SavedTensors:
    """Context manager recording every tensor autograd saves for backward, each storage once."""

    def __init__(self, model):
        self.param_shapes = {tuple(p.shape) for p in model.parameters()}
        self.storages = {}  # data_ptr -> (bytes, shape, is_weight)

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.storages:
            shape = tuple(t.shape)
            self.storages[s.data_ptr()] = (s.nbytes(), shape, shape in self.param_shapes)
        return t

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def summary(self) -> dict:
        acts = [(b, shape) for b, shape, w in self.storages.values() if not w]
        weights = sum(b for b, _, w in self.storages.values() if w)
        return {"weights": weights, "acts": sum(b for b, _ in acts), "largest": max(acts)}


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MiB; nan without /proc."""
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
    """What minimal GRPO code does: logits at EVERY position, fp32 log_softmax over all of them,
    gather, keep the completion -- the (G, P+T-1, V) log-softmax is saved for backward."""
    G, T = completion_ids.shape
    ids = torch.cat([torch.tensor([prompt_ids]).expand(G, -1), completion_ids], 1)  # (G, P + T)
    logits = model(input_ids=ids).logits[:, :-1].float()  # (G, P+T-1, V)
    logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (G, P+T-1)
    return logp[:, len(prompt_ids) - 1:]  # (G, T)


def measure_memory(model, fn, prompt: list, completion: torch.Tensor) -> dict:
    """Saved-for-backward bytes of one forward of `fn`, then the peak-RSS rise over fwd + bwd."""
    model.zero_grad(set_to_none=True)
    start = reset_peak_rss()
    with SavedTensors(model) as saved, bf16():
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
        # M_MMAP_THRESHOLD (-3) = 1 MiB: big tensors get their own mmap and go back to the OS when
        # freed, so a peak is not hidden by memory kept from the previous measurement.
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

def print_header(a, model):
    print(f"bench/rollout: {type(model).__name__} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params), "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"  CPU: {cpu_name()}; torch CPU capability: {torch.backends.cpu.get_cpu_capability()}; "
          f"{os.cpu_count()} cores; {torch.get_num_threads()} torch threads; "
          f"1-min load average {os.getloadavg()[0]:.1f}")
    print(f"  medians of {a.repeats} timed round(s) after 1 warm-up round")
    if a.threads > 1 and os.getloadavg()[0] + a.threads > os.cpu_count() + 0.5:
        print(f"  WARNING: {a.threads} threads on a loaded machine oversubscribe the cores; "
              f"rerun with --threads 1 (or when the machine is idle).")


def print_timings(title: str, med: dict):
    """Medians side by side, then each other contender's time as a multiple of the first's."""
    names = list(med)
    print(f"\n{title}")
    for name in names:
        print(f"  {name:<44} {med[name]:8.2f} s")
    for name in names[1:]:
        print(f"  {name} / {names[0]}: {med[name] / med[names[0]]:.2f}x")


def print_sampling_split(med: dict, prefill: dict, steps: dict):
    """Prefill (the same work in every path) and decode time of each path."""
    for name in med:
        decode = med[name] - prefill[name]
        n, rows = steps[name]
        print(f"  {name}: prefill {prefill[name]:.2f} s, decode {decode:.2f} s "
              f"= {n} steps of {rows} rows, {decode / n:.3f} s per step")


def print_memory(rows: list, G: int, T: int, cfg):
    """The saved-for-backward table and the growth per prompt token."""
    V, C, L = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    print(f"\n3. memory saved for backward (G={G}, T={T}, V={V}, C={C}, L={L}), MiB; "
          f"'largest' = largest activation; peak RSS+ = rise of peak RSS over fwd + bwd")
    print(f"  {'P':>5} | {'ours: acts':>10} {'largest':>8} {'peak RSS+':>9} | "
          f"{'naive 1 row: acts':>17} {'largest':>8} {'peak RSS+':>9} | {'naive x G acts':>14}")
    for P, o, n in rows:
        print(f"  {P:>5} | {o['acts'] / MIB:10.0f} {o['largest'][0] / MIB:8.1f} "
              f"{o['peak_rss']:9.0f} | {n['acts'] / MIB:17.0f} {n['largest'][0] / MIB:8.1f} "
              f"{n['peak_rss']:9.0f} | {G * n['acts'] / MIB:14.0f}")
    print(f"  largest saved tensor of ours: shape {max(o['largest'] for _, o, _ in rows)[1]}; "
          f"bound G x min(T, chunk) x V x 4 B = {G * min(T, CHUNK) * V * 4 / MIB:.0f} MiB")
    if len(rows) > 1:
        (P0, o0, n0), (P1, o1, n1) = rows[-2], rows[-1]
        ours_tok = (o1["acts"] - o0["acts"]) / (P1 - P0)  # bytes per prompt token, whole group
        naive_tok = (n1["acts"] - n0["acts"]) / (P1 - P0)  # bytes per prompt token, one row
        print(f"  per extra prompt token ({P0}->{P1}): ours {ours_tok / 1024:.0f} KiB for the "
              f"group; naive {naive_tok / 1024:.0f} KiB per row (x G = "
              f"{G * naive_tok / 1024:.0f} KiB), of which fp32 log-softmax {V * 4 / 1024:.0f} KiB")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per contender (median)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch CPU threads (1 when other jobs share the cores)")
    p.add_argument("--prompts", type=int, default=4, help="N prompts sampled per step (part 1)")
    p.add_argument("--prompt-len", type=int, default=1024, help="P prompt tokens (parts 1-2)")
    p.add_argument("--group", type=int, default=8, help="G completions per prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="T completion tokens (EOS off)")
    p.add_argument("--bf16", action="store_true", help="sample under bf16 autocast (part 1)")
    p.add_argument("--more", action="store_true",
                   help="part 1 also times the batched call without oneDNN linears, also on "
                        "transformers' loop, and on the repeated prompt cache")
    p.add_argument("--ragged", type=int, default=0,
                   help="prompt i is shortened by i x RAGGED tokens (left padding in the batch)")
    p.add_argument("--separate", action="store_true", help="part 2 also times G single-row passes")
    p.add_argument("--memory-lengths", type=int, nargs="+", default=[512, 1024, 2048],
                   help="prompt lengths of part 3")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    model, tok = load_policy("smollm2-135m")  # fp32 weights
    model.eval()
    print_header(a, model)
    prompts = calibration_prompts(tok, a.prompt_len, a.prompts, seed=0)  # exactly P tokens each
    prompts = [p[i * a.ragged:] for i, p in enumerate(prompts)]  # P - i x ragged tokens
    G, T = a.group, a.new_tokens
    completion = None
    if "sampling" in a.parts:
        med, prefill, steps, ids = bench_sampling(model, tok, prompts, G, T, a.repeats, a.bf16,
                                                  a.more)
        print_timings(f"1. sampling N={a.prompts} prompts x P={[len(p) for p in prompts]} "
                      f"tokens, G={G}, T={T} (EOS off), {'bf16 autocast' if a.bf16 else 'fp32'}",
                      med)
        print_sampling_split(med, prefill, steps)
        completion = ids[:G]  # the first prompt's group
    if completion is None:
        completion = torch.randint(0, model.config.vocab_size, (G, T), generator=torch.Generator()
                                   .manual_seed(0))  # (G, T) timing does not depend on the ids
    if "fwd-bwd" in a.parts:
        med, (dmax, dmean) = bench_fwd_bwd(model, prompts[0], completion, a.repeats, a.separate)
        print_timings(f"2. forward + backward of one group (P={a.prompt_len}, G={G}, T={T}, "
                      f"fp32 weights, bf16 autocast)", med)
        print(f"  |logp(ours) - logp(full)|: max {dmax:.3f}, mean {dmean:.4f} nats (bf16 rounding)")
    if "memory" in a.parts:
        rows = bench_memory(model, tok, a.memory_lengths, completion)
        print_memory(rows, G, T, model.config)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s, "
          f"1-min load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
