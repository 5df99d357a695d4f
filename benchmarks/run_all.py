"""Run every benchmark in turn (`make bench`); each prints its own table. Several minutes on 2 cores."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SCRIPTS = (
    "step_overhead.py",
    "mask_update.py",
    "sharded.py",
    "quantization.py",
    "compression.py",
    "rehearsal.py",
    "shrink.py",
    "onnx_runtime.py",
    "static_quantization.py",
)
for script in SCRIPTS:
    print(f"\n$ python benchmarks/{script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True)
