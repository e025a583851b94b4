"""Routers, routing decisions, auxiliary losses and routing statistics.

Shape suffixes as in `moe` (G routing groups, S tokens per group, E experts, K choices per token,
C capacity: slots per expert per group, D model width).

Padding (flaxformer parity): every function that takes `token_mask_GS` (bool [G, S], True for a real
token, False for padding; None means every token is real) lets a padded token claim nothing. It is
never picked by an expert while a real token remains, it gets gate 0, the balance loss leaves it out
of the assignment fractions and the mean probabilities while still counting it in S (flaxformer's
convention), and the z-loss and the statistics average over real tokens only (see `router_z_loss`).

The router is a module (it has a weight); everything else here is a pure function of its logits,
so the losses and statistics are return values, never hidden collections.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.scipy import special

from moe.config.enums import Priority
from moe.parallel import axes

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


def top_k_per_group(x_GXY: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k` over the last axis, on each device's own groups (see `axes.per_group`)."""
  return axes.per_group(lambda x: jax.lax.top_k(x, k), x_GXY)


def tokens_choose(
    probs_GSE: jax.Array, top_k: int, renormalize: bool, token_mask_GS: jax.Array | None = None
) -> TopK:
  """Top-k experts per token. Ties go to the lower expert index (`jax.lax.top_k`).

  With `renormalize`, a token's k gates are divided by their sum before any capacity drop (Tutel,
  praxis; a dropped second choice does not boost the first). A padded token (`token_mask_GS`
  False) keeps its expert indices but gets gates 0, as in flaxformer; the dispatch paths then give
  its claims no slot (`moe.dispatch`).
  """
  gates, index = top_k_per_group(probs_GSE, top_k)
  if renormalize:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  if token_mask_GS is not None:
    gates = jnp.where(token_mask_GS[..., None], gates, 0.0)
  return TopK(index.astype(jnp.int32), gates)


def experts_choose(
    probs_GSE: jax.Array, capacity: int, token_mask_GS: jax.Array | None = None
) -> ExpertChoice:
  """Each expert takes its top-C tokens of the group by router probability.

  Zhou et al. 2022, Eq. 1-2. Every expert is full; a token may get several experts or none. Ties go
  to the earlier token. A padded token (`token_mask_GS` False) ranks below every real token, so it
  is picked only when fewer than C real tokens remain, and then with gate 0 (no output, no gradient).
  """
  probs_GES = jnp.swapaxes(probs_GSE, 1, 2)
  if token_mask_GS is None:
    gates, index = top_k_per_group(probs_GES, capacity)
    return ExpertChoice(index.astype(jnp.int32), gates)
  # Probabilities are in [0, 1], so p - 2 puts padding below any real token, even one at
  # probability 0, and keeps the padded tokens' own order (a deterministic choice among them).
  ranked_GES = jnp.where(token_mask_GS[:, None, :], probs_GES, probs_GES - 2.0)
  gates, index = top_k_per_group(ranked_GES, capacity)
  return ExpertChoice(index.astype(jnp.int32), jnp.where(gates < 0.0, 0.0, gates))


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


def expert_load(
    expert_index_GSK: jax.Array, num_experts: int, token_mask_GS: jax.Array | None = None
) -> jax.Array:
  """Fraction of the group's k * S assignments that go to each expert, before capacity: [G, E].

  A padded token's assignments are not counted, but S still counts it (flaxformer), so with padding
  the fractions sum to the real share of the group.
  """
  one_hot = jax.nn.one_hot(expert_index_GSK, num_experts, dtype=jnp.float32)
  if token_mask_GS is not None:
    one_hot = jnp.where(token_mask_GS[..., None, None], one_hot, 0.0)
  return jnp.mean(jnp.sum(one_hot, axis=2), axis=1) / expert_index_GSK.shape[-1]


def load_balancing_loss(
    probs_GSE: jax.Array, load_GE: jax.Array, token_mask_GS: jax.Array | None = None
) -> jax.Array:
  """Switch load-balancing loss, normalised so that perfectly balanced routing scores 1.0 for any k.

    loss = E * sum_e f_e * P_e,   averaged over groups,

  with f_e the fraction of assignments to expert e (`expert_load`: sums to 1 over experts) and P_e
  the mean router probability of expert e (Fedus et al. 2021, Eq. 4-6). Balanced: f = P = 1/E gives
  1.0; every token on one expert with probability 1 gives E. Only P carries a gradient.

  Not for experts choose: there every expert is full, f = 1/E, and the loss is 1.0 whatever the
  router does; the layer reports 0.0 instead (see `Losses`).

  Padding (`token_mask_GS`, with `load_GE` from `expert_load` with the same mask): as flaxformer,
  a padded token is left out of f and P but still counted in S, so P_e = sum over real tokens of
  p_e / S. A group that is half padding and balanced scores 0.25, not 1.0; what matters, the
  gradient, only ever reaches real tokens' probabilities.

  Porting: flaxformer and MaxText count f without dividing by k, so their value is k times ours (k
  at balance); GShard/praxis count only the top-1 choice. Scale the weight by k to match
  flaxformer's.
  """
  num_experts = probs_GSE.shape[-1]
  probs_GSE = probs_GSE.astype(jnp.float32)
  if token_mask_GS is not None:
    probs_GSE = jnp.where(token_mask_GS[..., None], probs_GSE, 0.0)
  mean_prob_GE = jnp.mean(probs_GSE, axis=1)
  return jnp.mean(num_experts * jnp.sum(jax.lax.stop_gradient(load_GE) * mean_prob_GE, axis=-1))


def _mean_over_real(x_GS: jax.Array, token_mask_GS: jax.Array | None) -> jax.Array:
  """Mean of x [G, S, ...] over the real tokens of all groups (over all tokens if no mask).

  With an all-True mask this is the plain mean bit for bit: the sum runs over the same values
  and the divisor is the same count. No real token at all gives 0.
  """
  if token_mask_GS is None:
    return jnp.mean(x_GS, axis=(0, 1))
  mask = token_mask_GS.reshape(token_mask_GS.shape + (1,) * (x_GS.ndim - 2))
  count = jnp.sum(token_mask_GS.astype(jnp.float32))
  return jnp.sum(jnp.where(mask, x_GS, 0.0), axis=(0, 1)) / jnp.maximum(count, 1.0)


def router_z_loss(logits_GSE: jax.Array, token_mask_GS: jax.Array | None = None) -> jax.Array:
  """ST-MoE router z-loss (Zoph et al. 2022, Eq. 5): mean over tokens of logsumexp(logits)^2.

  With padding, the mean runs over real tokens only: the loss of a batch then does not depend on
  how much padding it holds, and padded rows (whose logits are whatever the model computes at a
  padding position) neither add value nor gradient. flaxformer instead counts a padded token as
  (ln E)^2, the value at zero logits, and divides by all S tokens: its value is
  (n_real * ours + n_pad * (ln E)^2) / S, with the same gradient up to the factor n_real / S.
  """
  z_GS = jnp.square(jax.nn.logsumexp(logits_GSE.astype(jnp.float32), axis=-1))
  return _mean_over_real(z_GS, token_mask_GS)


class Losses(NamedTuple):
  """Unweighted auxiliary losses of one MoE layer (float32 scalars); the caller weights them
  (`moe.layers.moe_layer.auxiliary_loss`).

  `balance` is `load_balancing_loss` per routing group, or pooled over the whole batch
  (`moe.layers.balancing.global_balance_loss`, `MoEConfig.balance_scope`), for tokens choose, and
  0.0 (no gradient) for experts choose: every expert is full by construction, so the loss would be
  a constant 1.0 that reads as perfect balance whatever the router does. Zhou et al. 2022 use no
  balance loss, and flaxformer reports 0.
  """

  balance: jax.Array
  z: jax.Array  # `router_z_loss`, for both routers.
  # DeepSeek-V3's complementary loss (`moe.layers.balancing.sequence_balance_loss`); 0.0 when its
  # weight `MoEConfig.sequence_balance_weight` is 0, and for experts choose.
  sequence_balance: jax.Array


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
    probs_GSE: jax.Array,
    load_GE: jax.Array,
    kept_GSK: jax.Array,
    capacity: int | None,
    token_mask_GS: jax.Array | None = None,
    filled_G: jax.Array | None = None,
) -> Stats:
  """Statistics of one layer's routing, averaged over groups (see `Stats`).

  Args:
    probs_GSE: router probabilities [G, S, E].
    load_GE: fraction of assignments per expert before capacity [G, E] (`expert_load`, with the
      same `token_mask_GS`).
    kept_GSK: bool [G, S, k], whether each claim kept a slot (experts choose: [G, S, 1], whether
      any expert took the token).
    capacity: C, the buffer slots per expert per group of the path that ran, so that capacity_used
      is kept / (E * C); None for a path without padded buffers (DROPLESS), where it is 1.0.
    token_mask_GS: bool [G, S], False for padding, or None. Every statistic but capacity_used is
      then over real tokens only, pooled over groups: dropped_fraction is the share of real
      tokens' r-th choices that lost their slot, expert_load the share of real assignments.
      capacity_used stays kept / (E * C) on the buffer paths (a padded token keeps no slot) and
      1.0 without buffers (the rows DROPLESS computes for padded claims, at gate 0, are not told
      apart).
    filled_G: the slots per group that hold a real assignment, where `kept_GSK` cannot count them
      (experts choose: a token may fill several slots, and a slot may hold padding).
  """
  probs = probs_GSE.astype(jnp.float32)
  num_experts = probs.shape[-1]
  entropy = jnp.sum(special.entr(probs), axis=-1)  # entr(0) = 0: an expert of zero probability.
  kept = kept_GSK.astype(jnp.float32)
  if capacity is None:
    used = jnp.ones((), jnp.float32)
  elif filled_G is not None:
    used = jnp.mean(filled_G / (num_experts * capacity))
  else:
    used = jnp.mean(jnp.sum(kept, axis=(1, 2)) / (num_experts * capacity))
  if token_mask_GS is not None:
    # `load_GE` counts real assignments over k * S; S / (mean real tokens per group) turns the
    # group mean into the pooled share of real assignments (exactly 1.0 when nothing is padded).
    real_G = jnp.sum(token_mask_GS.astype(jnp.float32), axis=1)
    load_GE = load_GE * (probs.shape[1] / jnp.maximum(jnp.mean(real_G), 1e-30))
  return Stats(
      dropped_fraction=1.0 - _mean_over_real(kept, token_mask_GS),
      expert_load=jnp.mean(load_GE, axis=0),
      router_entropy=_mean_over_real(entropy, token_mask_GS),
      top1_probability=_mean_over_real(jnp.max(probs, axis=-1), token_mask_GS),
      capacity_used=used,
  )
