"""Test set-up, before anything imports jax: 8 fake CPU devices for the sharding tests, and one
persistent compilation cache for the session.

The suite compiles the same smoke-size programs many times (in-process and in the subprocesses of the
preemption, torture and command-line tests, which inherit the environment). JAX's persistent cache
keys an executable by its HLO, compile options and versions, so a hit returns the same program a
compilation would: results are unchanged, a 13 s smoke run takes 5 s. Only compilations of a second
or more are kept (train steps), so the many small jits of the layer tests do not pay for writing. The directory is new for every
session, so nothing carries over from another checkout or run.
"""

import os
import shutil
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="moe-test-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"  # Train steps, not every jit.
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if _OWN_CACHE is not None:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
