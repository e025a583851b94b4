"""Test set-up, before anything imports jax: 8 fake CPU devices for the sharding tests, programs
compiled without most optimisations, and one persistent compilation cache for the session.

The suite's programs are tiny: compiling them takes seconds, running them milliseconds, so most of
the suite's time is XLA compiling. JAX_DISABLE_MOST_OPTIMIZATIONS (a JAX option: LLVM at -O0, without
its expensive passes) made test_sharding_train's nine one-step tests 1.6x faster (92 s -> 58 s on a
shared 2-core CPU, 2026-11-26), most of it compile time. jax hands XLA the same
programs; their machine code is less optimised, so a float may differ in its last bits from what a
default compilation computes. Subprocesses inherit the setting, so what a test compares between
processes is compiled alike. A test whose claim is bit-identity between two different programs (a
mask of ones against no mask) depends on the machine code: it is marked `optimized_compile` and runs
with the default compilation (`_compile_settings`). JAX_DISABLE_MOST_OPTIMIZATIONS=0 in the
environment runs the whole suite with the default compilation.

The suite compiles the same smoke-size programs many times (in-process and in the subprocesses of the
preemption, torture and command-line tests, which inherit the environment). JAX's persistent cache
keys an executable by its HLO, compile options and versions, so a hit returns the same program a
compilation would: results are unchanged, a 13 s smoke run takes 5 s. Only compilations of a second
or more are kept (train steps), so the many small jits of the layer tests do not pay for writing.
The directory is new for every session, so nothing carries over from another checkout or run.
"""

import os
import shutil
import tempfile

import pytest

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="moe-test-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"  # Train steps, not every jit.
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_configure(config):
  config.addinivalue_line(
      "markers",
      "optimized_compile: compile with XLA's default optimisations (see tests/conftest.py)",
  )


# Whether the suite compiles with the default optimisations (JAX_DISABLE_MOST_OPTIMIZATIONS=0), and
# whether this process does now.
_SUITE_OPTIMIZED = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("0", "false", "off")
_OPTIMIZED = [_SUITE_OPTIMIZED]


@pytest.fixture(autouse=True)
def _compile_settings(request):
  """Optimisations on for a test marked `optimized_compile`, the suite's setting for the others.
  When the setting changes the in-memory caches are emptied: no program crosses between the two."""
  optimized = _SUITE_OPTIMIZED or request.node.get_closest_marker("optimized_compile") is not None
  if optimized != _OPTIMIZED[0]:
    import jax  # pylint: disable=g-import-not-at-top

    jax.config.update("jax_disable_most_optimizations", not optimized)
    jax.clear_caches()
    _OPTIMIZED[0] = optimized
  yield


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
