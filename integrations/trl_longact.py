"""
integrations/trl_longact.py -- LongAct inside TRL's GRPOTrainer, as one TrainerCallback.

LongAct (arXiv 2604.14922) lets RL update only the salient rows of W_Q and W_K: in every head the
rows behind the q/k channels with the largest activations (saliency.py), round(0.3 * D) of D;
the other rows keep their weights and AdamW state bit for bit (masking.py, "frozen"); every
other weight trains normally. This callback does that inside a transformers Trainer (TRL's
GRPOTrainer, or any other), without a trl import of its own:
  * every forward of the policy made with gradients on is read by saliency.prefill_collector's
    q/k hooks (the project's statistic, fp32, padding excluded), summed over the step;
  * on_pre_optimizer_step: masking.build_masks, mask_grads, the rows outside copied out;
  * on_optimizer_step: those rows copied back; `masks`, `stats`, `drift`, `counts` keep the step's.

    from trl import GRPOConfig, GRPOTrainer
    from integrations.trl_longact import LongActCallback
    longact = LongActCallback(ratio=0.3)
    GRPOTrainer(model, reward_funcs=f, args=GRPOConfig(...), train_dataset=data,
                callbacks=[longact]).train()

Where this differs from train.py (SOURCES.md §9.59): the statistics come from the optimizer
step's own training forwards over prompt + completion (TRL samples with `generate` or vLLM),
not from the sampling prefill over the prompt alone; and the Trainer clips the gradient before
on_pre_optimizer_step, so its clip sees the rows outside the mask unless the callback clips
(LongActCallback(max_grad_norm=1.0) with GRPOConfig(max_grad_norm=0)). One process or DDP (the
statistics summed over ranks); not FSDP or DeepSpeed, which shard rows or optimizer state.

Shapes: H heads, D head dim, C = H*D output channels (rows) of one q/k matrix.
Test: .venv/bin/python -m pytest -q tests/test_trl_longact.py
"""

import torch
from transformers import TrainerCallback

import masking
import saliency
from masking import hold_rows, put_back_rows  # noqa: F401 -- named here for users and tests
from plumbing.common import head_dim_of, mix_seed
from plumbing.fsdp import reduce_qk_state


# masking.masked_step's two halves (masking.hold_rows, masking.put_back_rows) serve here: the
# Trainer calls optimizer.step() itself, between the two events below.


# -----------------------------------------------------------------------------
# the callback


class LongActCallback(TrainerCallback):
    """LongAct's per-step row masks on every q_proj/k_proj of the Trainer's model (see above).

    ratio, stat, per_head, strategy: as masking.build_masks and saliency.py (the paper's 0.3,
    seq_l2, per head, topk). semantics: "frozen" (rows outside keep weights and optimizer state)
    or "grad" (only their gradient is zeroed). max_grad_norm: clip the masked gradient here,
    with the Trainer's own clip off (max_grad_norm=0). seed: the per-step seed of "random".
    """

    def __init__(self, ratio: float = masking.DEFAULT_RATIO, stat: str = saliency.DEFAULT_STAT,
                 per_head: bool = True, strategy: str = "topk", semantics: str = "frozen",
                 max_grad_norm: float | None = None, seed: int = 0):
        saliency.check_stat(stat)
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if strategy not in masking.STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {masking.STRATEGIES}")
        if semantics not in masking.SEMANTICS:
            raise ValueError(f"unknown semantics {semantics!r}; choose one of {masking.SEMANTICS}")
        self.ratio, self.stat, self.per_head, self.strategy = ratio, stat, per_head, strategy
        self.semantics, self.max_grad_norm, self.seed = semantics, max_grad_norm, seed
        self.masks = self.stats = self.drift = self.counts = None  # the last step's
        self._handles, self._held, self._open = [], [], None
        self._hook = self._state = None

    # -- reading the step's forwards
    def _new_step(self, model) -> None:
        """A fresh collector: every optimizer step has statistics of its own forwards only."""
        self._hook, self._state = saliency.prefill_collector(model, self.stat)
        self._forwards = 0

    def _forward_begins(self, module, args, kwargs) -> None:
        # Only forwards with gradients on: the ones whose gradient this step applies. That
        # leaves out `generate`, old and reference log-probs (no_grad) and evaluation; and
        # gradient checkpointing's recomputation runs inside backward, after _forward_ends,
        # so no activation is counted twice.
        if not torch.is_grad_enabled() or self._open is not None:
            return
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)  # (B, T)
        self._open = self._hook(mask)  # q/k hooks in, folding into self._state
        self._open.__enter__()
        self._forwards += 1

    def _forward_ends(self, module, args, kwargs, output) -> None:
        if self._open is not None:  # hooks out, also after an exception (always_call)
            self._open, ctx = None, self._open
            ctx.__exit__(None, None, None)

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- Trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("LongActCallback needs the Trainer's model (callback kwarg `model`)")
        if self.max_grad_norm is not None and (args.max_grad_norm or 0) > 0:
            raise ValueError("LongActCallback(max_grad_norm=...) clips the masked gradient itself: "
                             "set the Trainer's max_grad_norm=0, or leave this one None")
        from torch.distributed.tensor import DTensor
        if any(isinstance(m.weight, DTensor) or m.weight.numel() == 0
               for m in saliency.qk_modules(model).values()):
            raise NotImplementedError("the q/k weights are sharded (FSDP or DeepSpeed ZeRO-3); "
                                      "this callback copies whole rows: use train.py --fsdp")
        self._remove_hooks()  # a second train() on the same callback
        self._head_dim = head_dim_of(model.config)
        self._new_step(model)
        self._handles = [
            model.register_forward_pre_hook(self._forward_begins, with_kwargs=True),
            model.register_forward_hook(self._forward_ends, with_kwargs=True, always_call=True)]

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        state_ = reduce_qk_state(self._state)  # every rank's sequences: one mask on all ranks
        acc = next(iter(state_["accs"].values()))
        if acc["tokens"] == 0:
            raise ValueError("LongActCallback saw no forward with gradients on this step: was "
                             "the model called outside the Trainer's training forward?")
        self.stats = saliency.finalize_state(state_)
        self.counts = {"forwards": self._forwards, "sequences": acc["sequences"],
                       "tokens": acc["tokens"]}
        self.masks = masking.build_masks(self.stats, self.ratio, self.strategy, self.per_head,
                                         self._head_dim,
                                         seed=mix_seed(self.seed, "mask", state.global_step))
        masking.check_masks(model, self.masks)  # every q/k module masked, shapes right
        masking.mask_grads(model, self.masks)  # grad W_Q <- grad W_Q * G_Q, the same for W_K
        if self.max_grad_norm is not None:  # the clip sees zeros outside the mask (SOURCES §8.2)
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.max_grad_norm)
        self._held = hold_rows(optimizer, model, self.masks, self.semantics)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.drift = put_back_rows(optimizer, self._held, self.semantics)
        self._held = []
        self._new_step(model)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hooks()
