"""Test helpers for masking.py: a copy of the masked q/k parameters before a step, and how far
the rows outside the mask moved after it (masking.masked_step measures the same drift itself;
these check it from the outside).

Used by tests/test_masking.py.
"""

import torch
from torch import Tensor

from masking import masked_params


def qk_snapshot(model: torch.nn.Module, masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """{parameter name: detached copy} of every masked q/k weight and bias (rows_outside_drift)."""
    return {name: p.detach().clone() for name, p, _ in masked_params(model, masks)}


def rows_outside_drift(before: dict[str, Tensor], after, masks: dict[str, Tensor]) -> float:
    """Max |after - before| over the rows outside each parameter's mask (0.0 = nothing moved).

    before: {"<module>.weight" or "<module>.bias": tensor} (qk_snapshot); after: the same, or the
    model itself (read in place, no copy); masks are keyed by module.
    Example: before w = [[1, 1], [2, 2]], after [[1, 1], [2.5, 2]], mask [T, F] -> 0.5.
    """
    if isinstance(after, torch.nn.Module):
        after = {n: p.detach() for n, p in after.named_parameters() if n in before}
    drift = 0.0
    for name, b in before.items():
        module = name.rsplit(".", 1)[0]
        if module not in masks or name not in after:
            raise ValueError(f"{name}: no mask for {module!r} or no 'after' tensor")
        out = ~masks[module].to(b.device)  # (C,)
        if out.any():
            delta = (after[name][out].float() - b[out].float()).abs().max().item()
            drift = max(drift, delta)
    return drift
