"""Linear layers in disguise: modules that compute ``y = x W^T + b`` under another type, turned into ``nn.Linear``.

Dynamic quantization (``torch.ao``'s ``quantize_dynamic``) replaces modules by their exact type, so a layer that
computes a Linear under another type stays float, silently. :func:`as_linears` converts these, on a copy, into
plain ``nn.Linear`` modules with equal outputs, so that they are quantized like any Linear:

* transformers' ``Conv1D`` (GPT-2, OpenAI GPT, ImageGPT, Decision Transformer, CLVP): the weight is stored
  (in, out) and ``y = x @ W + b``; the Linear gets the transposed weight. transformers is an optional dependency,
  never imported here (:mod:`lightning_compress.layouts` finds the class).
* subclasses of ``nn.Linear`` that keep ``nn.Linear.forward`` (a custom ``__init__`` or initialisation, extra
  attributes): torch.ao matches ``type(module) is nn.Linear`` only. Not ``NonDynamicallyQuantizableLinear``:
  it is ``nn.MultiheadAttention``'s ``out_proj``, whose weight the attention's functional forward reads directly,
  so a quantized module there would break it (:mod:`lightning_compress.quantization.outcomes` states that reason).
* (Linear layers parametrized with ``torch.nn.utils.parametrize``, which torch.ao's ``from_float`` refuses, are
  plain Linears by then: the float copy folds every reparametrization, :mod:`lightning_compress.quantization.copying`.)

Not converted: pointwise (1x1) convolutions are a Linear over channels, but channels-first; they are left to static
quantization with the other convolutions. A layer whose weight is shared with another module (a tie) is left as it
is: converting it would untie the weight.
"""

from __future__ import annotations

from torch import nn

from lightning_compress import layouts

#: Attributes set on a converted module: the type it had in the trained model, and what it was, in words.
_ORIGINAL = "_lightning_compress_original_type"
_KIND = "_lightning_compress_converted_from"
_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs")


def is_linear_like_type(cls: type) -> bool:
    """Whether instances of ``cls`` are Linear layers in disguise (for ``modules=[...]`` given as types)."""
    conv1d = [c for c in layouts.conv1d_types() if issubclass(cls, c)]
    if conv1d:
        return cls.forward is conv1d[0].forward
    return issubclass(cls, nn.Linear) and cls is not nn.Linear and _keeps_linear_forward(cls)


def original_type(module: nn.Module) -> type[nn.Module]:
    """The type ``module`` had before :func:`as_linears` converted it (its own type otherwise)."""
    return getattr(module, _ORIGINAL, type(module))


def converted_from(module: nn.Module) -> str | None:
    """What :func:`as_linears` converted ``module`` from (``"Conv1D"`` or a Linear subclass's name), or None."""
    return getattr(module, _KIND, None)


def as_linears(model: nn.Module) -> dict[str, str]:
    """Convert, in place, every Linear layer in disguise in ``model`` into an ``nn.Linear`` with equal outputs.

    Returns the converted layers' names and what each was (``"Conv1D"`` or a Linear subclass's name).
    Meant for a copy (:func:`~lightning_compress.quantization.copying.float_copy` calls it): modules are replaced or
    retyped in place.
    """
    shared = _shared_parameter_ids(model)
    converted: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        kind = _kind(module)
        if kind is None or not name or any(id(p) in shared for p in module.parameters(recurse=False)):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = _to_linear(module)
        if linear is None:
            continue
        setattr(linear, _KIND, kind)
        setattr(parent, child, linear)
        converted[name] = kind
    return converted


def _kind(module: nn.Module) -> str | None:
    if layouts.is_conv1d(module):
        return "Conv1D" if is_linear_like_type(type(module)) else None
    if not isinstance(module, nn.Linear) or isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return None
    return type(module).__name__ if is_linear_like_type(type(module)) else None


def _keeps_linear_forward(cls: type) -> bool:
    return cls.forward is nn.Linear.forward and cls is not nn.modules.linear.NonDynamicallyQuantizableLinear


def _to_linear(module: nn.Module) -> nn.Linear | None:
    original = type(module)
    if layouts.is_conv1d(module):
        linear = layouts.conv1d_to_linear(module)
    else:
        try:  # a subclass that kept Linear's forward: the same module, as a Linear
            module.__class__ = nn.Linear
        except TypeError:  # a layout Linear's cannot take (__slots__): left as it is
            return None
        setattr(module, _ORIGINAL, original)
        return module
    for hooks in _HOOKS:  # as torch.ao keeps a swapped module's hooks
        getattr(linear, hooks).update(getattr(module, hooks))
    linear.train(module.training)
    setattr(linear, _ORIGINAL, original)
    return linear


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    seen: set[int] = set()
    shared: set[int] = set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (shared if id(p) in seen else seen).add(id(p))
    return shared
