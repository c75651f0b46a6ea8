#!/usr/bin/env python
"""Training-step images/s per network and feed: the same as `tinyin bench train` (see its --help).

    python tools/bench_train.py --shards out/shards --images out/release --arch lenet5,resnet18 --size 28,64
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.argv = ["tinyin", "bench", "train", *sys.argv[1:]]  # the table's header echoes sys.argv[3:]
    main(sys.argv[1:], prog_name="tools/bench_train.py")
