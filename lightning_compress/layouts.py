"""Weight layouts of the dense layer families: which stored dimension of a weight holds the output channels.

Most layers store weights output-first: ``nn.Linear`` ``(out, in)``, ``nn.Conv*`` ``(out, in / groups, *kernel)``,
the RNN family ``(gates * hidden, in)``, ``nn.MultiheadAttention``'s projections ``(3 * embed, embed)``. Two families
users train store them input-first:

* ``nn.ConvTranspose1d/2d/3d``: ``(in, out / groups, *kernel)``;
* ``transformers``' ``Conv1D`` (GPT-2, OpenAI GPT, ImageGPT, CLVP, Decision Transformer): ``(in, out)``, computing
  ``x @ W + b``. A Linear in all but name.

``transformers`` is an optional dependency and is never imported here: a ``Conv1D`` instance can only exist once
the module defining its class is imported, so looking the class up in ``sys.modules`` finds it exactly when a model
can hold one, and costs nothing otherwise.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Where transformers has defined `Conv1D` (pytorch_utils since 4.x; modeling_utils re-exports it).
_CONV1D_MODULES = ("transformers.pytorch_utils", "transformers.modeling_utils")


def conv1d_types() -> tuple[type[nn.Module], ...]:
    """``transformers``' ``Conv1D`` class, if ``transformers`` is imported; else ``()`` (no model can hold one)."""
    found = []
    for module_name in _CONV1D_MODULES:
        cls = getattr(sys.modules.get(module_name), "Conv1D", None)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls not in found:
            found.append(cls)
    return tuple(found)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` ``Conv1D`` (weight stored ``(in, out)``)."""
    types = conv1d_types()
    return bool(types) and isinstance(module, types)


def output_dim(module: nn.Module, param_name: str) -> int:
    """The stored dimension of ``module``'s parameter ``param_name`` that indexes output channels: 1 for the weights
    of ``ConvTranspose*`` and ``Conv1D``, else 0 (biases and normalization parameters are vectors over outputs)."""
    if param_name == "weight" and (isinstance(module, _CONV_TRANSPOSE) or is_conv1d(module)):
        return 1
    return 0


def output_dims(model: nn.Module, names: list[str]) -> dict[str, int]:
    """:func:`output_dim` of each named parameter (canonical names, as ``model.named_parameters()`` gives them).

    A parameter shared by several layers counts as input-first only if every layer holding it stores it so: an
    embedding tied to a Linear head (GPT-2's ``wte`` and ``lm_head``) is output-first, as the head sees it.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    wanted = set(names)
    dims: dict[str, set[int]] = {}
    for module in model.modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = canonical.get(id(param))
            if name in wanted:
                dims.setdefault(name, set()).add(output_dim(module, param_name))
    return {name: 1 if dims.get(name) == {1} else 0 for name in names}


def storage_dim(dim: int, ndim: int, out_dim: int) -> int:
    """The stored dimension of a weight of ``ndim`` dimensions for ``dim`` in the output-first layout
    ``(out, in, *kernel)`` (negative ``dim`` counts from the end, as in torch): input-first layouts swap 0 and 1."""
    dim %= ndim
    if out_dim == 1 and dim in (0, 1):
        return 1 - dim
    return dim


def conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what the ``Conv1D`` ``conv`` computes: its weight is ``conv``'s weight transposed,
    its bias the same parameter. A ``Conv1D`` computes ``x @ W + b``; the Linear ``x @ (W.T).T + b``.

    The weight is the transposed view, not a contiguous copy: ``F.linear`` then multiplies by ``W`` itself, the
    GEMM ``Conv1D`` runs, and the outputs are bit-identical (a contiguous copy differed in the last bit on 20 of 36
    shapes measured). The view shares ``conv``'s storage: call this on a copy of the model.
    """
    weight = conv.weight.detach().t()
    linear = torch.nn.utils.skip_init(
        nn.Linear,
        weight.shape[1],
        weight.shape[0],
        bias=conv.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    linear.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        linear.bias = conv.bias
    return linear


def conv1d_as_linear(model: nn.Module) -> dict[str, nn.Module]:
    """Replace every ``Conv1D`` in ``model`` (in place; call it on a copy) by its :func:`conv1d_to_linear`.
    Returns the replaced modules by qualified name, for :func:`linear_as_conv1d`."""
    replaced: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if name and is_conv1d(module):
            _set_submodule(model, name, conv1d_to_linear(module))
            replaced[name] = module
    return replaced


def linear_as_conv1d(model: nn.Module, replaced: dict[str, nn.Module]) -> None:
    """Undo :func:`conv1d_as_linear` in place: each Linear goes back into its ``Conv1D`` (the same object), whose
    weight becomes the Linear's transposed and whose sizes (``nf``, ``nx``) follow it, so that channels removed from
    the Linear are removed from the ``Conv1D``."""
    for name, conv in replaced.items():
        linear = model.get_submodule(name)
        weight = linear.weight.detach()
        conv.weight = nn.Parameter(weight.t().contiguous(), requires_grad=linear.weight.requires_grad)
        conv.bias = linear.bias
        conv.nf, conv.nx = weight.shape[0], weight.shape[1]
        _set_submodule(model, name, conv)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
