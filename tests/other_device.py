"""A stand-in second device, so the device plumbing is tested on machines without a GPU.

Tensors "on" it (:class:`OnOther`) report device ``meta`` but carry real CPU data; under
:class:`OtherDevice` (a dispatch mode) every op on them runs on that data and returns
tensors on the stand-in device again, while an op that mixes one of them with a CPU tensor
that is not a 0-d scalar is refused with CUDA's message, as CUDA refuses it. Exceptions as
CUDA's: a copy across devices, and CPU index tensors. ``.item()``, ``float()`` and
``.tolist()`` work (a copy to the host); ``.numpy()`` does not. So a pass that forgets to
move its inputs, or makes a tensor on the CPU and meets the model's tensors with it, fails
here as it would on a GPU, and a correct pass gives the CPU's numbers (up to kernels that
torch picks by device, e.g. SDPA's: use eager attention to compare bit for bit; and ops the
mode sees decomposed may sum in another order). Unlike CUDA, ``module.to()`` here unties tied
weights (each module gets its own copy, with the same values).

    with OtherDevice():
        model.to(OTHER)
        ...  # mpsearch code under test; model_device(model) is OTHER
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

OTHER = torch.device("meta")
aten = torch.ops.aten


class OnOther(torch.Tensor):
    """A tensor on the stand-in device, holding its values in a CPU tensor ``_cpu``."""

    @staticmethod
    def __new__(cls, real: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            real.shape,
            strides=real.stride(),
            storage_offset=real.storage_offset(),
            dtype=real.dtype,
            layout=real.layout,
            device=OTHER,
            requires_grad=False,
        )
        r._cpu = real
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with OtherDevice():  # an op outside the mode (a backward on autograd's own thread): enter it for this op
            return func(*args, **(kwargs or {}))

    def tolist(self):  # as CUDA's: a copy to the host first
        return self.cpu().tolist()

    def __repr__(self) -> str:
        return f"OnOther({self._cpu!r})"


def _is_other(device) -> bool:
    return device is not None and torch.device(device) == OTHER


_tensor, _as_tensor = torch.tensor, torch.as_tensor


def _factory(make):
    def f(data, *args, device=None, **kwargs):  # torch.tensor(..., device=meta) would make a tensor without its data
        if _is_other(device):
            return OnOther(make(data, *args, device="cpu", **kwargs))
        return make(data, *args, device=device, **kwargs)

    return f


class OtherDevice(TorchDispatchMode):
    """While active, :data:`OTHER` is a device with data; see the module docstring."""

    #: where a CPU tensor may meet one on the device, as on CUDA: copies across devices
    MIXED = {aten.copy_.default, aten._to_copy.default}
    #: ops whose index tensors may stay on the CPU
    INDEX = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        on = [t for t in tensors if isinstance(t, OnOther)]
        if any(t.device == OTHER and not isinstance(t, OnOther) for t in tensors):
            raise AssertionError(f"stand-in device: a meta tensor without data reached {func}")
        if on and func not in self.MIXED:
            indices = tree_flatten(args[1])[0] if func in self.INDEX else []
            bad = [
                t for t in tensors if not isinstance(t, OnOther) and t.dim() > 0 and not any(t is i for i in indices)
            ]
            if bad:
                raise RuntimeError(
                    "Expected all tensors to be on the same device, but found at least two devices, meta and cpu! "
                    f"({func}: a cpu tensor of shape {tuple(bad[0].shape)})"
                )
        to_other = _is_other(kwargs.get("device"))
        if to_other:
            kwargs = {**kwargs, "device": torch.device("cpu")}
        real_args, real_kwargs = tree_map(lambda t: t._cpu if isinstance(t, OnOther) else t, (args, kwargs))
        out = func(*real_args, **real_kwargs)
        if func is aten._local_scalar_dense.default:  # .item(): a number on the host
            return out
        if func.overloadpacket.__name__.endswith("_") and args and isinstance(args[0], torch.Tensor):
            return args[0]  # in place: the tensor passed in, changed through its data
        if func is aten._to_copy.default:
            wrap = to_other or (bool(on) and kwargs.get("device") is None)
        else:
            wrap = bool(on) or to_other
        if not wrap:
            return out
        return tree_map(lambda t: OnOther(t) if isinstance(t, torch.Tensor) and not isinstance(t, OnOther) else t, out)

    _depth = [0]  # modes entered, on any thread (autograd's too): the patches below are global

    def __enter__(self):
        if self._depth[0] == 0:
            torch.tensor, torch.as_tensor = _factory(_tensor), _factory(_as_tensor)
            # module.to() / .double() then assign new parameters instead of `param.data = ...`, which no dispatch sees
            OtherDevice._overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
            torch.__future__.set_overwrite_module_params_on_conversion(True)
        self._depth[0] += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth[0] -= 1
        if self._depth[0] == 0:
            torch.tensor, torch.as_tensor = _tensor, _as_tensor
            torch.__future__.set_overwrite_module_params_on_conversion(OtherDevice._overwrite)
        return super().__exit__(*exc)
