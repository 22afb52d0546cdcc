"""LongAct in TRL's GRPOTrainer (integrations/trl_longact.py) and in a loop of one's own (the
README's two snippets): after each step the rows outside its masks keep their weights and AdamW
state bit for bit, the rows inside move, and the masks are masking.build_masks of statistics
that saliency.py's own hooks give on the same forwards. A tiny Qwen3 built from a config and a
character tokenizer made here: no download, seconds on a CPU.

Run: .venv/bin/python -m pytest -q tests/test_trl_longact.py
"""

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

import masking
import saliency
from conftest import tiny_model
from integrations.trl_longact import LongActCallback, hold_rows, put_back_rows
from plumbing.common import head_dim_of, qk_modules

PROMPTS = ["the sky is blue. what color is the sky?", "grass is green.", "what is two plus two?",
           "a long prompt: the cat sat on the mat, the dog sat on the log; who sat on the mat?"]


def char_tokenizer():
    """One token per character, ids 0-2 the special tokens the tiny config names."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = "abcdefghijklmnopqrstuvwxyz .,;:?!0123456789"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>", padding_side="left")


def qk_snapshot(model, optimizer) -> dict:
    """{q/k module: (weight, {AdamW state key: tensor})}, cloned."""
    out = {}
    for name, m in qk_modules(model).items():
        state = optimizer.state.get(m.weight, {})
        out[name] = (m.weight.detach().clone(),
                     {k: v.clone() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")})
    return out


def check_rows(before: dict, after: dict, masks: dict) -> None:
    """Outside the mask: weight and state bit-identical (a state born this step: zeros, as a
    fresh AdamW's). Inside: every row moved."""
    assert set(masks) == set(before) and masks
    for name, m in masks.items():
        (w0, s0), (w1, s1) = before[name], after[name]
        assert 0 < int(m.sum()) < m.numel()
        assert torch.equal(w1[~m], w0[~m]), name
        assert (w1[m] != w0[m]).any(dim=1).all(), name
        assert set(s1) == {"exp_avg", "exp_avg_sq"}, name
        for k, t in s1.items():
            old = s0.get(k, torch.zeros_like(t))
            assert torch.equal(t[~m], old[~m]), (name, k)


class Probe(TrainerCallback):
    """Listed after LongActCallback: sees the step's weights before the optimizer and after the
    rows are put back, and the training forwards' inputs (gradients on) of every step."""

    def __init__(self, longact):
        self.longact, self.steps, self.inputs = longact, [], [[]]

    def on_train_begin(self, args, state, control, model=None, **kw):
        def record(module, a, kwargs):
            if torch.is_grad_enabled():
                self.inputs[-1].append((kwargs["input_ids"].clone(),
                                        kwargs["attention_mask"].clone()))
        model.register_forward_pre_hook(record, with_kwargs=True)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        self.before = qk_snapshot(model, optimizer)
        self.other = {n: p.detach().clone() for n, p in model.named_parameters()
                      if "v_proj" in n or "down_proj" in n}

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        moved = all(not torch.equal(self.other[n], p) for n, p in model.named_parameters()
                    if n in self.other)
        la = self.longact
        self.steps.append({"before": self.before, "after": qk_snapshot(model, optimizer),
                           "masks": la.masks, "stats": la.stats, "counts": la.counts,
                           "drift": la.drift, "others_moved": moved})
        self.inputs.append([])


def test_longact_callback_in_two_grpo_steps(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tok = char_tokenizer()
    model = tiny_model("qwen3", vocab=len(tok))
    start = copy.deepcopy(model)  # the weights of step 1's forward

    def reward(completions, **kwargs):  # distinct in every group: no advantage is zero
        return [len(c) + 0.1 * i for i, c in enumerate(completions)]

    longact = LongActCallback(ratio=0.3)
    probe = Probe(longact)
    config = GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, max_steps=2, learning_rate=1e-2, weight_decay=0.1,
        lr_scheduler_type="constant", logging_strategy="no", save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, fp16=False, seed=0, disable_tqdm=True)
    assert config.gradient_checkpointing  # TRL's default: its recomputation must not count
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tok,
                          train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
                          callbacks=[longact, probe])
    trainer.train()

    D = head_dim_of(model.config)
    assert len(probe.steps) == 2
    for step, ins in zip(probe.steps, probe.inputs):
        # (a) outside: bit-identical, weights and AdamW state; (b) inside: moved
        check_rows(step["before"], step["after"], step["masks"])
        assert step["drift"] == 0.0 and step["others_moved"]
        # (c) the masks are build_masks of the collected statistics
        rebuilt = masking.build_masks(step["stats"], 0.3, "topk", per_head=True, head_dim=D)
        assert rebuilt.keys() == step["masks"].keys()
        assert all(torch.equal(rebuilt[n], step["masks"][n]) for n in rebuilt)
        # only the training forwards: no generation prefill, no checkpoint recomputation
        assert step["counts"] == {"forwards": len(ins), "sequences": 4,
                                  "tokens": sum(int(m.sum()) for _, m in ins)}

    # (c) step 1's statistics are saliency.py's on the same inputs and weights
    with torch.no_grad(), saliency.qk_hooks(start, "seq_l2") as state:
        for ids, mask in probe.inputs[0]:
            state["mask"] = mask
            start(input_ids=ids, attention_mask=mask)
    expected = saliency.finalize_state(state)
    for name, s in probe.steps[0]["stats"].items():
        torch.testing.assert_close(s, expected[name], rtol=1e-5, atol=1e-6)


def test_the_custom_loop_of_the_readme():
    """The README's loop with the project's functions; a causal-LM loss stands for yours."""
    model = tiny_model("llama")
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (4, 12), generator=g)  # (B, T)
    attn = torch.ones_like(ids)
    attn[:2, :3] = 0  # two left-padded rows
    data = [({"input_ids": ids, "attention_mask": attn}, ids)] * 2

    # --- README: LongAct in a loop of your own
    D = head_dim_of(model.config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for prompts, batch in data:
        stats = saliency.collect_qk_stats(model, [prompts])  # {q/k module: (C,)}, no grad
        masks = masking.build_masks(stats, ratio=0.3, head_dim=D)  # top 30% rows per head
        opt.zero_grad()
        before = qk_snapshot(model, opt)  # (the test's check, not the README's)
        model(input_ids=batch, labels=batch).loss.backward()  # your loss here
        masking.mask_grads(model, masks)  # grad W_Q <- grad W_Q * G_Q, the same for W_K
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # sees the masked gradient
        masking.masked_step(opt, model, masks)  # opt.step(); rows outside bit-identical
        # --- end of the README's loop
        check_rows(before, qk_snapshot(model, opt), masks)


def test_hold_and_put_back_are_masked_step_in_two_halves():
    """The callback's two halves give what masking.masked_step gives, bit for bit."""
    results = []
    for split in (False, True):
        model = tiny_model("qwen2")  # q/k biases: their rows follow the weight rows
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        masks = masking.build_masks({n: torch.arange(m.weight.shape[0]).float().flip(0)
                                     for n, m in qk_modules(model).items()}, 0.3, head_dim=8)
        for _ in range(2):
            opt.zero_grad()
            model(input_ids=torch.arange(3, 15).view(2, 6), labels=torch.arange(3, 15).view(2, 6)
                  ).loss.backward()
            masking.mask_grads(model, masks)
            if split:
                held = hold_rows(opt, model, masks)
                opt.step()
                assert put_back_rows(opt, held) == 0.0
            else:
                assert masking.masked_step(opt, model, masks) == 0.0
        results.append(copy.deepcopy(model.state_dict()))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_the_callback_alone_clips_the_masked_gradient():
    """Its events called by hand, as a Trainer would with max_grad_norm=0: the clip factor comes
    from the masked gradient (SOURCES.md §8.2), and the step keeps the rows outside."""
    model = tiny_model("llama")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    cb, args, st = LongActCallback(max_grad_norm=1e-3), SimpleNamespace(max_grad_norm=0), \
        SimpleNamespace(global_step=0)
    cb.on_train_begin(args, st, None, model=model)
    ids = torch.arange(3, 19).view(2, 8)  # (B, T)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    with torch.no_grad():
        model(input_ids=ids)  # no gradients: not read
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = qk_snapshot(model, opt)
    cb.on_pre_optimizer_step(args, st, None, model=model, optimizer=opt)
    assert cb.counts == {"forwards": 1, "sequences": 2, "tokens": 16}
    for name, m in cb.masks.items():
        grads[f"{name}.weight"][~m] = 0.0
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                 for g in grads.values()]))
    coef = 1e-3 / (norm + 1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n] * coef)
    opt.step()
    cb.on_optimizer_step(args, st, None, model=model, optimizer=opt)
    check_rows(before, qk_snapshot(model, opt), cb.masks)
    cb.on_train_end(args, st, None)
    with pytest.raises(ValueError, match="max_grad_norm=0"):  # two clips: refused
        LongActCallback(max_grad_norm=1.0).on_train_begin(SimpleNamespace(max_grad_norm=1.0),
                                                          st, None, model=model)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="ratio"):
        LongActCallback(ratio=0)
    with pytest.raises(ValueError, match="strategy"):
        LongActCallback(strategy="best")
    with pytest.raises(ValueError, match="stat"):
        LongActCallback(stat="median")
