"""Routing recipes since 2024: sigmoid scores, auxiliary-loss-free balancing by a selection bias, and
balance losses over the global batch and over sequences.

* Scores (`Score`): softmax over experts (Switch, GShard), or DeepSeek-V3's sigmoid affinity per
  expert, whose k chosen values are normalised to sum to 1 to form the gates (DeepSeek-V3 report,
  Eq. 13-15). The balance losses and the statistics read `probabilities`: the softmax, or the
  sigmoid affinities normalised over the experts (DeepSeek-V3's s', Eq. 19).
* Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3 Sec. 2.1.2): a per-expert bias b is
  added to the scores for the top-k choice only; gates come from the unbiased scores. After every
  training step b_e <- b_e + u * sign(mean load - load_e), u the update rate, load the fraction of
  the step's assignments per expert over the whole global batch (an [E] all-reduce under a mesh).
  The bias is training state, not a parameter: no gradient, no weight decay, not in the optimiser.
* Global-batch balance (Qiu et al. 2025, "Demons in the Detail"): the Switch loss E * sum_e f_e P_e
  with f and P pooled over every routing group of the step instead of averaged per group; with one
  group per batch the two are the same number.
* Sequence-wise balance (DeepSeek-V3 Eq. 17-20, the small complementary loss kept beside the bias):
  the Switch loss of each sequence, averaged over sequences.

Causality: none of these lets a token's routing depend on a later token. The bias of step t is a
function of earlier steps' batches only (like a parameter); the pooled losses couple the tokens of a
batch through gradients, not through the forward pass that routes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.config.enums import Score
from moe.layers import routing


class RouterBias(nnx.Variable):
  """The per-expert selection bias of auxiliary-loss-free balancing: training state that the train
  step updates from the step's expert load, outside the optimiser (`updated_bias`)."""


def probabilities_and_affinity(logits_GSE: jax.Array, score: Score) -> tuple[jax.Array, jax.Array]:
  """(probabilities over experts [G, S, E], affinity [G, S, E]) of float32 router logits.

  Softmax: both are the softmax. Sigmoid: the affinity is sigmoid(logit) per expert and the
  probabilities are the affinities normalised to sum to 1 over the experts.
  """
  logits_GSE = logits_GSE.astype(jnp.float32)
  if score is Score.SOFTMAX:
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    return probs_GSE, probs_GSE
  affinity_GSE = jax.nn.sigmoid(logits_GSE)
  return affinity_GSE / jnp.sum(affinity_GSE, axis=-1, keepdims=True), affinity_GSE


def choose(
    affinity_GSE: jax.Array,
    top_k: int,
    *,
    score: Score,
    renormalize: bool,
    bias_E: jax.Array | None = None,
    token_mask_GS: jax.Array | None = None,
) -> routing.TopK:
  """Each token's k experts by affinity plus the selection bias, with gates from the unbiased
  affinities: normalised over the k chosen for sigmoid scores (always) and softmax scores (when
  `renormalize`). Ties go to the lower expert index. A padded token keeps its indices with gates 0.
  """
  ranked_GSE = affinity_GSE if bias_E is None else affinity_GSE + jax.lax.stop_gradient(bias_E)
  _, index_GSK = routing.top_k_per_group(ranked_GSE, top_k)
  gates_GSK = jnp.take_along_axis(affinity_GSE, index_GSK, axis=-1)
  if score is Score.SIGMOID or renormalize:
    gates_GSK = gates_GSK / jnp.sum(gates_GSK, axis=-1, keepdims=True)
  if token_mask_GS is not None:
    gates_GSK = jnp.where(token_mask_GS[..., None], gates_GSK, 0.0)
  return routing.TopK(index_GSK.astype(jnp.int32), gates_GSK)


def updated_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """b + rate * sign(mean load - load): raises the bias of under-loaded experts, lowers the others'.

  `load_E` is the fraction of the step's assignments per expert (it sums to 1 without padding, so
  its mean is 1 / E); an expert exactly at the mean keeps its bias (sign 0). Leading axes (layers
  stacked by a scan) are independent: the mean is over the last (expert) axis.
  """
  load_E = jax.lax.stop_gradient(load_E.astype(jnp.float32))
  return bias_E + rate * jnp.sign(jnp.mean(load_E, axis=-1, keepdims=True) - load_E)


def global_balance_loss(
    probs_GSE: jax.Array, load_GE: jax.Array, token_mask_GS: jax.Array | None = None
) -> jax.Array:
  """E * sum_e f_e * P_e with f (`routing.expert_load`'s fractions) and P (mean probabilities)
  pooled over all G groups: the per-group loss of `routing.load_balancing_loss` when G = 1.

  Padding follows `routing.load_balancing_loss`: left out of f and P, counted in S.
  """
  num_experts = probs_GSE.shape[-1]
  probs_GSE = probs_GSE.astype(jnp.float32)
  if token_mask_GS is not None:
    probs_GSE = jnp.where(token_mask_GS[..., None], probs_GSE, 0.0)
  load_E = jnp.mean(jax.lax.stop_gradient(load_GE), axis=0)
  return num_experts * jnp.sum(load_E * jnp.mean(probs_GSE, axis=(0, 1)))


def sequence_balance_loss(
    probs_BLE: jax.Array, expert_index_BLK: jax.Array, token_mask_BL: jax.Array | None = None
) -> jax.Array:
  """The Switch loss of each sequence, averaged over the B sequences (DeepSeek-V3's complementary
  sequence-wise loss up to its weight alpha: its f_i is E times our fractions)."""
  load_BE = routing.expert_load(expert_index_BLK, probs_BLE.shape[-1], token_mask_BL)
  return routing.load_balancing_loss(probs_BLE, load_BE, token_mask_BL)
