"""One global L1 mask update on a 50M-parameter model: lightning_compress vs Lightning's ModelPruning.

Each measurement runs in a fresh process (alternating methods), which reports the wall time of the update and
its peak memory overhead (peak RSS during the update minus RSS before it). Usage:

    python benchmarks/mask_update.py [--repeats 3] [--layers 12] [--width 2048]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _model(layers: int, width: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(method: str, layers: int, width: int, amount: float) -> dict:

    model = _model(layers, width)
    if method == "lightning_compress":
        from lightning_compress.pruning import masks as engine
        from lightning_compress.pruning import scores

        weights = [m.weight for m in model]
        masks = [engine.new_mask(w) for w in weights]  # the callback's working masks
        before = _rss_mb()
        start = time.perf_counter()
        engine.update_unstructured(weights, masks, amount, scores.l1_scores(weights), "global")
        engine.apply_masks(weights, masks)
        seconds = time.perf_counter() - start
        zeros = sum(int((w == 0).sum()) for w in weights)
    else:
        import lightning.pytorch as pl
        from lightning.pytorch.callbacks import ModelPruning

        class Wrapper(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = model

        module = Wrapper()
        pruning = ModelPruning("l1_unstructured", amount=amount, use_global_unstructured=True, verbose=0)
        pruning.setup(None, module, "fit")
        before = _rss_mb()
        start = time.perf_counter()
        pruning.apply_pruning(amount)
        seconds = time.perf_counter() - start
        zeros = sum(int((m.weight == 0).sum()) for m in model)
    return {
        "method": method,
        "seconds": seconds,
        "peak_overhead_mb": _peak_mb() - before,
        "sparsity": zeros / (layers * width * width),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--amount", type=float, default=0.5)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.layers, args.width, args.amount)))
        return
    results: dict[str, list[dict]] = {"lightning_compress": [], "ModelPruning": []}
    for _ in range(args.repeats):
        for method in results:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                method,
                "--layers",
                str(args.layers),
                "--width",
                str(args.width),
            ]
            cmd += ["--amount", str(args.amount)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[method].append(json.loads(out))
    n = args.layers * args.width * args.width
    print(
        f"global L1 update to {args.amount:.0%} on {n / 1e6:.1f}M parameters, medians of {args.repeats} processes each"
    )
    med = {
        m: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_overhead_mb")}
        for m, rs in results.items()
    }
    for method, values in med.items():
        sparsity = results[method][0]["sparsity"]
        print(
            f"  {method:20s} {values['seconds']:.3f} s   peak +{values['peak_overhead_mb']:.0f} MB"
            f"   sparsity {sparsity:.4f}"
        )
    ours, theirs = med["lightning_compress"], med["ModelPruning"]
    print(
        f"  ratio: {theirs['seconds'] / ours['seconds']:.1f}x faster, "
        f"{theirs['peak_overhead_mb'] / max(ours['peak_overhead_mb'], 1):.1f}x less peak memory overhead"
    )


if __name__ == "__main__":
    main()
