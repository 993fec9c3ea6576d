"""Test set-up, before JAX is imported: 8 fake CPU devices for sharding tests, and one persistent compilation
cache for the whole session (this process, pytest-xdist workers and the commands the tests start).

JAX compiles a computation again for every new jitted function object, even when its HLO is the same (each
test builds its own trainer); with the cache those compiles are read back from disk instead (~0.3 s against
~4 s for a small step). The cache is keyed by the HLO, compile options, devices and XLA_FLAGS, so a test that
changes any of them compiles anew. It lives in a temporary folder removed when the session ends.
"""
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # a cache the caller chose is left alone
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="xmag-jax-test-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
    if _OWN_CACHE:  # xdist workers inherit the variable: only the process that made the folder removes it
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
