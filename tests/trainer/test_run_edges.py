"""The edges of a run, on the command line: a signal at start-up, just after the restore or in the final
save (placed by the test hook `moe.trainer.preemption.SIGNAL_AT_ENV`, not by a timer); what counts as
complete; a second launch on a held workdir; a workdir whose checkpoints are gone; malformed metrics.

One smoke run of 6 steps (checkpoints at 3 and 6) is trained once; the tests that only read it share it,
the others work on copies.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import resource
import shutil
import signal
import socket
import subprocess
import sys

import pytest

import configs.switch
from moe.config.config_dict import experiment_from_config_dict
from moe.data import pipeline
from moe.trainer import checkpoints, run_records, workdir as workdir_lib
from moe.trainer.preemption import EXIT_CODE, SIGNAL_AT_ENV
from research import statistics, sweep_plan

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 6
SPEC = "configs/switch.py:size=smoke"
OVERRIDES = (f"train.steps={STEPS}", "train.checkpoint_every=3", "train.eval_every=3")


def train(workdir, *extra, signal_at=None) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  env.pop(SIGNAL_AT_ENV, None)
  if signal_at:
    env[SIGNAL_AT_ENV] = signal_at
  return subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--config={SPEC}"]
      + [f"--config.{o}" for o in OVERRIDES]
      + [f"--workdir={workdir}", *extra],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
  )


def last_line(result: subprocess.CompletedProcess, stream: str = "stderr") -> str:
  """The last line a run printed on `stream`: stdout for progress and preemption, stderr for errors."""
  return getattr(result, stream).strip().splitlines()[-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir where a SIGINT stopped the first launch during start-up, and a SIGTERM came while the
  second launch's final checkpoint was being written: (workdir, first result, second result)."""
  workdir = tmp_path_factory.mktemp("edges") / "switch8_smoke" / "seed0"
  startup = train(workdir, signal_at="startup=SIGINT")
  final_save = train(workdir, signal_at=f"saving:{STEPS}=SIGTERM")
  return workdir, startup, final_save


@pytest.fixture
def copy(run, tmp_path):
  """A copy of the trained workdir, at the same depth (`<root>/<name>/seed0`)."""
  target = tmp_path / "switch8_smoke" / "seed0"
  shutil.copytree(run[0], target)
  return target


def test_a_signal_at_start_up_exits_75_naming_what_is_on_disk(run):
  _, startup, _ = run
  assert startup.returncode == EXIT_CODE, startup.stderr[-2000:]
  assert last_line(startup, "stdout") == (
      "preempted (SIGINT) during start-up: no checkpoint is on disk yet; rerun the same command "
      f"to resume (exit status {EXIT_CODE})"
  )
  assert "Traceback" not in startup.stderr


def test_a_signal_in_the_final_save_lets_it_commit_then_exits_75(run):
  workdir, _, final_save = run
  assert final_save.returncode == EXIT_CODE, final_save.stderr[-2000:]
  assert f"preempted (SIGTERM) after step {STEPS}: checkpoint {STEPS} is saved" in last_line(
      final_save, "stdout"
  )
  assert checkpoints.steps_of(workdir) == [STEPS, 3]
  assert workdir_lib.is_complete(workdir, STEPS)


def test_a_signal_just_after_the_restore_exits_75_and_writes_nothing(copy):
  before = (copy / run_records.METRICS).read_text()
  result = train(copy, signal_at="restored=SIGTERM")
  assert result.returncode == EXIT_CODE, result.stderr[-2000:]
  assert f"during start-up: checkpoint {STEPS} is the newest on disk" in last_line(result, "stdout")
  assert (copy / run_records.METRICS).read_text() == before


def test_a_lost_final_save_is_incomplete_for_the_sweep_and_the_report(copy):
  """What kill -9 in the final save leaves: orbax's temporary directory, the final records written."""
  (copy / "checkpoints" / str(STEPS)).rename(
      copy / "checkpoints" / f"{STEPS}.orbax-checkpoint-tmp-1"
  )
  records = run_records.read_metrics(copy / run_records.METRICS)
  assert {"train", "eval"} <= {r["split"] for r in records if r["step"] == STEPS}
  assert not workdir_lib.is_complete(copy, STEPS)
  planned = sweep_plan.Run("switch8_smoke", 0, SPEC, OVERRIDES, None, None, str(copy), STEPS)
  assert not sweep_plan.is_complete(planned)
  (result,) = statistics.load_runs(copy.parents[1])
  assert not result.complete
  assert statistics.summarize([result])[0]["pending_seeds"] == [0]


def test_without_evaluation_a_run_completes_on_its_final_checkpoint(copy):
  """train.eval_batches=0: no eval record is expected (else the sweep would relaunch it forever)."""
  records = run_records.read_metrics(copy / run_records.METRICS)
  (copy / run_records.METRICS).write_text(
      "".join(run_records.metrics_line(r) for r in records if r["split"] == "train")
  )
  assert not workdir_lib.is_complete(copy, STEPS)  # The config says it evaluates.
  config = json.loads((copy / workdir_lib.CONFIG).read_text())
  config["train"]["eval_batches"] = 0
  (copy / workdir_lib.CONFIG).write_text(json.dumps(config))
  assert workdir_lib.is_complete(copy, STEPS)


def test_a_second_launch_on_a_held_workdir_is_refused_naming_the_holder(copy):
  before = (copy / run_records.METRICS).read_text()
  with workdir_lib.locked(copy):
    result = train(copy)
  assert result.returncode == 1
  assert last_line(result) == (
      f"experiments.train: workdir {copy} is in use by pid {os.getpid()} on host "
      f"{socket.gethostname()} (it holds {copy / workdir_lib.LOCK}): wait for that run to end, "
      "or use another --workdir"
  )
  assert (copy / run_records.METRICS).read_text() == before


def test_the_lock_of_a_killed_holder_does_not_block(tmp_path):
  holder = subprocess.run(
      [
          sys.executable,
          "-c",
          "import os, pathlib, signal; from moe.trainer import workdir as w; "
          f"w.locked(pathlib.Path({str(tmp_path)!r})).__enter__(); "
          "os.kill(os.getpid(), signal.SIGKILL)",
      ],
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert holder.returncode == -9
  assert "pid" in (tmp_path / workdir_lib.LOCK).read_text()  # The file stays; the lock went.
  with workdir_lib.locked(tmp_path):
    assert f"pid {os.getpid()}" in (tmp_path / workdir_lib.LOCK).read_text()


def test_checkpoints_gone_with_metrics_kept_is_refused_not_restarted(copy):
  shutil.rmtree(copy / "checkpoints")
  before = (copy / run_records.METRICS).read_text()
  result = train(copy)
  assert result.returncode == 1, result.stderr[-2000:]
  assert last_line(result).startswith(
      f"experiments.train: workdir {copy}: checkpoint {STEPS} had committed but no checkpoint is "
      f"left in checkpoints/, while metrics.jsonl holds"
  )
  assert "train.overwrite=True to start over" in last_line(result)
  assert (copy / run_records.METRICS).read_text() == before


def test_none_on_the_command_line_reaches_the_config(copy):
  """The README's dropless value: the resume is refused for that very change, so None was parsed."""
  result = train(copy, "--config.model.moe.train_capacity_factor=None")
  assert result.returncode == 1
  assert "model.moe.train_capacity_factor: 1.25 -> None" in result.stderr


def test_malformed_metrics_lines_are_reported_and_kept_aside(tmp_path, caplog):
  good = [{"step": s, "split": "train", "loss": 1.0} for s in (1, 2, 3)]
  lines = [run_records.metrics_line(good[0]), "null\n", run_records.metrics_line(good[1])]
  lines += ["{garbage\n", run_records.metrics_line(good[2]), '{"step": 4, "spl']
  (tmp_path / run_records.METRICS).write_text("".join(lines))
  assert run_records.read_metrics(tmp_path / run_records.METRICS) == good
  run_records.MetricsWriter(tmp_path, start_step=3, sparse_layers=[])
  assert run_records.read_metrics(tmp_path / run_records.METRICS) == good
  aside = (tmp_path / run_records.MALFORMED).read_text().splitlines()
  assert [json.loads(l)["line"] for l in aside] == [2, 4, 6]
  assert json.loads(aside[0])["text"] == "null"
  assert "line(s) 2, 4, 6 are not JSON records" in caplog.text


def _file_size_limit():  # In the child, before exec: writes past 1 MB fail (EFBIG), as on a full disk.
  resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Else the kernel kills the writer instead.


def test_a_failed_background_save_stops_the_run_in_one_line(tmp_path):
  """The first checkpoint (2 MB of arrays) cannot be written: the run stops before its next save (the
  loop asks after every step; how many steps orbax's writer takes to fail is not the test's to
  decide), with one line naming the directory and the cause, and no traceback. It stopped only at
  the next save while orbax's finalize thread took the writer's error for itself."""
  data = experiment_from_config_dict(configs.switch.get_config("size=smoke")).data
  # The corpus streams cached here, so the child's 1 MB limit meets the checkpoint first.
  for split in ("train", "validation"):
    pipeline.token_stream(data, split)
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false")
  env.pop(SIGNAL_AT_ENV, None)
  result = subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--config={SPEC}", "--config.train.steps=400"]
      + ["--config.train.checkpoint_every=40", "--config.train.log_every=1"]
      + ["--config.train.eval_every=1000", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
      preexec_fn=_file_size_limit,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert last_line(result).startswith(
      f"experiments.train: a checkpoint could not be written to {tmp_path / 'run' / 'checkpoints'}: "
  ), result.stderr[-3000:]
  assert "File too large" in last_line(result) and "Traceback" not in result.stderr
  steps = [r["step"] for r in run_records.read_metrics(tmp_path / "run" / run_records.METRICS)]
  assert 40 <= max(steps) < 80  # Stopped before its next save, not a period late.
  assert checkpoints.steps_of(tmp_path / "run") == []


def test_a_metrics_write_past_the_file_size_limit_names_what_it_was_writing(tmp_path):
  """A real EFBIG (16 KB limit in a child) while logging: the error names metrics.jsonl or the
  TensorBoard directory, whichever filled first, not just '[Errno 27] File too large'."""
  child = (
      "import pathlib, resource, signal, sys\n"
      "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 14, 1 << 14))\n"
      "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
      "from moe.trainer import run_records\n"
      "writer = run_records.MetricsWriter(pathlib.Path(sys.argv[1]), start_step=0, sparse_layers=[1])\n"
      "try:\n"
      "  for step in range(1, 10_000):\n"
      "    writer.write({'step': step, 'split': 'train', 'loss': 1.0, 'load': [[0.25] * 4]})\n"
      "except OSError as error:\n"
      "  print(error.errno, error.filename, sep='\\n')\n"
  )
  result = subprocess.run(
      [sys.executable, "-c", child, str(tmp_path)],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert result.returncode == 0 and result.stdout.strip(), result.stderr[-2000:]
  errno_line, filename = result.stdout.strip().splitlines()[-2:]
  assert int(errno_line) == errno.EFBIG
  metrics, (events,) = tmp_path / run_records.METRICS, (tmp_path / "tensorboard").iterdir()
  full = {str(metrics): metrics, str(events.parent): events}  # What each name stands for.
  assert filename in full
  assert full[filename].stat().st_size == 1 << 14  # The name is of the file that reached the limit,
  assert min(metrics.stat().st_size, events.stat().st_size) < 1 << 14  # not of the other one.
