"""JSONL/TensorBoard writer, resume truncation, throughput/MFU arithmetic, the NaN check."""

import json
import math

import numpy as np
import pytest

from xmag_jax.distill import metrics


def test_jsonl_and_tensorboard(tmp_path):
    writer = metrics.MetricWriter(tmp_path)
    writer.write(1, {"loss": 2.0, "lr": 1e-4}, record_index=np.array([3, 1, 2]), log_point=True)
    writer.write(2, {"loss": 1.5, "lr": 2e-4})
    writer.close()
    lines = metrics.read_metrics(tmp_path)
    assert lines == [{"step": 1, "loss": 2.0, "lr": 1e-4, "record_index": [3, 1, 2]},
                     {"step": 2, "loss": 1.5, "lr": 2e-4}]
    events = list((tmp_path / metrics.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_resume_drops_steps_after_the_checkpoint_and_cut_lines(tmp_path):
    writer = metrics.MetricWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with (tmp_path / metrics.METRICS_FILE).open("a") as f:
        f.write('{"step": 6, "lo')  # a line cut by kill -9
    writer = metrics.MetricWriter(tmp_path, tensorboard=False)
    writer.resume_at(3)
    writer.write(4, {"loss": 40.0})
    writer.close()
    assert [(m["step"], m["loss"]) for m in metrics.read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_object_store_layout_only_adds_parts_and_resumes(tmp_path):
    """gs:// cannot append: each log point writes a new part with its own lines; nothing is ever rewritten."""
    writer = metrics.MetricWriter(tmp_path, tensorboard=False)
    writer._remote = True  # the object-store path, on a local directory
    parts = tmp_path / metrics.METRICS_PARTS_DIR
    seen = {}
    for step in range(1, 10):
        writer.write(step, {"loss": float(step)}, log_point=step % 3 == 0)
        for part in parts.glob("*.jsonl"):
            assert seen.setdefault(part.name, part.read_text()) == part.read_text()  # never rewritten
    writer.write(10, {"loss": 10.0})
    writer.close()
    assert sorted(p.name for p in parts.glob("*.jsonl")) == [
        "0000000001-0000000003.jsonl", "0000000004-0000000006.jsonl", "0000000007-0000000009.jsonl",
        "0000000010-0000000010.jsonl"]
    assert not (tmp_path / metrics.METRICS_FILE).exists()
    assert [m["step"] for m in metrics.read_metrics(tmp_path)] == list(range(1, 11))
    writer = metrics.MetricWriter(tmp_path, tensorboard=False)
    writer._remote = True
    writer.resume_at(5)  # a checkpoint at step 5: parts after it go, the straddling one is cut
    writer.write(6, {"loss": 60.0}, log_point=True)
    writer.close()
    assert [(m["step"], m["loss"]) for m in metrics.read_metrics(tmp_path)] == [
        (s, float(s)) for s in range(1, 6)] + [(6, 60.0)]


def test_throughput_and_mfu():
    meter = metrics.Throughput(batch_size=64, flops_per_step=4e12, peak_flops_per_device=2e12, device_count=4)
    rates = meter.rates(0.5)
    assert rates["pairs_per_s"] == 128.0
    assert rates["model_tflops_per_s"] == 8.0
    assert rates["mfu"] == 1.0
    assert meter.tick() == {}
    assert set(meter.tick()) == {"step_time_s", "pairs_per_s", "model_tflops_per_s", "mfu"}
    two_views = metrics.Throughput(batch_size=64, flops_per_step=8e12, peak_flops_per_device=2e12, device_count=4,
                                   views=2).rates(1.0)
    assert two_views["pairs_per_s"] == 64.0 and two_views["views_per_s"] == 128.0 and two_views["mfu"] == 1.0
    on_cpu = metrics.Throughput(batch_size=64, flops_per_step=4e12, peak_flops_per_device=None, device_count=1)
    assert "mfu" not in on_cpu.rates(0.5)  # no peak known: no MFU rather than a made-up one


def test_non_finite_metrics_name_the_step():
    metrics.check_finite(3, {"loss": 1.0, "grad_norm": 0.5})
    with pytest.raises(metrics.NonFiniteLossError, match=r"at step 12: grad_norm=inf, loss=nan"):
        metrics.check_finite(12, {"loss": math.nan, "grad_norm": math.inf, "lr": 1.0})


def test_progress_line():
    line = metrics.progress_line(5, 40, {"loss": 0.123456, "pairs_per_s": 10.0, "mfu": 0.25})
    assert line == "step 5/40 | loss 0.1235 | 10.0 pairs/s | MFU 25.0%"
    json.dumps(line)


def test_object_store_mode_rewrites_at_log_points(tmp_path):
    """gs:// cannot append: lines are kept and the file is replaced at log points and on close."""
    writer = metrics.MetricWriter(tmp_path, tensorboard=False)
    writer._remote = True  # what a gs:// workdir sets; the local directory stands in for the bucket
    writer.write(1, {"loss": 1.0})
    assert not (tmp_path / metrics.METRICS_FILE).exists()
    writer.write(2, {"loss": 2.0}, log_point=True)
    assert [m["step"] for m in metrics.read_metrics(tmp_path)] == [1, 2]
    writer.write(3, {"loss": 3.0})
    writer.close()
    resumed = metrics.MetricWriter(tmp_path, tensorboard=False)
    resumed._remote = True
    resumed.resume_at(2)
    resumed.write(3, {"loss": 30.0})
    resumed.close()
    assert [(m["step"], m["loss"]) for m in metrics.read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
