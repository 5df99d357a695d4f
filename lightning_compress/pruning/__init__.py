"""Pruning while training: a plain-torch core under thin Lightning callbacks.

* :mod:`~lightning_compress.pruning.pruner`: ``Pruner``, the core: selected parameters, their masks and score;
  update, apply, measure, checkpoint, squash, in any training loop;
* :mod:`~lightning_compress.pruning.callbacks`: ``MagnitudePruning``, ``MovementPruning`` (and ``ScheduledPruning``,
  what every pruning callback shares): when, from which hook, what is logged;
* :mod:`~lightning_compress.pruning.scores`: magnitude, random, Ln norms of slices and of channel groups;
  :mod:`~lightning_compress.pruning.movement`: movement scores accumulated while training (``MovementPruning``);
* :mod:`~lightning_compress.pruning.masks`: the engine (exact threshold, growing masks, in-place application);
* :mod:`~lightning_compress.pruning.selection`: which parameters; :mod:`~lightning_compress.pruning.groups`: coupled
  channels; :mod:`~lightning_compress.pruning.sharding`: FSDP2 shards;
* :mod:`~lightning_compress.pruning.schedules`, :mod:`~lightning_compress.pruning.guard`: when and how much, and the
  accuracy budget; :mod:`~lightning_compress.pruning.config`: the callbacks' arguments, checked;
* :mod:`~lightning_compress.pruning.progress`: where a fit is in its schedule;
  :mod:`~lightning_compress.pruning.reporting`, :mod:`~lightning_compress.pruning.state`: what a run logs, prints
  and draws, and what its checkpoints hold.

Names are imported on first use, so ``Pruner`` and the plain modules need no Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MagnitudePruning": "lightning_compress.pruning.callbacks",
    "MovementPruning": "lightning_compress.pruning.callbacks",
    "ScheduledPruning": "lightning_compress.pruning.callbacks",
    "Pruner": "lightning_compress.pruning.pruner",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_compress.pruning' has no attribute {name!r}")
