"""The scenarios of tests/test_fsdp.py, run two ways: sharded, by each of 2 gloo processes under
torchrun (`main`), and in one process as the reference (`run_reference`, from the test itself).

A small masked GRPO update on fixed fake completions: per step, 4 groups of G = 2 completions
(rank r takes groups 2r, 2r+1), a new row mask from seeded random statistics (30% per head),
rollout.completion_logprobs -> grpo.grpo_loss normalised by the whole step's counts, one backward
per group, masked gradients, global clipping at 0.5, AdamW with weight decay 0.1, masked step.

Run: .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 \
         tests/fsdp_worker.py OUT_DIR          (writes OUT_DIR/rank0.pt, rank1.pt)
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpo  # noqa: E402
import masking  # noqa: E402
import rollout  # noqa: E402
from plumbing import fsdp  # noqa: E402

GROUPS, G, T, STEPS = 4, 2, 6, 3  # groups per step, group size, completion tokens, steps
LR, WD, CLIP = 1e-2, 0.1, 0.5
# name: (family, KV heads, tied embeddings, gradient checkpointing, mask semantics)
SCENARIOS = {
    "qwen2_kv3": ("qwen2", 3, False, False, "frozen"),  # q/k bias; k_proj's head 1 spans 2 ranks
    "llama_tied": ("llama", 2, True, True, "grad"),
}


def tiny(kind: str, kv_heads: int, tied: bool, seed: int = 0):
    """A tiny causal LM (2 layers, 6 query heads of dim 8, vocab 127: uneven over 2 ranks)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind](
        vocab_size=127, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=kv_heads, head_dim=8,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def step_batch(step: int):
    """(Rollout, advantages (B,)) of a step: fixed fake prompts/completions, seeded by the step."""
    g = torch.Generator().manual_seed(1000 + step)
    prompts = [torch.randint(3, 127, (3 + i,), generator=g).tolist() for i in range(GROUPS)]
    ids = torch.randint(3, 127, (GROUPS * G, T), generator=g)  # (B, T)
    lengths = torch.randint(1, T + 1, (GROUPS * G,), generator=g)  # (B,)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()  # (B, T)
    rewards = torch.randint(0, 2, (GROUPS * G,), generator=g).float()  # (B,)
    adv, _ = grpo.group_advantages(rewards, G)
    r = rollout.Rollout(prompts, ids, mask, torch.zeros(GROUPS * G, dtype=torch.bool),
                        [""] * (GROUPS * G), G)
    return r, adv


def step_masks(model, step: int) -> dict:
    """New masks every step: top 30% per head of seeded random statistics (same on all ranks)."""
    g = torch.Generator().manual_seed(2000 + step)
    stats = {n: torch.rand(m.weight.shape[0], generator=g)
             for n, m in sorted(model.named_modules()) if n.endswith(("q_proj", "k_proj"))}
    return masking.build_masks(stats, 0.3, "topk", per_head=True, head_dim=8)


def update(model, opt, step: int, semantics: str, sharded: bool) -> dict:
    """One masked optimizer step; returns {"norm": grad norm before clipping, "drift": ...}."""
    r, adv = step_batch(step)
    world, rank = (fsdp.world(), fsdp.rank()) if sharded else (1, 0)
    per = GROUPS // world
    groups = list(range(rank * per, (rank + 1) * per))
    rows = torch.tensor([g * G + j for g in groups for j in range(G)])  # (b,) this rank's rows
    counts = fsdp.global_counts(r.completion_mask[rows]) if sharded \
        else grpo.batch_counts(r.completion_mask)
    masks = step_masks(model, step)
    opt.zero_grad(set_to_none=True)
    for gi in groups:  # one group per micro-batch
        sub = rollout.select_groups(r, [gi])
        logp = rollout.completion_logprobs(model, sub)  # (G, T)
        loss, _ = grpo.grpo_loss(logp, logp.detach(), None, adv[gi * G:(gi + 1) * G],
                                 sub.completion_mask, beta=0.0, num_tokens=counts[0],
                                 num_seqs=counts[1])
        loss.backward()
    (fsdp if sharded else masking).mask_grads(model, masks)
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP))
    drift = (fsdp if sharded else masking).masked_step(opt, model, masks, semantics)
    return {"norm": norm, "drift": float(drift)}


def snapshot(model, opt) -> dict:
    """Full (gathered) parameters and AdamW moments; a collective when sharded."""
    full = lambda t: t.full_tensor() if isinstance(t, fsdp.DTensor) else t.detach().clone()  # noqa
    out = {"params": {n: full(p) for n, p in model.named_parameters()}, "moments": {}}
    for n, p in model.named_parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            if k in opt.state.get(p, {}):
                out["moments"][f"{n}:{k}"] = full(opt.state[p][k])
    return out


def make(name: str, sharded: bool):
    kind, kv, tied, ckpt, semantics = SCENARIOS[name]
    model = tiny(kind, kv, tied).train()
    if ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
    if sharded:
        fsdp.shard_policy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, foreach=False)
    return model, opt, semantics


def greedy(model, max_new_tokens: int = 4) -> torch.Tensor:
    """Greedy completions of two fixed prompts (a forward through FSDP's root via generate)."""
    tok = type("Tok", (), {"pad_token_id": 2, "eos_token_id": 2,
                           "batch_decode": lambda self, x, **k: [""] * len(x)})()
    r = rollout.sample_groups(model, tok, [[5, 6, 7], [9, 8]], 1, max_new_tokens,
                              temperature=0.0)
    return r.completion_ids  # (2, max_new_tokens)


def run(name: str, sharded: bool, ckpt_dir=None, hf_dir=None) -> dict:
    """Steps 0..STEPS-1 of a scenario; snapshots after each; optional checkpoint after step 1."""
    model, opt, semantics = make(name, sharded)
    out = {"greedy": greedy(model), "snaps": [snapshot(model, opt)], "info": []}
    if sharded:  # ranks decode different numbers of tokens: generate must keep them in step
        out["greedy_uneven"] = greedy(model, 2 + 3 * fsdp.rank())
    for step in range(STEPS):
        out["info"].append(update(model, opt, step, semantics, sharded))
        out["snaps"].append(snapshot(model, opt))
        if ckpt_dir is not None and step == 1:
            fsdp.save_checkpoint(ckpt_dir, model, opt, {"step": step + 1})
    if hf_dir is not None:
        fsdp.export_hf(model, None, hf_dir)
    return out


def run_resumed(name: str, ckpt_dir) -> dict:
    """A fresh sharded model and optimizer, loaded from the step-2 checkpoint, then step 3."""
    model, opt, semantics = make(name, True)
    extra = fsdp.load_checkpoint(ckpt_dir, model, opt)
    info = update(model, opt, extra["step"], semantics, True)
    return {"extra": extra, "info": info, "snap": snapshot(model, opt)}


def row_masks_of_odd_shapes() -> dict:
    """local_row_mask of a 5-row (3 + 2) and a 1-row (1 + 0) weight sharded over 2 ranks."""
    from torch.distributed.fsdp import fully_shard
    out = {}
    for rows in (5, 1):
        lin = torch.nn.Linear(4, rows)
        fully_shard(lin)
        mask = torch.arange(rows) % 2 == 0  # (C,) T F T F T
        out[rows] = (fsdp.local_row_mask(lin.weight, mask), tuple(lin.weight.to_local().shape))
    return out


def collectives() -> dict:
    """global_counts, reduce_qk_state and the two consistency checks on rank-dependent inputs."""
    r = fsdp.rank()
    mask = torch.zeros(2 + r, 5)
    mask[0, :3] = 1  # rank 0: 3 tokens in 1 sequence; rank 1: 3 + 5 tokens in 2 sequences
    if r == 1:
        mask[2] = 1
    state = {"stat": "seq_l2", "accs": {"a.q_proj": {"value": torch.tensor([1.0, 2.0]) * (r + 1),
                                                     "tokens": 10 + r, "sequences": 1 + r}}}
    fsdp.reduce_qk_state(state)
    errors = {}
    for what, fn in (("count", lambda: fsdp.same_count(r, "groups")),
                     ("masks", lambda: fsdp.check_same_masks({"x": torch.tensor([r == 0, True])}))):
        try:
            fn()
        except ValueError as e:
            errors[what] = str(e)
    return {"counts": fsdp.global_counts(mask), "state": state["accs"]["a.q_proj"],
            "errors": errors, "share": fsdp.my_share([0, 1, 2, 3]), "width": widths(r),
            "main": fsdp.from_main(f"run-of-rank-{r}"),
            "numbers": [fsdp.reduce_numbers([r + 1, 10 * r], op) for op in ("sum", "min", "max")],
            "mean": fsdp.mean_over_ranks({"reward": float(r), "step": 7, "tag": "x"})}


def widths(r: int):
    """same_width of a 1-row rollout of width 3 (rank 0) or 5 (rank 1): (ids, mask) after."""
    T = 3 + 2 * r
    ro = rollout.Rollout([[1]], torch.full((1, T), 7), torch.ones(1, T),
                         torch.zeros(1, dtype=torch.bool), [""], 1)
    ro = fsdp.same_width(ro, pad_id=2)
    return ro.completion_ids, ro.completion_mask


def frozen_reference_logprobs() -> torch.Tensor:
    """GRPO's KL reference: a sharded model without gradients, log-probs of this rank's groups."""
    ref = tiny("qwen2", 3, False).requires_grad_(False)
    fsdp.shard_policy(ref)
    r, _ = step_batch(0)
    with torch.no_grad():
        return rollout.completion_logprobs(ref, rollout.select_groups(r, fsdp.my_share(
            list(range(GROUPS)), "groups")))  # (b, T)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    fsdp.init_distributed(timeout_s=120)
    out = Path(out_dir)
    res = {"world": fsdp.world(), "odd": row_masks_of_odd_shapes(), "coll": collectives(),
           "ref_logp": frozen_reference_logprobs()}
    res["qwen2_kv3"] = run("qwen2_kv3", True, ckpt_dir=out / "ckpt", hf_dir=out / "hf")
    res["resumed"] = run_resumed("qwen2_kv3", out / "ckpt")
    res["llama_tied"] = run("llama_tied", True, hf_dir=out / "hf_tied")
    torch.save(res, out / f"rank{fsdp.rank()}.pt")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
