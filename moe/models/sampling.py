"""Sampling text from a model: temperature, top-k and top-p (nucleus), over the KV cache.

    result = generate(model, prompt_BP, SamplingConfig(temperature=0.8, top_p=0.9), seed=0)
    result.tokens_BL, result.stopped_at_max_len

One jitted function runs a forward pass over new tokens (`moe.models.decode.forward`) and samples the next
token: called once on the whole prompt (the prefill), then once per generated token on the token it
returned (the decode steps), each compiled once. Randomness: the token after position t is drawn with
`fold_in(key(seed), t)`, so a seed fixes the sample.

Order of the filters, as in Hugging Face transformers' samplers: logits / temperature, then top-k,
then top-p on the distribution that top-k left (Holtzman et al. 2020, "The Curious Case of Neural
Text Degeneration": the smallest set of tokens whose probability mass is >= p). Temperature 0 is
greedy decoding (argmax; top-k and top-p cannot change it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe.config.validation import check_number
from moe.models import decode
from moe.models.transformer import Transformer

DEFAULT_MAX_NEW_TOKENS = 200


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
  """How the next token is drawn from the logits.

  Attributes:
    temperature: logits are divided by it; 0 means greedy (argmax).
    top_k: keep the k most likely tokens (ties to the lower id); 0 keeps all.
    top_p: keep the smallest set of most likely tokens whose probability is >= top_p; 1.0 keeps all.
  """

  temperature: float = 0.8
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    check_number("temperature", self.temperature, low=0, hint=" (0: greedy)")
    check_number("top_k", self.top_k, low=0, integer=True, hint=" (0: off)")
    check_number("top_p", self.top_p, low=0, low_open=True, high=1, hint=" (1.0: off)")


def filter_logits(logits_BV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """`logits_BV` with the tokens outside the top-k and then the top-p set at -inf.

  Sorted once, most likely first (a stable sort: of equal logits the lower id comes first, as
  argmax picks it). Top-p keeps a token while the mass of the tokens before it is < top_p, so the
  kept set is the smallest whose mass reaches top_p, and never empty.
  """
  if top_k == 0 and top_p >= 1.0:
    return logits_BV
  b, v = logits_BV.shape
  order_BV = jnp.argsort(-logits_BV, axis=-1, stable=True)
  sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
  keep_BV = jnp.ones((b, v), bool)  # In sorted order.
  if top_k:
    keep_BV = keep_BV & (jnp.arange(v) < top_k)[None, :]
  if top_p < 1.0:
    probs_BV = jax.nn.softmax(jnp.where(keep_BV, sorted_BV, -jnp.inf), axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = keep_BV & (mass_before_BV < top_p)
  keep_in_vocab_order_BV = jnp.zeros((b, v), bool).at[jnp.arange(b)[:, None], order_BV].set(keep_BV)
  return jnp.where(keep_in_vocab_order_BV, logits_BV, -jnp.inf)


def sample_token(logits_BV: jax.Array, key: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """One token per row, int32 [B], drawn from float32 logits [B, V] as `cfg` says."""
  if cfg.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = filter_logits(logits_BV / cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"), donate_argnames=("cache",))
def _forward_and_sample(graphdef, state, tokens_BL, cache, key, cfg: SamplingConfig):
  """Runs the new tokens, samples the token after the last: (int32 [B], cache)."""
  logits_BLV, cache = decode.forward(nnx.merge(graphdef, state), tokens_BL, cache)
  position = cache.length - 1  # Of the last token run: the draw for the next is keyed by it.
  return sample_token(logits_BLV[:, -1], jax.random.fold_in(key, position), cfg), cache


@dataclasses.dataclass(frozen=True)
class Generated:
  """What `generate` returns.

  Attributes:
    tokens_BL: int32 [batch, n]: the n generated tokens after each prompt (L = n).
    stopped_at_max_len: True when n < max_new_tokens because the model reads at most max_len tokens.
  """

  tokens_BL: np.ndarray
  stopped_at_max_len: bool


def generate(
    model: Transformer,
    prompt_BP: np.ndarray | jax.Array,
    cfg: SamplingConfig = SamplingConfig(),
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
) -> Generated:
  """Continues each prompt by up to `max_new_tokens` tokens.

  The model reads at most max_len tokens, which predict one more: a prompt of P tokens gets at most
  max_len - P + 1 new ones. MoE layers route as `moe.models.decode` documents (dropless, per token).

  Args:
    model: the trained model (its eval mode; see `moe.models.decode.decoding_model`).
    prompt_BP: int32 [batch, P], P >= 1: prompts of equal length.
    cfg: the sampling rule.
    max_new_tokens: at most this many new tokens (>= 1).
    seed: the sampling seed.

  Raises:
    ValueError: an empty or too long prompt, max_new_tokens < 1, or a model that cannot decode
      (`moe.models.decode.decoding_config`), before anything compiles.
  """
  check_number("max_new_tokens", max_new_tokens, low=1, integer=True)
  check_number("seed", seed, low=0, integer=True)
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  batch, p = prompt_BP.shape
  max_len = model.cfg.max_len
  if not 1 <= p <= max_len:
    raise ValueError(
        f"the prompt has {p} tokens; the model reads 1 to model.max_len={max_len} tokens"
    )
  model = decode.decoding_model(model)
  n = min(max_new_tokens, max_len - p + 1)
  graphdef, state = nnx.split(model)
  key = jax.random.key(seed)
  cache = decode.init_cache(model, batch)
  token_B, cache = _forward_and_sample(graphdef, state, prompt_BP, cache, key, cfg)
  tokens = [token_B]
  for _ in range(n - 1):  # Dispatched asynchronously: the host waits only for the result below.
    token_B, cache = _forward_and_sample(graphdef, state, token_B[:, None], cache, key, cfg)
    tokens.append(token_B)
  return Generated(np.asarray(jnp.stack(tokens, axis=1)), n < max_new_tokens)
