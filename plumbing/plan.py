"""
plan.py -- GPU memory and disk of a LongAct run, computed from a model config: what fits on one
GPU (`python train.py --preset paper-8b --plan`; the time estimate is timeplan.py's).

A step samples groups (prompt + G completions), then updates the policy one group per
micro-batch through the shared-prompt path of rollout.py (the prompt runs once, its keys/values
shared by the G completions; logits in chunks recomputed in backward). The plan adds up, per
phase, every tensor alive at that phase's peak:

    sampling  weights, optimizer state, reference, the cascade KV cache (each prompt once, each
              row's own suffix: what engine.py builds), prefill / decoding transients
    update    weights, gradients, optimizer state, autocast copies, reference, saved activations,
              shared prompt K/V and their gradients, one layer's recompute, one logits chunk
    step      the resident tensors, the optimizer's temporaries, the frozen q/k rows copied out
    evaluation  the resident tensors and one greedy batch at the longest evaluation length
    disk      one checkpoint, and the peak while the kept ones and the new one coexist

Peaks are sums of the rows (conservative). GB = 1e9 bytes. Activation sizes follow transformers'
Qwen3 code layer by layer; tests/test_plan.py checks parameter, gradient and optimizer bytes
exactly, saved activations against torch's saved-tensor hooks, and the cache rows against the
real cache objects. Choices (precision options, what coexists, estimated rows): SOURCES.md §9.39.
Model configs come from policy.model_config (Qwen3-4B and -8B offline).

Letters: L layers, C hidden, I MLP width, H query heads, K key/value heads, D head dim, V vocab,
P prompt tokens, G completions per prompt, T new tokens per completion.
Run: python -m plumbing.plan --model qwen3-4b qwen3-8b --optimizer bf16-sr [--prompt-len 16384]
"""

import argparse
from dataclasses import dataclass, fields, replace
from pathlib import Path

from plumbing.common import head_dim_of
from plumbing.policy import model_config

GB = 1e9
OPTIMIZERS = {  # bytes per parameter: weight, gradient, optimizer state (m + v); autocast copies?
    "adamw": (4, 4, 8, True),
    "bf16-sr": (2, 2, 4, False),
    "bf16-sr-fp32-moments": (2, 2, 8, False),
}
BF16_CHUNK = 1 << 24  # optim.AdamWSR's default chunk (elements per fp32 temporary)
# memory (GB), dense bf16 tensor TFLOP/s (without sparsity), memory bandwidth (TB/s): NVIDIA's
# data sheets of the SXM parts (SOURCES.md §8.10)
GPUS = {"h200": dict(name="H200 SXM", gb=141.0, tflops=989.0, tbps=4.8),
        "h100": dict(name="H100 SXM", gb=80.0, tflops=989.0, tbps=3.35),
        "a100": dict(name="A100 SXM 80GB", gb=80.0, tflops=312.0, tbps=2.04)}


@dataclass
class Settings:
    """One step's shape. Defaults: the paper setting (16k-token prompts, G = 8, 1024 new tokens)."""
    prompt_len: int = 16384
    group_size: int = 8
    new_tokens: int = 1024
    reference: bool = True           # GRPO with beta > 0 keeps a frozen bf16 reference model
    optimizer: str = "bf16-sr"       # a key of OPTIMIZERS
    grad_checkpointing: bool = True
    logits_chunk: int = 256          # rollout.token_logprobs' chunk of positions
    autocast: bool = True            # bf16 compute over fp32 weights ("adamw" only)
    prompts_per_generate: int = 1    # groups sampled by one generate call
    micro_groups: int = 1            # groups per update micro-batch (forward before backward)
    mask_ratio: float = 0.3          # LongAct's share of q/k rows that train (1.0: no masking)
    eval_len: int = 32768            # the longest evaluation prompt (RULER at 2x training)
    eval_new_tokens: int = 128       # the evaluation's answer budget (RULER's niah tasks: 128)
    eval_batch: int = 1              # greedy evaluation prompts per generate call
    keep_checkpoints: int = 1        # checkpoints kept on disk (train.py --keep-checkpoints)
    saves: int = 8                   # checkpoints the run writes (the paper: 200 steps, every 25)
    train_scope: str = "all"         # "qk": only the q/k projections have optimizer state
    gpu: str = "h200"                # a key of GPUS: its memory (10% headroom) and speeds

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Settings.optimizer: {self.optimizer!r} is not one of "
                             f"{sorted(OPTIMIZERS)}")
        if self.gpu not in GPUS:
            raise ValueError(f"Settings.gpu: {self.gpu!r} is not one of {sorted(GPUS)}")
        for f in ("prompt_len", "group_size", "new_tokens", "logits_chunk",
                  "prompts_per_generate", "micro_groups", "eval_len", "eval_new_tokens",
                  "eval_batch", "keep_checkpoints", "saves"):
            if getattr(self, f) < 1:
                raise ValueError(f"Settings.{f} must be >= 1, got {getattr(self, f)}")


# -----------------------------------------------------------------------------
# sizes (pure arithmetic on the config)

# the config fields dims() reads (head_dim may be absent: hidden / heads); a model without one
# fails at parse time (preflight.check_architecture), not in this arithmetic
CONFIG_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "vocab_size")


def dims(config) -> dict:
    """The widths the plan needs, read once from a Llama/Qwen-style config."""
    H = config.num_attention_heads
    D = head_dim_of(config)
    return dict(L=config.num_hidden_layers, C=config.hidden_size, I=config.intermediate_size,
                H=H, K=config.num_key_value_heads, D=D, V=config.vocab_size,
                tied=bool(getattr(config, "tie_word_embeddings", False)))


def param_counts(config) -> dict:
    """Parameters by kind: `linear` (every matmul weight, the LM head included), `total`."""
    d = dims(config)
    L, C, I, H, K, D, V = (d[k] for k in "LCIHKDV")
    attn = C * H * D + 2 * C * K * D + H * D * C  # q, k, v, o (Qwen3 has no bias)
    per_layer_linear = attn + 3 * C * I  # gate, up, down
    norms = L * (2 * C + 2 * D) + C  # two RMSNorms per layer, q/k norms over D, final norm
    linear = L * per_layer_linear + V * C  # the LM head is a matmul (tied: the embedding)
    total = L * per_layer_linear + norms + V * C * (1 if d["tied"] else 2)
    return dict(total=total, linear=linear, largest=V * C, qk=L * C * (H + K) * D)


def act_bytes(s: Settings) -> dict:
    """Bytes per element: r = residual stream (the weights' dtype), a = matmul inputs/outputs,
    k = cached keys (Qwen3's k_norm multiplies by its weight: fp32 weights give fp32 keys even
    under autocast), cast = whether autocast makes a separate bf16 copy per projection input."""
    w = OPTIMIZERS[s.optimizer][0]
    autocast = w == 4 and s.autocast
    a = 2 if (w == 2 or autocast) else 4
    return dict(r=w, a=a, k=w, cast=autocast)


def layer_saved_bytes(config, tokens: int, b: dict) -> int:
    """Bytes one Qwen3 decoder layer saves for backward over `tokens` positions (no checkpointing),
    not counting the keys/values that attention saves (the plan counts those per forward).

    From transformers' Qwen3 code: an RMSNorm saves its fp32 upcast, 1/rms and its normalised
    output; a Linear saves its input; SiLU and the SwiGLU product save their inputs; sdpa saves
    q, its output and a log-sum-exp per head; q_norm/k_norm are RMSNorms over D.
    """
    d = dims(config)
    C, I, H, K, D = (d[k] for k in "CIHKD")
    r, a = b["r"], b["a"]
    norms = 2 * (4 * C + 4 + r * C)  # input + post-attention norm: upcast, 1/rms, normalised
    proj_inputs = (5 if b["cast"] else 2) * a * C  # q,k,v + gate,up: one tensor each, or casts
    q = 4 * H * D + 4 * H + 2 * a * H * D  # q_norm (upcast, 1/rms, normalised), rotated q
    k = 4 * K * D + 4 * K + a * K * D  # k_norm (upcast, 1/rms, normalised)
    attn_out = a * H * D + 4 * H + a * H * D  # sdpa output + log-sum-exp, o_proj's input
    mlp = 4 * a * I  # gate out, SiLU out, up out, product
    return tokens * (norms + proj_inputs + q + k + attn_out + mlp)


def completion_attention_bytes(config, s: Settings, b: dict) -> int:
    """Per layer, what sdpa saves for the G completions: their keys/values (the prompt's
    concatenated in front, repeated to H heads because a mask rules out sdpa's GQA path) and the
    (G, T-1, P+T-1) mask converted to the compute dtype."""
    d = dims(config)
    G, P, T = s.group_size, s.prompt_len, s.new_tokens
    kv = 2 * G * d["H"] * (P + T - 1) * d["D"] * b["a"]
    mask = G * (T - 1) * (P + T - 1) * b["a"]
    return kv + mask


# -----------------------------------------------------------------------------
# the plan

def row(phase: str, item: str, nbytes: float, how: str, saved: bool = False) -> dict:
    """One line of the plan. saved: held by autograd as a saved tensor of the forward (what
    torch.autograd.graph.saved_tensors_hooks sees), as opposed to states, caches, transients."""
    return dict(phase=phase, item=item, bytes=float(nbytes), gb=nbytes / GB, how=how,
                saved=saved)


def state_rows(config, s: Settings) -> list:
    """Weights, gradients, optimizer state, autocast copies and the reference model."""
    n = param_counts(config)
    w, g, st, _ = OPTIMIZERS[s.optimizer]
    copies = 2 * n["linear"] if act_bytes(s)["cast"] else 0
    ref = 2 * n["total"] if s.reference else 0
    return [
        row("update", "weights", w * n["total"], f"{n['total'] / 1e9:.2f} B params x {w} B"),
        row("update", "gradients", g * n["total"], f"params x {g} B"),
        row("update", "optimizer state (AdamW m, v)", st * n["total"], f"params x {st} B"),
        row("update", "bf16 weight copies made by autocast", copies,
            "2 B x matmul weights" if copies else "none (no autocast over fp32 weights)"),
        row("update", "reference model, bf16, frozen", ref,
            "params x 2 B" if ref else "none (beta = 0)"),
    ]


def activation_rows(config, s: Settings) -> list:
    """What the shared-prompt update keeps for backward, plus its transients."""
    d, b = dims(config), act_bytes(s)
    L, C, K, D, V = (d[k] for k in "LCKDV")
    G, P, T, m = s.group_size, s.prompt_len, s.new_tokens, s.micro_groups
    Tc = G * (T - 1)  # completion positions run through the decoder (the last token predicts none)
    kv_prompt = L * P * K * D * (b["k"] + b["a"])  # keys + values of the prompt, every layer
    ends = (P + Tc) * (4 * C + 4 + b["r"] * C) + G * T * C * b["r"] + 8 * (P + G * T)
    one_layer = max(layer_saved_bytes(config, P, b) + P * K * D * (b["k"] + b["a"]),
                    layer_saved_bytes(config, Tc, b) + completion_attention_bytes(config, s, b))
    chunk = G * min(s.logits_chunk, T) * V * (3 * 4 + b["a"])
    per = f" x {m} groups" if m > 1 else ""
    if s.grad_checkpointing:
        layers = row("update", "saved activations: layer inputs", m * L * (P + Tc) * C * b["r"],
                     f"L x (P + G(T-1)) = {L} x {P + Tc} tokens x C x {b['r']} B{per}",
                     saved=True)
        recompute = row("update", "one layer recomputed in backward", 2 * one_layer,
                        "2 x one layer's saved tensors (estimate)")
    else:
        extra = L * P * K * D * b["a"] if b["cast"] else 0  # sdpa keeps a bf16 cast of fp32 keys
        inside = (L * (layer_saved_bytes(config, P + Tc, b)
                       + completion_attention_bytes(config, s, b))
                  + 2 * (P + Tc) * D * b["r"] + extra)  # + cos/sin once per forward
        layers = row("update", "saved activations: every layer", m * inside,
                     f"layer_saved_bytes x L, completion keys/values and masks{per}", saved=True)
        recompute = row("update", "one layer's gradients in backward", one_layer,
                        "1 x one layer's saved tensors (estimate)")
    return [
        layers,
        row("update", "saved activations: final norm, hidden states, ids", m * ends,
            f"final RMSNorm over P + G(T-1) tokens, (G, T, C) for the logits, token ids{per}",
            saved=True),
        row("update", "shared prompt K/V", m * kv_prompt,
            f"L x P x K x D x ({b['k']} + {b['a']}) B, held by the cache{per}",
            saved=not s.grad_checkpointing),
        row("update", "gradients of the shared prompt K/V", m * kv_prompt,
            "summed over the G rows, held until the prompt's backward"),
        recompute,
        row("update", "one logits chunk and its gradient", chunk,
            f"G x {min(s.logits_chunk, T)} x V x (3 x 4 + {b['a']}) B (estimate)"),
    ]


def kv_bytes_per_position(config, s: Settings) -> int:
    """Cached keys + values of one position over every layer."""
    d, b = dims(config), act_bytes(s)
    return d["L"] * d["K"] * d["D"] * (b["k"] + b["a"])


def cascade_cache_bytes(config, s: Settings, prompts: int, prompt_len: int, rows: int,
                        new_tokens: int) -> int:
    """The cache that rollout.py's cascade decoding builds: each prompt's P-1 positions ONCE
    (left-padded to the longest), plus each row's own suffix: the last prompt token and the
    generated tokens but the last (T positions). G rows per prompt share its prefix."""
    return kv_bytes_per_position(config, s) * (prompts * (prompt_len - 1)
                                               + prompts * rows * new_tokens)


def resident_rows(phase: str, states: list) -> list:
    """What stays on the GPU between updates: weights, optimizer state, copies, the reference;
    gradients freed (§9.39)."""
    keep = {"weights", "optimizer state (AdamW m, v)", "bf16 weight copies made by autocast",
            "reference model, bf16, frozen"}
    out = [dict(r, phase=phase) for r in states if r["item"] in keep]
    out.insert(1, row(phase, "gradients", 0, "freed after the step (set_to_none)"))
    return out


def generate_rows(config, s: Settings, phase: str, prompts: int, prompt_len: int, rows: int,
                  new_tokens: int) -> list:
    """One generate call: the cascade cache, and the larger of its two transients -- one prompt's
    prefill (its own cache, copied into the batch cache, plus one layer's MLP) and a decode step
    (one layer's suffix re-made by torch.cat, fp32 logits and probabilities of every row)."""
    d, b = dims(config), act_bytes(s)
    cache = cascade_cache_bytes(config, s, prompts, prompt_len, rows, new_tokens)
    one_prompt = prompt_len * (kv_bytes_per_position(config, s)
                               + 3 * d["I"] * b["a"] + 2 * d["C"] * b["r"])
    suffix = prompts * rows * new_tokens * kv_bytes_per_position(config, s) // d["L"]
    decode = suffix + prompts * rows * d["V"] * 4 * 3
    how = (f"{prompts} x (P-1 = {prompt_len - 1}) prefix + {prompts * rows} rows x T = "
           f"{new_tokens} suffix positions x L x K x D x ({b['k']} + {b['a']}) B")
    return [row(phase, "KV cache (cascade: prefix once per prompt)", cache, how),
            row(phase, "prefill / decoding transients", max(one_prompt, decode),
                "max(one prompt's prefill: its K/V + a layer's MLP; a decode step's suffix "
                "copy + fp32 logits)")]


def sampling_rows(config, s: Settings, states: list) -> list:
    """Sampling: resident states, one generate call of `prompts_per_generate` groups of G rows."""
    return resident_rows("sampling", states) + generate_rows(
        config, s, "sampling", s.prompts_per_generate, s.prompt_len, s.group_size, s.new_tokens)


def eval_rows(config, s: Settings, states: list) -> list:
    """Evaluation between steps (--eval-every): the training state stays resident while greedy
    decoding runs `eval_batch` prompts of the longest evaluation length, one row each."""
    return resident_rows("evaluation", states) + generate_rows(
        config, s, "evaluation", s.eval_batch, s.eval_len, 1, s.eval_new_tokens)


def disk_rows(config, s: Settings) -> list:
    """One checkpoint (train.save_checkpoint: the weights as save_pretrained writes them, in the
    policy's dtype, and trainer_state.pt with the optimizer state of the weights that train: all,
    or with --train-scope qk the q/k projections alone) and the disk peak while the kept ones and
    the one being written coexist (a run that writes fewer never has more on disk)."""
    n = param_counts(config)
    trained = n["qk"] if s.train_scope == "qk" else n["total"]
    w, _, st, _ = OPTIMIZERS[s.optimizer]
    one = n["total"] * w + trained * st
    coexist = min(s.keep_checkpoints + 1, s.saves)
    return [row("disk", "weights (model.safetensors)", n["total"] * w, f"params x {w} B"),
            row("disk", "optimizer state (trainer_state.pt)", trained * st,
                f"{'q/k ' if s.train_scope == 'qk' else ''}params x {st} B"),
            row("disk", "one checkpoint", one, "weights + optimizer state"),
            row("disk", "peak", coexist * one,
                f"{coexist} coexist: {s.keep_checkpoints} kept + the one being written, "
                f"of {s.saves} written")]


def step_rows(config, s: Settings, states: list) -> list:
    """The optimizer step: resident states, the optimizer's temporaries, the frozen-row copies."""
    n = param_counts(config)
    w, _, st, _ = OPTIMIZERS[s.optimizer]
    if s.optimizer == "adamw":  # torch's for-loop AdamW: sqrt(v) and the denominator, fp32
        temps, how = 2 * 4 * n["largest"], "torch AdamW: 2 fp32 copies of the largest tensor"
    else:
        temps, how = 8 * 4 * min(BF16_CHUNK, n["largest"]), "AdamWSR: ~8 fp32 buffers, 1 chunk"
    frozen = (1 - s.mask_ratio) * n["qk"] * (w + st)
    return [row("step", "weights, gradients, state, copies, reference",
                sum(r["bytes"] for r in states), "the update's resident rows"),
            row("step", "optimizer temporaries", temps, how),
            row("step", "q/k rows outside the mask, copied out and back", frozen,
                f"(1 - {s.mask_ratio}) x q/k params x ({w} + {st}) B (masking 'frozen')")]


def plan(config, settings: Settings | None = None) -> list:
    """Rows (phase, item, bytes, gb, how, saved) of the sampling, update, step and evaluation
    phases, each closed by a "peak" row = the sum of its rows, then the disk rows."""
    s = settings or Settings()
    states = state_rows(config, s)
    out = []
    for name, rows_ in (("sampling", sampling_rows(config, s, states)),
                        ("update", states + activation_rows(config, s)),
                        ("step", step_rows(config, s, states)),
                        ("evaluation", eval_rows(config, s, states))):
        out += rows_ + [row(name, "peak", sum(r["bytes"] for r in rows_), "sum of the rows")]
    return out + disk_rows(config, s)


def largest_fitting(config, s: Settings, field: str, most: int) -> tuple:
    """(n, reason): the largest value of `field` (prompts_per_generate or eval_batch) up to
    `most` whose phase fits 90% of the GPU. More groups per call: fewer decode loops per step."""
    phase = {"prompts_per_generate": "sampling", "eval_batch": "evaluation"}[field]
    budget = 0.9 * GPUS[s.gpu]["gb"]
    fits = [n for n in range(1, most + 1)
            if memory_peaks(plan(config, replace(s, **{field: n})))[phase] <= budget]
    if not fits:
        return 1, f"none fits {budget:.0f} GB of the {GPUS[s.gpu]['name']}; 1 (the least)"
    calls = -(-most // fits[-1])  # as few calls as the largest fitting size needs ...
    n = -(-most // calls)  # ... with their sizes balanced (32 by at most 15: 11 + 11 + 10)
    peak = memory_peaks(plan(config, replace(s, **{field: n})))[phase]
    why = "all of them" if n == most else f"{fits[-1] + 1} would not fit"
    return n, (f"{calls} call(s) for {most}: {phase} peak {peak:.1f} GB <= {budget:.0f} GB (90% "
               f"of the {GPUS[s.gpu]['name']}), {why}")


def eval_answer_tokens(tasks) -> int:
    """The largest answer budget of the evaluation's RULER tasks (each family has its own)."""
    from tasks import ruler  # imported here: plan.py stays usable without the task data
    return max(ruler.RULER_FAMILIES[ruler.RULER_TASKS[t][0]]["max_new_tokens"] for t in tasks)


def settings_for_args(args) -> Settings:
    """Settings from train.py's parsed arguments (after presets and algorithm defaults)."""
    return Settings(
        prompt_len=args.train_len, group_size=args.group_size, new_tokens=args.max_new_tokens,
        reference=(args.beta or 0) > 0, optimizer=args.optimizer,
        grad_checkpointing=args.grad_checkpointing, autocast=args.precision != "fp32",
        # train.py samples --gen-groups prompts per generate call (0 = all of the step's)
        prompts_per_generate=args.gen_groups or args.prompts_per_step,
        micro_groups=args.micro_groups,
        mask_ratio=1.0 if args.mask_strategy == "all" else args.ratio,
        eval_len=max(args.eval_lengths), eval_new_tokens=eval_answer_tokens(args.eval_tasks),
        eval_batch=args.eval_batch or 1, keep_checkpoints=args.keep_checkpoints, gpu=args.gpu,
        saves=checkpoints_written(args), train_scope=getattr(args, "train_scope", "all"))


def checkpoints_written(args) -> int:
    """How many checkpoints train.main writes: every --save-every steps, and the last step's."""
    saves = set(range(args.save_every, args.steps + 1, args.save_every)) if args.save_every \
        else set()
    final = {args.steps} if getattr(args, "save_final", True) else set()
    return max(1, len(saves | final))  # at least the one a signal saves


def print_plan(args) -> None:
    """`python train.py ... --plan`: the memory and disk plan and its verdict (the time plan is
    timeplan.py's)."""
    rows, s = plan_for_args(args), settings_for_args(args)
    print(format_plan(rows))
    print(verdict(rows, s) + "\n")


def download_bytes(model: str, config) -> int:
    """Bytes the hub download of `model` writes into the hub cache: 0 for an embedded name, a
    local folder or a model already cached; else the weights in bf16 (how Qwen3 ships them),
    params x 2 B (SOURCES.md §9.48)."""
    from plumbing import policy  # the embedded names
    if model in policy.EMBEDDED or Path(model).exists():
        return 0
    from huggingface_hub import try_to_load_from_cache
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if isinstance(try_to_load_from_cache(model, name), str):
            return 0
    return 2 * param_counts(config)["total"]


def plan_for_args(args) -> list:
    """plan() of a train.py run: `python train.py --preset paper-8b --plan`; a model that is not
    on this machine adds its download into the hub cache (outside the checkpoints' disk peak)."""
    config = model_config(args.model)
    rows = plan(config, settings_for_args(args))
    download = download_bytes(args.model, config)
    if download:
        rows.append(row("disk", "model download into the hub cache (once)", download,
                        "params x 2 B (bf16, as the hub ships it); checked with the peak"))
    return rows


def peaks(rows: list) -> dict:
    """{phase: peak GB}, the disk's included."""
    return {r["phase"]: r["gb"] for r in rows if r["item"] == "peak"}


def memory_peaks(rows: list) -> dict:
    """{phase: peak GB} of the GPU's memory (the disk left out)."""
    return {k: v for k, v in peaks(rows).items() if k != "disk"}


def saved_activation_bytes(rows: list) -> float:
    """The update's bytes held as autograd saved tensors (what a saved-tensor hook measures)."""
    return sum(r["bytes"] for r in rows if r["phase"] == "update" and r["saved"])


def format_plan(rows: list | dict) -> str:
    """A markdown table. `rows` from plan(), or {column name: rows} for plans side by side (same
    settings shape, e.g. two models): then one GB column per plan and no "how" column."""
    named = rows if isinstance(rows, dict) else {"GB": rows}
    first = next(iter(named.values()))
    head = ["phase", "component", *named] + (["how"] if len(named) == 1 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * len(named)
             + ("---|" if len(named) == 1 else "")]
    for i, r in enumerate(first):
        vals = [f"{plan_rows[i]['gb']:.1f}" for plan_rows in named.values()]
        item = f"**{r['item']}**" if r["item"] == "peak" else r["item"]
        if r["item"] == "peak":
            vals = [f"**{v}**" for v in vals]
        lines.append("| " + " | ".join([r["phase"], item, *vals]
                                       + ([r["how"]] if len(named) == 1 else [])) + " |")
    return "\n".join(lines)


def verdict(rows: list, s: Settings) -> str:
    """One line: the largest phase against the GPU with 10% headroom."""
    phase, top = max(memory_peaks(rows).items(), key=lambda kv: kv[1])
    gb = GPUS[s.gpu]["gb"]
    ok = "fits" if top <= 0.9 * gb else "does NOT fit"
    return (f"largest phase ({phase}) {top:.1f} GB vs {0.9 * gb:.1f} GB (90% of the "
            f"{GPUS[s.gpu]['name']}'s {gb:.0f} GB): {ok}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Memory plan of one LongAct RL step on one GPU.")
    p.add_argument("--model", nargs="+", default=["qwen3-8b"],
                   help="qwen3-4b, qwen3-8b (offline), or a local HF folder / hub id")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="bf16-sr")
    p.add_argument("--prompt-len", type=int, default=16384)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=1024)
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="beta = 0 (DAPO): no reference model")
    p.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false")
    p.add_argument("--logits-chunk", type=int, default=256)
    p.add_argument("--no-autocast", dest="autocast", action="store_false",
                   help="fp32 compute (adamw-fp32 only)")
    p.add_argument("--prompts-per-generate", type=int, default=1,
                   help="groups sampled by one generate call (their KV caches coexist)")
    p.add_argument("--micro-groups", type=int, default=1, help="groups per update micro-batch")
    p.add_argument("--mask-ratio", type=float, default=0.3, help="share of q/k rows that train")
    p.add_argument("--eval-len", type=int, default=32768, help="longest evaluation prompt")
    p.add_argument("--eval-batch", type=int, default=1, help="greedy prompts per generate call")
    p.add_argument("--keep-checkpoints", type=int, default=1)
    p.add_argument("--gpu", choices=sorted(GPUS), default="h200")
    a = p.parse_args(argv)
    s = Settings(**{f.name: getattr(a, f.name) for f in fields(Settings)
                    if hasattr(a, f.name)})
    plans = {m: plan(model_config(m), s) for m in a.model}
    print(f"P = {s.prompt_len}, G = {s.group_size}, T = {s.new_tokens}, optimizer {s.optimizer}, "
          f"reference {s.reference}, checkpointing {s.grad_checkpointing}\n")
    print(format_plan(plans if len(plans) > 1 else next(iter(plans.values()))))
    for m, rows in plans.items():
        print(f"{m}: {verdict(rows, s)}")
    return plans


if __name__ == "__main__":
    main()
