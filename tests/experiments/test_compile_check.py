"""experiments.compile_check: the step compiled for fake devices, and the refusals of a TPU slice
that cannot be built, each one line before anything compiles. Compiling for a real slice needs
libtpu (the `tpu` extra); `.ci/run` does that in its own virtualenv (./run.sh compile-tpu)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SMOKE = "--config=configs/switch.py:size=smoke"


def compile_check(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "experiments.compile_check", SMOKE, *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
  )


def last_line(result: subprocess.CompletedProcess) -> str:
  return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["--topology=v9z:2x2"],
            "compile_check: unknown topology 'v9z:2x2': expected GEN:AxB or GEN:AxBxC with GEN one "
            "of v5e, v5p, v6e (e.g. v5e:2x2, v5p:4x8x8)",
        ),
        (
            ["--topology=v5e:2x2", "--mesh=data=8"],
            "compile_check: mesh (data=8, fsdp=1, expert=1, tensor=1) needs 8 devices, but 4 are present",
        ),
    ],
)
def test_a_slice_that_cannot_be_built_is_one_line(args, line):
  result = compile_check(*args)
  assert result.returncode == 1, result.stderr[-2000:]
  assert last_line(result).startswith(line), result.stderr[-2000:]
  assert "Traceback" not in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu is installed")
def test_a_topology_without_libtpu_names_the_extra():
  result = compile_check("--topology=v5e:2x2", "--mesh=data=4")
  assert result.returncode == 1, result.stderr[-2000:]
  assert last_line(result) == (
      "compile_check: --topology needs libtpu, which is not installed: pip install -e '.[tpu]' "
      "(into its own virtualenv: it is about 700 MB)"
  )


def test_fake_devices_report_memory_flops_and_collectives():
  """8 fake CPU devices, data=2 x expert=4: the report names the mesh, and the step's gradient
  all-reduce over 'data' moves bytes."""
  result = compile_check("--fake_devices=8", "--mesh=data=2,expert=4,rules=expert")
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout
  assert "mesh {'data': 2, 'fsdp': 1, 'expert': 4, 'tensor': 1} (expert rules)" in out, out
  flops = float(out.split("FLOPs per device ")[1].split(",")[0])
  assert flops > 0
  reduce_mib = float(out.split("all-reduce ")[1].split(" MiB")[0])
  assert reduce_mib > 0, out
