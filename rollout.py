"""
rollout.py -- G completions per prompt with Hugging Face `generate`, and their log-probs with the
prompt run once.

In long-context RL a group is G completions of ONE long prompt (LongAct: 16k-token prompts,
G = 8). Both halves of a step share that prompt:
  * sampling (`sample_groups`): the N prompts are prefilled once, their cache repeated to the
    G rows of each group, and one `generate` call decodes all N x G rows. The fast engine
    (plumbing/engine.py, the default) does the same with less memory traffic; `engine="hf"` is
    the plain version below;
  * log-probs (`completion_logprobs`): the prompt runs ONCE with gradients and the G completion
    forwards attend to its keys/values, so backward sends all G gradients into one prompt forward.
    Exact: tests/test_rollout.py compares it with G full [prompt; completion] forwards.
Sampling sees the distribution the loss scores (a complete GenerationConfig, the model's own
swapped out); completion masks come from the position of the first EOS, never from
`ids != pad` (pad == EOS for SmolLM2 and Qwen; SOURCES.md §9.20).

    sample_groups(model, tok, prompts, G, T)  -> Rollout: G completions per prompt
    completion_logprobs(model, rollout)       -> (B, T) log pi(y_t | x, y_<t), with gradients

Shapes: N prompts (= groups), G group size, B = N*G completions, P prompt tokens (padded),
T completion tokens, C hidden, V vocab.
Test: .venv/bin/python -m pytest -q tests/test_rollout.py
"""

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache, GenerationConfig

from plumbing.common import left_pad, mix_seed, model_device, positions_from_mask, swapped

try:  # the fast path, in its own file; without it the plain engine still runs (engine="hf")
    import plumbing.engine as fast_engine
except ModuleNotFoundError:
    fast_engine = None

ENGINES = ("fast", "hf")

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


def generation_config(max_new_tokens: int, temperature: float, top_p: float, pad_id: int,
                      eos: list) -> GenerationConfig:
    """A complete config: plain temperature/nucleus sampling (or greedy), every other processor off.

    Each field that could change the sampled distribution gets its neutral value explicitly; the
    fields whose "off" is None (min_p, suppress_tokens, sequence_bias, ...) stay None, which is why
    `only_config` must also swap out the model's own generation_config (SOURCES.md §9.18)."""
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


def only_config(model, config: GenerationConfig):
    """Make `config` the model's generation_config for one call (a context manager).

    transformers 5 fills every None field of a passed config from `model.generation_config`
    (`_prepare_generation_config`, defaults_only=True), and has no switch to stop it; with the
    model's own config out of the way only the global neutral defaults remain."""
    return swapped(model, generation_config=config)


# -----------------------------------------------------------------------------
# the plain engine: prefill the padded prompts once, repeat their cache G times, `generate`

@torch.no_grad()
def hf_generate(model, prompts: list, G: int, config: GenerationConfig, prefill_hook=None):
    """(N*G, T') completion ids of one chunk with transformers' own loop. The prompts minus their
    last token are prefilled as one left-padded batch (under `prefill_hook`), the cache repeated
    to G rows per prompt, and `generate` continues from the last prompt token."""
    device = model_device(model)
    ids, attn = (x.to(device) for x in left_pad(prompts, config.pad_token_id))  # (N, P) each
    cache = DynamicCache(config=model.config)
    if ids.shape[1] > 1:
        with prefill_hook(attn[:, :-1]) if prefill_hook else nullcontext():
            model.get_decoder()(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], cache=cache,
                                position_ids=positions_from_mask(attn)[:, :-1], use_cache=True)
        cache.batch_repeat_interleave(G)  # (N*G, ...) a group's rows share its prompt's K/V
    out = model.generate(input_ids=ids.repeat_interleave(G, 0),
                         attention_mask=attn.repeat_interleave(G, 0), cache=cache,
                         generation_config=config)  # (N*G, P + T')
    return out[:, ids.shape[1]:]  # (N*G, T') the completions only


def sample_groups(model, tokenizer, prompts: list, group_size: int, max_new_tokens: int,
                  temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                  prefill_hook=None, greedy_batch: int = 8, engine: str = "fast") -> Rollout:
    """`group_size` completions for each prompt (lists of token ids). temperature 0 = greedy.

    Sampling: all N x G rows in one `generate` call, seeded by mix_seed(seed, "sample"); the
    global RNG state is restored afterwards. Same seed and prompts -> same samples (other prompts
    in the batch -> other samples). Greedy: `greedy_batch` prompts per call.
    prefill_hook: optional callable(attention_mask) -> context manager, entered around each
    prefill forward only (never decoding); it sees every prompt's tokens exactly once.
    engine: "fast" (plumbing/engine.py) or "hf" (hf_generate above): one distribution, other
    draws.
    """
    if group_size < 1 or max_new_tokens < 1:
        raise ValueError(f"group_size and max_new_tokens must be >= 1, got {group_size}, "
                         f"{max_new_tokens}")
    if engine not in ENGINES or (engine == "fast" and fast_engine is None):
        missing = "; plumbing/engine.py is missing, so only 'hf'" if fast_engine is None else ""
        raise ValueError(f"engine {engine!r}: choose from {ENGINES}" + missing)
    generate = fast_engine.generate if engine == "fast" else hf_generate
    was_training = model.training
    model.eval()  # no dropout while sampling
    pad_id, eos = tokenizer.pad_token_id, eos_ids(model, tokenizer)
    config = generation_config(max_new_tokens, temperature, top_p, pad_id, eos)
    chunk = len(prompts) if temperature > 0 else greedy_batch
    device, pieces = model_device(model), []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            only_config(model, config):
        for start in range(0, len(prompts), chunk):
            if temperature > 0:
                torch.manual_seed(mix_seed(seed, "sample"))
            pieces.append(generate(model, prompts[start:start + chunk], group_size, config,
                                   prefill_hook))
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
    with ExitStack() as stack:
        for m in model.modules():
            if hasattr(m, "_can_checkpoint_with_cache"):
                stack.enter_context(swapped(m, _can_checkpoint_with_cache=True))
        yield


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
    device = model_device(model)
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
    device = model_device(model)
    G, T = completion_ids.shape
    completion_ids = completion_ids.to(device)
    prompt = torch.tensor([prompt_ids], device=device).expand(G, -1)  # (G, P)
    ids = torch.cat([prompt, completion_ids], 1)  # (G, P + T)
    logits = model(input_ids=ids, logits_to_keep=T + 1).logits[:, :-1].float()  # (G, T, V)
    return logits.log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)  # (G, T)
