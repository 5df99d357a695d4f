"""Training-step time with masks in force: plain training vs MagnitudePruning vs MovementPruning vs Lightning's
ModelPruning.

A 5.3M-parameter MLP (512-2048-2048-10), batch 128, SGD with momentum, CPU. Each run trains 2 epochs; the
pruning callbacks reach 90% sparsity before epoch 1 (ModelPruning prunes at the end of epoch 0; MovementPruning
at the start of epoch 1, from the scores of epoch 0, and it goes on accumulating them at every step), and only
epoch 1's batches are timed (on_train_batch_start to on_train_batch_end: forward, backward, optimizer step
and the masks' re-application). Configurations alternate round by round; medians over all rounds.

    python benchmarks/step_overhead.py [--rounds 5] [--batches 30]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import MagnitudePruning, MovementPruning

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


class MLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class BatchTimer(Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, *args):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if trainer.current_epoch == 1:
            self.times.append(time.perf_counter() - self._start)


def configs():
    return {
        "plain": lambda: [],
        "MagnitudePruning": lambda: [MagnitudePruning(amount=0.9, schedule="constant")],
        "MovementPruning": lambda: [MovementPruning(amount=0.9, schedule="constant", start=1)],
        "ModelPruning": lambda: [
            ModelPruning(
                "l1_unstructured", amount=0.9, use_global_unstructured=True, verbose=0, make_pruning_permanent=True
            )
        ],
    }


def run(callbacks, data) -> list[float]:
    torch.manual_seed(0)
    timer = BatchTimer()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        callbacks=[*callbacks, timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(MLP(), DataLoader(data, batch_size=128))
    return timer.times


def isolated_mask_cost(steps: int) -> tuple[float, float, float]:
    """Median plain training step, median mask re-application (the post-step hook's work) and median movement
    accumulation (MovementScore.before_step: one fused pass S -= g * w), interleaved."""
    from lightning_compress import Pruner
    from lightning_compress.pruning import masks as engine
    from lightning_compress.pruning import scores
    from lightning_compress.pruning.movement import MovementScore

    torch.manual_seed(0)
    model = MLP()
    optimizer = model.configure_optimizers()
    x, y = torch.randn(128, 512), torch.randint(0, 10, (128,))
    weights = [model.net[i].weight for i in (0, 2, 4)]
    masks = scores.prune_by_magnitude(weights, 0.9, "global")
    pruner = Pruner({f"net.{i}.weight": model.net[i].weight for i in (0, 2, 4)}, MovementScore())
    step_times, apply_times, score_times = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model.net(x), y).backward()
        optimizer.step()
        middle = time.perf_counter()
        engine.apply_masks(weights, masks)
        end = time.perf_counter()
        pruner.score.before_step(pruner, [0, 1, 2])
        scored = time.perf_counter()
        step_times.append(middle - start)
        apply_times.append(end - middle)
        score_times.append(scored - end)
    return statistics.median(step_times), statistics.median(apply_times), statistics.median(score_times)


def application_variants() -> dict[str, float]:
    """Milliseconds to apply the 3 masks (5.3M weights, 90% pruned) in place, per way of applying them."""
    import torch.utils.benchmark as benchmark

    from lightning_compress.pruning import masks as engine
    from lightning_compress.pruning import scores

    torch.manual_seed(0)
    weights = [torch.randn(2048, 512), torch.randn(2048, 2048), torch.randn(10, 2048)]
    byte_masks = scores.prune_by_magnitude(weights, 0.9, "global")
    keep = [m != 0 for m in byte_masks]
    int_masks = [k.to(torch.int32).neg_() for k in keep]
    float_masks = [k.float() for k in keep]

    def whole_tensor_widening():
        for w, m in zip(weights, byte_masks):
            w.view(torch.int32).bitwise_and_(m.to(torch.int32))

    variants = {
        "int8 mask, widened per 2^20 and ANDed (chosen, 1 B)": lambda: engine.apply_masks(weights, byte_masks),
        "int8 mask, widened whole tensor (1 B)": whole_tensor_widening,
        "w.view(int32).bitwise_and_(int32 mask) (4 B)": lambda: [
            w.view(torch.int32).bitwise_and_(m) for w, m in zip(weights, int_masks)
        ],
        "w.mul_(float_mask) (4 B)": lambda: [w.mul_(m) for w, m in zip(weights, float_masks)],
        "w.mul_(bool_mask) (type promotion, 1 B)": lambda: [w.mul_(k) for w, k in zip(weights, keep)],
        "w.masked_fill_(~keep, 0) (1 B)": lambda: [w.masked_fill_(~k, 0) for w, k in zip(weights, keep)],
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(5):  # interleaved rounds, order reversed every other round
        for name in list(variants) if r % 2 == 0 else reversed(list(variants)):
            timer = benchmark.Timer("f()", globals={"f": variants[name]}, num_threads=torch.get_num_threads())
            results[name].append(timer.blocked_autorange(min_run_time=0.2).median * 1e3)
    return {name: statistics.median(times) for name, times in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.batches * 128
    data = TensorDataset(torch.randn(n, 512), torch.randint(0, 10, (n,)))
    times: dict[str, list[float]] = {name: [] for name in configs()}
    for _ in range(args.rounds):
        for name, make in configs().items():
            times[name].extend(run(make(), data))
    plain = statistics.median(times["plain"])
    print(f"step time, median of {len(times['plain'])} steps per configuration ({torch.get_num_threads()} threads)")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:18s} {median * 1e3:7.2f} ms   {median / plain:.3f}x plain")
    step, apply, score = isolated_mask_cost(200)
    print(f"isolated, 200 interleaved steps: plain step {step * 1e3:.2f} ms, mask re-application {apply * 1e3:.2f} ms")
    print(f"  -> (step + masks) / step = {(step + apply) / step:.3f}x")
    print(f"  movement accumulation {score * 1e3:.2f} ms ({score * 1e9 / 5_263_360:.2f} ns per weight)")
    print(f"  -> (step + masks + movement) / step = {(step + apply + score) / step:.3f}x")
    print("applying the masks in place, median of 5 interleaved rounds:")
    for name, ms in application_variants().items():
        print(f"  {name:54s} {ms:6.3f} ms")


if __name__ == "__main__":
    main()
