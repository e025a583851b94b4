"""Decoding with a KV cache: one pass over the prompt (prefill), then one pass per new token.

    model = decoding_model(model)                              # decode-time routing, same params
    cache = init_cache(model, batch=1)
    logits_BPV, cache = forward(model, prompt_BP, cache)       # prefill (jit it)
    logits_B1V, cache = forward(model, token_B1, cache)        # one decode step (jit it)

The cache holds, per layer, the rotated keys and the values of every position so far in fixed-size
buffers [B, Q, M, H] (Q = max_len; M key/value heads: grouped-query attention caches M heads, not
N), and `length`, the number of positions written, shared by the batch. A call with L new tokens
writes positions length .. length + L - 1 with `jax.lax.dynamic_update_slice` and attends over the whole
buffer under the mask key position <= query position, which also hides the unwritten slots (they
all lie after every query). Layers under the scan (`Transformer.periods`) keep their caches stacked
over the same leading axis as their parameters and are scanned with them. The pieces are the
model's own (`Transformer.embed_tokens`, `Attention.project` / `output`, `Block.feed_forward`,
`Transformer.logits`); only the attention over the cache is written here.

How the MoE layer routes at decode time, and why. Capacity couples the tokens of a routing group.
A decode step holds one token per sequence, so with per-sequence groups (`group_size=None`) each
step's group is that one token: S = 1 and C = min(S, max(ceil(cf * k * S / E), min_capacity)) = 1
for every cf > 0. The token's k claims go to k distinct experts, one claim each, and none drops:
decoding is dropless in effect whatever the eval capacity factor. We make that the rule
(`decoding_config`): the decoding model routes with `group_size=None` and
`eval_capacity_factor=None` (dropless), the prompt's prefill included. We chose dropless over "the
eval capacity factor with per-sequence groups" because the two agree on every decode step and
differ only in the prefill, where a capacity would drop prompt tokens that no decode step can drop
(a token's output would depend on whether it came with the prompt or was generated, and on how the
prompt was cut); and because `group_size` counts tokens of the flattened batch, which one decode
step of B tokens cannot tile in general. So a token's MoE output depends on that token alone.

Consequences. Cached decoding equals the full forward pass `model(tokens)` (eval mode) exactly when
that pass drops nothing: always for a dropless model or a capacity factor that leaves room for
every claim, otherwise up to the tokens the full pass drops (its drop rate is in the eval records).
Routing that is not causal in the full pass (`MoEConfig.routing_is_causal`: top-k > 1 with a
capacity, batch-prioritised order) decodes causally this way, as it would at serving time; its full
pass is then no reference. Experts choose cannot decode one token at a time (each expert takes its
top C tokens of a group, and a group of one token is taken by every expert, which is not the model
that was trained): `decoding_config` refuses it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe.config.enums import RouterKind
from moe.config.model import ModelConfig
from moe.models.transformer import Attention, Block, Transformer
from moe.parallel import axes


class LayerCache(NamedTuple):
  """One layer's cache: rotated keys and values [batch, max_len, kv_heads, head_dim]."""

  k_BQMH: jax.Array
  v_BQMH: jax.Array


class KVCache(NamedTuple):
  """The whole model's cache; a pytree.

  Attributes:
    prefix: one `LayerCache` per unrolled layer (`Transformer.prefix`).
    periods: one `LayerCache` per layer of the scanned period, each stacked over the period's
      repeats: [repeats, batch, max_len, kv_heads, head_dim]. Empty without a scan.
    length: int32 []: positions written so far, i.e. the position of the next token.
  """

  prefix: tuple[LayerCache, ...]
  periods: tuple[LayerCache, ...]
  length: jax.Array


def decoding_config(cfg: ModelConfig) -> ModelConfig:
  """`cfg` with the decode-time routing of the module docstring: dropless, per-sequence groups.

  Raises:
    ValueError: the router is experts choose, which cannot route one token at a time.
  """
  moe = cfg.moe
  if moe is None or not cfg.num_sparse_layers:
    return cfg
  if moe.router is RouterKind.EXPERTS_CHOOSE:
    raise ValueError(
        "model.moe.router='experts_choose' cannot decode one token at a time (every expert would "
        "take the single token of each step, which is not the trained model); only "
        "'tokens_choose' models can be sampled"
    )
  return dataclasses.replace(
      cfg, moe=dataclasses.replace(moe, group_size=None, eval_capacity_factor=None)
  )


def decoding_model(model: Transformer) -> Transformer:
  """The same parameters (shared, not copied) under `decoding_config(model.cfg)`."""
  cfg = decoding_config(model.cfg)
  if cfg == model.cfg:
    return model
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(abstract)
  return nnx.merge(graphdef, nnx.state(model))


def init_cache(model: Transformer, batch: int) -> KVCache:
  """An empty cache for `batch` sequences of up to `model.cfg.max_len` tokens (compute dtype)."""
  cfg = model.cfg
  shape = (batch, cfg.max_len, cfg.num_kv_heads, cfg.head_dim)
  empty = lambda *lead: LayerCache(
      jnp.zeros(lead + shape, cfg.compute_dtype), jnp.zeros(lead + shape, cfg.compute_dtype)
  )
  prefix = tuple(empty() for _ in range(model.prefix_len))
  periods = tuple(empty(model.repeats) for _ in range(model.period_len)) if model.repeats else ()
  return KVCache(prefix, periods, jnp.zeros((), jnp.int32))


def _attention(
    attention: Attention, x_BLD: jax.Array, cache: LayerCache, start: jax.Array
) -> tuple[jax.Array, LayerCache]:
  """Causal attention of T new tokens at positions start .. start + T - 1 over the cache."""
  t, max_len = x_BLD.shape[1], cache.k_BQMH.shape[1]
  positions_L = start + jnp.arange(t, dtype=jnp.int32)
  q_BLNH, k_BLMH, v_BLMH = attention.project(x_BLD, positions_L)
  at = (0, start, 0, 0)
  k_BQMH = jax.lax.dynamic_update_slice(cache.k_BQMH, k_BLMH.astype(cache.k_BQMH.dtype), at)
  v_BQMH = jax.lax.dynamic_update_slice(cache.v_BQMH, v_BLMH.astype(cache.v_BQMH.dtype), at)
  visible_LQ = jnp.arange(max_len)[None, :] <= positions_L[:, None]
  out_BLNH = jax.nn.dot_product_attention(q_BLNH, k_BQMH, v_BQMH, mask=visible_LQ[None, None, :, :])
  return attention.output(out_BLNH), LayerCache(k_BQMH, v_BQMH)


def _block(
    block: Block, x_BLD: jax.Array, cache: LayerCache, start: jax.Array
) -> tuple[jax.Array, LayerCache]:
  """`Block.__call__` in eval mode, its attention over the cache."""
  attended_BLD, cache = _attention(block.attention, block.attention_norm(x_BLD), cache, start)
  x_BLD, _ = block.feed_forward(x_BLD + attended_BLD, train=False, rng=None)
  return x_BLD, cache


def forward(model: Transformer, tokens_BL: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
  """Runs T new tokens at positions cache.length .. cache.length + T - 1 (eval mode).

  Args:
    model: a model from `decoding_model` (any model works; that one routes as documented above).
    tokens_BL: int32 [batch, T]: the prompt (prefill) or the last sampled token (T = 1).
    cache: from `init_cache` or the previous call.

  Returns:
    float32 logits [batch, T, vocab] and the cache with the T positions written. The caller keeps
    cache.length + T <= max_len: a write past the buffer would be clamped by
    `dynamic_update_slice`, not refused (`moe.models.sampling.generate` stops in time).
  """
  t, max_len = tokens_BL.shape[1], model.cfg.max_len
  if t > max_len:
    raise ValueError(f"{t} new tokens exceed model.max_len={max_len}, the length of the cache")
  start = cache.length
  x_BLD = model.embed_tokens(tokens_BL)
  prefix = []
  for block, layer_cache in zip(model.prefix, cache.prefix):
    x_BLD, layer_cache = _block(block, x_BLD, layer_cache, start)
    prefix.append(layer_cache)

  periods = cache.periods
  if model.repeats:

    @nnx.scan(
        in_axes=(0, nnx.Carry, 0),
        out_axes=(nnx.Carry, 0),
        transform_metadata={nnx.PARTITION_NAME: axes.LAYERS},
    )
    def scan_periods(period, x_BLD, period_cache):
      new = []
      for block, layer_cache in zip(period.layers, period_cache):
        x_BLD, layer_cache = _block(block, x_BLD, layer_cache, start)
        new.append(layer_cache)
      return x_BLD, tuple(new)

    x_BLD, periods = scan_periods(model.periods, x_BLD, cache.periods)
  return model.logits(x_BLD), KVCache(tuple(prefix), periods, start + t)
