"""The float copy that quantization starts from: the model's own computation and nothing else.

A plain ``copy.deepcopy`` of a trained LightningModule copies everything that hangs on it, and fails on what
cannot be copied: the record-function objects that ``Trainer(profiler="pytorch")`` hooks onto every module, a
``SummaryWriter`` or a lock kept as an attribute, the non-leaf ``weight`` that ``torch.nn.utils.prune`` or the
hook-based ``weight_norm`` computes before each forward. Here instead:

* :class:`Copier` (a drop-in for ``copy.deepcopy(module, memo)``) leaves behind the module hooks of other tools
  (profilers, distributed wrappers) and any hook that cannot be copied, shares rather than copies each attribute
  that cannot be copied, and shares the datasets, dataloaders and datamodules a module may hold (quantization
  needs none of them, and they can be large); hooks taken off the original are put back as they were;
* :func:`fold_reparametrizations` then turns reparametrized weights of the copy into plain ones, as their own
  ``remove`` functions do: ``torch.nn.utils.prune`` (``weight_orig * weight_mask``), ``torch.nn.utils.parametrize``
  (``parametrizations.weight_norm``, ``spectral_norm``, ``orthogonal``, users' own) and the hook-based
  ``torch.nn.utils.weight_norm`` / ``spectral_norm``. Quantized layers hold plain weights only.

What was shared, left behind or folded is in :class:`CopyReport`, for one info line. :func:`float_copy` is the
whole of it: the float32 CPU copy that quantization starts from (compile wrappers removed, FSDP2 shards gathered,
Linear layers in disguise turned into ``nn.Linear``).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from torch.utils.data import DataLoader, Dataset

from lightning_compress import compat
from lightning_compress.quantization import linear_like

# nn.Module's hook dicts, each with the dicts of per-hook flags kept beside it under the same ids (torch 2.13).
_HOOK_DICTS = {
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
    "_backward_pre_hooks": (),
    "_backward_hooks": (),
    "_state_dict_pre_hooks": (),
    "_state_dict_hooks": (),
    "_load_state_dict_pre_hooks": (),
    "_load_state_dict_post_hooks": (),
}
_MODULE_INTERNALS = frozenset(
    {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", *_HOOK_DICTS}
    | {flag for flags in _HOOK_DICTS.values() for flag in flags}
)
# Hooks defined in these packages observe, profile or distribute a model; they are no part of what it computes.
_TOOL_PACKAGES = (
    "lightning.pytorch.profilers",
    "lightning.pytorch.profiler",
    "lightning.fabric",
    "torch.profiler",
    "torch.autograd.profiler",
    "torch.distributed",
)
# Values deepcopy returns as they are: nothing to decide.
_ATOMIC = (int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device, type)
_REPARAMETRIZATION_HOOKS = (prune.BasePruningMethod, WeightNorm, SpectralNorm)


@dataclasses.dataclass
class CopyReport:
    """What the copy did besides copying; names are ``module.attribute`` as in ``named_modules``."""

    shared: list[str] = dataclasses.field(default_factory=list)
    hooks_left_behind: list[str] = dataclasses.field(default_factory=list)
    folded: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> str | None:
        """One line for the user, or ``None`` when there is nothing to say."""
        parts = []
        if self.shared:
            parts.append(f"shares what cannot be copied: {_listing(self.shared)}")
        if self.hooks_left_behind:
            parts.append(
                f"leaves behind {len(self.hooks_left_behind)} hook(s) of other tools or that cannot be "
                f"copied: {_listing(self.hooks_left_behind)}"
            )
        if self.folded:
            parts.append(f"folds reparametrized weights into plain ones: {_listing(self.folded)}")
        return "the float copy " + "; ".join(parts) if parts else None


class Copier:
    """``copy.deepcopy(module, memo)`` that leaves behind what quantization must not or need not copy."""

    def __init__(self) -> None:
        self.report = CopyReport()

    def __call__(self, module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
        memo = {} if memo is None else memo
        names = {m: name for name, m in module.named_modules(remove_duplicate=False)}
        with self._hooks_taken_off(module, names, _is_tool_hook):
            self._share_uncopyable_attributes(module, names, memo)
            with self._hooks_taken_off(module, names, lambda hook: not _copied_into(hook, memo)):
                return copy.deepcopy(module, memo)

    @contextlib.contextmanager
    def _hooks_taken_off(
        self, module: nn.Module, names: dict[nn.Module, str], leave: Callable[[Any], bool]
    ) -> Iterator[None]:
        """Take the hooks for which ``leave(hook)`` holds off ``module``'s tree; put every dict back afterwards."""
        saved: list[tuple[dict[Any, Any], dict[Any, Any]]] = []
        for m in module.modules():
            for attr, flag_attrs in _HOOK_DICTS.items():
                hooks = m.__dict__.get(attr)
                left = [key for key, hook in (hooks or {}).items() if not _is_reparametrization(hook) and leave(hook)]
                if not left:
                    continue
                flags = [m.__dict__[f] for f in flag_attrs if f in m.__dict__]
                saved.extend((d, dict(d)) for d in (hooks, *flags))
                for key in left:
                    self.report.hooks_left_behind.append(f"{_owner_name(names, m)} ({_hook_name(hooks[key])})")
                    for d in (hooks, *flags):
                        d.pop(key, None)
        try:
            yield
        finally:
            for live, content in reversed(saved):
                live.clear()
                live.update(content)

    def _share_uncopyable_attributes(self, module: nn.Module, names: dict[nn.Module, str], memo: dict) -> None:
        for m in module.modules():
            for attr, value in _state(m).items():
                if attr in _MODULE_INTERNALS or isinstance(value, _ATOMIC) or id(value) in memo:
                    continue
                if isinstance(value, (Dataset, DataLoader)) or _is_datamodule(value):
                    memo[id(value)] = value  # not needed to quantize, possibly large
                elif isinstance(value, torch.Tensor) and value.grad_fn is not None:
                    # computed from other tensors by a reparametrization's hook; recomputed when it is folded
                    memo[id(value)] = value.detach().clone()
                elif not _copied_into(value, memo):
                    memo[id(value)] = value
                    self.report.shared.append(f"{_owner_name(names, m, attr)} ({type(value).__name__})")


def _state(module: nn.Module) -> dict[str, Any]:
    """What deepcopy copies of a module: its ``__getstate__`` (a LightningModule leaves out its trainer), or its
    ``__dict__`` (a parametrized module's ``__getstate__`` refuses, and its ``__deepcopy__`` copies the dict)."""
    try:
        state = module.__getstate__()
    except Exception:
        state = None
    return state if isinstance(state, dict) else module.__dict__


def _copied_into(value: Any, memo: dict[int, Any]) -> bool:
    """Deep-copy ``value`` into ``memo`` (so the module's copy reuses it) and say whether that worked; a failed
    attempt leaves ``memo`` as it was."""
    trial = collections.ChainMap({}, memo)
    try:
        copy.deepcopy(value, trial)
    except Exception:
        return False
    copied = trial.maps[0]
    # deepcopy keeps the temporaries it copied alive in memo[id(memo)], so that their ids, which are memo's keys,
    # are not reused by other objects; here that list sits under the trial's id: move it under the memo's own
    memo.setdefault(id(memo), []).extend(copied.pop(id(trial), []))
    memo.update(copied)
    return True


def fold_reparametrizations(model: nn.Module, report: CopyReport | None = None) -> list[str]:
    """Turn every reparametrized weight of ``model`` into a plain parameter holding its current value; returns
    their names. ``model`` should be in the mode it will run in (eval: spectral norm does no power iteration).

    Raises:
        ValueError: one could not be folded; the message names it, and the function that makes it permanent on
            the original model (``torch.nn.utils.prune.remove``, ``parametrize.remove_parametrizations``).
    """
    folded = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if parametrize.is_parametrized(m):
            _own_class(m)
            for tensor in list(m.parametrizations):
                _fold(
                    f"{prefix}{tensor}",
                    "torch.nn.utils.parametrize.remove_parametrizations(module, name)",
                    lambda m=m, t=tensor: parametrize.remove_parametrizations(m, t, leave_parametrized=True),
                )
                folded.append(f"{prefix}{tensor}")
        for hook_id, hook in list(m._forward_pre_hooks.items()):
            if isinstance(hook, prune.BasePruningMethod):
                tensor = hook._tensor_name
                remover = "torch.nn.utils.prune.remove(module, name)"
                fold: Callable[[], Any] = lambda m=m, t=tensor: prune.remove(m, t)  # noqa: E731
            elif isinstance(hook, (WeightNorm, SpectralNorm)):
                tensor = hook.name
                remover = f"torch.nn.utils.remove_{'weight' if isinstance(hook, WeightNorm) else 'spectral'}_norm"
                fold = lambda m=m, h=hook, i=hook_id: _remove_hook_based(m, h, i)  # noqa: E731
            else:
                continue
            _fold(f"{prefix}{tensor}", remover, fold)
            folded.append(f"{prefix}{tensor}")
    if report is not None:
        report.folded.extend(folded)
    return folded


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own. ``parametrize`` injects one class per module, whose
    properties compute the parametrized tensors, and a deep copy keeps that class: removing a parametrization
    from the copy (which deletes the property from the class) would break the original."""
    cls = type(module)
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _fold(name: str, remover: str, fold: Callable[[], Any]) -> None:
    try:
        fold()  # not under no_grad: parametrize would then register the folded weight as a buffer
    except Exception as error:
        raise ValueError(
            f"the weight {name!r} is reparametrized, and folding it into a plain weight on the float copy failed "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}). Make it permanent "
            f"on the model before fit ends, with {remover}."
        ) from error


def _remove_hook_based(module: nn.Module, hook: WeightNorm | SpectralNorm, hook_id: int) -> None:
    """``remove_weight_norm`` / ``remove_spectral_norm`` for exactly this hook (a module may hold several)."""
    hook.remove(module)
    del module._forward_pre_hooks[hook_id]
    for attr in ("_state_dict_hooks", "_load_state_dict_pre_hooks"):
        hooks = getattr(module, attr)
        for key, value in list(hooks.items()):
            if getattr(value, "fn", None) is hook:
                del hooks[key]


def _is_reparametrization(hook: Any) -> bool:
    return isinstance(hook, _REPARAMETRIZATION_HOOKS)


def _hook_function(hook: Any) -> Any:
    while hasattr(hook, "func"):  # functools.partial
        hook = hook.func
    return hook


def _is_tool_hook(hook: Any) -> bool:
    function = _hook_function(hook)
    owner = getattr(function, "__self__", None)
    modules = [getattr(function, "__module__", None), type(function).__module__]
    if owner is not None:
        modules.append(type(owner).__module__)
    return any(isinstance(m, str) and m.startswith(_TOOL_PACKAGES) for m in modules)


def _hook_name(hook: Any) -> str:
    function = _hook_function(hook)
    name = getattr(function, "__qualname__", None) or type(function).__qualname__
    return ".".join(name.split("<locals>.")[-1].split(".")[-2:])  # Class.method, without where it was defined


def _owner_name(names: dict[nn.Module, str], module: nn.Module, attribute: str | None = None) -> str:
    owner = names.get(module, "")
    if attribute is None:
        return owner or "the root module"
    return f"{owner}.{attribute}" if owner else attribute


def _is_datamodule(value: Any) -> bool:
    return any(c.__name__ == "LightningDataModule" for c in type(value).__mro__)


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def float_copy(
    model: nn.Module, full_state: dict[str, Any] | None = None, report: CopyReport | None = None
) -> tuple[nn.Module, torch.dtype | None]:
    """A float32 copy of ``model`` on the CPU in eval mode, without ``torch.compile`` wrappers, holding what its
    forward computes (see the module docstring: other tools' hooks left behind, attributes that cannot be copied
    shared, reparametrized weights folded into plain ones; ``report``, when given, is filled with those).

    ``full_state``: for a model sharded with FSDP2, its gathered full state dict; the copy is then a plain,
    unsharded module holding those tensors (:func:`lightning_compress.compat.unsharded_copy`).

    Returns the copy and the floating dtype the model's weights had when it was not float32 (``None`` otherwise):
    dynamic quantization starts from float32 weights. Layers that compute a Linear under another type (transformers'
    ``Conv1D``, ``nn.Linear`` subclasses, parametrized Linears) are ``nn.Linear`` in the copy, with equal outputs
    (:func:`lightning_compress.quantization.linear_like.as_linears`). The model itself is left as it is.
    """
    copier = Copier()
    if full_state is None:
        copied = compat.uncompiled_copy(model, deepcopy=copier)
    else:
        copied = compat.unsharded_copy(model, full_state, deepcopy=copier)
    copied = copied.cpu().eval()
    fold_reparametrizations(copied, copier.report)
    if report is not None:
        for field in dataclasses.fields(report):
            getattr(report, field.name).extend(getattr(copier.report, field.name))
    dtypes = {p.dtype for p in copied.parameters() if p.is_floating_point()} - {torch.float32}
    cast_from = sorted(dtypes, key=str)[0] if dtypes else None
    if cast_from is not None:
        copied.float()
    linear_like.as_linears(copied)
    return copied, cast_from


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The strategy's full state dict of a sharded ``module``, on the CPU of rank zero (empty elsewhere).

    A collective: every process calls it. ``get_model_state_dict`` gathers the shards one parameter at a time.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
