"""
fsdp.py -- the same LongAct training sharded over N processes with PyTorch's FSDP2, masks exact.

FSDP2 (`torch.distributed.fsdp.fully_shard`) cuts every parameter along dim 0 -- its rows -- into
N contiguous blocks, one per rank (torch.chunk's rule), held as a DTensor with placement Shard(0).
A row of W_Q / W_K is exactly LongAct's unit (SOURCES.md §1.3), so a (C,) row mask slices into one
local (c,) mask per rank, and every masked operation of masking.py runs on the local rows only: no
communication beyond FSDP's own, and the update of one process to fp32 rounding. The paper says
nothing about sharding; the choices are SOURCES.md §9.30 (units, summed gradients, masks after
backward) and §9.37 (equal work per rank, global norm, checkpoints, torch version, exactness).

    torchrun --nproc-per-node N train.py ... --fsdp
    device = init_distributed(); shard_policy(model); AdamW(model.parameters())
    per step:  prompts = my_share(step_prompts)      # all ranks draw all prompts with one seed
               stats = saliency.finalize_state(reduce_qk_state(state))  # same masks everywhere
               counts = global_counts(mask)          # the loss divides by the WHOLE step's counts
               loss.backward() per micro-batch       # FSDP sums the ranks' gradients
               mask_grads(model, masks)              # local rows; then clip_grad_norm_ (global)
               drift = masked_step(opt, model, masks, "frozen")
               row = mean_over_ranks(row); rank 0 (is_main()) logs it
    save_checkpoint / load_checkpoint (torch.distributed.checkpoint), export_hf for evaluation

Shapes: C rows of a parameter (global), c rows on this rank, N ranks, B rows of a batch, T tokens.
Test: .venv/bin/python -m pytest -q tests/test_fsdp.py   (2 gloo processes on the CPU, seconds)
"""

import os
import shutil
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import AutoModelForCausalLM

import masking
from plumbing.common import model_device, swap_folder_in, world_size

MIN_TORCH = (2, 13)  # §9.37


# -----------------------------------------------------------------------------
# processes

def torch_version() -> tuple:
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def init_distributed(timeout_s: float = 600.0) -> str:
    """Join the process group that `torchrun` describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    nccl with one GPU per process on CUDA machines, gloo on the CPU. Returns the device string
    ("cuda:<local rank>" or "cpu") for the model."""
    if torch_version() < MIN_TORCH:
        raise RuntimeError(f"--fsdp needs torch >= {'.'.join(map(str, MIN_TORCH))} "
                           f"(SOURCES.md §9.37); this is {torch.__version__}")
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [k for k in needed if k not in os.environ]
    if missing:
        raise RuntimeError(f"environment variables {missing} are not set: launch with "
                           "`torchrun --nproc-per-node N train.py ... --fsdp`")
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device != "cpu" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
    return device


world = world_size  # processes of the job (common.world_size)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs, writes files and prints."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def from_main(obj):
    """Rank 0's value of a small picklable object on every rank (e.g. the run folder it chose)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _comm_device() -> str:
    """nccl reduces CUDA tensors only; gloo CPU ones."""
    return "cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"


def reduce_numbers(values: list, op: str = "sum") -> list:
    """All-reduce a short list of numbers over ranks with "sum", "min" or "max"; one process
    returns them unchanged. Every rank must call it with the same length (it is a collective).
    Example: DAPO's refill loop stops when reduce_numbers([kept], "min")[0] >= B // world()."""
    if not dist.is_initialized():
        return list(values)
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    t = torch.tensor(values, dtype=torch.float64 if any(isinstance(v, float) for v in values)
                     else torch.int64, device=_comm_device())
    dist.all_reduce(t, op=ops[op])
    return t.tolist()


# -----------------------------------------------------------------------------
# sharding the policy

def shard_policy(model, param_dtype: torch.dtype | None = None):
    """fully_shard every decoder layer, then [decoder, lm_head] as one unit, then the root (§9.30).

    param_dtype: FSDP's mixed precision (e.g. torch.bfloat16: parameters all-gathered in bf16,
    gradients reduced in fp32); None computes in the parameters' dtype (use autocast as before).
    Call on every rank, before the optimizer is built (the parameters become DTensors)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) \
        if param_dtype is not None else MixedPrecisionPolicy()
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    layers = getattr(decoder, "layers", None)
    if layers is None or head is None:
        raise ValueError(f"{type(model).__name__}: expected a decoder with `.layers` and an output "
                         "embedding (a Hugging Face causal LM)")
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard([decoder, head], mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)  # §9.30: sum the ranks' gradients,
            m.set_force_sum_reduction_for_comms(True)  # as a plain SUM (gloo has no PREMUL_SUM)
    device = model_device(model)
    with torch.no_grad():  # the first FSDP module to run forward becomes the root (§9.30)
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    return model


# -----------------------------------------------------------------------------
# [LongAct] row masks on local shards

def local(t):
    """The rank's local block of a DTensor (a view: in-place writes land in FSDP's shard); a plain
    tensor is returned as it is, so every function here also runs in one process."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_row_mask(param, mask: torch.Tensor) -> torch.Tensor:
    """(C,) row mask -> (c,) the rows of `param` this rank holds, from the DTensor's own placement.

    Example: C = 5 rows over 2 ranks -> torch.chunk gives rank 0 rows 0..2, rank 1 rows 3..4; with
    C = 1, rank 1 holds no row and gets an empty mask."""
    if mask.dim() != 1 or mask.shape[0] != param.shape[0]:
        raise ValueError(f"row mask of shape {tuple(mask.shape)} for a parameter of shape "
                         f"{tuple(param.shape)}: expected ({param.shape[0]},)")
    if not isinstance(param, DTensor):
        return mask.to(param.device)
    if len(param.placements) != 1 or param.placements[0] != Shard(0):
        raise ValueError(f"expected FSDP's row sharding (Shard(0),) on a 1-D mesh, got "
                         f"{param.placements}")
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                          param.placements)
    rows = param.to_local()
    if tuple(rows.shape) != tuple(shape):
        raise RuntimeError(f"local shard {tuple(rows.shape)} != computed {tuple(shape)}")
    return mask.to(rows.device)[offset[0]:offset[0] + shape[0]]  # (c,)


def _local_masked_params(model, masks: dict) -> list:
    """[(name, parameter, (c,) local rows inside the mask)], masking.masked_params' selection."""
    return [(name, p, local_row_mask(p, rows))
            for name, p, rows in masking.masked_params(model, masks)]


def check_same_masks(masks: dict) -> None:
    """Raise on every rank if the ranks hold different masks (each would freeze other rows)."""
    if not dist.is_initialized():
        return
    bits = torch.cat([masks[k].flatten().long() for k in sorted(masks)])  # (sum C,)
    key = int((bits * torch.arange(1, bits.numel() + 1)).sum())  # a position-weighted checksum
    (lo,), (hi,) = reduce_numbers([key], "min"), reduce_numbers([key], "max")
    if lo != hi:
        raise ValueError("the ranks hold different row masks; build them from all-reduced "
                         "statistics (reduce_qk_state) and the same seed on every rank")


@torch.no_grad()
def mask_grads(model, masks: dict) -> None:
    """masking.mask_grads on each rank's local gradient rows: call after the last backward of the
    step (FSDP has reduce-scattered by then) and before clipping."""
    check_same_masks(masks)
    for _, p, rows in _local_masked_params(model, masks):
        if p.grad is not None:
            local(p.grad)[~rows] = 0.0  # (c, I) or (c,): whole local rows outside the mask


@torch.no_grad()
def masked_step(optimizer, model, masks: dict, semantics: str = "frozen") -> float:
    """masking.masked_step on local shards; returns the max |delta| of rows outside the mask over
    all ranks (0.0 under "frozen"). Needs masked gradients (mask_grads) like the one-process path.
    """
    if semantics not in masking.SEMANTICS:
        raise ValueError(f"unknown semantics {semantics!r}; choose one of {masking.SEMANTICS}")
    saved, bad = [], []  # (parameter, local rows outside, their values, {state key: values})
    for name, p, rows in _local_masked_params(model, masks):
        out = ~rows  # (c,)
        if p.grad is not None and bool(local(p.grad)[out].any()):
            bad.append(name)
        state = optimizer.state.get(p, {})
        keys = [k for k, t in state.items() if torch.is_tensor(t) and t.shape == p.shape] \
            if semantics == "frozen" else []
        saved.append((p, out, local(p)[out], {k: local(state[k])[out] for k in keys}))
    if reduce_numbers([len(bad)])[0]:  # every rank raises, none waits forever
        raise ValueError(f"gradient rows outside the mask are not zero (e.g. {bad[:2]} on rank "
                         f"{rank()}); call fsdp.mask_grads(model, masks) before clipping")
    optimizer.step()
    drift = 0.0
    for p, out, before, state in saved:
        if semantics == "frozen":
            local(p)[out] = before  # whole rows back, bit for bit
            for k, rows in state.items():  # looked up again: the optimizer may replace tensors
                local(optimizer.state[p][k])[out] = rows
        if out.any():
            drift = max(drift, (local(p)[out].float() - before.float()).abs().max().item())
    return reduce_numbers([drift], "max")[0]


# -----------------------------------------------------------------------------
# the step's batch across ranks

def global_counts(mask: torch.Tensor) -> tuple:
    """(num_tokens, num_seqs) of the whole step over all ranks: grpo.batch_counts of this rank's
    (B, T) loss mask, all-reduced. With these as the loss's normalisers and summed gradients
    (§9.30), N ranks give the update of one process holding every rank's rows."""
    lengths = mask.sum(-1)  # (B,)
    tokens, seqs = int(lengths.sum()), int((lengths > 0).sum())  # = grpo.batch_counts(mask)
    tokens, seqs = reduce_numbers([tokens, seqs])
    return int(tokens), int(seqs)


def same_count(n: int, what: str) -> None:
    """Raise on every rank unless all ranks have the same `n` (§9.37: unequal work hangs)."""
    (lo,), (hi,) = reduce_numbers([n], "min"), reduce_numbers([n], "max")
    if lo != hi:
        raise ValueError(f"{what}: ranks differ ({lo} to {hi}; rank {rank()} has {n}); every rank "
                         "must process the same number, or FSDP's collectives do not match")


def my_share(items: list, what: str = "prompts") -> list:
    """This rank's contiguous 1/N of a list every rank holds in full (e.g. the step's prompts drawn
    with one seed everywhere): together the ranks cover it once, in order, like one process."""
    n, N = len(items), world()
    if n % N:
        raise ValueError(f"{n} {what} do not split over {N} ranks: use a multiple of {N}")
    per = n // N
    return items[rank() * per:(rank() + 1) * per]


def mean_over_ranks(row: dict) -> dict:
    """A log row with every number averaged over ranks (each rank's describe its own share); other
    values are kept. For logging: every rank must pass the same numeric keys."""
    keys = sorted(k for k, v in row.items() if isinstance(v, (int, float))
                  and not isinstance(v, bool))
    sums = reduce_numbers([float(row[k]) for k in keys])
    return row | {k: s / world() for k, s in zip(keys, sums)}


def same_width(r, pad_id: int):
    """A rollout right-padded (mask 0) to the widest completion over all ranks (§9.37)."""
    T = r.completion_ids.shape[1]
    T_all = int(reduce_numbers([T], "max")[0])
    if T_all == T:
        return r
    return replace(r, completion_ids=F.pad(r.completion_ids, (0, T_all - T), value=pad_id),
                   completion_mask=F.pad(r.completion_mask, (0, T_all - T)))  # (B, T_all)


@torch.no_grad()
def reduce_qk_state(state: dict) -> dict:
    """Sum saliency accumulators (saliency.prefill_collector's state) over ranks, in place, so
    that saliency.finalize_state gives the statistic of every rank's prompts together and every
    rank builds the same masks. max_abs takes the max instead of the sum."""
    if not dist.is_initialized():
        return state
    names = sorted(state["accs"])
    accs = [state["accs"][n] for n in names]
    values = torch.cat([a["value"].float().to(_comm_device()) for a in accs])  # (sum C,)
    dist.all_reduce(values, op=dist.ReduceOp.MAX if state["stat"] == "max_abs"
                    else dist.ReduceOp.SUM)
    counts = reduce_numbers([c for a in accs for c in (a["tokens"], a["sequences"])])
    for i, (a, v) in enumerate(zip(accs, values.split([a["value"].numel() for a in accs]))):
        a["value"] = v.to(a["value"].device)
        a["tokens"], a["sequences"] = int(counts[2 * i]), int(counts[2 * i + 1])
    return state


# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(folder, model, optimizer, extra: dict) -> None:
    """Sharded weights + optimizer state (torch.distributed.checkpoint, every rank writes its own
    shards) and `extra` (step, scheduler, config: rank 0's, torch.save) into `folder`, atomically.
    Call on every rank."""
    final = Path(folder)
    tmp = final.with_name(final.name + ".tmp")
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    if is_main():
        torch.save(extra, tmp / "extra.pt")
        swap_folder_in(tmp, final)
    barrier()


def load_checkpoint(folder, model, optimizer) -> dict:
    """Load what save_checkpoint wrote into a sharded model and its optimizer (same number of
    ranks); returns `extra`. Call on every rank, after shard_policy and building the optimizer."""
    folder = Path(folder)
    if not (folder / "extra.pt").exists():
        raise FileNotFoundError(f"{folder}: no complete distributed checkpoint (extra.pt missing)")
    model_sd, optim_sd = get_state_dict(model, optimizer)  # the layout to load into
    sd = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(sd, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])
    return torch.load(folder / "extra.pt", weights_only=False)


def export_hf(model, tokenizer, folder) -> None:
    """A plain Hugging Face folder (safetensors + config [+ tokenizer]) from a sharded model: the
    full state dict is gathered on rank 0's CPU, loaded into an unsharded copy built on the meta
    device (no second full allocation) and saved. Call on every rank; rank 0 writes."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
    if is_main():
        final = Path(folder)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(model.config)
        missing, unexpected = plain.load_state_dict(full, strict=False, assign=True)
        plain.tie_weights()  # a tied head points at the loaded embedding again
        left = [n for n, p in plain.named_parameters() if p.is_meta]
        if left or unexpected:
            raise RuntimeError(f"export: parameters not loaded {left[:3]}, unexpected "
                               f"{unexpected[:3]}")
        plain.generation_config = model.generation_config
        plain.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        swap_folder_in(tmp, final)
    barrier()
