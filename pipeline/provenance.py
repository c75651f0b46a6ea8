"""What produced a number: commit, machine and versions, for env.json files and benchmark headers.

One record for training runs (`train.py`) and benchmarks (`tinyin bench train`, `tools/`), so every
figure names the same facts. torch is imported only by `environment`: `commit` serves the shard
build's benchmark, which needs no torch.
"""
import contextlib
import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)  # a process runs one checkout: ask git once
def commit():
    """The checkout's commit (+"-dirty" with uncommitted changes), or $TINYIN_COMMIT where there is no git
    checkout of tinyin (a copy without .git; an installed copy)."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        top, head = subprocess.run(["git", "rev-parse", "--show-toplevel", "--short=12", "HEAD"], cwd=ROOT,
                                   capture_output=True, text=True, check=True).stdout.splitlines()
        # Only tinyin's own checkout: a copy installed into a venv inside the user's project is in that
        # project's work tree, and its commit would be named as the one behind the figures.
        if Path(top).resolve() == ROOT:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, check=True).stdout.strip()
            return head + ("-dirty" if dirty else "")
    return os.environ.get("TINYIN_COMMIT", "unknown")


def cpu_name():
    """The CPU model (Linux names it in /proc/cpuinfo; platform.processor() is often just "x86_64")."""
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return platform.processor() or platform.machine()


def environment(device):
    """Commit, host, CPU, accelerator and versions behind a figure measured on torch.device `device`."""
    import torch

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return dict(commit=commit(), host=platform.node(), cores=os.cpu_count(), cpu=cpu_name(), device=str(device),
                gpu=gpu, python=platform.python_version(), torch=torch.__version__,
                torchvision=importlib.metadata.version("torchvision"),  # no import: see models/torchvision_zoo.py
                cuda=torch.version.cuda if gpu else None)
