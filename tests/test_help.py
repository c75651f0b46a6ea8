"""Every script's --help prints and exits 0: argparse formats help strings with %, so a stray one
(a "5%" in a help text) turns --help into a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, flag", [("train.py", "--time-budget MINUTES"), ("tools/reproduce.py", "--jobs"),
                                          ("tools/speedrun.py", "--ablate"), ("tools/gpu_session.py", "--deadline")])
def test_help_prints(script, flag):
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr[-2000:]
    assert flag in result.stdout
