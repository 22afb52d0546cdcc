"""
engine.py -- the fast sampling engine behind rollout.sample_groups (engine="fast", the default).
rollout.py holds the plain version of the same thing; this file is the optimisation, kept apart
(as nanochat keeps its engine apart from its RL script), and the project runs without it
(`--engine hf`).

One `generate` call decodes N prompts x G rows. Four things make it fast (SOURCES.md §8.3,
§9.18):
  * each prompt is prefilled alone, unpadded, into a preallocated batch cache (`prefill`): no
    padding mask, so sdpa takes its plain causal kernel;
  * cascade attention (`CascadeCache`, `cascade_attention`): a group's G rows read its prompt's
    keys/values once per decode step instead of G repeated copies (Hydragen, arXiv 2402.05099);
  * our decoding loop (`decode`, through generate's custom_generate) draws each token by inverting
    the CDF with one uniform number per row (`draw`) instead of torch.multinomial's V;
  * fp32 decoding on an AVX-512 CPU computes the linear layers with oneDNN (`onednn_linears`).
Same distribution as the plain path; the same completions under greedy decoding
(tests/test_rollout.py).

Shapes: N prompts (= groups), G group size, B = N*G rows, P prompt tokens (padded), T completion
tokens, V vocab; in attention H query heads, Hkv KV heads, rep = H / Hkv, D head dim, P' = P-1
prefilled prompt positions, S suffix positions (decoded so far).
Test: .venv/bin/python -m pytest -q tests/test_rollout.py
"""

from contextlib import ExitStack, contextmanager, nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface, Cache, DynamicCache, GenerationConfig
from transformers.cache_utils import DynamicLayer
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from plumbing.common import left_pad, model_device, positions_from_mask, swapped, world_size


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
    """Several ranks (train.py --fsdp): every rank must run the same forwards."""
    return world_size() > 1


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
    with ExitStack() as stack:
        for m in model.modules():
            if type(m) is torch.nn.Linear:  # an instance attribute wins over the class method
                stack.enter_context(swapped(m, forward=OneDNNLinear(m).forward))
        yield

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
    with ExitStack() as stack:
        for m in modules:
            stack.enter_context(swapped(m, cascade_layer=cache.layers[m.layer_idx]))
        for c in configs:
            stack.enter_context(swapped(c, _attn_implementation="cascade"))
        yield


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
    device = model_device(model)
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
def generate(model, prompts: list, G: int, config: GenerationConfig, prefill_hook=None,
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
    device = model_device(model)
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
    with decoding, onednn_linears(model) if onednn else nullcontext():
        out = model.generate(input_ids=ids.repeat_interleave(G, 0),
                             attention_mask=attn.repeat_interleave(G, 0), cache=cache,
                             generation_config=config,
                             custom_generate=None if hf_loop else decode)  # (N*G, P + T')
    return out[:, ids.shape[1]:]  # (N*G, T') the completions only
