"""Re-scoring a trained run: per-window losses on a chosen evaluation, and that evaluation's noise.

    scored = score(workdir, cfg, spread=True, num_batches=64)
    scored.loss, scored.tokens, scored.halves, document_bootstrap(scored)
    on_train = score(workdir, cfg, num_batches=64, split="train")
    seen = trained_on(on_train, cfg)   # the windows its steps drew
    on_train.where(seen).loss, on_train.where(~seen).loss

Nothing in the workdir is written (`moe.trainer.trained_run` reads the latest checkpoint that restores). Each
window's document is the one holding its first target token; documents are the EOS-separated
pieces of the packed validation stream (`moe.data.corpora`).

Scored on the training split instead (built-in corpora), the windows split into those the run
trained on and those it did not: held-out documents, unseen windows of training documents and
trained-on windows separate what a model generalises to new documents from what it learnt of the
documents it read (and from what it memorised of the windows themselves).

Two measures of how much an evaluation's number depends on which windows it scores:
* halves: the loss of its even and of its odd windows, two disjoint samples of the same documents;
  half their difference estimates the standard error of the full evaluation's sampling.
* a bootstrap over documents: the spread of the loss when the split's documents are redrawn with
  replacement, what a different held-out split of the same corpus would give. Two models scored on
  the same windows share it, so for their gap `paired_bootstrap` redraws the documents of both at
  once.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import numpy as np
from flax import nnx

from moe.config.experiment import ExperimentConfig
from moe.data import corpora, pipeline
from moe.trainer import steps, trained_run

BOOTSTRAP_SAMPLES = 2000


@dataclasses.dataclass(frozen=True)
class Scored:
  """One run scored on one evaluation: per-window sums and the documents they belong to."""

  step: int  # The checkpoint's step.
  ce_W: np.ndarray  # float64 [W]: summed cross-entropy of each window.
  tokens_W: np.ndarray  # float64 [W]: its scored tokens.
  document_W: np.ndarray  # int64 [W]: the split's document of its first target.
  window_W: np.ndarray  # int64 [W]: its window id in the split's stream.
  num_windows: int  # Windows in the whole split.

  @property
  def loss(self) -> float:
    return float(self.ce_W.sum() / self.tokens_W.sum())

  @property
  def tokens(self) -> int:
    return int(self.tokens_W.sum())

  @property
  def halves(self) -> tuple[float, float]:
    """Loss of the even and of the odd windows (in scoring order)."""
    return tuple(
        float(self.ce_W[i::2].sum() / self.tokens_W[i::2].sum()) for i in (0, 1)
    )  # type: ignore[return-value]

  @property
  def num_documents(self) -> int:
    return len(np.unique(self.document_W))

  def where(self, mask_W: np.ndarray) -> "Scored":
    """The same evaluation restricted to the windows where `mask_W` is True."""
    pick = lambda a: a[mask_W]
    return dataclasses.replace(
        self,
        ce_W=pick(self.ce_W),
        tokens_W=pick(self.tokens_W),
        document_W=pick(self.document_W),
        window_W=pick(self.window_W),
    )


def documents_of(stream: np.ndarray, window_ids: np.ndarray, seq_len: int, eos_id: int):
  """The document (0-based, in stream order) of each window's first target token."""
  eos_positions = np.flatnonzero(np.asarray(stream) == eos_id)
  first_target = np.asarray(window_ids, np.int64) * seq_len + 1
  return np.searchsorted(eos_positions, first_target, side="left").astype(np.int64)


def score(
    workdir: str | pathlib.Path,
    cfg: ExperimentConfig,
    *,
    spread: bool = True,
    num_batches: int | None = None,
    split: str = corpora.VALIDATION,
) -> Scored:
  """The run's latest checkpoint scored on `num_batches` batches (None: the whole split) of
  `split` ('validation', or 'train' for the built-in corpora)."""
  model, step = trained_run.load_model(workdir, cfg)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tc = cfg.train
  batches = pipeline.eval_batches(
      cfg.data,
      seq_len=tc.seq_len,
      global_batch_size=tc.global_batch_size,
      num_batches=num_batches,
      spread=spread,
      split=split,
  )
  window_losses = steps.make_window_losses_step(graphdef, rest)
  ce, tokens = [], []
  for batch in batches:
    ce_B, tokens_B = jax.device_get(window_losses(params, steps.to_device(batch)))
    ce.append(np.asarray(ce_B, np.float64))
    tokens.append(np.asarray(tokens_B, np.float64))
  ce_W, tokens_W = np.concatenate(ce), np.concatenate(tokens)
  real = tokens_W > 0  # The last batch's padding rows.
  ids = batches.window_ids
  eos = pipeline.tokenizer_for(cfg.data).eos_id
  documents = documents_of(batches.stream, ids, tc.seq_len, eos)
  return Scored(step, ce_W[real], tokens_W[real], documents, ids, batches.num_windows)


def trained_on(scored: Scored, cfg: ExperimentConfig) -> np.ndarray:
  """bool [W]: which of a training-split evaluation's windows the run's first `scored.step` steps
  drew (`moe.data.pipeline.trained_window_ids`)."""
  drawn = pipeline.trained_window_ids(
      cfg.data,
      seq_len=cfg.train.seq_len,
      global_batch_size=cfg.train.global_batch_size,
      steps=scored.step,
  )
  return np.isin(scored.window_W, drawn)


def _document_sums(scored: Scored) -> tuple[np.ndarray, np.ndarray]:
  d = int(scored.document_W.max()) + 1
  ce = np.bincount(scored.document_W, scored.ce_W, minlength=d)
  tokens = np.bincount(scored.document_W, scored.tokens_W, minlength=d)
  present = tokens > 0
  return ce[present], tokens[present]


def _resample_counts(num_documents: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.multinomial(
      num_documents, np.full(num_documents, 1.0 / num_documents), size=BOOTSTRAP_SAMPLES
  ).astype(np.float64)


def document_bootstrap(scored: Scored, seed: int = 0) -> float:
  """Standard error of the loss over document resamples (`BOOTSTRAP_SAMPLES` draws)."""
  ce, tokens = _document_sums(scored)
  counts = _resample_counts(len(ce), seed)
  return float(np.std(counts @ ce / (counts @ tokens), ddof=1))


def paired_bootstrap(a: Scored, b: Scored, seed: int = 0) -> tuple[float, float]:
  """(loss(a) - loss(b), its standard error over document resamples drawn for both at once).

  Raises:
    ValueError: the two were not scored on the same windows.
  """
  if not np.array_equal(a.window_W, b.window_W):
    raise ValueError("the two runs were not scored on the same windows: compare like with like")
  ce_a, tokens = _document_sums(a)
  ce_b, _ = _document_sums(b)
  counts = _resample_counts(len(ce_a), seed)
  gaps = (counts @ ce_a - counts @ ce_b) / (counts @ tokens)
  return a.loss - b.loss, float(np.std(gaps, ddof=1))
