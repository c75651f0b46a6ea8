#!/usr/bin/env python
"""Training-step images/s per network and feed: the same as `tinyin bench train` (see its --help).

    python tools/bench_train.py --shards data/shards --images data/tiny-imagenet-200 --arch lenet5,resnet18 --size 28,64
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.cli import bench_train_cmd, run_alone  # noqa: E402

if __name__ == "__main__":
    sys.argv = ["tinyin", "bench", "train", *sys.argv[1:]]  # the table's header echoes sys.argv[3:]
    run_alone(bench_train_cmd, "tools/bench_train.py", sys.argv[3:])
