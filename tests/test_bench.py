"""`bench_remote`: the loopback-HTTP rows come after the local ones, with curl's rate as their ceiling."""
import shutil

from pipeline.bench import bench_remote, format_table


def test_remote_rows_fetch_the_train_split_and_name_their_ceiling(shards):
    rows = bench_remote(shards, batch_size=32, workers=0, passes=1, log=lambda m: None)
    names = [r["loader"] for r in rows]
    fetch = rows[names.index("remote fetch (cold cache -> verified copy)")]
    assert names[-1] == "remote stream (make_loader(URL, path=stream))" and fetch["images_per_s"] > 0
    if shutil.which("curl"):
        assert names[0] == "ceiling: curl, loopback HTTP (1 connection)" and rows[0]["of_ceiling"] == 1.0
        assert fetch["of_ceiling"] == fetch["images_per_s"] / rows[0]["images_per_s"]
    assert "| remote fetch (cold cache -> verified copy) |" in format_table(rows, "cmd", 32)
