"""A second device on a CPU-only machine, with real values: catches device mixes without a GPU.

The policy is moved to `FAKE` (torch's `meta` device) by `fake_device()`; its tensors are wrapper
tensors whose `.device` says meta while their values live in an ordinary CPU tensor inside. Every
aten operation is intercepted (a TorchDispatchMode, and the wrapper's own __torch_dispatch__ for
operations autograd runs on its own thread): it is computed on the CPU values, and it REFUSES, as
CUDA does, to mix a "device" tensor with a CPU tensor of one or more dimensions (0-dim CPU tensors
are scalars, which CUDA accepts too). Factory calls with the device (torch.arange(..., device=d),
torch.rand(..., device=d)) make device tensors; .cpu() / .tolist() / .item() are host copies and
stay legal. meta rather than a pretend "cuda": a CPU-only torch has no device guard for cuda, which
autograd needs, and it has one for meta.

So a code path that runs cleanly under `fake_device()` with the model on FAKE keeps every tensor
of its computation on the model's device: the property a GPU run checks by crashing with
"Expected all tensors to be on the same device", after the model load and the first evaluation.
What it does not check: kernels, memory, or anything torch.cuda.* reports.

    with fake_device():
        model.to(FAKE)            # parameters: wrapper tensors on meta, real values inside
        ...                       # the code under test; a mix raises RuntimeError

Test: .venv/bin/python -m pytest -q tests/test_device.py
"""

from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

FAKE = torch.device("meta")


class DeviceTensor(torch.Tensor):
    """A tensor that reports device meta and keeps its values in `elem`, a CPU tensor."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, layout=elem.layout, device=FAKE, requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    def __repr__(self):
        return f"DeviceTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return run(func, args, kwargs or {})


INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
            torch.ops.aten.index_put_.default, torch.ops.aten._index_put_impl_.default)


def _is_fake(device) -> bool:
    return device is not None and torch.device(device).type == FAKE.type


def run(func, args, kwargs):
    """Compute `func` on the CPU values; refuse a device/CPU mix; wrap what lands on the device."""
    seen = set()  # device types of the tensor arguments (0-dim CPU scalars excluded)
    wrappers = {}  # id(inner CPU tensor) -> its wrapper (in-place ops return their input)

    def unwrap(x):
        if isinstance(x, DeviceTensor):
            seen.add(FAKE.type)
            wrappers[id(x.elem)] = x
            return x.elem
        if isinstance(x, torch.Tensor) and x.device.type == FAKE.type:  # a real meta tensor
            if x.numel():
                raise RuntimeError(f"fake_device: a {tuple(x.shape)} meta tensor without values "
                                   f"reached {func} (made outside the intercepted calls)")
            seen.add(FAKE.type)
            return torch.empty(x.shape, dtype=x.dtype)  # empty: nothing to lose
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            seen.add(x.device.type)
        return x

    if func in INDEXING:  # CUDA accepts CPU index tensors (it copies them over): so do we
        head, indices, *rest = args
        args = (tree_map(unwrap, head), [i if i is None or i.device.type == "cpu" else unwrap(i)
                                         for i in indices], *tree_map(unwrap, rest))
    else:
        args = tree_map(unwrap, args)
    kwargs = tree_map(unwrap, kwargs)
    target = kwargs.get("device")
    if _is_fake(target):
        kwargs["device"] = torch.device("cpu")
    if len(seen) > 1:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least "
                           f"two devices, {' and '.join(sorted(seen))}! (fake_device: {func})")
    out = func(*args, **kwargs)
    on_device = _is_fake(target) or (target is None and FAKE.type in seen)

    def wrap(x):
        if not isinstance(x, torch.Tensor) or not on_device:
            return x
        known = wrappers.get(id(x))
        return DeviceTensor(x) if known is None else known
    return tree_map(wrap, out)


def _list_index(i):
    """A list index as the CPU tensor torch would make of it ([] and ints: long; bools: bool)."""
    if not isinstance(i, list):
        return i
    return torch.tensor(i, dtype=torch.bool if i and type(i[0]) is bool else torch.long)


def _index_parts(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


class _Functions(TorchFunctionMode):
    """torch.tensor / torch.as_tensor with device=meta would make a tensor WITHOUT the values
    (meta keeps shapes only) before any aten operation runs: made on the CPU, then wrapped."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.tensor, torch.as_tensor) and _is_fake(kwargs.get("device")):
            kwargs["device"] = "cpu"
            return DeviceTensor(torch.tensor(*args, **kwargs) if func is torch.tensor
                                else torch.as_tensor(*args, **kwargs).clone())
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and any(
                isinstance(i, list) for i in _index_parts(args[1])):  # x[[0, 2]]: torch would
            key = args[1]  # build the index tensor on meta, without values; CUDA copies it over
            key = (tuple(_list_index(i) for i in key) if isinstance(key, tuple)
                   else _list_index(key))
            return func(args[0], key, *args[2:], **kwargs)
        if func is torch.Tensor.tolist and isinstance(args[0], DeviceTensor):
            return args[0].elem.tolist()  # a host copy, legal (the wrapper has no storage)
        return func(*args, **kwargs)


class _Mode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return run(func, args, kwargs or {})


@contextmanager
def fake_device():
    """Inside: FAKE holds real values and a mix of FAKE and CPU tensors raises RuntimeError.
    torch.Generator(device=FAKE) gives a CPU generator: the values a random operation on the
    device draws are drawn on the CPU (a CUDA device has its own generators; meta has none)."""
    real = torch.Generator
    torch.Generator = lambda device="cpu": real(device="cpu" if _is_fake(device) else device)
    try:
        with _Functions(), _Mode():
            yield
    finally:
        torch.Generator = real
