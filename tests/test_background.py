"""Threads that are busy when the process exits (`pipeline.background`): each finishes the piece of
work in hand, and no other, before the interpreter's teardown. Left to the teardown, a thread inside
torch aborts the process ("terminate called without an active exception": exit -6, not the run's
own code)."""
import subprocess
import sys
from pathlib import Path


def exit_mid_work(tmp_path, code):
    """Run `code`, which writes what its thread does to the file `LOG`, then "exit" and a one-line
    error; return the lines logged before and after the exit."""
    log = tmp_path / "log"
    result = subprocess.run([sys.executable, "-c", f"LOG = {str(log)!r}\n" + code], capture_output=True,
                            text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert (result.returncode, result.stderr) == (1, "error: a mistake\n")
    before, after = log.read_text().split("exit\n")
    return before.splitlines(), after.splitlines()


def test_a_data_pass_running_at_exit_finishes_its_shard_and_stops(tmp_path):
    before, after = exit_mid_work(tmp_path, """
import sys, threading, time
from pipeline.storage import DataPass

busy = threading.Event()

class Arrays:  # 20 shards of 0.1 s each; the third takes 1 s and the process exits during it
    entries = [None] * 20
    def touch_shard(self, s):
        if s == 2:
            busy.set()
        time.sleep(1.0 if s == 2 else 0.1)

DataPass(Arrays(), checksum=False, after=lambda s: open(LOG, "a").write(f"{s}\\n"))
busy.wait()
open(LOG, "a").write("exit\\n")
sys.exit("error: a mistake")
""")
    assert (before, after) == (["0", "1"], ["2"])  # the shard in hand, no other


def test_a_ring_running_at_exit_finishes_its_batch_and_stops(tmp_path):
    """1 of 30 runs stopped mid-epoch on the real shards (fast path, prefetch 4) aborted so before."""
    before, after = exit_mid_work(tmp_path, """
import sys, threading, time
from pipeline.ring import prefetch_ring

busy = threading.Event()

def fill(idx, out):  # 0.1 s a batch; the third takes 1 s and the process exits during it
    open(LOG, "a").write(f"start {idx[0]}\\n")
    if idx[0] == 2:
        busy.set()
    time.sleep(1.0 if idx[0] == 2 else 0.1)
    open(LOG, "a").write(f"end {idx[0]}\\n")

ring = prefetch_ring(([i] for i in range(20)), fill, (1,), 1, 4, "cpu")
next(ring)
busy.wait()
open(LOG, "a").write("exit\\n")
sys.exit("error: a mistake")
""")
    assert before == ["start 0", "end 0", "start 1", "end 1", "start 2"]
    assert after == ["end 2"]  # the batch in hand, no other
