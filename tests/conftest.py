import sys
import warnings

import pytest

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
    """``run(loader, artifact, x)``: outputs of ``lightning_compress.<loader>(artifact)`` called on ``x`` in a new
    Python process that imports neither Lightning nor the tests' model code (asserted there). ``x`` is a tensor,
    a tuple of positional inputs or a dict of keyword inputs, as a LightningModule's ``example_input_array``."""
    import subprocess

    import torch

    def run(loader, artifact, x):
        args, kwargs = (
            ((), x) if isinstance(x, dict) else (tuple(x), {}) if isinstance(x, (tuple, list)) else ((x,), {})
        )
        torch.save({"args": args, "kwargs": kwargs}, tmp_path / "x.pt")
        code = (
            "import sys, torch\n"
            f"from lightning_compress import {loader}\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            f"y = {loader}({str(artifact)!r})(*x['args'], **x['kwargs'])\n"
            f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n"
            "training = ('digits', 'helpers', 'lightning', 'transformers')\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] in training]\n"
            "assert not loaded, f'imported training code: {loaded}'\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        return torch.load(tmp_path / "y.pt")

    return run
