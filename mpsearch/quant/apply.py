"""``apply_(model, plan)``: the one verb that puts a plan on a model (simulated quantization).

Weights are fake-quantized in place; run-time targets (layer inputs, the KV cache) are
hooks installed on the model (:mod:`mpsearch.quant.hooks`), kept at ``model._mpsearch_runtime``.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..core.format import FormatError
from ..core.layers import kind_of, matrix, set_matrix
from ..core.plan import Plan, PlanError
from .hooks import RuntimeHooks
from .memo import QuantMemo
from .quantizer import get_quantizer, quantize


def quantizable_names(model: nn.Module) -> list[str]:
    """Names a plan may address by exact name: every layer of a known kind (Linear, Conv,
    Conv1D; :mod:`mpsearch.core.layers`) and every other module with a 2-D ``weight`` (embeddings)."""
    return [
        n
        for n, m in model.named_modules()
        if kind_of(m) is not None or (isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2)
    ]


def _matrix(m: nn.Module) -> torch.Tensor:
    return matrix(m) if kind_of(m) is not None else m.weight


def _set(m: nn.Module, w: torch.Tensor) -> None:
    if kind_of(m) is not None:
        set_matrix(m, w)
    else:
        m.weight.copy_(w)


def space_names(model: nn.Module, space: str = "llama") -> list[str]:
    """The tensors the search space ``space`` makes decisions (targets, less ignore)."""
    from ..core.space import SearchSpace

    return [m.name for m in SearchSpace.from_file(space).members(model)]


def check_plan(
    model: nn.Module, plan: Plan, check: bool = True, space: str = "llama", all_tensors: bool = False
) -> Plan:
    """The plan resolved to exact names and checked against ``model``, before any work is done.

    - the fingerprint (``check=False`` skips it, for a sibling model with the same names);
    - patterns and ``_default`` reach only the decision tensors of ``space``
      (``all_tensors=True``: every 2-D weight, embeddings and LM head included);
    - every format fits its tensor (group size divides the row) and its quantizer
      accepts it; errors name the tensor.
    """
    if check:
        plan.check_model(model)
    names = quantizable_names(model)
    scope = None
    if not all_tensors and any(k.startswith("re:") or k == "_default" for k in plan.tensors):
        scope = space_names(model, space)
    resolved = plan.resolve(names, scope)
    modules = dict(model.named_modules())
    for name, entry in resolved.tensors.items():
        for target, fmt in entry.items():
            if fmt is None:
                continue
            if target != "weight":
                check_runtime(model, resolved, name, target, fmt)
                continue
            in_features = _matrix(modules[name]).shape[1]
            if not fmt.fits(in_features):
                raise PlanError(
                    f"tensors[{name!r}].weight: group size {fmt.group_size} does not divide its input dimension "
                    f"{in_features}"
                )
            try:
                get_quantizer(fmt.quantizer).check(fmt)
            except FormatError as e:
                raise PlanError(f"tensors[{name!r}].weight: {e}") from None
            imp = resolved.importance_for(name)
            if get_quantizer(fmt.quantizer).importance_kind == "gram":
                if imp is None or tuple(imp.shape) != (in_features, in_features):
                    got = "none" if imp is None else f"shape {tuple(imp.shape)}"
                    raise PlanError(
                        f"tensors[{name!r}].weight: {fmt.key} needs the layer input's Gram matrix "
                        f"({in_features}, {in_features}) as the plan's importance[{name!r}]; it has {got}"
                    )
            elif imp is not None and tuple(imp.shape) not in ((in_features,), (in_features, in_features)):
                raise PlanError(
                    f"importance[{name!r}] has shape {tuple(imp.shape)}; the tensor's rows are {in_features} wide"
                )
    return resolved


@dataclass(frozen=True)
class CheckedPlan:
    """A plan that :func:`check_plan` resolved and checked against one model.

    :func:`apply_` and :func:`applied` take it as it is: checking a plan reads the model's
    fingerprint (a hash of every weight), so a caller that checks before heavy work passes
    the checked plan on instead of having it checked again."""

    plan: Plan
    model: weakref.ref

    @classmethod
    def of(
        cls,
        model: nn.Module,
        plan: "Plan | CheckedPlan",
        check: bool = True,
        space: str = "llama",
        all_tensors: bool = False,
    ) -> "CheckedPlan":
        """``plan`` checked against ``model`` (a plan already checked against it is returned as it is)."""
        if isinstance(plan, CheckedPlan):
            if plan.model() is not model:
                raise PlanError("this plan was checked against another model; check it against this one")
            return plan
        return cls(check_plan(model, plan, check, space, all_tensors), weakref.ref(model))


def check_runtime(model: nn.Module, plan: Plan, name: str, target: str, fmt) -> None:
    """A run-time format fits its site: the quantizer takes the target, a cache target sits on an
    attention's k_proj / v_proj, groups tile the cache width, and calibrated formats bring their tensors."""
    from .calibrate import needs_calibration
    from .hooks import CACHE_PROJ, attention_of, calib_for

    where = f"tensors[{name!r}].{target}"
    q = get_quantizer(fmt.quantizer)
    if fmt.is_full:
        return
    if target not in q.targets:
        raise PlanError(f"{where}: quantizer {fmt.quantizer!r} quantizes {list(q.targets)}, not {target}")
    mod = dict(model.named_modules())[name]
    if target == "input" and kind_of(mod) is None:
        raise PlanError(
            f"{where}: only the input of a Linear / Conv layer can be quantized; {name} is a {type(mod).__name__}"
        )
    if target in CACHE_PROJ:
        if name.rpartition(".")[2] != CACHE_PROJ[target]:
            raise PlanError(
                f"{where}: the {target} is addressed on the attention's {CACHE_PROJ[target]}, not on {name}"
            )
        try:
            _, attn = attention_of(model, name)
        except ValueError as e:
            raise PlanError(f"{where}: {e}") from None
        width = _matrix(mod).shape[0]
        if hasattr(q, "fits_width") and not q.fits_width(fmt, width, attn.head_dim):
            raise PlanError(f"{where}: group size {fmt.group_size} does not divide the cache width {width}")
    if needs_calibration(fmt, target) and calib_for(plan.calibration, name, target, fmt) is None:
        raise PlanError(
            f"{where}: {fmt.key} is calibrated offline and the plan carries no calibration for it; "
            "fit it with mpsearch.quant.calibrate.calibrate(model, {(name, target): [fmt]}, tokens)"
        )


@torch.no_grad()
def apply_(
    model: nn.Module,
    plan: Plan | CheckedPlan,
    check: bool = True,
    space: str = "llama",
    all_tensors: bool = False,
    memo: QuantMemo | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Fake-quantize ``model``'s weights in place as ``plan`` says; returns ``model``.

    The plan is checked first (:func:`check_plan`, unless it is a :class:`CheckedPlan` of
    this model); nothing is changed if any entry is invalid. ``space``/``all_tensors`` say what
    patterns and ``_default`` may reach.
    ``memo`` (a :class:`QuantMemo` of this model) reuses slow quantizations across plans.
    ``device`` (cpu, cuda, cuda:N, auto, or a :class:`torch.device`): move the model there first,
    and quantize there (GPTQ and the GGUF searches are much faster on a GPU); None leaves it where it is.
    """
    resolved = CheckedPlan.of(model, plan, check, space, all_tensors).plan
    if device is not None:
        from ..core.device import exact_fp32, resolve_device

        device = device if isinstance(device, torch.device) else resolve_device(device)
        model.to(device)
        exact_fp32(device)
    modules = dict(model.named_modules())

    def q(n: str, f) -> torch.Tensor:
        w, imp = _matrix(modules[n]), resolved.importance_for(n)
        try:
            out = quantize(w, f, imp) if memo is None else memo.quantize(n, w, f, imp)
        except (
            FormatError,
            torch.linalg.LinAlgError,
        ) as e:  # the quantizer's own complaint, with the tensor it was about
            raise PlanError(f"tensors[{n!r}].weight: {f.key}: {e}") from None
        if not torch.isfinite(out).all():  # nothing NaN goes on to be measured as if it were a plan
            raise PlanError(f"tensors[{n!r}].weight: {f.key} {dict(f.params) or ''} gives NaN or infinite weights")
        return out

    new = {n: q(n, f) for n, f in resolved.weight_formats().items()}
    for n, w in new.items():
        _set(modules[n], w)
    old = getattr(model, "_mpsearch_runtime", None)
    if old is not None:
        old.remove()
    model._mpsearch_runtime = None
    if resolved.runtime_formats():  # inputs and KV cache: hooks that stay on the model
        model._mpsearch_runtime = RuntimeHooks(model, resolved.runtime_formats(), resolved.calibration)
        model._mpsearch_runtime.install()
    return model


def apply(
    model: nn.Module,
    plan: Plan,
    check: bool = True,
    space: str = "llama",
    all_tensors: bool = False,
    device: str | torch.device | None = None,
) -> nn.Module:
    """A quantized deep copy (on ``device``, see :func:`apply_`); ``model`` is untouched."""
    return apply_(copy.deepcopy(model), plan, check, space, all_tensors, device=device)


@contextlib.contextmanager
def applied(
    model: nn.Module,
    plan: Plan | CheckedPlan,
    check: bool = True,
    space: str = "llama",
    all_tensors: bool = False,
    memo: QuantMemo | None = None,
) -> Iterator[nn.Module]:
    """Quantize in place for the ``with`` block, then restore the original weights."""
    modules = dict(model.named_modules())
    plan = CheckedPlan.of(model, plan, check, space, all_tensors)
    saved = {n: _matrix(modules[n]).detach().clone() for n in plan.plan.weight_formats()}
    try:
        yield apply_(model, plan, memo=memo)
    finally:
        hooks = getattr(model, "_mpsearch_runtime", None)
        if hooks is not None:
            hooks.remove()
            model._mpsearch_runtime = None
        with torch.no_grad():
            for n, w in saved.items():
                _set(modules[n], w)
