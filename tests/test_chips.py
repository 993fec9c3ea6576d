"""MFU's peak comes from the device kind; CPUs and unknown devices have none."""

import jax
import pytest

from xmag_jax import chips


@pytest.mark.parametrize("kind,tflops", [
    ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5", 459), ("TPU v5p", 459), ("TPU v6 lite", 918),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H200", 989.4)])
def test_known_kinds(kind, tflops):
    assert chips.peak_flops(kind) == pytest.approx(tflops * 1e12)


def test_cpu_has_no_peak_unless_overridden():
    assert chips.peak_flops_per_device(jax.devices()) is None
    assert chips.peak_flops_per_device(jax.devices(), override_tflops=2.0) == 2e12
