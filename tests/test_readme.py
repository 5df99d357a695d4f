"""Every code block in the README runs: Python blocks are executed in order in one namespace, in a temporary
folder; shell blocks may only name make targets, which are checked with a dry run (running `make test` from the
test suite would recurse)."""

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def _blocks(language):
    return [code for lang, code in BLOCK.findall((ROOT / "README.md").read_text()) if lang == language]


def test_python_blocks_run(tmp_path, monkeypatch):
    blocks = _blocks("python")
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "digits_int8.ts").exists()
    assert namespace["quantization"].results["quantization/sparsity_before"] == __import__("pytest").approx(
        0.8, abs=1e-3
    )


def test_shell_blocks_are_make_targets_that_exist():
    commands = [line for code in _blocks("bash") for line in code.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    for command in commands:
        target = command.split()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
        result = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        assert "pytest" in result.stdout or "digits_mlp.py" in result.stdout
