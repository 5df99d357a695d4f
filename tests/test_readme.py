"""Every code block in the README runs: Python blocks are executed in order in one namespace, in a temporary
folder; shell blocks may only name make targets, which are checked with a dry run (running `make test` from the
test suite would recurse), and `pip install` lines, which must name the torch the Makefile pins and extras that
pyproject.toml defines."""

import os
import re
import subprocess
from pathlib import Path

import pytest

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
    assert namespace["quantization"].results["quantization/sparsity_before"] == pytest.approx(0.8, abs=1e-3)


def _shell_lines():
    return [line.strip() for code in _blocks("bash") for line in code.splitlines() if line.strip()]


def test_shell_blocks_are_make_targets_that_exist():
    commands = [line for line in _shell_lines() if line.startswith("make ")]
    assert commands == ["make demo", "make test"]
    for command in commands:
        target = command.split()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
        result = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        assert "pytest" in result.stdout or "digits_mlp.py" in result.stdout


def test_install_lines_name_the_pinned_torch_and_extras_that_exist():
    """Every other shell line is a `pip install`: of the torch the Makefile pins (from PyTorch's CPU index), or of
    this checkout with extras that pyproject.toml defines."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    torch_spec = re.search(r"^TORCH_SPEC := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    installs = [line for line in _shell_lines() if not line.startswith("make ")]
    assert installs, "the README gives no install command"
    named_extras = set()
    for line in installs:
        words = line.split()
        assert words[:2] == ["pip", "install"], line
        if words[2] == torch_spec:
            assert words[3:] in ([], ["--index-url", "https://download.pytorch.org/whl/cpu"]), line
            continue
        assert len(words) == 4 and words[2] == "-e", line
        match = re.fullmatch(r'"?\.(?:\[([\w,-]+)\])?"?', words[3])
        assert match, line
        named = set(match.group(1).split(",")) if match.group(1) else set()
        assert named <= extras, f"{line}: no extra {sorted(named - extras)} in pyproject.toml"
        named_extras |= named
    assert {"shrink", "plot", "cli"} <= named_extras
    assert any(line.split()[2] == torch_spec for line in installs)
