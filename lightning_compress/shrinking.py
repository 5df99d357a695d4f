"""Structured pruning that pays off on any hardware: remove the channels that pruning zeroed.

:func:`shrink` returns a copy of a model in which every output channel (a Linear row, a Conv filter) that is zero in
every member of its coupled group is physically removed, together with the matching input columns/channels of the
layers that consume it and the matching entries of the normalization layers between them. The dependency analysis
(which layers are coupled through residual adds, concatenations, reshapes, grouped convolutions) is Torch-Pruning's
``DependencyGraph`` (VainF/Torch-Pruning, "DepGraph"): a well-kept library that does exactly this, where a
hand-written graph walker would be a second, weaker copy of it. It is an optional extra:
``pip install 'lightning_compress[shrink]'``.

What is ours: deciding which channels may go, and keeping the outputs equal. A channel may go when the weights of
every layer producing it are zero; it then carries a constant (its bias through the activation, a BatchNorm shift),
which is read off every input given at each consumer (a channel whose value differs within an input or between
inputs is kept) and folded into that consumer's bias (exactly, for Linear
consumers and for Conv consumers without padding; with padding, only a constant of 0 is removable). A group this
code cannot follow (LayerNorm/GroupNorm across channels, attention, anything unknown that holds parameters, or
channels that reach the model's output) is left dense, with a warning naming the layer and the reason.

The example input only shows the layers it reaches. A layer that holds parameters but that the example does not
reach (a branch taken on other inputs' values, a head used only in ``training_step``) could consume or produce any
group's channels, and which ones cannot be known from the trace: then no channel is removed, with a warning naming
the layer. ``transformers``' ``Conv1D`` (GPT-2) is followed as the Linear it is (see
:mod:`lightning_compress.layouts`) and comes back a ``Conv1D``. The result is compared with the model on the example
input and on every other input given before it is returned; on any difference the unshrunk copy is returned instead,
with a warning: never a wrong model on the inputs given. Inputs never given (another keyword value, another branch,
another shape) are not verified.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress import compat, layouts
from lightning_compress.inputs import ModelInput, outputs_match, plain_outputs

SHRINK_HINT = "Shrinking needs Torch-Pruning: pip install 'lightning_compress[shrink]'"
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Normalizations across channels and attention (InstanceNorm normalizes each channel on its own: it does not mix).
_MIXING = (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.LocalResponseNorm, nn.MultiheadAttention)
_ATTENTION_OPS = re.compile(r"ScaledDotProduct|Attention|^Bmm|^Baddbmm", re.IGNORECASE)
_PER_CHANNEL = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class ShrinkWarning(UserWarning):
    """A group of channels was left dense: the message names the layer and the reason."""


def shrink(model: nn.Module, example_input: Any, atol: float = 1e-5, more_inputs: Sequence[Any] = ()) -> nn.Module:
    """A copy of ``model`` without the channels that structured pruning zeroed; outputs equal on ``example_input``
    and on each of ``more_inputs``.

    A zeroed channel still carries a constant (its bias through the activation), which is folded into the layers
    that consume it; that constant is read on every input given, and a channel whose value differs within an input
    or between inputs (a ``scale`` keyword, a branch on the data between activations) is kept. The result is
    compared with the model on every input given. What no given input shows cannot be verified: a keyword value,
    a branch or an input shape that none of them exercises may still see a constant that differs; pass such inputs
    in ``more_inputs`` (``DynamicQuantization(shrink=True)`` passes every validation input it captured).

    Args:
        model: a float model whose pruned channels are exactly zero (e.g. after ``MagnitudePruning`` with
            ``method="ln_structured"``, ``dim=0``).
        example_input: a real input, as in ``example_input_array`` (a tensor, a tuple, or a dict of keywords); the
            model is traced on it (the first of ``more_inputs`` that reaches every layer, when it does not).
        atol: the largest difference from ``model``'s outputs on an input that counts as equal.
        more_inputs: other real inputs, each in the same forms as ``example_input``.

    Warns:
        ShrinkWarning: channels left in place, with the layer and the reason; a layer holding parameters that the
            example does not reach (nothing is removed then); the result not matching (the unshrunk copy is
            returned).

    Raises:
        ImportError: Torch-Pruning is not installed.
    """
    torch_pruning()  # before the try below, which turns the analysis' own failures into a warning
    copy = compat.uncompiled_copy(model).eval()
    examples = [ModelInput.from_example(x) for x in (example_input, *more_inputs)]
    with torch.no_grad():
        expected = [plain_outputs(example(copy)) for example in examples]
    reference = compat.uncompiled_copy(copy)
    try:
        replaced = layouts.conv1d_as_linear(copy)
        for example in examples:  # trace on the first input that reaches every layer
            traced = trace(copy, example)
            if not traced.unreached:
                break
        if traced.unreached:
            warnings.warn(
                f"shrink: {describe_modules(traced.unreached)} hold(s) parameters that the example input does not "
                "reach: inputs that do could consume or produce any of the pruned channels, so none was removed. "
                "Pass an example that reaches every layer, or shrink the submodule it runs (shrink(model.part, x)).",
                ShrinkWarning,
                stacklevel=2,
            )
            return reference
        names = {module: name for name, module in copy.named_modules()}
        # Lazily: each group is computed when yielded, from the layers as the groups before it left them (indices
        # into a concatenation shift once one of its branches has shrunk).
        for group in traced.graph.get_all_groups(root_module_types=_LAYERS):
            _shrink_group(traced, group, copy, examples, names)
        layouts.linear_as_conv1d(copy, replaced)
    except Exception as error:  # a model the dependency graph cannot follow: never return a half-shrunk one
        warnings.warn(
            f"shrink: the dependency analysis could not follow the model ({type(error).__name__}: {error}); "
            "returning it unshrunk.",
            ShrinkWarning,
            stacklevel=2,
        )
        return reference
    with torch.no_grad():
        differing = [
            i
            for i, (example, want) in enumerate(zip(examples, expected))
            if not outputs_match(want, plain_outputs(example(copy)), atol=atol, rtol=1e-4)
        ]
    if differing:
        which = "the example input" if differing == [0] else f"{len(differing)} of the {len(examples)} inputs given"
        warnings.warn(
            f"shrink: the shrunk model's outputs differ from the model's on {which}; returning the model "
            "unshrunk. Please report this with the model's structure.",
            ShrinkWarning,
            stacklevel=2,
        )
        return reference
    return copy


def zeroed_channels(model: nn.Module) -> int:
    """How many output channels (rows of a Linear, filters of a Conv, columns of a ``Conv1D``) of ``model``'s
    layers have all-zero weights: what :func:`shrink` may remove."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not (isinstance(module, _LAYERS) or layouts.is_conv1d(module)) or not isinstance(weight, Tensor):
            continue
        moved = weight.detach().movedim(layouts.output_dim(module, "weight"), 0)
        rows = moved.reshape(moved.shape[0], -1)
        count += int((~rows.any(dim=1)).sum())
    return count


def torch_pruning(purpose: str = "Shrinking") -> Any:
    """The ``torch_pruning`` module, or an ImportError that says how to install it."""
    try:
        import torch_pruning as tp
    except ImportError as error:
        raise ImportError(SHRINK_HINT.replace("Shrinking", purpose)) from error
    return tp


@dataclasses.dataclass
class Trace:
    """Torch-Pruning's dependency graph of a model called on one input, and the modules that call did not reach:
    ``(qualified name, module)`` for each module holding a parameter the traced outputs do not depend on."""

    graph: Any
    unreached: list[tuple[str, nn.Module]]
    outputs: list[Tensor]

    def reaches_output(self, group: Any) -> bool:
        """Whether the channels of a group of :attr:`graph` are (part of) one of the traced outputs."""
        ends = {id(t.grad_fn) for t in self.outputs}
        for item in group:
            node = item.dep.target
            if not self.graph.is_out_channel_pruning_fn(item.dep.handler):
                continue  # a consumer: its output is another tensor, with other channels
            if id(node.grad_fn) in ends or any(_is_output_op(n.module) for n in [node, *node.outputs]):
                return True
        return False


def trace(model: nn.Module, example: ModelInput, purpose: str = "Shrinking") -> Trace:
    """Trace ``model`` on ``example`` (in place: call it on a copy): its dependency graph, from the output tensors
    with a gradient history, and which parameters those outputs depend on (every floating parameter is made to
    require grad for the call, so frozen ones count too; the flags are restored)."""
    tp = torch_pruning(purpose)
    outputs: list[list[Tensor]] = []

    def forward(m: nn.Module, x: ModelInput) -> list[Tensor]:
        outputs.append(_traced_tensors(x(m)))
        return outputs[-1]

    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(p.is_floating_point())
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example, forward_fn=forward, verbose=False
            )
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    reached = _parameters_behind(outputs[-1])
    unreached = [
        (name, module)
        for name, module in model.named_modules()
        if any(id(p) not in reached for p in module.parameters(recurse=False) if p.is_floating_point())
    ]
    return Trace(graph, unreached, outputs[-1])


def mixes_channels(module: nn.Module) -> bool:
    """Whether ``module`` combines the channels it is given (a normalization across channels, attention), as opposed
    to a layer this code merely does not follow (a transposed convolution, an embedding, a custom layer)."""
    return isinstance(module, _MIXING)


def mixing_operation(group: Any) -> str | None:
    """The name of an operation in ``group`` that mixes its channels although Torch-Pruning models it as element-wise:
    attention (``scaled_dot_product_attention``, or the batched matmuls of an eager one), whose heads tie channels
    together; ``None`` if there is none."""
    for item in group:
        grad_fn = item.dep.target.grad_fn
        name = grad_fn.name() if grad_fn is not None and hasattr(grad_fn, "name") else ""
        if _ATTENTION_OPS.search(name):
            return name.removesuffix("Backward0").removesuffix("Backward1")
    return None


def indices_fit(graph: Any, group: Any) -> bool:
    """Whether every layer's indices in ``group`` lie within its channels (Torch-Pruning maps indices through ops it
    does not understand, such as reshapes into attention heads, onto channels that do not exist)."""
    for item in group:
        module, idxs = item.dep.target.module, item.idxs
        if not isinstance(module, _LAYERS) or not idxs:
            continue
        out = graph.is_out_channel_pruning_fn(item.dep.handler)
        if isinstance(module, nn.Linear):
            size = module.out_features if out else module.in_features
        else:
            size = module.out_channels if out else module.in_channels
        if len(idxs) > size or max(idxs) >= size:
            return False
    return True


def _is_output_op(module: Any) -> bool:
    return isinstance(module, torch_pruning().ops._OutputOp)  # the node of an output that no hooked layer made


def describe_modules(modules: list[tuple[str, nn.Module]], limit: int = 4) -> str:
    """``'a.b' (Linear), 'c' (Conv2d) and 3 more``: a few lines at most, whatever the count."""
    shown = ", ".join(f"{name!r} ({type(module).__name__})" for name, module in modules[:limit])
    return shown + (f" and {len(modules) - limit} more" if len(modules) > limit else "")


def _parameters_behind(tensors: list[Tensor]) -> set[int]:
    """``id`` of every leaf tensor (parameter) in the autograd graphs of ``tensors``."""
    reached: set[int] = set()
    stack = [t.grad_fn for t in tensors]
    seen: set[Any] = set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return reached


def _shrink_group(
    traced: Trace, group: Any, model: nn.Module, examples: list[ModelInput], names: dict[nn.Module, str]
) -> None:
    graph = traced.graph
    root_item = group[0]
    root = root_item.dep.target.module
    name = names.get(root, type(root).__name__)
    producers, consumers = [], []
    for item in group:
        if any(root_idx is None for root_idx in item.root_idxs):
            return  # an index mapping (grouped heads, say) that Torch-Pruning cannot trace back to the root
        module, out = item.dep.target.module, graph.is_out_channel_pruning_fn(item.dep.handler)
        if not isinstance(module, nn.Module) or not any(True for _ in module.parameters(recurse=False)):
            continue  # an operation (add, reshape, activation): it holds nothing to remove
        if isinstance(module, _LAYERS):
            (producers if out else consumers).append(item)
        elif not isinstance(module, _PER_CHANNEL):
            layer = f"{type(module).__name__} {names.get(module, '')!r}"
            reason = f"{layer} mixes these channels" if mixes_channels(module) else f"shrink does not follow {layer}"
            return _left_dense(name, reason, _zero_channels(producers) if producers else None)
    attention = mixing_operation(group)
    if attention is not None or not indices_fit(graph, group):
        zeroed = _zero_channels(producers) if producers and indices_fit(graph, producers) else None
        if attention is not None:
            return _left_dense(name, f"they run through attention ({attention}), whose heads tie them together", zeroed)
        return _left_dense(name, "the dependency graph maps them onto channels that do not exist (a reshape)", zeroed)
    if not consumers or traced.reaches_output(group):
        return  # these channels are (part of) the model's output: removing them would change its shape
    removable = _zero_channels(producers)
    if not removable:
        return
    constants = _constants(model, examples, consumers, removable)
    varying: set[int] = set()  # zero weights, yet not constant where consumed: something this code does not see
    padded: set[int] = set()  # a padded convolution sees a constant only away from the borders
    folds = []
    for item in consumers:
        consumer = item.dep.target.module
        for idx, root_idx in zip(item.idxs, item.root_idxs):
            if root_idx not in removable:
                continue
            value = constants.get((consumer, idx))
            if value is None:
                varying.add(root_idx)
            elif value != 0 and not (isinstance(consumer, nn.Linear) or _unpadded(consumer)):
                padded.add(root_idx)
            elif value != 0:
                folds.append((root_idx, consumer, idx, value))
    _left_dense(name, "they are not constant where they are consumed", varying)
    _left_dense(name, "they carry a nonzero constant that a padded convolution consumes", padded - varying)
    removable -= varying | padded
    if not removable:
        return
    for root_idx, consumer, idx, value in folds:
        if root_idx in removable:
            _fold(consumer, idx, value)
    graph.get_pruning_group(root, root_item.dep.handler, idxs=sorted(removable)).prune()


def _zero_channels(producers: list[Any]) -> set[int]:
    """Root channels whose weights are zero in every producing layer of the group."""
    zero: set[int] | None = None
    for item in producers:
        weight = item.dep.target.module.weight.detach()
        found = {root for idx, root in zip(item.idxs, item.root_idxs) if not weight[idx].any()}
        zero = found if zero is None else zero & found
    return zero or set()


def _consumer_inputs(model: nn.Module, example: ModelInput, consumers: list[Any]) -> dict[nn.Module, Tensor]:
    captured: dict[nn.Module, Tensor] = {}
    modules = {item.dep.target.module for item in consumers}
    handles = [m.register_forward_pre_hook(lambda m, args: captured.setdefault(m, args[0])) for m in modules]
    try:
        with torch.no_grad():
            example(model)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _constants(
    model: nn.Module, examples: list[ModelInput], consumers: list[Any], removable: set[int]
) -> dict[tuple[nn.Module, int], float]:
    """``(consumer, input channel) -> value`` for each removable channel that is the same everywhere in what the
    consumer receives on every one of ``examples`` (one input's activations held at a time)."""
    seen: dict[tuple[nn.Module, int], set[float | None]] = {}
    for example in examples:
        captured = _consumer_inputs(model, example, consumers)
        for item in consumers:
            consumer = item.dep.target.module
            if consumer not in captured:
                continue
            for idx, root_idx in zip(item.idxs, item.root_idxs):
                if root_idx in removable:
                    seen.setdefault((consumer, idx), set()).add(_constant(captured[consumer], idx, consumer))
    return {key: values.pop() for key, values in seen.items() if len(values) == 1 and None not in values}


def _constant(x: Tensor, idx: int, consumer: nn.Module) -> float | None:
    """The value of input channel ``idx`` if it is the same everywhere in ``x``, else ``None``."""
    channel = x[..., idx] if isinstance(consumer, nn.Linear) else x[:, idx]
    first = channel.reshape(-1)[0]
    return float(first) if bool((channel == first).all()) else None


def _unpadded(conv: nn.Module) -> bool:
    padding = conv.padding if isinstance(conv.padding, tuple) else (conv.padding,)
    return all(p == 0 for p in padding) and conv.groups == 1


def _fold(consumer: nn.Module, idx: int, value: float) -> None:
    """Add what a constant input ``value`` on input channel ``idx`` contributes to every output, to the bias."""
    weight = consumer.weight.detach()
    contribution = weight[:, idx].reshape(weight.shape[0], -1).sum(dim=1) * value
    with torch.no_grad():
        if consumer.bias is None:
            consumer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
        consumer.bias.add_(contribution)


def _left_dense(name: str, reason: str, zeroed: set[int] | None) -> None:
    if zeroed:  # only worth saying when something could have been removed
        message = f"shrink: left {len(zeroed)} zeroed channel(s) of {name!r} in place: {reason}"
        warnings.warn(message, ShrinkWarning, stacklevel=4)  # at the caller of shrink()


def _traced_tensors(output: Any) -> list[Tensor]:
    """The output tensors Torch-Pruning traces the graph back from: every one with a gradient history (integer
    outputs and constants have none)."""
    found: list[Tensor] = []
    stack = [plain_outputs(output)]
    while stack:
        item = stack.pop(0)
        if isinstance(item, Tensor):
            if item.grad_fn is not None:
                found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    if not found:
        raise ValueError("no output of the model depends on its parameters")
    return found
