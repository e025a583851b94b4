"""Re-scoring a trained run (moe/trainer/evaluation.py, experiments/evaluate.py): the run's own
evaluation again, read-only; the training split's windows parted by whether the run trained on
them; the noise estimates against direct computations.

One smoke run (switch, 20 steps, evaluated at its end) is trained once and only read.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest

import configs.switch
from experiments import evaluate
from moe import data
from moe.config.config_dict import experiment_from_config_dict
from moe.trainer import evaluation, loop
from moe.trainer.run_records import read_metrics

STEPS = 20


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  cd = configs.switch.get_config("size=smoke")
  cd.train.steps, cd.train.eval_every, cd.train.checkpoint_every = STEPS, STEPS, STEPS
  cfg = experiment_from_config_dict(cd)
  workdir = tmp_path_factory.mktemp("evaluate") / "run"
  loop.train_and_evaluate(cfg, str(workdir))
  return workdir, cfg


def files_digest(root: pathlib.Path) -> dict[str, str]:
  return {
      str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
      for p in sorted(root.rglob("*"))
      if p.is_file()
  }


def test_rescoring_gives_the_logged_loss_and_writes_nothing(run, tmp_path, capsys):
  workdir, _ = run
  before = files_digest(workdir)
  logged = [r for r in read_metrics(workdir / "metrics.jsonl") if r["split"] == "eval"][-1]
  result = evaluate.run(str(workdir), None, None, str(tmp_path / "out.json"))
  (own,) = result["runs"]
  assert own["step"] == STEPS == logged["step"]
  np.testing.assert_allclose(own["loss"], logged["loss"], rtol=1e-5)
  assert own["tokens"] == logged["tokens"]
  assert files_digest(workdir) == before
  assert "checkpoint 20" in capsys.readouterr().out
  with pytest.raises(ValueError, match="inside a run's workdir"):
    evaluate.run(str(workdir), None, None, str(workdir / "out.json"))


def test_the_training_split_is_parted_by_the_windows_the_run_drew(run, tmp_path):
  """Which windows the run trained on, against the rows the training iterator yields for its
  steps, located in the stream by their content; then the command line's parts and their losses
  against the per-window losses it writes out."""
  workdir, cfg = run
  tc = cfg.train
  stream = data.token_stream(cfg.data, "train")
  n = (len(stream) - 1) // tc.seq_len
  window_of = {
      stream[k * tc.seq_len : (k + 1) * tc.seq_len].astype(np.int32).tobytes(): k for k in range(n)
  }
  it = data.train_iterator(cfg.data, seq_len=tc.seq_len, global_batch_size=tc.global_batch_size)
  drawn = {
      window_of[r.astype(np.int32).tobytes()] for _ in range(STEPS) for r in next(it)["inputs"]
  }
  # Not trained on: the windows the next step would draw (an off-by-one step counts them), and some
  # spread over the stream.
  following = [window_of[r.astype(np.int32).tobytes()] for r in next(it)["inputs"]]
  others = [k for k in following + list(range(0, n, 97)) if k not in drawn][:40]
  ids = np.array(sorted(drawn) + others)
  s = scored(np.ones(len(ids)), np.ones(len(ids)), np.zeros(len(ids)), window_W=ids, step=STEPS)
  np.testing.assert_array_equal(
      evaluation.trained_on(s, cfg), [True] * len(drawn) + [False] * len(others)
  )

  result = evaluate.run(str(workdir), "spread:4", None, str(tmp_path / "out.json"), "train")
  (own,) = result["runs"]
  (windows,) = json.loads((tmp_path / "out.json").read_text())["windows"].values()
  trained = np.array(windows["trained"])
  np.testing.assert_array_equal(trained, [k in drawn for k in windows["window"]])
  assert own["trained_windows_count"] + own["untrained_windows_count"] == len(trained) == 32
  ce, tokens = np.array(windows["ce"]), np.array(windows["tokens"])
  np.testing.assert_allclose(own["loss"], ce.sum() / tokens.sum())
  np.testing.assert_allclose(
      own["untrained_windows_loss"], ce[~trained].sum() / tokens[~trained].sum()
  )


def scored(ce_W, tokens_W, document_W, window_W=None, step=1) -> evaluation.Scored:
  n = len(ce_W)
  return evaluation.Scored(
      step=step,
      ce_W=np.asarray(ce_W, np.float64),
      tokens_W=np.asarray(tokens_W, np.float64),
      document_W=np.asarray(document_W, np.int64),
      window_W=np.arange(n) if window_W is None else np.asarray(window_W),
      num_windows=n,
  )


def test_bootstrap_over_documents_against_a_direct_resampling():
  """The standard error against a loop that redraws documents one resample at a time, with its own
  generator: the two agree to the Monte-Carlo error of 2,000 draws (a few percent)."""
  rng = np.random.default_rng(3)
  docs = np.repeat(np.arange(12), rng.integers(1, 6, 12))
  tokens = rng.integers(50, 128, len(docs)).astype(float)
  ce = tokens * (1.0 + 0.3 * rng.standard_normal(12)[docs] + 0.05 * rng.standard_normal(len(docs)))
  s = scored(ce, tokens, docs)
  draws = []
  loop_rng = np.random.default_rng(11)
  for _ in range(4000):
    picked = loop_rng.integers(0, 12, 12)
    draws.append(
        sum(ce[docs == d].sum() for d in picked) / sum(tokens[docs == d].sum() for d in picked)
    )
  np.testing.assert_allclose(evaluation.document_bootstrap(s), np.std(draws, ddof=1), rtol=0.08)
  # A loss that does not depend on the document has no document error.
  flat = scored(tokens * 1.5, tokens, docs)
  assert evaluation.document_bootstrap(flat) < 1e-12
  # Two runs that differ by a constant per token: the paired gap has no error, the unpaired ones do.
  shifted = scored(ce + 0.1 * tokens, tokens, docs)
  gap, se = evaluation.paired_bootstrap(shifted, s)
  np.testing.assert_allclose(gap, 0.1, rtol=1e-9)
  assert se < 1e-12 < evaluation.document_bootstrap(shifted)


def test_where_keeps_the_windows_it_is_given():
  s = scored([10.0, 20.0, 30.0, 40.0], [10, 10, 20, 20], [0, 0, 1, 1])
  part = s.where(np.array([True, False, False, True]))
  assert part.loss == pytest.approx(50.0 / 30.0) and part.tokens == 30
  np.testing.assert_array_equal(part.window_W, [0, 3])
  assert part.num_documents == 2 and part.step == 1
