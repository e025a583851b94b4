"""The optimiser: AdamW with a warmup-then-decay learning rate, global-norm clipping and masked decay.

    tx = make_optimizer(cfg.train, params)          # params: nnx.State of nnx.Param (with metadata)
    opt_state = tx.init(nnx.as_pure(params))        # optax runs on the bare arrays

Learning rate at step t (t counts completed optimiser steps, from 0), peak lr, warmup w, T = steps:

    warmup (t < w):  lr = peak * t / w                                   (0 at the very first step)
    cosine:          lr = peak * (f + (1 - f) * (1 + cos(pi * min(1, (t - w) / (T - w)))) / 2)
    rsqrt:           lr = peak * sqrt(max(w, 1) / max(t, w, 1))          (T5 / Switch; continuous at w)
    constant:        lr = peak

with f = end_lr_fraction. Weight decay is optax's decoupled AdamW decay (Loshchilov & Hutter 2019):
the update of a decayed parameter p is -lr(t) * (adam_direction + weight_decay * p).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe.config.train import NonFinite, Schedule, TrainConfig
from moe.parallel import axes

# A path component (attribute or dict key, lower-cased) that names a norm, a bias or the token
# embedding. Matched against whole components and their `_`-separated words, so `final_norm`,
# `attn_norm`, `rmsnorm`, `ln1`, `bias`, `b`, `embed`, `embedding`, `tok_embed` and `wte` match, but
# `unembed` (an untied output projection: a matrix like any other, decayed) and `w_in` do not.
_NO_DECAY_WORDS = frozenset(
    {"norm", "rmsnorm", "layernorm", "ln", "bias", "embed", "embedding", "embeddings", "wte"}
)
_NO_DECAY_COMPONENT = re.compile(r"^(\w*norm|ln\d*|b)$")


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  """The learning rate as a function of the step (a jnp scalar or int); see the module docstring.

  Built from optax's schedules: linear warm-up from 0, then cosine decay to `end_lr_fraction` of the
  peak over the remaining steps (`optax.warmup_cosine_decay_schedule`), T5's inverse square root, or
  a constant, joined at the end of the warm-up (`optax.join_schedules`).
  """
  peak, warmup, total = cfg.learning_rate, cfg.warmup_steps, cfg.steps
  if cfg.schedule is Schedule.COSINE:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total, warmup + 1),  # optax counts the warm-up in; at least one decay step.
        end_value=peak * cfg.end_lr_fraction,
    )
  if cfg.schedule is Schedule.RSQRT:
    floor = float(max(warmup, 1))
    # join_schedules passes the steps since the boundary; this is peak * sqrt(w / t) from t = w on.
    decayed = lambda since: peak * jnp.sqrt(floor / jnp.maximum(since + warmup, floor))
  else:
    decayed = optax.constant_schedule(peak)
  return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), decayed], [warmup])


def _logical_axes(variable: Any) -> tuple:
  """The logical axis names of an nnx.Variable (its `out_sharding` metadata), or ()."""
  if not isinstance(variable, nnx.Variable):
    return ()
  names = variable.get_metadata().get("out_sharding")
  return tuple(names) if names else ()


def decays(path: tuple, variable: Any) -> bool:
  """Whether AdamW decays this parameter. The rule, in order:

  1. Rank: a parameter whose rank, not counting stacked-layer axes (logical axis `axes.LAYERS`, added
     when layers are scanned), is below 2 is a norm scale, a bias or a scalar: not decayed.
  2. Logical axes: a parameter with a `axes.NORM` axis is a norm scale: not decayed.
  3. Name: a path component that names a norm (`norm`, `*_norm`, `ln*`), a bias (`bias`, `*_bias`) or
     the token embedding (`embed`, `embedding`, `tok_embed`, `wte`, ...) is not decayed. The token
     embedding is excluded as in T5X and nanodo (its rows for rare tokens get few gradients, and decay
     would shrink them towards zero); an untied output projection is decayed like any matrix.
  Everything else (attention and FFN matrices, expert banks, the router) is decayed.

  Args:
    path: the parameter's path in the model state (attribute names, dict keys, list indices).
    variable: the nnx.Variable (for its metadata) or a bare array.
  """
  value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
  logical = _logical_axes(variable)
  rank = jnp.ndim(value) - sum(1 for name in logical if name == axes.LAYERS)
  if rank < 2 or axes.NORM in logical:
    return False
  for part in path:
    if isinstance(part, int):
      continue
    name = str(part).lower()
    if _NO_DECAY_COMPONENT.match(name) or set(name.split("_")) & _NO_DECAY_WORDS:
      return False
  return True


def weight_decay_mask(params: nnx.State) -> nnx.State:
  """A tree of bools with the structure of `nnx.as_pure(params)`: True where AdamW decays."""
  flat = [(path, decays(path, var)) for path, var in nnx.to_flat_state(params)]
  return nnx.from_flat_state(flat)


def make_optimizer(cfg: TrainConfig, params: nnx.State) -> optax.GradientTransformation:
  """Global-norm clipping (if grad_clip_norm > 0), then AdamW with the schedule and the decay mask;
  with `on_nonfinite='skip'`, all of it behind `optax.apply_if_finite`.

  Args:
    cfg: the training configuration (learning rate, schedule, Adam moments, decay, clipping).
    params: the model's parameters as an nnx.State of nnx.Param (metadata is read for the mask).

  Returns:
    An optax transformation over `nnx.as_pure(params)`-structured trees.
  """
  adamw = optax.adamw(
      learning_rate_schedule(cfg),
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=weight_decay_mask(params),
  )
  tx = adamw
  if cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
  if cfg.on_nonfinite is NonFinite.SKIP:
    # A non-finite gradient leaves parameters and moments as they were. The limit that optax would
    # then apply the update anyway is never reached: the loop stops at max_consecutive_skips.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=cfg.max_consecutive_skips + 1)
  return tx


def global_norm(tree: Any) -> jax.Array:
  """sqrt(sum of squares) over every leaf, in float32."""
  return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
