"""Generates text from a trained run: the latest checkpoint of --workdir, with a KV cache.

    python -m experiments.sample --workdir=runs/switch_smoke --prompt="To be, or not to be" \
        [--max_new_tokens=200 --temperature=0.8 --top_k=0 --top_p=1.0 --seed=0]

Prints the prompt and its continuation. Works for dense and sparse runs of any size (on one device),
byte-level or SentencePiece; `--temperature=0` is greedy. Generation stops after --max_new_tokens
tokens, or earlier when the model has read model.max_len tokens (it says so). MoE layers route
each token dropless at decode time (see `moe.models.decode`).

Exit status: 0, or 1 with one line saying why (no workdir, no checkpoint, an empty or too long
prompt, a bad flag value); --verbose shows the traceback.
"""

import dataclasses
import sys

import numpy as np
from absl import app, flags, logging

from moe.models import sampling
from moe.trainer import trained_run

_DEFAULTS = sampling.SamplingConfig()
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (config.json, checkpoints/).")
_PROMPT = flags.DEFINE_string("prompt", None, "The text to continue.")
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", sampling.DEFAULT_MAX_NEW_TOKENS, "At most this many new tokens."
)
_TEMPERATURE = flags.DEFINE_float(
    "temperature", _DEFAULTS.temperature, "Divides the logits; 0 is greedy."
)
_TOP_K = flags.DEFINE_integer("top_k", _DEFAULTS.top_k, "Keep the k most likely tokens; 0: all.")
_TOP_P = flags.DEFINE_float(
    "top_p", _DEFAULTS.top_p, "Keep the smallest set of tokens with mass >= p; 1.0: all."
)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir",
    None,
    "Where the run's SentencePiece model is cached, if not its data.cache_dir (e.g. another machine).",
)
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, raise with the traceback.")
flags.mark_flags_as_required(["workdir", "prompt"])


def sample() -> str:
  """Loads the run, generates, and returns what to print."""
  cfg = sampling.SamplingConfig(
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value
  )
  run = trained_run.load_config(_WORKDIR.value)
  data = run.data
  if _CACHE_DIR.value:
    data = dataclasses.replace(data, cache_dir=_CACHE_DIR.value)
  tokenizer = trained_run.run_tokenizer(data)
  if tokenizer.vocab_size > run.model.vocab_size:
    raise ValueError(
        f"the {data.tokenizer.value} tokenizer has {tokenizer.vocab_size} ids but the model only "
        f"{run.model.vocab_size}: not the run's tokenizer"
    )
  prompt_ids = tokenizer.encode(_PROMPT.value)
  if len(prompt_ids) == 0:
    raise ValueError("--prompt is empty: give the model some text to continue")
  model, step = trained_run.load_model(_WORKDIR.value, run)
  result = sampling.generate(
      model, prompt_ids[None, :], cfg, max_new_tokens=_MAX_NEW_TOKENS.value, seed=_SEED.value
  )
  new_tokens = result.tokens_BL[0]
  note = (
      f"\n[stopped after {len(new_tokens)} new tokens: the model reads at most "
      f"model.max_len={run.model.max_len} tokens]"
      if result.stopped_at_max_len
      else ""
  )
  header = f"[{run.name}, step {step}, {len(prompt_ids)} prompt + {len(new_tokens)} new tokens]"
  return f"{header}\n{_PROMPT.value}{_continuation(tokenizer, prompt_ids, new_tokens)}{note}"


def _continuation(tokenizer, prompt_ids: np.ndarray, new_ids: np.ndarray) -> str:
  """The text of the new tokens, decoded with the prompt so that a piece or a UTF-8 character that
  spans the boundary, or a leading space, comes out as in the whole text."""
  before = tokenizer.decode(prompt_ids)
  whole = tokenizer.decode(np.concatenate([prompt_ids, new_ids]))
  return whole[len(before) :] if whole.startswith(before) else tokenizer.decode(new_ids)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO.
  try:
    text = sample()
  except ValueError as error:
    if _VERBOSE.value:
      raise
    sys.exit(f"experiments.sample: {error}")
  print(text)


if __name__ == "__main__":
  app.run(main)
