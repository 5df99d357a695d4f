"""The ONNX format: the float model exported to ONNX and quantized by ONNX Runtime, a file that runs in
``onnxruntime.InferenceSession`` alone (no torch, no lightning_compress), with our JSON header in the model's
``metadata_props`` (key ``lightning_compress``).

How a file is made (:func:`make`): the float model (pruned, shrunk when asked) is exported with the dynamo exporter
(``torch.onnx.export(..., dynamo=True)``, which needs ``onnxscript``), its inputs named as forward's arguments
(:func:`lightning_compress.inputs.named_inputs`), the batch dimension and every dimension that varied among the
given inputs dynamic; the exported float graph must reproduce the float model on every given input to float
precision (``FLOAT_RTOL``), or the form is refused (an export records one path through a forward that loops or
branches on shapes); then ``onnxruntime.quantization.shape_inference.quant_pre_process`` (with
``skip_symbolic_shape=True``: symbolic shape inference fails on dynamic sequence lengths) and
``onnxruntime.quantization.quantize_dynamic(weight_type=QuantType.QInt8)`` (``QUInt8`` weights ran 2x slower on
this CPU). The header records the input names, the output structure (dicts, tuples of tensors) and a SHA-256 of
the graph, checked at load: a damaged weight is an :class:`ArtifactError`, not silently different outputs.

ONNX Runtime quantizes on its own (per-tensor weights, dynamic uint8 activations, also embeddings), so the file is
compared with the *float* model, within ``INT8_RTOL`` of each output's largest magnitude: writing passes
``tolerance`` to :class:`lightning_compress.artifacts.verification.CheckedArtifact`.

Needs the optional extra ``pip install 'lightning_compress[onnx]'`` (onnx, onnxscript, onnxruntime), imported
lazily: :func:`require` names the extra when one is missing. Knows nothing of callbacks or Lightning.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.artifacts import headers
from lightning_compress.artifacts.headers import ArtifactError
from lightning_compress.artifacts.verification import FormError, UnsupportedCall, short_error
from lightning_compress.inputs import ModelInput, forward_adapter, named_inputs, plain_outputs

FORMAT = "lightning_compress.onnx"
VERSION = 1
FORMS = ("onnx",)
#: This format quantizes the float model itself: it is made from, and compared with, the float reference.
QUANTIZES = True
#: The exported float graph against the float model: ORT's float kernels re-associate sums (about 1e-6 here).
FLOAT_RTOL = 1e-4
#: The int8 file against the float model, per output, as a fraction of its largest magnitude. Measured here: 0.7 %
#: (digits MLP), 0.7 % (LSTM), 2.5 % (tiny BERT) of the largest logit; a graph that computes something else
#: (another path, another shape) differs by about the output's own scale.
INT8_RTOL = 0.1
EXTRA_HINT = "the ONNX format needs the optional extra: pip install 'lightning_compress[onnx]'"
_REQUIRED = ("onnx", "onnxscript", "onnxruntime")
_KEY = "lightning_compress"


def missing_packages() -> list[str]:
    """The packages of the ``[onnx]`` extra that cannot be imported here."""
    return [name for name in _REQUIRED if importlib.util.find_spec(name) is None]


def require(what: str = "the ONNX format") -> None:
    """Raise ``ImportError`` naming the extra when one of its packages is missing."""
    missing = missing_packages()
    if missing:
        raise ImportError(f"{what} needs {', '.join(missing)}: {EXTRA_HINT}")


# ---------------------------------------------------------------------------------------------- writing
def make(model: nn.Module, form: str, inputs: Sequence[ModelInput], metadata: dict[str, Any]) -> tuple[bytes, list]:
    """The bytes of an int8 ONNX file of the float ``model``, exported on ``inputs[0]`` with the dimensions that
    vary among ``inputs`` dynamic, checked in float on every input; and the names of its inputs."""
    require()
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()):
        raise FormError(
            "the ONNX format exports the float model and quantizes it with ONNX Runtime; pass the float model "
            "(save_quantized(float_model, ..., 'model.onnx'))"
        )
    model.eval()
    named = named_inputs(model.forward, inputs[0])
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise FormError(
                f"forward's input {name!r} is a {type(value).__name__}; an ONNX artifact takes one tensor per input. "
                "Leave it at its default in the calls, or pass it as a tensor"
            )
    with torch.inference_mode():
        structure, leaves = _flatten(plain_outputs(inputs[0](model)))
    names = list(named)
    dynamic = _dynamic_shapes(model, names, inputs)
    # exported on an input whose dynamic dimensions are all 2 or more: torch.export specializes a dimension of
    # size 1 (an example_input_array of one row would fix the batch at 1)
    example = next((i for i in inputs if _fits(model, i, names, dynamic)), inputs[0])
    named = named_inputs(model.forward, example)
    flat = _Flat(forward_adapter(model, example)[0], names)
    with tempfile.TemporaryDirectory() as folder:
        exported = os.path.join(folder, "float.onnx")
        _export(flat, named, dynamic, len(leaves), exported)
        _check_float(model, exported, inputs, structure)
        data = _quantized(exported, folder)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "torch": torch.__version__,
        "inputs": names,
        "outputs": structure,
        "metadata": metadata,
    }
    return _with_header(data, header), names


class _Flat(nn.Module):
    """The forward adapter returning its outputs' tensors as a flat tuple, in :func:`_flatten`'s order."""

    def __init__(self, adapter: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.adapter = adapter

        def forward(self: _Flat, *args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
            return tuple(_flatten(self.adapter(*args, **kwargs))[1])

        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        forward.__signature__ = inspect.Signature([inspect.Parameter(n, kind) for n in ["self", *names]])
        self.forward = forward.__get__(self)


def _dynamic_shapes(model: nn.Module, names: list[str], inputs: Sequence[ModelInput]) -> dict[str, dict[int, Any]]:
    """Dimension 0 of every input (the batch) and every dimension that differs among ``inputs``."""
    from torch.export import Dim

    seen = [named_inputs(model.forward, i) for i in inputs]
    dynamic: dict[str, dict[int, Any]] = {}
    for name in names:
        shapes = {tuple(s[name].shape) for s in seen if isinstance(s.get(name), Tensor)}
        first = next(iter(shapes))
        dims = {0} if first else set()
        dims |= {d for d in range(len(first)) if len({s[d] for s in shapes if len(s) == len(first)}) > 1}
        dynamic[name] = {d: Dim.DYNAMIC for d in sorted(dims)}
    return dynamic


def _fits(model: nn.Module, inputs: ModelInput, names: list[str], dynamic: dict[str, dict[int, Any]]) -> bool:
    named = named_inputs(model.forward, inputs)
    return list(named) == names and all(
        isinstance(named[n], Tensor) and named[n].shape[d] >= 2 for n, dims in dynamic.items() for d in dims
    )


def _export(module: nn.Module, named: dict[str, Tensor], dynamic: dict, outputs: int, path: str) -> None:
    try:
        with _quiet_exporter():
            program = torch.onnx.export(
                module,
                (),
                kwargs=dict(named),
                input_names=list(named),
                output_names=[f"output_{i}" for i in range(outputs)],
                dynamic_shapes=dynamic,
                dynamo=True,
                verbose=False,
                # the exporter's optimizer folds the gate reordering of an LSTM's weights (Slice/Concat of
                # initializers) into initializers; without it ORT's quantizer leaves the LSTM in float
                optimize=True,
            )
            program.save(path)
    except Exception as error:
        raise FormError(f"torch.onnx.export (dynamo) failed ({short_error(error, 300)})") from error


def _check_float(model: nn.Module, path: str, inputs: Sequence[ModelInput], structure: Any) -> None:
    """The exported float graph reproduces the float model on every input, or the form is refused."""
    session = _session(path)
    names = [i.name for i in session.get_inputs()]
    for example in inputs:
        with torch.inference_mode():
            expected = _flatten(plain_outputs(example(model)))[1]
        feed = _feed(named_inputs(model.forward, example), names)
        try:
            actual = session.run(None, feed)
        except Exception as error:
            raise FormError(
                f"the exported graph raises on inputs {example.describe()} ({short_error(error)}): the export "
                "recorded the shapes of the first input (a loop or branch on shapes in forward)"
            ) from error
        for i, (e, a) in enumerate(zip(expected, actual)):
            a = torch.from_numpy(a)
            scale = float(e.abs().max()) if e.numel() and e.is_floating_point() else 0.0
            if e.shape != a.shape or (e.numel() and float((e.double() - a.double()).abs().max()) > FLOAT_RTOL * scale):
                raise FormError(
                    f"on inputs {example.describe()} the exported float graph's output_{i} differs from the model's "
                    "(another shape or values): the export recorded one path through forward (a loop or branch on "
                    "shapes or values)"
                )


def _quantized(exported: str, folder: str) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared, quantized = os.path.join(folder, "prepared.onnx"), os.path.join(folder, "int8.onnx")
    with _quiet_exporter():
        try:
            quant_pre_process(exported, prepared, skip_symbolic_shape=True)
        except Exception as error:
            raise FormError(f"onnxruntime's quant_pre_process failed ({short_error(error)})") from error
        try:
            quantize_dynamic(prepared, quantized, weight_type=QuantType.QInt8)
        except Exception as error:
            raise FormError(f"onnxruntime's quantize_dynamic failed ({short_error(error)})") from error
    with open(quantized, "rb") as f:
        return f.read()


def _with_header(data: bytes, header: dict[str, Any]) -> bytes:
    import onnx

    proto = onnx.load_from_string(data)
    header = {**header, "sha256": _graph_hash(proto)}
    entry = proto.metadata_props.add()
    entry.key, entry.value = _KEY, json.dumps(header)
    return proto.SerializeToString()


def _graph_hash(proto: Any) -> str:
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's and ORT's progress notes and warnings about their own internals (torchvision ops it skips,
    its own deprecated calls) say nothing the user can act on; the export either reproduces the model or is
    refused with the reason."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "root", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ---------------------------------------------------------------------------------------------- calling
def artifact_call(model: nn.Module, artifact: Callable[..., Any], form: str) -> Callable[[ModelInput], Any]:
    """How to call a loaded ONNX artifact with the inputs ``model`` itself receives."""
    forward = model.forward
    takes = set(artifact.input_names)

    def call(inputs: ModelInput) -> Any:
        named = named_inputs(forward, inputs)
        unknown = [name for name in named if name not in takes]
        if unknown:
            raise UnsupportedCall(
                f"forward's input {unknown[0]!r} is not among the ONNX file's inputs {sorted(takes)}: set "
                "`example_input_array` to inputs that include it"
            )
        return artifact(**named)

    return call


class OnnxArtifact(nn.Module):
    """An ONNX file run by an ``onnxruntime.InferenceSession`` (intra-op threads as ``torch.get_num_threads()``),
    called as the model's forward was: positionally or by its inputs' names; returns torch tensors in the
    structure forward returned (dicts, tuples, lists of tensors)."""

    def __init__(self, session: Any, header: dict[str, Any]) -> None:
        super().__init__()
        self.session = session
        self.input_names: list[str] = list(header["inputs"])
        self.structure = header["outputs"]
        self.header = header

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(self.input_names):
            raise TypeError(f"the artifact takes {len(self.input_names)} inputs ({self.input_names}), got {len(args)}")
        given = dict(zip(self.input_names, args))
        for name, value in kwargs.items():
            if name not in self.input_names or name in given:
                raise TypeError(f"unexpected or repeated input {name!r}; the artifact takes {self.input_names}")
            given[name] = value
        missing = [n for n in self.input_names if n not in given]
        if missing:
            raise TypeError(f"the artifact is missing input(s) {missing}; it takes {self.input_names}")
        outputs = self.session.run(None, _feed(given, self.input_names))
        return _unflatten(self.structure, [torch.from_numpy(o) for o in outputs])


def _feed(named: dict[str, Any], names: list[str]) -> dict[str, Any]:
    return {n: named[n].detach().cpu().numpy() for n in names if n in named}


def _session(source: str | bytes) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------- loading
def is_onnx(path: str, head: bytes) -> bool:
    """An ONNX ``ModelProto`` begins with its ``ir_version`` field (tag byte 0x08); or the path says ``.onnx``."""
    return head[:1] == b"\x08" or path.lower().endswith(".onnx")


def load(data: bytes, source: str) -> OnnxArtifact:
    """Check our header and the graph's SHA-256, then open an InferenceSession; every failure is an ArtifactError."""
    try:
        require(f"loading {source}")
    except ImportError as error:
        raise ArtifactError(str(error)) from error
    import onnx

    try:
        proto = onnx.load_from_string(data)
    except Exception as error:
        raise ArtifactError(f"{source} is not a valid ONNX file ({short_error(error)})") from error
    ours = [p.value for p in proto.metadata_props if p.key == _KEY]
    if not ours:
        raise ArtifactError(
            f"{source} is an ONNX file but not a lightning_compress artifact (no '{_KEY}' metadata); run it with "
            "onnxruntime.InferenceSession directly"
        )
    header = headers.parse(ours[0].encode(), source)
    _check_header(header, source)
    if _graph_hash(proto) != header["sha256"]:
        raise ArtifactError(
            f"{source} is damaged: its graph (weights included) does not match the SHA-256 recorded when it was written"
        )
    try:
        session = _session(data)
    except Exception as error:
        raise ArtifactError(f"{source} could not be loaded by ONNX Runtime ({short_error(error)})") from error
    return OnnxArtifact(session, header).eval()


def _check_header(header: Any, source: str) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArtifactError(f"{source} carries a damaged lightning_compress header ({headers.describe(header)})")
    if header.get("version") != VERSION:
        raise ArtifactError(
            f"{source} has ONNX artifact format version {headers.describe(header.get('version'))}; this "
            f"lightning_compress reads version {VERSION}. Upgrade lightning_compress to load it."
        )
    problem = headers.field_problem(
        header,
        {
            "format": lambda v: True,
            "version": lambda v: True,
            "torch": headers.is_name,
            "inputs": lambda v: isinstance(v, list) and all(headers.is_name(n) for n in v),
            "outputs": lambda v: _valid_structure(v),
            "metadata": lambda v: True,
            "sha256": lambda v: isinstance(v, str) and len(v) == 64,
        },
    ) or headers.scalar_problem(header["metadata"], "metadata")
    if problem:
        raise ArtifactError(f"{source} carries a malformed lightning_compress header: {problem}")


# ---------------------------------------------------------------------------------------------- outputs
def _flatten(output: Any) -> tuple[Any, list[Tensor]]:
    """A JSON description of a :func:`plain_outputs` structure (a leaf is its index) and its tensors in order."""
    leaves: list[Tensor] = []

    def walk(value: Any) -> Any:
        if isinstance(value, Tensor):
            leaves.append(value)
            return len(leaves) - 1
        if isinstance(value, dict):
            return {"dict": [[str(k), walk(v)] for k, v in value.items()]}
        if isinstance(value, (tuple, list)):
            return {type(value).__name__: [walk(v) for v in value]}
        raise FormError(f"the model returns a {type(value).__name__}; an ONNX artifact returns tensors")

    return walk(output), leaves


def _unflatten(structure: Any, leaves: list[Tensor]) -> Any:
    if isinstance(structure, int):
        return leaves[structure]
    ((kind, items),) = structure.items()
    if kind == "dict":
        return {k: _unflatten(v, leaves) for k, v in items}
    values = [_unflatten(v, leaves) for v in items]
    return tuple(values) if kind == "tuple" else values


def _valid_structure(value: Any, depth: int = 0) -> bool:
    if depth > 32:
        return False
    if isinstance(value, int) and not isinstance(value, bool):
        return 0 <= value < 4096
    if not (isinstance(value, dict) and len(value) == 1):
        return False
    ((kind, items),) = value.items()
    if kind == "dict":
        return isinstance(items, list) and all(
            isinstance(i, list) and len(i) == 2 and headers.is_name(i[0]) and _valid_structure(i[1], depth + 1)
            for i in items
        )
    return kind in ("tuple", "list") and isinstance(items, list) and all(_valid_structure(i, depth + 1) for i in items)
