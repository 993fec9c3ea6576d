"""The prep benchmark runs end to end and prints its numbers (no timing asserted here)."""
import re

from data_prep import bench


def test_prep_benchmark_reports_throughput_and_overhead(capsys):
    assert bench.main(["--size", "4096"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"tile_pairs .*: [\d.]+ pairs/s per core", out)
    assert re.search(r"bare read_region \+ JPEG encode of the same fields: [\d.]+ pairs/s per core", out)
    ratio = float(re.search(r"overhead ratio tile_pairs / bare = ([\d.]+)x", out).group(1))
    assert ratio > 0
