"""The device audit: catch on a CPU the placement bugs that only crash on GPUs (``train.device_audit``).

On a CPU every tensor is on the recipe's device, so a tensor that raylora makes on the host and hands
to NCCL, to DeepSpeed or to the model works here and crashes on the first GPU run ("No backend type
associated with device type cpu"). The audit makes the difference visible: while the recipe runs,

* a tensor made by raylora's own code with a factory (``torch.tensor``, ``zeros``, ``arange``, ...)
  without ``device=`` the recipe's device, and every tensor of a micro-batch as the data stream hands
  it over, counts as *on the host*;
* ``.to(device)`` (or ``.cuda()``) places it: from then on it counts as on the device;
* a collective (``torch.distributed``, also the ones DeepSpeed calls), ``engine.backward`` or the
  model's forward that gets a host tensor, or a tensor whose device type is not the recipe's, raises
  :class:`DeviceAuditError` naming the file and line where the tensor was made.

It costs a Python call per torch function on the training thread: a test mode, off by default.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PACKAGE = str(Path(__file__).resolve().parent)
FACTORIES = (
    "tensor",
    "as_tensor",
    "asarray",
    "zeros",
    "ones",
    "full",
    "empty",
    "arange",
    "linspace",
    "eye",
    "rand",
    "randn",
    "randint",
    "from_numpy",
)
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce",
    "broadcast",
    "gather",
    "scatter",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
)


class DeviceAuditError(RuntimeError):
    """A tensor on the host (or another device) was handed to a collective, DeepSpeed or the model."""


def _caller_in_package() -> str | None:
    """``file:line`` of the nearest raylora frame calling into torch, if the call comes from raylora."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(PACKAGE) and not name.endswith("device_audit.py"):
            return f"{Path(name).relative_to(Path(PACKAGE).parent)}:{frame.f_lineno}"
        if "/torch/" not in name:  # another library's call (transformers, DeepSpeed): not audited
            return None
        frame = frame.f_back
    return None


class DeviceAudit:
    """Tracks where tensors were made while active (see the module docstring)."""

    def __init__(self, device: Any):
        import torch

        self.device = torch.device(device)
        self.host: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self.origin: dict[int, str] = {}
        self.checked = 0  # tensors checked at a collective, DeepSpeed or the model (the audit ran)

    # ------------------------------------------------------------------------------ bookkeeping
    def mark_host(self, tensor: Any, origin: str) -> None:
        self.host[id(tensor)] = tensor
        self.origin[id(tensor)] = origin

    def mark_placed(self, tensor: Any) -> None:
        self.host.pop(id(tensor), None)
        self.origin.pop(id(tensor), None)

    def host_origin(self, tensor: Any) -> str | None:
        held = self.host.get(id(tensor))
        return self.origin.get(id(tensor)) if held is tensor else None

    def on_device(self, device: Any) -> bool:
        import torch

        if device is None:
            return False
        device = torch.device(device) if isinstance(device, (str, int)) else device
        return device.type == self.device.type and (device.index in (None, self.device.index))

    # ----------------------------------------------------------------------------------- checks
    def check(self, what: str, value: Any) -> None:
        """Every tensor in ``value`` (nested lists, tuples, dicts) must be on the recipe's device."""
        import torch

        if isinstance(value, torch.Tensor):
            self.checked += 1
            origin = self.host_origin(value)
            if origin is not None:
                raise DeviceAuditError(
                    f"{what} got a tensor made on the host at {origin}; on GPUs this fails (NCCL reduces "
                    f"CUDA tensors only, the model's weights are on the GPU): make it on the recipe's device "
                    f"(device={self.device.type}) or move it there with .to(device)"
                )
            if value.device.type != self.device.type:
                raise DeviceAuditError(f"{what} got a tensor on {value.device}, not on {self.device}")
        elif isinstance(value, (list, tuple)):
            for v in value:
                self.check(what, v)
        elif isinstance(value, dict):
            for v in value.values():
                self.check(what, v)

    def audited(self, what: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.check(what, (args, kwargs))
            return fn(*args, **kwargs)

        return wrapper

    def batches(self, stream: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The data stream's micro-batches, their tensors counted as on the host until moved."""
        for batch in stream:
            for key, value in batch.items():
                self.mark_host(value, f"the data stream (micro-batch column {key!r})")
            yield batch

    def watch_engine(self, engine: Any) -> None:
        """DeepSpeed's backward and the model's forward check their tensors."""
        engine.backward = self.audited("DeepSpeed's engine.backward", engine.backward)
        engine.module.register_forward_pre_hook(
            lambda module, args, kwargs: self.check("the model's forward", (args, kwargs)), with_kwargs=True
        )

    def torch_function_mode(self) -> Any:
        import torch
        from torch.overrides import TorchFunctionMode

        audit = self
        factories = {getattr(torch, name) for name in FACTORIES}
        moves = {torch.Tensor.to, torch.Tensor.cuda}

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                result = func(*args, **kwargs)
                if func in factories and isinstance(result, torch.Tensor):
                    origin = _caller_in_package()
                    if origin is not None and not audit.on_device(kwargs.get("device")):
                        audit.mark_host(result, f"{origin} (torch.{func.__name__} without device=)")
                elif func in moves and isinstance(result, torch.Tensor):
                    target = result.device if func is torch.Tensor.cuda else _target_device(args, kwargs)
                    if target is not None and audit.on_device(target):
                        audit.mark_placed(args[0])
                        audit.mark_placed(result)
                return result

        return Mode()


def _target_device(args: tuple, kwargs: dict) -> Any:
    """The device of a ``Tensor.to(...)`` call, or None when it only changes the dtype."""
    import torch

    if "device" in kwargs:
        return kwargs["device"]
    for value in args[1:]:
        if isinstance(value, (str, torch.device)):
            return value
        if isinstance(value, torch.Tensor):
            return value.device
    return None


@contextmanager
def device_audit(device: Any) -> Iterator[DeviceAudit]:
    """Run the recipe under the audit: collectives are checked, raylora's tensors are tracked."""
    import torch.distributed as dist

    audit = DeviceAudit(device)
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    for name, fn in saved.items():
        setattr(dist, name, audit.audited(f"torch.distributed.{name}", fn))
    try:
        with audit.torch_function_mode():
            yield audit
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
