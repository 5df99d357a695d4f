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
