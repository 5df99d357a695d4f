"""Work beside training without changing it: every global state that our rehearsal and evaluations may touch is
saved before and restored after.

Why: the rehearsal runs before the first training step and draws from the global random generators (a validation
loader with ``shuffle=True``, dropout in a copy left in train mode, a ``RandomSampler`` read for its last batch, an
inner ``Trainer``); with a fixed seed, the training that follows would then shuffle, drop and initialise
differently than without our callback. Lightning's own ``isolate_rng`` covers the generators only; this also keeps
the module's train/eval modes, grad mode, the trainer's logged metrics, and the flags an inner ``Trainer`` or the
quantized backend may set (cuDNN, deterministic algorithms, the quantized engine).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
    np = None


@contextlib.contextmanager
def untouched(module: nn.Module | None = None, trainer: Any = None) -> Iterator[None]:
    """Run the body, then put back what it may have changed.

    Restored: the CPU and every CUDA device's random generator, numpy's and Python's ``random``; the train/eval
    mode of each submodule of ``module``; grad mode; the trainer's ``callback_metrics``, ``logged_metrics`` and
    ``progress_bar_metrics``; ``torch.backends.cudnn.benchmark``, deterministic-algorithm settings and
    ``torch.backends.quantized.engine``.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state() if np is not None else None
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    modes = [(m, m.training) for m in module.modules()] if module is not None else []
    grad = torch.is_grad_enabled()
    flags = (
        torch.backends.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.quantized.engine,
    )
    metrics = _metric_dicts(trainer)
    saved_metrics = [dict(d) for d in metrics]
    try:
        yield
    finally:
        random.setstate(python_state)
        if numpy_state is not None:
            np.random.set_state(numpy_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        for m, training in modes:
            m.training = training
        torch.set_grad_enabled(grad)
        torch.backends.cudnn.benchmark = flags[0]
        torch.use_deterministic_algorithms(flags[1], warn_only=flags[2])
        torch.backends.quantized.engine = flags[3]
        for live, saved in zip(metrics, saved_metrics):
            live.clear()
            live.update(saved)


def _metric_dicts(trainer: Any) -> list[dict[str, Any]]:
    """The trainer's metric dicts, as the objects its properties return (they are updated in place)."""
    if trainer is None:
        return []
    return [trainer.callback_metrics, trainer.logged_metrics, trainer.progress_bar_metrics]
