"""
plan.py -- GPU memory of one LongAct RL step, computed from a model config: what fits on one GPU.

A step samples groups (prompt + G completions), then updates the policy one group per
micro-batch through the shared-prompt path of rollout.py (`group_logprobs`: the prompt runs once,
its keys/values are shared by the G completions; logits in chunks recomputed in backward). The
plan adds up, per phase, every tensor that is alive at that phase's peak:

    sampling  weights, optimizer state, reference, KV cache of the G rows, decoding transients
    update    weights, gradients, optimizer state, autocast copies, reference, saved activations,
              shared prompt K/V and their gradients, one layer's recompute, one logits chunk
    step      the resident tensors, the optimizer's temporaries, the frozen q/k rows copied out

Peaks are sums of the rows (conservative: the transients of the update do not all coexist).
GB = 1e9 bytes. Activation sizes follow the Qwen3 code of transformers 5 layer by layer
(`layer_saved_bytes`); tests/test_plan.py checks the parameter, gradient and optimizer bytes
exactly and the saved activations against torch's saved-tensor hooks on a tiny Qwen3.

Choices (engineering; the paper does not describe its memory layout):
  1. Precision options (OPTIMIZERS, named like train.py's --optimizer): "adamw" = fp32 master
     weights, fp32 gradients, fp32 AdamW m and v, bf16 autocast for compute; "bf16-sr" = bf16
     weights, gradients and moments with optim.AdamWSR (stochastic rounding);
     "bf16-sr-fp32-moments" = the same with fp32 m and v.
  2. The GRPO reference model (beta > 0) is a frozen bf16 copy; DAPO (beta = 0) has none.
  3. Sampling assumes the gradients were freed after the last optimizer step
     (`optimizer.zero_grad(set_to_none=True)`). The KV caches (and prefills) of every group of
     one `generate` call coexist: `prompts_per_generate` multiplies those rows. Likewise the
     activations of the `micro_groups` groups of one update micro-batch.
  4. The optimizer step includes masking.masked_step's "frozen" copies: the q/k rows outside the
     mask, (1 - ratio) of them, copied out of the weight and of m and v, then back.
  5. Estimates, not read from code: one layer's recompute in backward is counted as twice its
     saved tensors (them plus the gradients flowing through), a logits chunk as three fp32
     (G, chunk, V) buffers plus one in the compute dtype. A GPU run (bench/gpu_check.py) is what
     checks these.
  6. Written for Qwen3 layers (q/k RMSNorm); for other Llama-style models the activation rows
     are approximate. Not counted: the CUDA context and allocator fragmentation (the 10%
     headroom is for them).

Published configs (no hub here): QWEN3 holds the numbers of Qwen/Qwen3-4B and Qwen/Qwen3-8B
`config.json` (hidden size, layers, heads, vocabulary, tied embeddings); 4.02 B and 8.19 B params.

Letters: L layers, C hidden, I MLP width, H query heads, K key/value heads, D head dim, V vocab,
P prompt tokens, G completions per prompt, T new tokens per completion.
Run: python plan.py --model qwen3-4b qwen3-8b --optimizer bf16-sr [--prompt-len 16384 ...]
Test: .venv/bin/python -m pytest -q tests/test_plan.py
"""

import argparse
from dataclasses import dataclass, fields

import transformers

GB = 1e9
QWEN3 = {  # config.json of the hub repositories Qwen/Qwen3-4B and Qwen/Qwen3-8B
    "qwen3-4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643,
                     eos_token_id=151645),
    "qwen3-8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
                     rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643,
                     eos_token_id=151645),
}
HUB_NAMES = {"Qwen/Qwen3-4B": "qwen3-4b", "Qwen/Qwen3-8B": "qwen3-8b"}
OPTIMIZERS = {  # bytes per parameter: weight, gradient, optimizer state (m + v); autocast copies?
    "adamw": (4, 4, 8, True),
    "bf16-sr": (2, 2, 4, False),
    "bf16-sr-fp32-moments": (2, 2, 8, False),
}
BF16_CHUNK = 1 << 24  # optim.AdamWSR's default chunk (elements per fp32 temporary)


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
    gpu_gb: float = 141.0            # H200; the plan asks for 10% headroom

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Settings.optimizer: {self.optimizer!r} is not one of "
                             f"{sorted(OPTIMIZERS)}")
        for f in ("prompt_len", "group_size", "new_tokens", "logits_chunk",
                  "prompts_per_generate", "micro_groups"):
            if getattr(self, f) < 1:
                raise ValueError(f"Settings.{f} must be >= 1, got {getattr(self, f)}")


def model_config(name: str):
    """A transformers config: "qwen3-4b" / "qwen3-8b" (or their hub ids) from QWEN3, offline;
    anything else through AutoConfig.from_pretrained (a local folder, or the hub when online)."""
    key = HUB_NAMES.get(name, name.lower())
    if key in QWEN3:
        return transformers.Qwen3Config(**QWEN3[key])
    return transformers.AutoConfig.from_pretrained(name)


# -----------------------------------------------------------------------------
# sizes (pure arithmetic on the config)

def dims(config) -> dict:
    """The widths the plan needs, read once from a Llama/Qwen-style config."""
    H = config.num_attention_heads
    D = getattr(config, "head_dim", None) or config.hidden_size // H
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


def sampling_rows(config, s: Settings, states: list) -> list:
    """Sampling: resident states (no gradients), KV cache of the generating rows, transients."""
    d, b = dims(config), act_bytes(s)
    L, C, I, K, D, V = (d[k] for k in "LCIKDV")
    n = s.prompts_per_generate
    cache = n * s.group_size * (s.prompt_len + s.new_tokens) * L * K * D * (b["k"] + b["a"])
    prefill = n * s.prompt_len * (3 * I * b["a"] + 2 * C * b["r"])  # one layer's MLP, n prompts
    decode = cache / L + n * s.group_size * V * 4 * 2  # a layer's cache re-made by cat, logits
    keep = {"weights", "optimizer state (AdamW m, v)", "bf16 weight copies made by autocast",
            "reference model, bf16, frozen"}
    out = [dict(r, phase="sampling") for r in states if r["item"] in keep]
    out.insert(1, row("sampling", "gradients", 0, "freed after the step (set_to_none)"))
    return out + [
        row("sampling", "KV cache of the generating rows", cache,
            f"{n} x G = {n * s.group_size} rows x (P + T) x L x K x D x ({b['k']} + {b['a']}) B"),
        row("sampling", "prefill / decoding transients", max(prefill, decode),
            "max(one prefill layer's MLP, one layer's cache copy + logits)"),
    ]


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
    """Rows (phase, item, bytes, gb, how, saved) of the sampling, update and step phases, each
    phase closed by a "peak" row = the sum of its rows."""
    s = settings or Settings()
    states = state_rows(config, s)
    out = []
    for name, rows_ in (("sampling", sampling_rows(config, s, states)),
                        ("update", states + activation_rows(config, s)),
                        ("step", step_rows(config, s, states))):
        out += rows_ + [row(name, "peak", sum(r["bytes"] for r in rows_), "sum of the rows")]
    return out


def settings_for_args(args) -> Settings:
    """Settings from train.py's parsed arguments (after presets and algorithm defaults)."""
    return Settings(
        prompt_len=args.train_len, group_size=args.group_size, new_tokens=args.max_new_tokens,
        reference=(args.beta or 0) > 0, optimizer=args.optimizer,
        grad_checkpointing=args.grad_checkpointing, autocast=args.precision != "fp32",
        # train.py samples --gen-groups prompts per generate call (0 = all of the step's)
        prompts_per_generate=args.gen_groups or args.prompts_per_step,
        micro_groups=args.micro_groups,
        mask_ratio=1.0 if args.mask_strategy == "all" else args.ratio)


def plan_for_args(args) -> list:
    """plan() of a train.py run: `python train.py --preset paper-8b --plan`."""
    return plan(model_config(args.model), settings_for_args(args))


def peaks(rows: list) -> dict:
    """{phase: peak GB}."""
    return {r["phase"]: r["gb"] for r in rows if r["item"] == "peak"}


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
    top = max(peaks(rows).values())
    budget = 0.9 * s.gpu_gb
    ok = "fits" if top <= budget else "does NOT fit"
    return f"largest phase {top:.1f} GB vs {budget:.1f} GB (90% of {s.gpu_gb:.0f} GB): {ok}"


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
    p.add_argument("--gpu-gb", type=float, default=141.0)
    a = p.parse_args(argv)
    s = Settings(**{f.name: getattr(a, f.name) for f in fields(Settings)})
    plans = {m: plan(model_config(m), s) for m in a.model}
    print(f"P = {s.prompt_len}, G = {s.group_size}, T = {s.new_tokens}, optimizer {s.optimizer}, "
          f"reference {s.reference}, checkpointing {s.grad_checkpointing}\n")
    print(format_plan(plans if len(plans) > 1 else next(iter(plans.values()))))
    for m, rows in plans.items():
        print(f"{m}: {verdict(rows, s)}")
    return plans


if __name__ == "__main__":
    main()
