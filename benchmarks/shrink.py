"""What removing zeroed channels buys: the dense (masked) model against its shrunk copy, side by side.

* MLP 512-2048-2048-10, batch 64: half the rows of the two hidden layers zeroed (smallest L2 norm, as
  ``MagnitudePruning(method="ln_structured")`` chooses them), biases kept, so shrinking folds their constants.
* ResNet-style CNN (stem + 2 residual blocks with BatchNorm, 64 channels, 32x32 inputs), batch 16: half the
  channels of every coupled group zeroed by the grouped update ``MagnitudePruning(structure="groups")`` uses
  (smallest L2 over filters, biases and BatchNorm scale/shift of the whole group).

Latency: ``lightning_compress.quantization.figures.interleaved_latency`` (both models on the same batches, order
reversed every round), one thread and two; median of the round medians. Outputs are checked equal first.

    python benchmarks/shrink.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_shrink import ResNetish  # noqa: E402

from lightning_compress import shrink  # noqa: E402
from lightning_compress.inputs import ModelInput  # noqa: E402
from lightning_compress.pruning import masks as engine  # noqa: E402
from lightning_compress.pruning import scores
from lightning_compress.pruning.groups import channel_groups  # noqa: E402
from lightning_compress.quantization.figures import interleaved_latency  # noqa: E402

warnings.filterwarnings("ignore")


def pruned_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
    weights = [model[0].weight, model[2].weight]
    masks = [engine.new_mask(w) for w in weights]
    scores.update_structured(weights, masks, 0.5, norm=2, dim=0)
    engine.apply_masks(weights, masks)
    return model.eval()


def pruned_cnn() -> nn.Module:
    """Half the channels of every coupled group, as MagnitudePruning(structure="groups") chooses them."""
    torch.manual_seed(0)
    net = ResNetish(c=64).eval()
    groups = channel_groups(net, torch.randn(2, 3, 32, 32))
    params = dict(net.named_parameters())
    names = sorted({name for g in groups for name in g.slices})
    masks = {name: engine.new_mask(params[name]) for name in names}
    scores.update_grouped(params, masks, groups, 0.5, norm=2)
    engine.apply_masks([params[n] for n in names], [masks[n] for n in names])
    return net


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    print("| model | parameters, dense -> shrunk | threads | dense ms | shrunk ms | speedup |")
    print("| --- | --- | --- | --- | --- | --- |")
    cases = {
        "MLP 512-2048-2048-10, batch 64": (pruned_mlp(), lambda: torch.randn(64, 512)),
        "ResNet-style CNN, 64 channels, batch 16": (pruned_cnn(), lambda: torch.randn(16, 3, 32, 32)),
    }
    for name, (model, make_input) in cases.items():
        inputs = [ModelInput.from_example(make_input()) for _ in range(8)]
        shrunk = shrink(model, inputs[0])
        with torch.inference_mode():
            assert all(torch.allclose(x(shrunk), x(model), atol=1e-4) for x in inputs), name
        for threads in (1, 2):
            torch.set_num_threads(threads)
            dense, small = interleaved_latency([model, shrunk], inputs, rounds=7)
            print(
                f"| {name} | {params(model):,} -> {params(shrunk):,} | {threads} | {dense.median_ms:.3f} | "
                f"{small.median_ms:.3f} | {dense.median_ms / small.median_ms:.2f}x |"
            )


if __name__ == "__main__":
    main()
