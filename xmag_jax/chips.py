"""Peak dense bf16 FLOP/s of the accelerator a job runs on, by JAX's `device.device_kind` (for MFU).

TPU numbers are the chips of `xmag_jax.topologies` (Cloud TPU system-architecture pages); GPU numbers are
NVIDIA's dense (no sparsity) bf16 tensor-core peaks from the A100, H100 and H200 datasheets. A CPU, or a
device this table does not know, has no peak: MFU is then reported as not applicable rather than as a
fraction of a made-up number (a config may still give `peak_tflops_per_device` as an override).
"""

from __future__ import annotations

from xmag_jax import topologies

# (substring of the lower-cased device_kind, peak FLOP/s per device); the first match wins, so longer,
# more specific names come before their prefixes.
_PEAKS: tuple[tuple[str, float], ...] = (
    ("tpu v6", topologies.CHIPS["v6e"].peak_bf16_flops),  # "TPU v6 lite", "TPU v6e"
    ("tpu v5 lite", topologies.CHIPS["v5e"].peak_bf16_flops),  # v5e
    ("tpu v5e", topologies.CHIPS["v5e"].peak_bf16_flops),
    ("tpu v5", topologies.CHIPS["v5p"].peak_bf16_flops),  # v5p reports "TPU v5" / "TPU v5p"
    ("tpu v4", topologies.CHIPS["v4"].peak_bf16_flops),  # one megacore device per chip
    ("h200", 989.4e12),
    ("h100 pcie", 756.5e12),
    ("h100", 989.4e12),  # SXM
    ("a100", 312e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 FLOP/s of one device of kind `device_kind`, or None when not known (CPU included)."""
    kind = device_kind.lower()
    return next((peak for key, peak in _PEAKS if key in kind), None)


def peak_flops_per_device(devices, override_tflops: float | None = None) -> float | None:
    """The peak for `devices` (all of one kind): `override_tflops` (TFLOP/s) when given, else the table's."""
    if override_tflops is not None:
        return float(override_tflops) * 1e12
    kinds = {d.device_kind for d in devices}
    if len(kinds) != 1:
        return None
    return peak_flops(kinds.pop())
