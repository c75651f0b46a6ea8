"""`bench_loader` on the synthetic set: every row measured, the local paths' first batch timed."""
from pipeline import bench


def test_loader_table_has_the_first_batch_of_the_local_paths(shards, monkeypatch):
    monkeypatch.setattr(bench, "FAST_PASS", 1000)  # a few epochs of the 240-sample set, not 100,000 images
    rows = bench.bench_loader(shards, None, batch_size=64, workers=0, passes=1, pass_images=240, variants=("gray28",),
                              include_baseline=False, log=lambda m: None)
    first = {r["loader"]: r.get("first_batch_s") for r in rows}
    assert list(first) == ["tinyin stream (webdataset)", "tinyin fast (mmap gather)", "tinyin resident",
                           "ceiling: numpy memmap gather"]
    assert first["tinyin fast (mmap gather)"] > 0 and first["tinyin resident"] > 0
    assert first["tinyin stream (webdataset)"] is None and all(r["images_per_s"] > 0 for r in rows)
    assert all(r["data_pass_s"] >= r["first_batch_s"] for r in rows if r.get("first_batch_s"))
    table = bench.format_table(rows, "test", 64).splitlines()
    assert table[2].endswith("| pass | first batch (data pass done) |")
    assert table[4].endswith("| — |") and table[5].endswith(" s) |") and table[7].endswith("| — |")
