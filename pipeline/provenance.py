"""What produced a number: the checkout's commit, for benchmark headers and env.json (no torch here)."""
import contextlib
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit():
    """The checkout's commit (+"-dirty" with uncommitted changes), or $TINYIN_COMMIT where there is no git."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    return os.environ.get("TINYIN_COMMIT", "unknown")
