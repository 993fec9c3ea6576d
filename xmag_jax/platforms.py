"""Which JAX platforms this host has, decided before JAX starts a backend: no libtpu noise off TPU VMs.

    platforms.configure()   # first thing in every command line (errors.run_cli and train's main call it)

`libtpu` is installed everywhere (the `aot` command compiles for TPU slices on any host), so without
`JAX_PLATFORMS` JAX tries the TPU backend on every host; off a TPU VM libtpu prints about ten lines of
start-up errors (no accelerator type, no worker hostnames, the GCE metadata server) before JAX falls back,
and it takes `/tmp/libtpu_lockfile`, which makes a second TPU-initialising process on the host fail.

`configure()` leaves everything as it is when the user set `JAX_PLATFORMS` (even to "") or when the host
has TPU chips (PCI vendor 0x1ae0, `/dev/accel*`, `/dev/vfio/<n>`): a TPU VM behaves as before. Otherwise
it sets `JAX_PLATFORMS` to `cuda,cpu` (an NVIDIA device node and the jax CUDA plugin installed) or `cpu`,
and `TPU_SKIP_MDS_QUERY=1`. The compile-only TPU devices of `xmag_jax.topologies.compile_devices` still
work (they then also skip libtpu's lock file, so `aot` runs beside a training job).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

GOOGLE_PCI_VENDOR = "0x1ae0"
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")
_CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def has_tpu_chips(root: str = "/") -> bool:
    """Whether TPU chips are attached: a Google PCI device, `/dev/accel*` (v2-v4) or `/dev/vfio/<n>` (v5+)."""
    for vendor in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    vfio = [p for p in glob.glob(os.path.join(root, "dev/vfio/*")) if os.path.basename(p).isdigit()]
    return bool(glob.glob(os.path.join(root, "dev/accel*")) or vfio)


def host_platforms(root: str = "/") -> str | None:
    """The `JAX_PLATFORMS` value for this host, or None on a TPU host (JAX's own choice is right there)."""
    if has_tpu_chips(root):
        return None
    nvidia = any(os.path.exists(os.path.join(root, d.lstrip("/"))) for d in _NVIDIA_DEVICES)
    if nvidia and any(importlib.util.find_spec(p) is not None for p in _CUDA_PLUGINS):
        return "cuda,cpu"
    return "cpu"


def configure() -> str | None:
    """Sets `JAX_PLATFORMS` for this host unless the user did; returns the platforms now in force (None: JAX's
    default). Call before the first JAX computation; if JAX is already imported its config is updated too."""
    if "JAX_PLATFORMS" in os.environ:
        return os.environ["JAX_PLATFORMS"]
    platforms = host_platforms()
    if platforms is None:
        return None
    os.environ["JAX_PLATFORMS"] = platforms  # also for subprocesses (Grain workers)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    if "jax" in sys.modules:  # its config read the environment at import
        sys.modules["jax"].config.update("jax_platforms", platforms)
    return platforms
