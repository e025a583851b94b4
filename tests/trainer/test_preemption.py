"""Preemption (`moe.trainer.preemption`): a SIGTERM finishes the step, saves it, exits 75; the rerun resumes
there and ends where an uninterrupted run ends. With two processes both save the same step."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from moe.trainer.preemption import EXIT_CODE, SIGNAL_AT_ENV
from moe.trainer.run_records import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 60
OVERRIDES = [
    f"--config.train.steps={STEPS}",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=1000",  # Only the preemption save and the last step.
    "--config.train.eval_every=20",
]


def _launch(workdir, log, *extra, env=None, signal_at=None) -> subprocess.Popen:
  """experiments.train in a subprocess; `signal_at` is the test hook's value
  (`moe.trainer.preemption.SIGNAL_AT_ENV`): the run signals itself at those points."""
  env = env or dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  env.pop(SIGNAL_AT_ENV, None)
  if signal_at:
    env[SIGNAL_AT_ENV] = signal_at
  return subprocess.Popen(
      [
          sys.executable,
          "-m",
          "experiments.train",
          "--config=configs/switch.py:size=smoke",
          *OVERRIDES,
          f"--workdir={workdir}",
          *extra,
      ],
      cwd=REPO,
      stdout=log,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
  )


def _timeless(records):
  return [
      {k: v for k, v in r.items() if k not in ("tokens_per_s", "time_s", "mfu")} for r in records
  ]


@pytest.mark.timeout(600)
def test_sigterm_saves_the_current_step_and_the_rerun_ends_identically(tmp_path):
  workdir, log_path = tmp_path / "run", tmp_path / "log.txt"
  with open(log_path, "w") as log:
    # SIGTERM after step 5, and again while checkpoint 5 is being written: the second changes nothing.
    proc = _launch(workdir, log, signal_at="step:5=SIGTERM,saving:5=SIGTERM")
    assert proc.wait(timeout=200) == EXIT_CODE, log_path.read_text()[-3000:]
  output = log_path.read_text()
  saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved == [5], (saved, output[-2000:])
  assert "preempted (SIGTERM) after step 5: checkpoint 5 is saved" in output
  assert "SIGTERM received again" in output
  assert max(r["step"] for r in read_metrics(workdir / "metrics.jsonl")) >= saved[0]

  with open(log_path, "w") as log:
    assert _launch(workdir, log).wait(timeout=300) == 0, log_path.read_text()[-3000:]
  assert f"Resumed from {workdir / 'checkpoints'} at step {saved[0]}" in log_path.read_text()

  # The uninterrupted run, in a process like the others (the same devices: the same sums).
  with open(log_path, "w") as log:
    assert _launch(tmp_path / "straight", log).wait(timeout=300) == 0, log_path.read_text()[-3000:]
  resumed = _timeless(read_metrics(workdir / "metrics.jsonl"))
  straight = _timeless(read_metrics(tmp_path / "straight" / "metrics.jsonl"))
  assert [r["step"] for r in resumed if r["split"] == "train"] == list(range(1, STEPS + 1))
  assert resumed == straight  # Every record, bit for bit.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.timeout(600)
def test_two_processes_save_the_same_step(tmp_path):
  """SIGTERM to one of two processes (after its step 5): JAX's preemption service tells both, they agree on a step,
  both save it and exit 75."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  port, workdir = _free_port(), tmp_path / "run"
  logs = [tmp_path / f"log{i}.txt" for i in range(2)]
  procs = []
  for i, log_path in enumerate(logs):
    with open(log_path, "w") as log:
      procs.append(
          _launch(
              workdir,
              log,
              f"--coordinator_address=localhost:{port}",
              "--num_processes=2",
              f"--process_id={i}",
              "--cpu_collectives",
              "--config.train.eval_batches=0",
              env=dict(env),
              signal_at="step:5=SIGTERM" if i == 1 else None,  # Process 1 is told; 0 learns it.
          )
      )
  try:
    codes = [p.wait(timeout=200) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert codes == [EXIT_CODE, EXIT_CODE], [log.read_text()[-2000:] for log in logs]
  saved = [p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and 5 <= int(saved[0]) < STEPS
  assert f"preempted (preemption notice) after step {saved[0]}" in logs[0].read_text()
