"""Parameters sharded across processes: FSDP2's ``fully_shard`` under Lightning's ``ModelParallelStrategy``.

``fully_shard`` turns each parameter into a ``DTensor`` whose local tensor on a process is a block of rows (dim 0,
``torch.chunk`` sizes: the last processes may hold fewer rows, or none) on a 1-D mesh, or on a 2-D mesh whose
other dimension replicates (HSDP). A block of rows is a contiguous range of the full tensor's row-major flat
entries, which is what the mask engine's :class:`~lightning_compress.pruning.masks.Part` describes; a replica is marked
``counted=False``, so every entry of the full tensor is counted once. Other layouts (tensor parallelism, sharding
on another dim) are refused by :func:`part_of`.

Everything here is plain ``torch.distributed``: the engine's reductions (:class:`ProcessGroupCollective`), where a
local shard lies (:func:`part_of`, :func:`locate`), and moving masks between their local form (training) and their
full form (checkpoints). Knows nothing of schedules, scores or Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

from lightning_compress import compat
from lightning_compress.pruning.masks import LOCAL, Collective, Part, whole


def fsdp_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules (``module`` included) that ``fully_shard`` manages."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard(modules: Sequence[torch.nn.Module]) -> None:
    """Register the sharded parameters of these FSDP2 modules again, freeing any unsharded copy (no communication).

    FSDP2 registers plain, unsharded parameters on a module between its forward and its backward, and keeps them
    after a forward without backward (a validation forward of the root module). Before reading
    ``named_parameters()`` and after changing shards in place, this makes the module show, and its next forward
    all-gather, the shards as they are.
    """
    for m in modules:
        m.reshard()


def is_sharded(parameter: Tensor) -> bool:
    """Whether ``parameter`` is a ``DTensor`` (each process holds part of it)."""
    return isinstance(parameter, DTensor)


def local(parameter: Tensor) -> Tensor:
    """The tensor this process holds of ``parameter`` (itself when it is not sharded), sharing its storage.

    Asked for anew at each use: FSDP2 may replace a parameter's local tensor (at its lazy initialization).
    """
    if not is_sharded(parameter):
        return parameter
    with torch.no_grad():
        return parameter.to_local()


def part_of(name: str, parameter: Tensor) -> Part:
    """Which flat entries of the full ``parameter`` this process holds, and whether it counts them.

    Raises ``ValueError`` naming the parameter for a layout the mask engine does not support: anything but
    ``Shard(0)`` on at most one mesh dimension and ``Replicate`` on the others.
    """
    if not is_sharded(parameter):
        return Part(0, parameter.numel())
    placements = tuple(parameter.placements)
    shards = [p for p in placements if isinstance(p, Shard)]
    if (
        any(not isinstance(p, (Shard, Replicate)) for p in placements)
        or len(shards) > 1
        or any(p.dim != 0 for p in shards)
    ):
        raise ValueError(
            f"Pruning supports parameters sharded on dim 0 (FSDP2's fully_shard, optionally replicated "
            f"across a second mesh dimension as in HSDP); {name!r} has placements {placements}. Exclude it "
            "(`exclude=[...]`) or shard it with fully_shard's default placement."
        )
    mesh = parameter.device_mesh
    coordinate = mesh.get_coordinate()
    counted = all(coordinate[d] == 0 for d, p in enumerate(placements) if isinstance(p, Replicate))
    global_offset = compat.local_shard_offset(parameter)
    row = math.prod(parameter.shape[1:])
    return Part(global_offset[0] * row if parameter.dim() else 0, parameter.numel(), counted)


def locate(names: Sequence[str], parameters: Sequence[Tensor]) -> tuple[list[Part], Collective]:
    """Which part of each parameter this process holds, and how the processes' counts are joined.

    Sharded (``DTensor``) parameters hold row blocks; a parameter left unsharded beside sharded ones is a full copy
    on every process, counted on rank zero only. Without sharding every process holds everything (DDP ranks compute
    the same masks, each on its own): the parts are whole and the collective is the identity.
    """
    if not any(is_sharded(p) for p in parameters):
        return whole(parameters), LOCAL
    counted = dist.get_rank() == 0
    parts = [part_of(n, p) if is_sharded(p) else Part(0, p.numel(), counted) for n, p in zip(names, parameters)]
    return parts, ProcessGroupCollective()


class ProcessGroupCollective:
    """The mask engine's reductions over every process of the default process group.

    Tensors travel on the CPU with gloo and on the current CUDA device with NCCL; results come back on the CPU.
    """

    def __init__(self) -> None:
        backend = str(dist.get_backend())
        self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")

    def sum(self, tensor: Tensor) -> Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def max(self, tensor: Tensor) -> Tensor:
        return self._all_reduce(tensor, dist.ReduceOp.MAX)

    def _all_reduce(self, tensor: Tensor, op: dist.ReduceOp) -> Tensor:
        result = tensor.to(self.device, copy=True)
        dist.all_reduce(result, op=op)
        return result.cpu()

    def cat(self, tensor: Tensor) -> Tensor:
        """The processes' 1-D tensors, concatenated in rank order (of any lengths, padded in transit)."""
        size = torch.tensor([tensor.numel()], device=self.device)
        sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, size)
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=tensor.dtype, device=self.device)
        padded[: tensor.numel()] = tensor.to(self.device)
        gathered = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(gathered, padded)
        return torch.cat([g[: int(s)] for g, s in zip(gathered, sizes)]).cpu()


def full_keep(parameter: Tensor, mask: Tensor) -> Tensor:
    """The bool mask (True keeps) of the full ``parameter``, from this process's ``mask``, on the CPU.

    Gathers the shards: every process takes part, and every process gets the full mask (1 byte per entry).
    """
    return full(parameter, (mask != 0).to(torch.uint8)).bool()  # gloo gathers no bool


def full(parameter: Tensor, values: Tensor) -> Tensor:
    """The full tensor of per-entry ``values`` laid out as ``parameter``, from this process's part of them (shaped as
    its local tensor), on the CPU. Gathers the shards: every process takes part, and every process gets it all."""
    if not is_sharded(parameter):
        return values.cpu()
    shards = DTensor.from_local(
        values,
        parameter.device_mesh,
        parameter.placements,
        run_check=False,
        shape=parameter.shape,
        stride=parameter.stride(),
    )
    return shards.full_tensor().cpu()


def local_keep(whole_tensor: Tensor, part: Part, shard: Tensor) -> Tensor:
    """This process's ``part`` of a full per-entry tensor (a bool mask, scores), shaped as its local tensor
    ``shard``."""
    return whole_tensor.reshape(-1)[part.offset : part.offset + shard.numel()].reshape(shard.shape)


def global_zero_counts(tensors: Sequence[Tensor], parts: Sequence[Part], collective: Collective) -> list[int]:
    """Exact zeros of each full tensor, from the local tensors (replicas not counted)."""
    counts = torch.tensor(
        [int(t.numel() - torch.count_nonzero(t)) if p.counted else 0 for t, p in zip(tensors, parts)],
        dtype=torch.int64,
    )
    return [int(c) for c in collective.sum(counts)]
