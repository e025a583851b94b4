"""Routers, routing decisions, auxiliary losses and routing statistics.

Notation (shape suffixes): G routing groups, S tokens per group, E experts, k choices per token,
C capacity (slots per expert per group), d model width.

The router is a module (it has a weight); everything else here is a pure function of its logits,
so the losses and statistics are return values, never hidden collections.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe import axes
from moe.config import Priority

# Switch Transformer (Sec. 2.4) shrinks the initialisation scale by 10 for stability; for the router
# it also starts the routing close to uniform, which is balanced.
router_init = jax.nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")


class Router(nnx.Module):
  """A linear map from d to E logits, computed in float32 whatever the activation dtype.

  Float32 because the softmax over experts and the z-loss are sensitive to rounding (Fedus et al.
  2021, "selective precision"; ST-MoE Sec. 3).
  """

  def __init__(self, d_model: int, num_experts: int, *, jitter_eps: float = 0.0, rngs: nnx.Rngs):
    self.jitter_eps = jitter_eps
    self.w = nnx.Param(
        router_init(rngs.params(), (d_model, num_experts), jnp.float32),
        out_sharding=(axes.EMBED, axes.ROUTER_EXPERTS),
    )

  def __call__(
      self, x_GSD: jax.Array, *, train: bool = False, rng: jax.Array | None = None
  ) -> jax.Array:
    """Returns float32 logits [G, S, E]. In training with jitter_eps > 0, `rng` is required."""
    x_GSD = x_GSD.astype(jnp.float32)
    if train and self.jitter_eps > 0:
      if rng is None:
        raise ValueError("moe.jitter_eps > 0 needs an rng in training")
      # Multiplicative noise on the router input (Switch Transformer, Sec. 2.4 / flaxformer).
      x_GSD = x_GSD * jax.random.uniform(
          rng, x_GSD.shape, jnp.float32, 1.0 - self.jitter_eps, 1.0 + self.jitter_eps
      )
    return jnp.einsum("gsd,de->gse", x_GSD, self.w[...], precision=jax.lax.Precision.HIGHEST)


class TopK(NamedTuple):
  """Tokens choose: each token's k experts, best first, and their gate values (combine weights)."""

  expert_index: jax.Array  # [G, S, k] int32
  gates: jax.Array  # [G, S, k] float32


class ExpertChoice(NamedTuple):
  """Experts choose: each expert's C tokens, best first, and their gate values."""

  token_index: jax.Array  # [G, E, C] int32
  gates: jax.Array  # [G, E, C] float32


def tokens_choose(probs_GSE: jax.Array, top_k: int, renormalize: bool) -> TopK:
  """Top-k experts per token. Ties go to the lower expert index (`jax.lax.top_k`).

  With `renormalize`, a token's k gates are divided by their sum before any capacity drop (Tutel,
  praxis; a dropped second choice does not boost the first).
  """
  gates, index = jax.lax.top_k(probs_GSE, top_k)
  if renormalize:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return TopK(index.astype(jnp.int32), gates)


def experts_choose(probs_GSE: jax.Array, capacity: int) -> ExpertChoice:
  """Each expert takes its top-C tokens of the group by router probability.

  Zhou et al. 2022, Eq. 1-2. Every expert is full; a token may get several experts or none. Ties go
  to the earlier token.
  """
  gates, index = jax.lax.top_k(jnp.swapaxes(probs_GSE, 1, 2), capacity)
  return ExpertChoice(index.astype(jnp.int32), gates)


def priority_order(probs_GSE: jax.Array, priority: Priority) -> jax.Array:
  """Token indices [G, S] in the order their claims are served, within every choice rank.

  INDEX: sequence order. BATCH_PRIORITIZED: highest top-1 probability first (Switch Transformer
  App. D, Riquelme et al. 2021); ties keep sequence order. The same order serves every rank, and all
  first choices are served before any second choice.
  """
  g, s, _ = probs_GSE.shape
  if priority is Priority.INDEX:
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (g, s))
  return jnp.argsort(-jnp.max(probs_GSE, axis=-1), axis=-1, stable=True).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# Losses.


def expert_load(expert_index_GSK: jax.Array, num_experts: int) -> jax.Array:
  """Fraction of the group's k * S assignments that go to each expert, before capacity: [G, E]."""
  one_hot = jax.nn.one_hot(expert_index_GSK, num_experts, dtype=jnp.float32)
  return jnp.mean(jnp.sum(one_hot, axis=2), axis=1) / expert_index_GSK.shape[-1]


def load_balancing_loss(probs_GSE: jax.Array, load_GE: jax.Array) -> jax.Array:
  """Switch load-balancing loss, normalised so that perfectly balanced routing scores 1.0 for any k.

    loss = E * sum_e f_e * P_e,   averaged over groups,

  with f_e the fraction of assignments to expert e (`expert_load`: sums to 1 over experts) and P_e
  the mean router probability of expert e (Fedus et al. 2021, Eq. 4-6). Balanced: f = P = 1/E gives
  1.0; every token on one expert with probability 1 gives E. Only P carries a gradient.

  Not for experts choose: there every expert is full, f = 1/E, and the loss is 1.0 whatever the
  router does; the layer reports 0.0 instead (see `Losses`).

  Porting: flaxformer and MaxText count f without dividing by k, so their value is k times ours (k
  at balance); GShard/praxis count only the top-1 choice. Scale the weight by k to match
  flaxformer's.
  """
  num_experts = probs_GSE.shape[-1]
  mean_prob_GE = jnp.mean(probs_GSE.astype(jnp.float32), axis=1)
  return jnp.mean(num_experts * jnp.sum(jax.lax.stop_gradient(load_GE) * mean_prob_GE, axis=-1))


def router_z_loss(logits_GSE: jax.Array) -> jax.Array:
  """ST-MoE router z-loss (Zoph et al. 2022, Eq. 5): mean over tokens of logsumexp(logits)^2."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_GSE.astype(jnp.float32), axis=-1)))


class Losses(NamedTuple):
  """Unweighted auxiliary losses of one MoE layer (float32 scalars); the caller weights them.

  `balance` is `load_balancing_loss` for tokens choose and 0.0 (no gradient) for experts choose:
  every expert is full by construction, so the loss would be a constant 1.0 that reads as perfect
  balance whatever the router does. Zhou et al. 2022 use no balance loss, and flaxformer reports 0.
  """

  balance: jax.Array
  z: jax.Array  # `router_z_loss`, for both routers.


# --------------------------------------------------------------------------------------------------
# Statistics.


class Stats(NamedTuple):
  """What a researcher plots to see whether routing is healthy. Averaged over groups.

  `capacity_used` is the fraction of the expert slots the layer computes that hold a kept
  assignment: kept / (E * C) for the buffer paths (EINSUM, GATHER), whose E * C rows per group are
  computed whether filled or not, so 1 - capacity_used is the expert compute spent on padding. With
  no capacity factor (C = S) it is k * S / (E * S) = k / E: nothing drops, but the buffers waste
  1 - k / E of their rows. DROPLESS computes exactly the assignments (1.0), and experts choose fills
  every slot (1.0).
  """

  dropped_fraction: jax.Array  # [k]: tokens whose r-th choice lost its slot (experts choose: [1],
  #                              tokens that no expert took).
  expert_load: jax.Array  # [E]: fraction of assignments per expert, before capacity.
  router_entropy: jax.Array  # []: mean over tokens of -sum_e p log p (nats; ln E is uniform).
  top1_probability: jax.Array  # []: mean over tokens of max_e p.
  capacity_used: jax.Array  # []: kept assignments / computed expert slots (see above).


def router_stats(
    probs_GSE: jax.Array, load_GE: jax.Array, kept_GSK: jax.Array, capacity: int | None
) -> Stats:
  """Statistics of one layer's routing, averaged over groups (see `Stats`).

  Args:
    probs_GSE: router probabilities [G, S, E].
    load_GE: fraction of assignments per expert before capacity [G, E] (`expert_load`).
    kept_GSK: bool [G, S, k], whether each claim kept a slot (experts choose: [G, S, 1], whether
      any expert took the token).
    capacity: C, the buffer slots per expert per group of the path that ran, so that capacity_used
      is kept / (E * C); None for a path without padded buffers (DROPLESS; experts choose, whose
      buffers are always full), where capacity_used is 1.0.
  """
  probs = probs_GSE.astype(jnp.float32)
  num_experts = probs.shape[-1]
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  kept = kept_GSK.astype(jnp.float32)
  if capacity is None:
    used = jnp.ones((), jnp.float32)
  else:
    used = jnp.mean(jnp.sum(kept, axis=(1, 2)) / (num_experts * capacity))
  return Stats(
      dropped_fraction=1.0 - jnp.mean(kept, axis=(0, 1)),
      expert_load=jnp.mean(load_GE, axis=0),
      router_entropy=jnp.mean(entropy),
      top1_probability=jnp.mean(jnp.max(probs, axis=-1)),
      capacity_used=used,
  )
