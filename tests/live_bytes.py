"""The peak of live tensor bytes while some code runs, on any device (the CPU has no allocator
statistics to ask).

Every tensor an aten operation makes inside `LiveBytes()` is counted, once per storage, from its
creation until it is freed (a weakref finalizer: torch keeps a tensor's Python object alive as
long as the tensor lives, views included, so the finalizer runs when the memory goes).
`peak` is the most bytes alive at once; tensors made before entering are not counted.

    with LiveBytes() as live:
        cache = engine.prefill(model, prompts, pad_id)
    live.peak   # bytes

Used by: tests/test_plan.py
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages = set()  # data pointers of the storages counted and still alive

    def _freed(self, key, n):
        self.live -= n
        self.storages.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t._base is not None:  # views: counted in base
                continue
            storage = t.untyped_storage()
            key, n = storage.data_ptr(), storage.nbytes()
            if key in self.storages or n == 0:  # in-place results: already counted
                continue
            self.storages.add(key)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._freed, key, n)
        return out
