"""LightningCLI entry point: the callbacks come from the YAML config, by class_path/init_args.

python examples/cli/main.py fit --config examples/cli/config.yaml
"""

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from digits import DigitsDataModule, DigitsMLP  # noqa: E402


def main() -> None:
    LightningCLI(DigitsMLP, DigitsDataModule, seed_everything_default=0)


if __name__ == "__main__":
    main()
