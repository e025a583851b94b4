"""`python -m experiments.sample` end to end on a switch run trained for two steps at smoke size with a
SentencePiece tokenizer (moe/trainer/trained_run.py loads it: config.json, the latest checkpoint's parameters, the
run's cached tokenizer); the CLI's greedy text equals generating in-process; it says when max_len
stops it; a missing workdir or checkpoint is one line and exit 1; a checkpoint that does not restore
is skipped, and nothing in the workdir is touched."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from moe.data import ByteTokenizer, DataConfig, SentencePieceTokenizer
from moe.models import sampling
from moe.trainer import trained_run

REPO = pathlib.Path(__file__).resolve().parents[2]
ENV = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
SP_VOCAB = 320  # Small: the tokenizer trains in a second on 100 kB.
PROMPT = "Now is the winter of our "


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", module, *args],
      cwd=REPO,
      env=ENV,
      capture_output=True,
      text=True,
      timeout=600,
  )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("sample")
  done = _run(
      "experiments.train",
      "--config=configs/switch.py:size=smoke",
      "--config.train.steps=2",
      "--config.train.warmup_steps=1",
      "--config.train.eval_batches=0",
      "--config.data.tokenizer=sentencepiece",
      f"--config.data.sp_vocab_size={SP_VOCAB}",
      "--config.data.sp_train_bytes=100000",
      f"--config.model.vocab_size={SP_VOCAB}",
      f"--config.data.cache_dir={root / 'cache'}",
      f"--workdir={root / 'run'}",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return root / "run"


def _listing(directory: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.mark.filterwarnings("ignore:Sharding info not provided")  # The reference restore below.
def test_cli_prints_the_prompt_and_the_greedy_continuation_until_max_len(run_dir):
  before = _listing(run_dir)
  done = _run("experiments.sample", f"--workdir={run_dir}", f"--prompt={PROMPT}", "--temperature=0")
  assert done.returncode == 0, done.stderr[-3000:]
  header, text, note = done.stdout.rstrip("\n").split("\n")[-3:]

  cfg = trained_run.load_config(run_dir)
  tokenizer = trained_run.run_tokenizer(cfg.data)
  assert isinstance(tokenizer, SentencePieceTokenizer)
  prompt_ids = tokenizer.encode(PROMPT)
  model, step = trained_run.load_model(run_dir, cfg)
  result = sampling.generate(model, prompt_ids[None], sampling.SamplingConfig(temperature=0))
  # The default 200 new tokens do not fit: 64 positions read, the last predicting one more.
  n = cfg.model.max_len - len(prompt_ids) + 1
  assert result.tokens_BL.shape == (1, n) and result.stopped_at_max_len
  whole = tokenizer.decode(np.concatenate([prompt_ids, result.tokens_BL[0]]))
  assert header == f"[switch8_smoke, step 2, {len(prompt_ids)} prompt + {n} new tokens]"
  assert text == PROMPT + whole[len(tokenizer.decode(prompt_ids)) :] and len(text) > len(PROMPT)
  assert note == f"[stopped after {n} new tokens: the model reads at most model.max_len=64 tokens]"
  assert _listing(run_dir) == before  # Sampling writes nothing into the run.

  # The parameters are the checkpoint's: compared with orbax's own restore of the whole state.
  assert step == 2
  saved = ocp.PyTreeCheckpointer().restore(run_dir / "checkpoints" / "2" / "state")["params"]
  ours = nnx.as_pure(nnx.state(model, nnx.Param))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(saved), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_workdir_or_checkpoint_is_one_line_and_exit_1(run_dir, tmp_path):
  done = _run("experiments.sample", f"--workdir={tmp_path / 'nowhere'}", "--prompt=x")
  assert done.returncode == 1
  assert done.stderr.strip() == f"experiments.sample: workdir {tmp_path / 'nowhere'} does not exist"
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  shutil.copy(run_dir / "config.json", fresh / "config.json")
  done = _run("experiments.sample", f"--workdir={fresh}", "--prompt=x")
  assert done.returncode == 1
  assert done.stderr.strip() == (
      f"experiments.sample: workdir {fresh} holds no checkpoint yet ({fresh / 'checkpoints'})"
  )


def test_a_checkpoint_that_does_not_restore_is_skipped_and_left_alone(run_dir, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(run_dir, copy)
  shutil.copytree(copy / "checkpoints" / "2", copy / "checkpoints" / "3")
  for path in (copy / "checkpoints" / "3" / "state").rglob("*"):  # Truncate every array file.
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(b"")
  cfg = trained_run.load_config(copy)
  _, step = trained_run.load_model(copy, cfg)
  assert step == 2 and (copy / "checkpoints" / "3").is_dir()
  shutil.rmtree(copy / "checkpoints" / "2")
  with pytest.raises(ValueError, match=r"no checkpoint in .* restores: step 3: "):
    trained_run.load_model(copy, cfg)


def test_run_tokenizer(run_dir, tmp_path):
  assert isinstance(trained_run.run_tokenizer(DataConfig(tokenizer="byte")), ByteTokenizer)
  data = trained_run.load_config(run_dir).data
  (model_file,) = (pathlib.Path(data.cache_dir) / "tokenizers").glob(f"*-v{SP_VOCAB}-*.model")
  assert trained_run.run_tokenizer(data).fingerprint == (
      SentencePieceTokenizer.from_file(model_file).fingerprint
  )
  elsewhere = DataConfig(
      tokenizer="sentencepiece",
      sp_vocab_size=SP_VOCAB,
      sp_train_bytes=100000,
      cache_dir=str(tmp_path),
  )
  with pytest.raises(ValueError, match=r"SentencePiece model .* is missing .*--cache_dir"):
    trained_run.run_tokenizer(elsewhere)  # Refused, not retrained.
  assert not list(tmp_path.rglob("*.model"))


def test_a_checkpoint_rotated_away_while_read_sends_it_to_the_newest_once(
    run_dir, tmp_path, monkeypatch
):
  """A running job commits checkpoint 4 and deletes 2 while 2 is being read: the newest is read."""
  copy = tmp_path / "run"
  shutil.copytree(run_dir, copy)
  restore, calls = trained_run._restore_params, []

  def rotating(workdir, step, *abstract):  # The abstract parameters and selection biases.
    calls.append(step)
    if len(calls) == 1:
      (workdir / "checkpoints" / "2").rename(workdir / "checkpoints" / "4")
      raise FileNotFoundError(f"{workdir}/checkpoints/2/state: not found")
    return restore(workdir, step, *abstract)

  monkeypatch.setattr(trained_run, "_restore_params", rotating)
  _, step = trained_run.load_model(copy, trained_run.load_config(copy))
  assert (step, calls) == (4, [2, 4])
