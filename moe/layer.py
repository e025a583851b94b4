"""The MoE feed-forward layer: route, dispatch, run the experts, combine; return losses and stats.

    y, aux = MoEFeedForward(cfg, d_model, rngs=nnx.Rngs(0))(x_BLD, train=True, rng=key)
    loss = (task_loss + cfg.balance_loss_weight * aux.losses.balance
            + cfg.z_loss_weight * aux.losses.z)

Tokens [B, L, d] are cut into routing groups [G, S, d] along the flattened token axis (per sequence
by default, or `group_size` tokens), so which tokens drop depends on the data only, never on the
mesh.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe import axes, dispatch, expert_parallel, routing
from moe.config import Dispatch, MoEConfig, RouterKind
from moe.ffn import MLP, Experts


class MoEAux(NamedTuple):
  """What a MoE layer returns beside its output: unweighted losses and routing statistics."""

  losses: routing.Losses
  stats: routing.Stats


class MoEFeedForward(nnx.Module):
  """E expert FFNs behind a router, with an optional always-on shared expert.

  Args:
    cfg: the layer's configuration (validated on construction).
    d_model: model width d.
    rngs: parameter initialisation.
  """

  def __init__(self, cfg: MoEConfig, d_model: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.router = routing.Router(d_model, cfg.num_experts, jitter_eps=cfg.jitter_eps, rngs=rngs)
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
    """Tokens cut into routing groups [G, S, d], their float32 logits and probabilities [G, S, E].

    Returns:
      (x_GSD, logits_GSE, probs_GSE).
    """
    cfg = self.cfg
    b, l, d = x_BLD.shape
    g, s = cfg.group_shape(b, l)
    x_GSD = axes.constrain(
        x_BLD.astype(cfg.compute_dtype).reshape(g, s, d), (axes.GROUP, None, axes.ACT_EMBED)
    )
    logits_GSE = self.router(x_GSD, train=train, rng=rng)
    return x_GSD, logits_GSE, jax.nn.softmax(logits_GSE, axis=-1)

  def routing_decisions(
      self, x_BLD: jax.Array, *, train: bool = False, rng: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """Which expert each claim goes to and whether it keeps its slot, for inspection and tests.

    Tokens choose: (expert_index [G, S, k], kept [G, S, k] bool). Experts choose: (token_index
    [G, E, C], all-True [G, E, C]). Computes what `__call__` decides, without running the experts.
    """
    cfg = self.cfg
    _, _, probs_GSE = self._groups_and_router(x_BLD, train, rng)
    s = probs_GSE.shape[1]
    if cfg.router is RouterKind.EXPERTS_CHOOSE:
      choice = routing.experts_choose(probs_GSE, cfg.capacity(s, train))
      return choice.token_index, jnp.ones(choice.token_index.shape, bool)
    top = routing.tokens_choose(probs_GSE, cfg.top_k, cfg.renormalize_gates)
    if cfg.dispatch is Dispatch.DROPLESS:
      return top.expert_index, jnp.ones(top.expert_index.shape, bool)
    order_GS = routing.priority_order(probs_GSE, cfg.priority)
    slots_fn = (
        dispatch.slots_by_cumsum if cfg.dispatch is Dispatch.EINSUM else dispatch.slots_by_sort
    )
    slots = slots_fn(top.expert_index, order_GS, cfg.num_experts)
    return top.expert_index, slots < cfg.capacity(s, train)

  def __call__(
      self, x_BLD: jax.Array, *, train: bool = False, rng: jax.Array | None = None
  ) -> tuple[jax.Array, MoEAux]:
    """Applies the layer.

    Args:
      x_BLD: tokens [batch, length, d].
      train: training mode: train capacity factor and router jitter.
      rng: key for the router jitter (needed only when training with jitter_eps > 0).

    Returns:
      y [batch, length, d] in the compute dtype, and `MoEAux` (losses, stats). The balance loss
      is 0.0 for experts choose (see `routing.Losses`).
    """
    cfg = self.cfg
    x_GSD, logits_GSE, probs_GSE = self._groups_and_router(x_BLD, train, rng)
    g, s, _ = x_GSD.shape

    if cfg.router is RouterKind.EXPERTS_CHOOSE:
      capacity = cfg.capacity(s, train)
      choice = routing.experts_choose(probs_GSE, capacity)
      run = (
          dispatch.einsum_expert_choice
          if cfg.dispatch is Dispatch.EINSUM
          else dispatch.gather_expert_choice
      )
      y_GSD, kept_GSK = run(x_GSD, choice.token_index, choice.gates, self._experts_on_buffers)
      # Every expert takes exactly C tokens: the load is uniform by construction and every slot is
      # used (capacity_used 1.0).
      load_GE = jnp.full((g, cfg.num_experts), 1.0 / cfg.num_experts, jnp.float32)
      stats_capacity = None
    else:
      top = routing.tokens_choose(probs_GSE, cfg.top_k, cfg.renormalize_gates)
      load_GE = routing.expert_load(top.expert_index, cfg.num_experts)
      if cfg.dispatch is Dispatch.DROPLESS:
        if expert_parallel.expert_axis() is not None:
          # Experts split over a mesh axis: each claim travels to its expert's device (all-to-all);
          # left to the partitioner, ragged_dot would gather the weights or replicate the claims.
          y_GSD, kept_GSK = expert_parallel.dropless_moe(
              x_GSD, top.expert_index, top.gates, self.experts, cfg.num_experts
          )
        else:
          y_GSD, kept_GSK = dispatch.dropless_moe(
              x_GSD, top.expert_index, top.gates, self.experts.grouped, cfg.num_experts
          )
        # No buffers: it computes exactly the assignments (capacity_used 1.0).
        stats_capacity = None
      else:
        capacity = cfg.capacity(s, train)
        order_GS = routing.priority_order(probs_GSE, cfg.priority)
        run = dispatch.einsum_moe if cfg.dispatch is Dispatch.EINSUM else dispatch.gather_moe
        y_GSD, kept_GSK = run(
            x_GSD,
            top.expert_index,
            top.gates,
            order_GS,
            capacity,
            cfg.num_experts,
            self._experts_on_buffers,
        )
        stats_capacity = capacity

    y_GSD = axes.constrain(y_GSD, (axes.GROUP, None, axes.ACT_EMBED))
    if self.shared_expert is not None:
      y_GSD = y_GSD + self.shared_expert(x_GSD)
    if cfg.router is RouterKind.EXPERTS_CHOOSE:
      # Every expert is full by construction (Zhou et al. 2022 use no balance loss), so the Switch
      # loss would be E * sum_e (1/E) * P_e = 1.0 for any router: a constant with zero gradient that
      # reads as perfect balance on a dashboard. Report 0.0 instead, as flaxformer does.
      balance = jnp.zeros((), jnp.float32)
    else:
      balance = routing.load_balancing_loss(probs_GSE, load_GE)
    losses = routing.Losses(balance=balance, z=routing.router_z_loss(logits_GSE))
    stats = routing.router_stats(probs_GSE, load_GE, kept_GSK, stats_capacity)
    return y_GSD.reshape(x_BLD.shape), MoEAux(losses, stats)
