r"""Movement scores: how training moves each weight, accumulated at every optimizer step (Sanh, Wolf & Rush, 2020,
"Movement Pruning: Adaptive Sparsity by Fine-Tuning", NeurIPS; eq. 4 and section 4 for the hard top-k variant).

The importance of weight ``w`` after steps ``1..T`` is

    S = -\sum_t g_t \odot w_t

with ``g_t`` the gradient the optimizer applies at step ``t`` (after unscaling and clipping, averaged over DDP's
processes) and ``w_t`` the weight before that step. Weights moving away from 0 (``g`` and ``w`` of opposite signs)
gain importance; weights shrinking toward 0 lose it, whatever their magnitude. The lowest ``S`` are pruned first.

:class:`MovementScore` keeps one float32 score per selected weight (4 bytes each, beside the weights on their device;
under FSDP2 beside each process's shard), updated by one fused ``torch._foreach_addcmul_`` per step
(:meth:`MovementScore.before_step`, called by :meth:`lightning_compress.pruning.pruner.Pruner.attach`'s step pre-hook
once per real optimizer step). Pruned weights are 0, so their scores stop changing. Knows nothing of schedules or
Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_compress.pruning import sharding
from lightning_compress.pruning.masks import LOCAL, Part, ScoreSource
from lightning_compress.pruning.scores import Score

if TYPE_CHECKING:
    from lightning_compress.pruning.pruner import Pruner

#: The key of the scores in the pruner's (and the callback's) checkpoint state.
STATE_KEY = "scores"


class MovementScore(Score):
    """``S = -sum_t g_t * w_t`` per weight, float32, accumulated once per optimizer step; lowest pruned first.

    Attributes:
        scores: this process's scores, one float32 tensor shaped as each of the pruner's local tensors (from
            :meth:`bind` on); zeros until the first step.
        steps: how many optimizer steps were accumulated (restored from checkpoints).
        restored: whether the last :meth:`load_state_dict` found scores (``False``: they start from zero).
    """

    def __init__(self) -> None:
        self.scores: list[Tensor] = []
        self.steps = 0
        self.restored = True
        self._pruner: Pruner | None = None

    def bind(self, pruner: Pruner) -> None:
        self._pruner = pruner
        self.scores = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in pruner.weights()]

    @property
    def nbytes(self) -> int:
        """Bytes the scores take on this process (4 per local selected weight)."""
        return sum(s.numel() * s.element_size() for s in self.scores)

    @torch.no_grad()
    def before_step(self, pruner: Pruner, held: Sequence[int]) -> None:
        """``S -= g * w`` for the weights at ``held`` (those the stepping optimizer updates) that have a gradient:
        one fused pass over the float32 ones, one pass per tensor of another dtype (computed in float32)."""
        fused: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        grads, weights = pruner.gradients(), pruner.weights()
        for i in held:
            score, grad, weight = self.scores[i], grads[i], weights[i]
            if grad is None:
                continue
            if grad.dtype == weight.dtype == torch.float32:
                for group, t in zip(fused, (score, grad, weight)):
                    group.append(t)
            else:
                score.addcmul_(grad.float(), weight.float(), value=-1)
        if fused[0]:
            torch._foreach_addcmul_(*fused, value=-1)
        self.steps += 1

    def source(self, weights: Sequence[Tensor], parts: Sequence[Part]) -> ScoreSource:
        flats = [s.view(-1) for s in self.scores]
        return lambda i, start, stop: ordered_non_negative(flats[i][start:stop])

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"scores": {name: full float32 CPU tensor}, "score_steps": int}``. Sharded, each parameter's scores are
        gathered in turn (a collective: call it on every process) and kept on rank zero only, as the masks."""
        pruner = self._pruner
        if pruner is None:
            return {STATE_KEY: None, "score_steps": self.steps}
        keep = pruner.collective is LOCAL or torch.distributed.get_rank() == 0
        saved = {}
        for name, param, score in zip(pruner.names, pruner.parameters.values(), self.scores):
            full = sharding.full(param, score)
            if keep:
                saved[name] = full.clone() if full.data_ptr() == score.data_ptr() else full
        return {STATE_KEY: saved, "score_steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the scores :meth:`state_dict` saved (each process takes its part). A state without scores (a
        ``MagnitudePruning`` checkpoint, say) leaves them at zero and sets :attr:`restored` to ``False``.

        Raises:
            ValueError: the scores are for other parameters, or of other shapes.
        """
        saved = state.get(STATE_KEY)
        self.restored = saved is not None
        if saved is None or self._pruner is None:
            return
        pruner = self._pruner
        if list(saved) != pruner.names:
            raise ValueError(
                f"The checkpoint's movement scores are for parameters {list(saved)}, but this run selects "
                f"{pruner.names}"
            )
        for name, param, part, score in zip(pruner.names, pruner.parameters.values(), pruner.parts, self.scores):
            if tuple(saved[name].shape) != tuple(param.shape):
                raise ValueError(
                    f"The checkpoint's movement scores for {name!r} have shape {tuple(saved[name].shape)}, "
                    f"the parameter {tuple(param.shape)}"
                )
            score.copy_(sharding.local_keep(saved[name], part, score))
        self.steps = int(state.get("score_steps") or 0)


def ordered_non_negative(scores: Tensor) -> Tensor:
    """Non-negative float64 values in the order of the float32 ``scores`` (any sign), for the mask engine, whose
    radix select reads non-negative floats' bits as integers: each float32's bits are mapped to the unsigned 32-bit
    integer that sorts like it (negatives reversed below the positives; -0 is +0), shifted to bits 61..30 of a
    float64 (finite: bit 62 stays 0), so that the engine's first 16-bit radix pass already splits them. NaN sorts
    beyond +-inf by its sign bit."""
    bits = torch.where(scores == 0, 0.0, scores).view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, -1 - bits, bits + (1 << 31))
    return (ordered << 30).view(torch.float64)
