"""The MoE feed-forward layer: route, dispatch, run the experts, combine; return losses and stats.

    y, aux = MoEFeedForward(cfg, d_model, rngs=nnx.Rngs(0))(x_BLD, train=True, rng=key)
    loss = task_loss + auxiliary_loss(cfg, aux.losses)

Scores are a softmax or DeepSeek-V3's sigmoid (`MoEConfig.score`); with `balance='bias'` the layer
holds a per-expert selection bias (`balancing.RouterBias`, state the train step updates, not a
parameter) that shifts which experts are chosen but not their gates (`moe.layers.balancing`).

Tokens [B, L, d] are cut into routing groups [G, S, d] along the flattened token axis (per sequence
by default, or `group_size` tokens), so which tokens drop depends on the data only, never on the
mesh.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe.config.enums import Balance, BalanceScope, Dispatch, RouterKind
from moe.config.layer import MoEConfig
from moe.layers import balancing, dispatch, expert_parallel, routing
from moe.layers.ffn import Experts, MLP
from moe.parallel import axes


class MoEAux(NamedTuple):
  """What a MoE layer returns beside its output: unweighted losses and routing statistics."""

  losses: routing.Losses
  stats: routing.Stats


def auxiliary_loss(cfg: MoEConfig, losses: routing.Losses) -> jax.Array:
  """The weighted auxiliary losses to add to the task loss; each loss averaged over its leading
  (sparse layer) axes first.

  The balance loss counts only with `balance='loss'` (with 'bias' or 'none' it is still reported);
  the sequence-wise loss with its own weight whatever the balance (DeepSeek-V3 keeps it beside the
  bias, Sec. 2.1.2); the z-loss always.
  """
  mean = lambda x: jnp.mean(x.astype(jnp.float32))
  total = cfg.z_loss_weight * mean(losses.z)
  if cfg.balance is Balance.LOSS:
    total = total + cfg.balance_loss_weight * mean(losses.balance)
  if cfg.sequence_balance_weight:
    total = total + cfg.sequence_balance_weight * mean(losses.sequence_balance)
  return total


class MoEFeedForward(nnx.Module):
  """E expert FFNs behind a router, with an optional always-on shared expert and, with
  `balance='bias'`, the selection bias `router_bias` [E] (`balancing.RouterBias`, zeros at first).

  Args:
    cfg: the layer's configuration (validated on construction).
    d_model: model width d.
    rngs: parameter initialisation.
  """

  def __init__(self, cfg: MoEConfig, d_model: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.router = routing.Router(d_model, cfg.num_experts, jitter_eps=cfg.jitter_eps, rngs=rngs)
    self.router_bias = (
        balancing.RouterBias(
            jnp.zeros((cfg.num_experts,), jnp.float32), out_sharding=(axes.ROUTER_EXPERTS,)
        )
        if cfg.balance is Balance.BIAS
        else None
    )
    self.experts = Experts(
        cfg.num_experts,
        d_model,
        cfg.expert_hidden,
        cfg.activation,
        dtype=cfg.compute_dtype,
        grouped_matmul=cfg.grouped_matmul,
        rngs=rngs,
    )
    self.shared_expert = (
        MLP(d_model, cfg.shared_expert_hidden, cfg.activation, dtype=cfg.compute_dtype, rngs=rngs)
        if cfg.shared_expert_hidden
        else None
    )

  def _experts_on_buffers(self, x_GECD: jax.Array) -> jax.Array:
    # Buffers are split over the expert mesh axis here: the resharding from token-side groups to
    # expert-side buffers is the all-to-all of expert parallelism (GShard Sec. 3.2).
    spec = (axes.EXPERT_GROUP, axes.ACT_EXPERT, None, axes.ACT_EMBED)
    y_GECD = self.experts(axes.constrain(x_GECD, spec))
    return axes.constrain(y_GECD, spec)

  def _groups_and_router(self, x_BLD, train: bool, rng):
    """Tokens cut into routing groups [G, S, d], their float32 logits, probabilities and
    affinities [G, S, E] (`balancing.probabilities_and_affinity`: the probabilities feed the
    losses, statistics and priority order, the affinities the choice and the gates).

    Returns:
      (x_GSD, logits_GSE, probs_GSE, affinity_GSE).
    """
    cfg = self.cfg
    b, l, d = x_BLD.shape
    g, s = cfg.group_shape(b, l)
    x_GSD = axes.constrain(
        x_BLD.astype(cfg.compute_dtype).reshape(g, s, d), (axes.GROUP, None, axes.ACT_EMBED)
    )
    # Routing arrays stay split like their groups. Unconstrained, the partitioner gathered the
    # probabilities [G, S, E] of the whole batch onto every device (its consumers, top-k, sorts and
    # means over groups, accept any sharding): per sparse layer that is 4 B x E per token of the
    # global batch on every device.
    spec = (axes.GROUP, None, None)
    logits_GSE = axes.constrain(self.router(x_GSD, train=train, rng=rng), spec)
    probs_GSE, affinity_GSE = balancing.probabilities_and_affinity(logits_GSE, cfg.score)
    return x_GSD, logits_GSE, axes.constrain(probs_GSE, spec), axes.constrain(affinity_GSE, spec)

  def _choose(self, affinity_GSE, mask_GS) -> routing.TopK:
    """Tokens choose: each token's k experts by affinity plus the selection bias (if any)."""
    cfg = self.cfg
    return balancing.choose(
        affinity_GSE,
        cfg.top_k,
        score=cfg.score,
        renormalize=cfg.renormalize_gates,
        bias_E=None if self.router_bias is None else self.router_bias[...],
        token_mask_GS=mask_GS,
    )

  def _token_mask(self, token_mask_BL, x_GSD) -> jax.Array | None:
    """The padding mask as routing groups, bool [G, S] (True: a real token), or None."""
    if token_mask_BL is None:
      return None
    g, s, _ = x_GSD.shape
    return axes.constrain(jnp.asarray(token_mask_BL).astype(bool).reshape(g, s), (axes.GROUP, None))

  def _slots(self, expert_index_GSK, probs_GSE, mask_GS):
    """Each claim's slot in its expert's buffer [G, S, k], as the configured dispatch numbers it."""
    cfg = self.cfg
    slots_fn = (
        dispatch.slots_by_cumsum if cfg.dispatch is Dispatch.EINSUM else dispatch.slots_by_sort
    )
    order_GS = routing.priority_order(probs_GSE, cfg.priority)
    return slots_fn(
        expert_index_GSK,
        order_GS,
        cfg.num_experts,
        token_mask_GS=mask_GS,
        serving_order=cfg.serving_order,
    )

  def routing_decisions(
      self,
      x_BLD: jax.Array,
      *,
      train: bool = False,
      rng: jax.Array | None = None,
      token_mask_BL: jax.Array | None = None,
  ) -> tuple[jax.Array, jax.Array]:
    """Which expert each claim goes to and whether it keeps its slot, for inspection and tests.

    Tokens choose: (expert_index [G, S, k], kept [G, S, k] bool; a padded token keeps nothing).
    Experts choose: (token_index [G, E, C], [G, E, C] bool: False where the pick is padding).
    Computes what `__call__` decides, without running the experts.
    """
    cfg = self.cfg
    x_GSD, _, probs_GSE, affinity_GSE = self._groups_and_router(x_BLD, train, rng)
    mask_GS = self._token_mask(token_mask_BL, x_GSD)
    s = probs_GSE.shape[1]
    if cfg.router is RouterKind.EXPERTS_CHOOSE:
      choice = routing.experts_choose(probs_GSE, cfg.capacity(s, train), mask_GS)
      if mask_GS is None:
        return choice.token_index, jnp.ones(choice.token_index.shape, bool)
      return choice.token_index, jax.vmap(lambda m, i: m[i])(mask_GS, choice.token_index)
    top = self._choose(affinity_GSE, mask_GS)
    kept_GSK = jnp.ones(top.expert_index.shape, bool)
    if mask_GS is not None:
      kept_GSK = kept_GSK & mask_GS[..., None]
    if cfg.dispatch is Dispatch.DROPLESS:
      return top.expert_index, kept_GSK
    slots_GSK = self._slots(top.expert_index, probs_GSE, mask_GS)
    return top.expert_index, slots_GSK < cfg.capacity(s, train)

  def _experts_choose(self, x_GSD, probs_GSE, affinity_GSE, mask_GS, train: bool):
    """Experts choose: (y [G, S, d], covered [G, S, 1], load [G, E], C, filled slots [G], None). Its
    scores are always the softmax (`MoEConfig` refuses sigmoid): `affinity_GSE` is `probs_GSE`."""
    del affinity_GSE
    cfg = self.cfg
    g, s, _ = x_GSD.shape
    capacity = cfg.capacity(s, train)
    choice = routing.experts_choose(probs_GSE, capacity, mask_GS)
    if cfg.dispatch is Dispatch.EINSUM:
      run = dispatch.einsum_expert_choice
      # Dispatch and combine contract on the token side, where they are local; the buffers go to
      # the experts and back by all-to-all. Left to choose, the partitioner gathered the combine's
      # output and the dispatch's gradient [G, S, d] over the whole batch under an expert split.
      token_side = (axes.GROUP, None, None, axes.ACT_EMBED)
      experts_fn = lambda x: axes.constrain(
          self._experts_on_buffers(axes.constrain(x, token_side)), token_side
      )
    else:
      run, experts_fn = dispatch.gather_expert_choice, self._experts_on_buffers
    y_GSD, covered_GS1 = run(x_GSD, choice.token_index, choice.gates, experts_fn)
    if mask_GS is not None:  # A padded pick (gate 0) covers nothing.
      covered_GS1 = covered_GS1 & mask_GS[..., None]
    load_GE, filled_G = self._expert_choice_load(choice.token_index, mask_GS, s)
    return y_GSD, covered_GS1, load_GE, capacity, filled_G, None

  def _expert_choice_load(self, token_index_GEC, mask_GS, s: int):
    """(load [G, E], filled slots [G]) of experts choose, counting real picks only.

    Every expert takes C tokens, so without padding the load is 1/E and every slot is filled. An
    expert that runs out of real tokens picks padding at gate 0 (`routing.experts_choose`): such a
    slot is computed but holds no assignment, so it counts neither in the load nor as filled.
    """
    g, e, c = token_index_GEC.shape
    if mask_GS is None:
      return jnp.full((g, e), 1.0 / e, jnp.float32), jnp.full((g,), float(e * c), jnp.float32)
    real_GEC = jnp.take_along_axis(mask_GS, token_index_GEC.reshape(g, e * c), axis=1)
    picks_GE = jnp.sum(real_GEC.reshape(g, e, c).astype(jnp.float32), axis=2)
    filled_G = jnp.sum(picks_GE, axis=1)
    # In `expert_load`'s units (a group's share of its real assignments, times its real share of
    # S), which `routing.router_stats` pools over groups.
    real_share_G = jnp.sum(mask_GS.astype(jnp.float32), axis=1) / s
    return picks_GE / jnp.maximum(filled_G, 1.0)[:, None] * real_share_G[:, None], filled_G

  def _tokens_choose(self, x_GSD, probs_GSE, affinity_GSE, mask_GS, train: bool):
    """Tokens choose: (y [G, S, d], kept [G, S, k], load [G, E], C of the buffers or None, None,
    expert_index [G, S, k])."""
    cfg = self.cfg
    top = self._choose(affinity_GSE, mask_GS)
    load_GE = routing.expert_load(top.expert_index, cfg.num_experts, mask_GS)
    if cfg.dispatch is Dispatch.DROPLESS:
      # No buffers: it computes exactly the assignments (capacity_used 1.0).
      if not expert_parallel.under_mesh():
        y_GSD, kept_GSK = dispatch.dropless_moe(
            x_GSD, top.expert_index, top.gates, self.experts.grouped, cfg.num_experts, mask_GS
        )
        return y_GSD, kept_GSK, load_GE, None, None, top.expert_index
      # Under a mesh each device sorts its own claims; with the experts split over a mesh axis each
      # claim travels to its expert's device (all-to-all). Left to the partitioner, the global sort
      # and ragged_dot would replicate every claim of the batch or gather the weights.
      # Padded tokens' gates are already 0 (`balancing.choose`), so their output is zero.
      y_GSD, kept_GSK = expert_parallel.dropless_moe(
          x_GSD, top.expert_index, top.gates, self.experts, cfg.num_experts
      )
      if mask_GS is not None:
        kept_GSK = kept_GSK & mask_GS[..., None]
      return y_GSD, kept_GSK, load_GE, None, None, top.expert_index
    capacity = cfg.capacity(x_GSD.shape[1], train)
    run = dispatch.einsum_moe if cfg.dispatch is Dispatch.EINSUM else dispatch.gather_moe
    y_GSD, kept_GSK = run(
        x_GSD,
        top.expert_index,
        top.gates,
        routing.priority_order(probs_GSE, cfg.priority),
        capacity,
        cfg.num_experts,
        self._experts_on_buffers,
        token_mask_GS=mask_GS,
        serving_order=cfg.serving_order,
    )
    return y_GSD, kept_GSK, load_GE, capacity, None, top.expert_index

  def _losses(self, shape_BL, logits_GSE, probs_GSE, load_GE, expert_index_GSK, mask_GS):
    """The layer's unweighted `routing.Losses`: balance per group or pooled over the batch (an [E]
    reduction over the groups, never a gather of token-level arrays), z, per-sequence balance."""
    cfg = self.cfg
    z = routing.router_z_loss(logits_GSE, mask_GS)
    zero = jnp.zeros((), jnp.float32)
    if cfg.router is RouterKind.EXPERTS_CHOOSE:
      # Every expert is full by construction (Zhou et al. 2022 use no balance loss), so the Switch
      # loss would be E * sum_e (1/E) * P_e = 1.0 for any router: a constant with zero gradient that
      # reads as perfect balance on a dashboard. Report 0.0 instead, as flaxformer does.
      return routing.Losses(balance=zero, z=z, sequence_balance=zero)
    if cfg.balance_scope is BalanceScope.GLOBAL:
      balance = balancing.global_balance_loss(probs_GSE, load_GE, mask_GS)
    else:
      balance = routing.load_balancing_loss(probs_GSE, load_GE, mask_GS)
    sequence = zero
    if cfg.sequence_balance_weight:
      b, l = shape_BL
      per_sequence = lambda a: a.reshape((b, l) + a.shape[2:])
      mask_BL = None if mask_GS is None else per_sequence(mask_GS)
      sequence = balancing.sequence_balance_loss(
          per_sequence(probs_GSE), per_sequence(expert_index_GSK), mask_BL
      )
    return routing.Losses(balance=balance, z=z, sequence_balance=sequence)

  def __call__(
      self,
      x_BLD: jax.Array,
      *,
      train: bool = False,
      rng: jax.Array | None = None,
      token_mask_BL: jax.Array | None = None,
  ) -> tuple[jax.Array, MoEAux]:
    """Applies the layer.

    Args:
      x_BLD: tokens [batch, length, d].
      train: training mode: train capacity factor and router jitter.
      rng: key for the router jitter (needed only when training with jitter_eps > 0).
      token_mask_BL: [batch, length], nonzero for a real token and 0 for padding (the batch's
        `weights`), or None (every token real). A padded token claims nothing: it takes no slot,
        is never picked by an expert while a real token remains, gets zero from the routed experts
        (a shared expert, a dense FFN, still runs on it), and the losses and statistics leave it
        out (see `moe.layers.routing`). An all-ones mask gives exactly the result of None.

    Returns:
      y [batch, length, d] in the compute dtype, and `MoEAux` (losses, stats). The balance loss
      is 0.0 for experts choose (see `routing.Losses`). The selection bias is read, never
      written: the train step updates it (`moe.trainer.steps`).
    """
    cfg = self.cfg
    x_GSD, logits_GSE, probs_GSE, affinity_GSE = self._groups_and_router(x_BLD, train, rng)
    mask_GS = self._token_mask(token_mask_BL, x_GSD)
    route = self._experts_choose if cfg.router is RouterKind.EXPERTS_CHOOSE else self._tokens_choose
    y_GSD, kept_GSK, load_GE, capacity, filled_G, expert_index_GSK = route(
        x_GSD, probs_GSE, affinity_GSE, mask_GS, train
    )

    y_GSD = axes.constrain(y_GSD, (axes.GROUP, None, axes.ACT_EMBED))
    if self.shared_expert is not None:
      y_GSD = y_GSD + self.shared_expert(x_GSD)
    losses = self._losses(
        x_BLD.shape[:2], logits_GSE, probs_GSE, load_GE, expert_index_GSK, mask_GS
    )
    stats = routing.router_stats(probs_GSE, load_GE, kept_GSK, capacity, mask_GS, filled_G=filled_G)
    return y_GSD.reshape(x_BLD.shape), MoEAux(losses, stats)
