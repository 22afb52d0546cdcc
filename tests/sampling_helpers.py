"""Shared pieces of the sampling tests (test_rollout.py, test_engine.py): a tiny tokenizer,
random prompts, an EOS bias, a spy on `generate`, and engine.generate as sample_groups calls it.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

import rollout
from plumbing import common, engine

EOS = 2


class TinyTok:
    """Just enough tokenizer for sample_groups: pad == eos == 2, as SmolLM2 and Qwen do."""
    pad_token_id = eos_token_id = EOS

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(str(t) for t in row.tolist() if not (skip_special_tokens and t == EOS))
                for row in ids]


def prompts(n=2, lengths=(12, 17), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (lengths[i % len(lengths)],), generator=g).tolist()
            for i in range(n)]


@contextmanager
def eos_boost(model, nats):
    """Add `nats` to the EOS logit at every step, so completions end earlier."""
    bump = nats * F.one_hot(torch.tensor(EOS), model.config.vocab_size)  # (V,)
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: out + bump.to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def spy_generate(model, **extra):
    """Record every model.generate call; `extra` kwargs are added (e.g. output_scores=True)."""
    calls, original = [], model.generate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs, **extra)
        calls.append(out)
        return out.sequences if extra.get("return_dict_in_generate") else out

    model.generate = spy
    try:
        yield calls
    finally:
        del model.generate  # back to the class method


def engine_sample(model, ps, G, T, temperature=0.0, seed=0, **switches):
    """engine.generate as sample_groups calls it, with the engine's switches (cascade, hf_loop,
    onednn) exposed: (N*G, T') completion ids."""
    config = rollout.generation_config(T, temperature, 1.0, EOS, [EOS])
    torch.manual_seed(common.mix_seed(seed, "sample"))
    with rollout.only_config(model, config):
        return engine.generate(model, ps, G, config, **switches)
