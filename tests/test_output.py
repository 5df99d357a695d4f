"""What users see in their terminal or log file: no progress bar of ours, and the summary below the last epoch's
bar (issue 18, item 7). Run in a subprocess whose stdout and stderr go to one pipe, as a terminal shows them."""

import os
import subprocess
import sys


def test_no_inner_progress_bars_and_the_summary_comes_after_the_last_epoch_bar():
    here = os.path.dirname(__file__)
    result = subprocess.run(
        [sys.executable, os.path.join(here, "progress_script.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=here,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    runs = result.stdout.split("=== ")[1:]
    assert [run.split("\n")[0] for run in runs] == ["TQDMProgressBar", "RichProgressBar"]
    for output in runs:
        assert "Validation" not in output  # the trainer never validates: a validation bar would be ours
        summary = output.index("lightning_compress summary")
        assert output.rindex("Epoch 1") < summary
        # the summary starts on a line of its own, after the bar's last line ended
        assert output[summary - 1] == "\n"
        assert "Epoch" not in output[summary:]
