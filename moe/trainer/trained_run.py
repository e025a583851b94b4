"""A trained run read back from its workdir: its config, its latest parameters and its tokenizer.

    cfg = load_config(workdir)                 # config.json -> ExperimentConfig
    model, step = load_model(workdir, cfg)     # parameters of the latest checkpoint that restores
    tokenizer = run_tokenizer(cfg.data)

Read-only: unlike training's `moe.trainer.checkpoints.restore_latest`, nothing in the workdir is moved or
written. Only the parameters (and the selection biases of a model routed with them) are read from a
checkpoint (orbax partial restore of 'state'/'params' and 'state'/'router_bias': the optimiser
moments, twice the parameters' size, and the data iterator stay on disk), onto one device; a checkpoint that does not restore is reported and the previous one tried.
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
from absl import logging
from flax import nnx

from moe.config import config_dict
from moe.config.data import DataConfig, Source, TokenizerKind
from moe.config.experiment import ExperimentConfig
from moe.data import corpora, pipeline, tokenizers
from moe.layers.balancing import RouterBias
from moe.models.transformer import Transformer
from moe.trainer import checkpoints, run_records, workdir as workdir_lib


def load_config(workdir: str | pathlib.Path) -> ExperimentConfig:
  """The run's config.json as validated dataclasses (`config_dict.experiment_from_config_dict`).

  Raises:
    ValueError: no workdir, or no config.json in it.
  """
  path = pathlib.Path(workdir) / workdir_lib.CONFIG
  if not pathlib.Path(workdir).is_dir():
    raise ValueError(f"workdir {workdir} does not exist")
  if not path.is_file():
    raise ValueError(f"workdir {workdir} holds no {workdir_lib.CONFIG}: not a run's workdir")
  values = run_records.read_json(path)
  try:
    return config_dict.experiment_from_config_dict(ml_collections.ConfigDict(values))
  except (TypeError, AttributeError) as error:  # Valid JSON, but not a config's layout.
    raise ValueError(f"{path}: not a run's config ({error})") from None


def _restore_params(
    workdir: pathlib.Path, step: int, abstract_params: nnx.State, abstract_bias: nnx.State
) -> tuple[nnx.State, nnx.State]:
  """The parameters and selection biases of checkpoint `step`, shaped as the abstract ones, on the
  first device."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = lambda abstract: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      nnx.as_pure(abstract).to_pure_dict(),
  )
  restored = checkpoints.restore_params(
      workdir, step, target(abstract_params), router_bias=target(abstract_bias)
  )
  states = []
  for name, abstract in (("params", abstract_params), ("router_bias", abstract_bias)):
    state = nnx.clone(abstract)  # The restored arrays in the variables.
    nnx.replace_by_pure_dict(state, restored[name])
    states.append(state)
  return tuple(states)


def load_model(workdir: str | pathlib.Path, cfg: ExperimentConfig) -> tuple[Transformer, int]:
  """The model of `cfg` with the parameters of the run's newest committed checkpoint that restores.

  A running job rotates its checkpoints (`train.keep_checkpoints`): a step deleted while it is read
  sends the search back to the newest step once more.

  Returns:
    (model, the checkpoint's step).

  Raises:
    ValueError: the workdir has no checkpoint, or none of them restores (each step and why).
  """
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  graphdef, abstract_params, abstract_bias, rest = nnx.split(abstract, nnx.Param, RouterBias, ...)
  failures = []
  for _ in range(2):  # The second pass only when a step was rotated away mid-read.
    steps = checkpoints.steps_of(workdir)
    if not steps:
      raise ValueError(f"workdir {workdir} holds no checkpoint yet ({directory})")
    rotated = False
    for step in steps:
      try:
        params, bias = _restore_params(pathlib.Path(workdir), step, abstract_params, abstract_bias)
      except Exception as error:  # pylint: disable=broad-except  # tensorstore raises bare Exceptions.
        if not (directory / str(step)).exists():
          rotated = True  # Deleted by the running job after a newer one committed.
          break
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        logging.warning("checkpoint %d in %s does not restore: %s", step, directory, cause)
        failures.append(f"step {step}: {cause}")
        continue
      return nnx.merge(graphdef, params, bias, rest), step
    if not rotated:
      break
  else:
    failures.append("the running job rotated its checkpoints away twice while they were read")
  raise ValueError(f"no checkpoint in {directory} restores: " + "; ".join(failures))


def run_tokenizer(data: DataConfig) -> tokenizers.Tokenizer:
  """The tokenizer the run trained with, never a new one for the built-in corpora.

  Byte-level: nothing to load. SentencePiece on the built-in corpora: the model file the run trained
  and cached under `data.cache_dir` (None: $MOE_CACHE_DIR or ~/.cache/moe), at the path
  `moe.data.corpora.corpus_tokenizer_path` derives from the corpus files; missing, it is refused
  rather than retrained. TFDS data: `moe.data.tokenizer_for`, which finds the model next to the
  prepared dataset (the data must be there; it trains one only if that file was deleted).

  Raises:
    ValueError: a SentencePiece model file that is not where the run left it.
  """
  if data.tokenizer is TokenizerKind.BYTE:
    return tokenizers.ByteTokenizer()
  if data.source is Source.TFDS:
    return pipeline.tokenizer_for(data)
  cache_dir = pathlib.Path(data.cache_dir) if data.cache_dir else corpora.default_cache_dir()
  path = corpora.corpus_tokenizer_path(
      data.source, cache_dir, data.sp_vocab_size, data.sp_train_bytes
  )
  if not path.is_file():
    raise ValueError(
        f"the run's SentencePiece model {path} is missing (data.cache_dir={data.cache_dir!r}); "
        "pass the cache directory the run used with --cache_dir"
    )
  return tokenizers.SentencePieceTokenizer.from_file(path)
