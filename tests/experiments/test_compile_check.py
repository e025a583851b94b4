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


def test_weak_scaling_rows_are_the_models_meshes_and_slices_it_names():
  """The table's rows without compiling (a subprocess: the module's flags would collide with other
  entry points' in one test process): 8, 64 and 256 chips per generation; each row's experiment has
  the model, the per-chip batch times the chips, the layers unrolled, and top-2's causal order."""
  code = """
import math
from experiments import weak_scaling as ws
assert {g: [math.prod(d) for d in s] for g, s in ws.SLICES.items()} == {
    g: [8, 64, 256] for g in ("v5p", "v5e", "v6e")}, ws.SLICES
cfg = ws.experiment("configs/switch.py:size=base", 64, 2, ws.MESHES["expert=8 x fsdp"][0], 4 * 64)
moe = cfg.model.moe
assert (moe.num_experts, moe.top_k, moe.serving_order.value) == (64, 2, "token_major"), moe
assert not cfg.model.scan_layers and cfg.train.global_batch_size == 256
assert (cfg.mesh.fsdp, cfg.mesh.expert, cfg.mesh.rules.value) == (-1, 8, "expert_fsdp")
dense = ws.experiment("configs/dense.py:size=base", None, None, ws.MESHES["data"][0], 32)
assert dense.model.moe is None and dense.model.d_model == 768
print("ok")
"""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, env=env
  )
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
  typo = subprocess.run(
      [sys.executable, "-m", "experiments.weak_scaling", "--models=dense"],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
  )
  assert typo.returncode != 0 and "--models: ['dense'] not among" in typo.stderr, typo.stderr
