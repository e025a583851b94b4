"""`experiments.train` on the command line: refusals are one line, touch nothing and exit 1."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def run(*args) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=configs/switch.py:size=smoke", *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=200,
      env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"),
  )


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.train.b1=1.5", "train.b1=1.5 must be a number >= 0 and < 1"),
        (
            "--config.model.moe.train_capacity_factor=-1.0",
            "moe.train_capacity_factor=-1.0 must be a number > 0, or None (dropless)",
        ),
        (
            "--config.train.seq_len=128",
            "train.seq_len=128 must be <= model.max_len=64 (the longest sequence the model accepts)",
        ),
    ],
)
def test_a_bad_value_is_one_line_without_a_traceback(tmp_path, override, message):
  result = run(override, f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == f"experiments.train: {message}", result.stderr
  assert "Traceback" not in result.stderr + result.stdout
  assert not (tmp_path / "run").exists()  # Nothing written (and nothing compiled: no output).
  verbose = run(override, f"--workdir={tmp_path / 'run'}", "--verbose")
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_an_unwritable_workdir_says_so(tmp_path):
  (tmp_path / "file").write_text("not a directory")
  result = run(f"--workdir={tmp_path / 'file' / 'run'}")
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(
      f"experiments.train: workdir {tmp_path / 'file' / 'run'} cannot be written"
  )


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--config.train.stpes=3"],
            '--config.train.stpes: no such config field. Did you mean "steps"?',
        ),
        (
            ["--config.modle.d_model=3"],
            '--config.modle.d_model: no such config field. Did you mean "model"?',
        ),
        (["--config.train.steps=abc"], "flag --config.train.steps=abc: invalid literal for int()"),
        (
            ["--config=configs/switch.py:size=huge"],
            "size must be one of smoke, tiny, small, base, large",
        ),
    ],
)
def test_a_bad_flag_is_one_line(tmp_path, args, message):
  result = run(*args, f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert (
      len(lines) == 1 and lines[0].startswith("experiments.train: ") and message in lines[0]
  ), lines
  assert not (tmp_path / "run").exists()


def test_a_config_file_that_raises_is_one_line_naming_it(tmp_path):
  """Each way a config file fails has its message tested in tests/config/test_command_line.py."""
  path = tmp_path / "config.py"
  path.write_text("def get_config(arg):\n  raise KeyError(arg)\n")
  result = run(f"--config={path}:x", f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f"experiments.train: {path}: get_config('x') raised KeyError: 'x'"
  ], result.stderr
  verbose = run(f"--config={path}:x", f"--workdir={tmp_path / 'run'}", "--verbose")
  assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_an_empty_workdir_or_a_broken_config_json_is_one_line(tmp_path):
  result = run("--workdir=")
  assert result.stderr.strip().splitlines() == [
      "experiments.train: flag --workdir=: --workdir is empty"
  ], result.stderr
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text("{")
  result = run(f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      f"experiments.train: {tmp_path / 'run' / 'config.json'}: not valid JSON (Expecting property "
      "name enclosed in double quotes at line 1 column 2)"
  ), result.stderr
