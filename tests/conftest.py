import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.fixture
def quiet_trainer_kwargs(tmp_path):
    """Trainer settings for fast, silent CPU tests; each test adds what it checks."""
    return dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


@pytest.fixture
def run_in_fresh_process(tmp_path):
    """``run(loader, artifact, x)``: outputs of ``lightning_compress.<loader>(artifact)(x)`` computed in a new Python
    process that imports neither Lightning nor the examples' model code (asserted there)."""
    import subprocess

    import torch

    def run(loader, artifact, x):
        torch.save(x, tmp_path / "x.pt")
        code = (
            "import sys, torch\n"
            f"from lightning_compress import {loader}\n"
            f"y = {loader}({str(artifact)!r})(torch.load({str(tmp_path / 'x.pt')!r}))\n"
            f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n"
            "assert 'digits' not in sys.modules and 'lightning' not in sys.modules, 'imported training code'\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        return torch.load(tmp_path / "y.pt")

    return run
