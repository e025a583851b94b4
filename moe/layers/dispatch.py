"""Three ways to send tokens to their experts and bring the results back.

All compute y[t] = sum over kept claims (t, e) of gate(t, e) * expert_e(x[t]), and agree on which
claims are kept. A claim keeps its slot when fewer than C earlier claims in serving order went to
the same expert. The serving order (`ServingOrder`) is rank-major (every first choice before any
second choice, tokens of one rank in `priority_order`; GShard, flaxformer) or token-major (all of a
token's claims, best first, before the next token's: causal with index priority). A dropped claim
is not re-routed, and a token whose claims all drop gets zero from the layer: the residual
connection around the layer carries it unchanged (Switch Transformer, Sec. 2.2).

Padding (`token_mask_GS`, bool [G, S], False for a padded token; None: all real): a padded token
claims nothing (flaxformer). Its claims take no slot, so no real claim drops because of it; it is
never dispatched on the buffer paths, and its output is exactly zero. DROPLESS has no capacity to
protect: its rows are a fixed k * T, so padded claims are computed with gate 0 (exactly zero output,
no gradient), and each row is computed on its own, so they change no real token's output.

* EINSUM (GShard, flaxformer): slots by a cumulative sum over one-hot claims, then one-hot dispatch
  and combine tensors [G, S, E, C] and two einsums. Simple and fast on TPUs; memory grows as
  S * E * C.
* GATHER: slots by a stable sort of the claims by expert; tokens gathered into [G, E, C, d] buffers
  by index and gathered back. No tensor of size S * E * C.
* DROPLESS (megablocks): no capacity; all k * T claims sorted by expert and one grouped matmul.

Experts choose (Zhou et al. 2022) has its own EINSUM and GATHER variants: the expert's choice is
already a [G, E, C] table of token indices.

`experts_fn` maps buffers [G, E, C, d] -> [G, E, C, d]; `grouped_fn` maps expert-sorted rows [T, d]
and group sizes [E] -> [T, d].
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from moe.config.enums import ServingOrder

ExpertsFn = Callable[[jax.Array], jax.Array]
GroupedFn = Callable[[jax.Array, jax.Array], jax.Array]


def _serving_order(
    values_GSK: jax.Array, order_GS: jax.Array, serving_order: ServingOrder
) -> jax.Array:
  """Per-claim values (expert, mask) in serving order: [G, k * S].

  Rank-major: claim j = rank j // S of the (j % S)-th token of `order_GS`. Token-major: claim j =
  rank j % k of the (j // k)-th token of `order_GS`.
  """
  served_GSK = jnp.take_along_axis(values_GSK, order_GS[..., None], axis=1)
  g, s, k = served_GSK.shape
  if serving_order is ServingOrder.TOKEN_MAJOR:
    return served_GSK.reshape(g, s * k)
  return jnp.swapaxes(served_GSK, 1, 2).reshape(g, k * s)


def _to_token_order(
    values_GJ: jax.Array, order_GS: jax.Array, top_k: int, serving_order: ServingOrder
) -> jax.Array:
  """Inverse of `_serving_order` for per-claim values: [G, k * S] -> [G, S, k] in token order."""
  g, ks = values_GJ.shape
  s = ks // top_k
  if serving_order is ServingOrder.TOKEN_MAJOR:
    served_GSK = values_GJ.reshape(g, s, top_k)
  else:
    served_GSK = jnp.swapaxes(values_GJ.reshape(g, top_k, s), 1, 2)
  out = jnp.zeros_like(served_GSK)
  return jax.vmap(lambda o, v, src: o.at[src].set(v))(out, served_GSK, order_GS)


def _served_mask(expert_index_GSK, order_GS, token_mask_GS, serving_order) -> jax.Array | None:
  """Whether each claim in serving order belongs to a real token: bool [G, k * S], or None."""
  if token_mask_GS is None:
    return None
  mask_GSK = jnp.broadcast_to(token_mask_GS[..., None], expert_index_GSK.shape)
  return _serving_order(mask_GSK, order_GS, serving_order)


def slots_by_cumsum(
    expert_index_GSK: jax.Array,
    order_GS: jax.Array,
    num_experts: int,
    *,
    token_mask_GS: jax.Array | None = None,
    serving_order: ServingOrder = ServingOrder.RANK_MAJOR,
) -> jax.Array:
  """Slot of each claim in its expert's buffer, by a cumulative count of one-hot claims: [G, S, k].

  The slot is the number of claims on the same expert served before it (it may be >= C: dropped).
  A padded token's claims count for no one and get slot k * S, which no capacity reaches.
  """
  served_GJ = _serving_order(expert_index_GSK, order_GS, serving_order)
  real_GJ = _served_mask(expert_index_GSK, order_GS, token_mask_GS, serving_order)
  claims_GJE = jax.nn.one_hot(served_GJ, num_experts, dtype=jnp.int32)
  if real_GJ is not None:
    claims_GJE = claims_GJE * real_GJ[..., None]
  slots_GJ = jnp.sum((jnp.cumsum(claims_GJE, axis=1) - 1) * claims_GJE, axis=-1)
  if real_GJ is not None:
    slots_GJ = jnp.where(real_GJ, slots_GJ, served_GJ.shape[1])
  return _to_token_order(slots_GJ, order_GS, expert_index_GSK.shape[-1], serving_order)


def slots_by_sort(
    expert_index_GSK: jax.Array,
    order_GS: jax.Array,
    num_experts: int,
    *,
    token_mask_GS: jax.Array | None = None,
    serving_order: ServingOrder = ServingOrder.RANK_MAJOR,
) -> jax.Array:
  """Slot of each claim in its expert's buffer, by a stable sort of the claims by expert: [G, S, k].

  After a stable sort, the claims of one expert are contiguous and still in serving order, so a
  claim's slot is its position minus the position where its expert's run starts. A padded token's
  claims sort after every expert (key E, which `bincount` does not count) and get slot k * S.
  """
  served_GJ = _serving_order(expert_index_GSK, order_GS, serving_order)
  real_GJ = _served_mask(expert_index_GSK, order_GS, token_mask_GS, serving_order)
  j = served_GJ.shape[1]
  key_GJ = served_GJ if real_GJ is None else jnp.where(real_GJ, served_GJ, num_experts)

  def one_group(key_J):
    perm_J = jnp.argsort(key_J, stable=True)
    counts_E = jnp.bincount(key_J, length=num_experts)
    starts_E = jnp.cumsum(counts_E) - counts_E
    sorted_slots_J = jnp.arange(j, dtype=jnp.int32) - starts_E[key_J[perm_J]].astype(jnp.int32)
    return jnp.zeros(j, jnp.int32).at[perm_J].set(sorted_slots_J)

  slots_GJ = jax.vmap(one_group)(key_GJ)
  if real_GJ is not None:
    slots_GJ = jnp.where(real_GJ, slots_GJ, j)
  return _to_token_order(slots_GJ, order_GS, expert_index_GSK.shape[-1], serving_order)


def einsum_moe(
    x_GSD,
    expert_index_GSK,
    gates_GSK,
    order_GS,
    capacity: int,
    num_experts: int,
    experts_fn: ExpertsFn,
    *,
    token_mask_GS: jax.Array | None = None,
    serving_order: ServingOrder = ServingOrder.RANK_MAJOR,
):
  """One-hot dispatch/combine (GShard Alg. 1, flaxformer). Returns (y [G, S, d], kept [G, S, k]).

  `token_mask_GS` (padding) and `serving_order`: see the module docstring.
  """
  slots_GSK = slots_by_cumsum(
      expert_index_GSK,
      order_GS,
      num_experts,
      token_mask_GS=token_mask_GS,
      serving_order=serving_order,
  )
  kept_GSK = slots_GSK < capacity
  expert_GSKE = jax.nn.one_hot(expert_index_GSK, num_experts, dtype=x_GSD.dtype)
  slot_GSKC = jax.nn.one_hot(jnp.where(kept_GSK, slots_GSK, capacity), capacity, dtype=x_GSD.dtype)
  dispatch_GSEC = jnp.einsum("gske,gskc->gsec", expert_GSKE, slot_GSKC)
  combine_GSEC = jnp.einsum(
      "gsk,gske,gskc->gsec", gates_GSK.astype(x_GSD.dtype), expert_GSKE, slot_GSKC
  )
  x_GECD = jnp.einsum("gsec,gsd->gecd", dispatch_GSEC, x_GSD)
  y_GECD = experts_fn(x_GECD)
  y_GSD = jnp.einsum("gsec,gecd->gsd", combine_GSEC, y_GECD.astype(x_GSD.dtype))
  return y_GSD, kept_GSK


def gather_moe(
    x_GSD,
    expert_index_GSK,
    gates_GSK,
    order_GS,
    capacity: int,
    num_experts: int,
    experts_fn: ExpertsFn,
    *,
    token_mask_GS: jax.Array | None = None,
    serving_order: ServingOrder = ServingOrder.RANK_MAJOR,
):
  """Sort/gather dispatch. Returns (y [G, S, d], kept [G, S, k]).

  `token_mask_GS` (padding) and `serving_order`: see the module docstring.
  """
  g, s, d = x_GSD.shape
  k = expert_index_GSK.shape[-1]
  slots_GSK = slots_by_sort(
      expert_index_GSK,
      order_GS,
      num_experts,
      token_mask_GS=token_mask_GS,
      serving_order=serving_order,
  )
  kept_GSK = slots_GSK < capacity
  # Flat buffer position of each claim; dropped claims point at one spare slot past the end.
  spare = num_experts * capacity
  pos_GSK = jnp.where(kept_GSK, expert_index_GSK * capacity + slots_GSK, spare)

  # Which token fills each slot: token index, or s (a zero row) for an empty slot.
  token_GSK = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], (s, k))
  fill = (
      lambda pos_SK: jnp.full(spare + 1, s, jnp.int32)
      .at[pos_SK.reshape(-1)]
      .set(token_GSK.reshape(-1))
  )
  source_GU = jax.vmap(fill)(pos_GSK)[:, :spare]
  x_pad_GSD = jnp.concatenate([x_GSD, jnp.zeros((g, 1, d), x_GSD.dtype)], axis=1)
  x_GECD = jnp.take_along_axis(x_pad_GSD, source_GU[..., None], axis=1).reshape(
      g, num_experts, capacity, d
  )

  y_GUD = experts_fn(x_GECD).astype(x_GSD.dtype).reshape(g, spare, d)
  y_pad_GUD = jnp.concatenate([y_GUD, jnp.zeros((g, 1, d), y_GUD.dtype)], axis=1)
  y_GSKD = jnp.take_along_axis(y_pad_GUD, pos_GSK.reshape(g, s * k, 1), axis=1).reshape(g, s, k, d)
  y_GSD = jnp.einsum("gsk,gskd->gsd", gates_GSK.astype(x_GSD.dtype), y_GSKD)
  return y_GSD, kept_GSK


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def sort_claims(x_TD, perm_J, inverse_J, top_k: int):
  """x of each claim in expert order: [k * T, d], row i = x[perm[i] // k] (claim j is token j // k).

  Autodiff would scatter-add the rows back to their tokens; as `perm` is a permutation, the VJP is
  a gather by its inverse and a sum over each token's k claims instead.
  """
  return x_TD[perm_J // top_k]


def _sort_claims_forward(x_TD, perm_J, inverse_J, top_k):
  return sort_claims(x_TD, perm_J, inverse_J, top_k), (perm_J, inverse_J)


def _sort_claims_backward(top_k, residuals, dx_sorted_JD):
  perm_J, inverse_J = residuals
  j, d = dx_sorted_JD.shape
  dx_TKD = dx_sorted_JD[inverse_J].reshape(j // top_k, top_k, d)
  return jnp.sum(dx_TKD, axis=1, dtype=jnp.float32).astype(dx_sorted_JD.dtype), None, None


sort_claims.defvjp(_sort_claims_forward, _sort_claims_backward)


@jax.custom_vjp
def unsort_claims(y_sorted_JD, perm_J, inverse_J):
  """Expert-ordered rows back in claim order: row j = y_sorted[inverse[j]]. A gather, not a scatter;
  its VJP is the gather by `perm`, where autodiff of a gather would scatter-add."""
  return y_sorted_JD[inverse_J]


def _unsort_claims_forward(y_sorted_JD, perm_J, inverse_J):
  return unsort_claims(y_sorted_JD, perm_J, inverse_J), (perm_J, inverse_J)


def _unsort_claims_backward(residuals, dy_JD):
  perm_J, _ = residuals
  return dy_JD[perm_J], None, None


unsort_claims.defvjp(_unsort_claims_forward, _unsort_claims_backward)


def dropless_moe(
    x_GSD,
    expert_index_GSK,
    gates_GSK,
    grouped_fn: GroupedFn,
    num_experts: int,
    token_mask_GS: jax.Array | None = None,
):
  """Every claim computed: claims sorted by expert, one grouped matmul.

  A padded token (`token_mask_GS` False) is computed with gate 0: exactly zero output, and its
  `kept` is False (it claimed nothing).

  The permutation and its inverse are gathers, forward and backward (`sort_claims`,
  `unsort_claims`): a scatter(-add), what autodiff and `.at[].set` give, is a read-modify-write that
  XLA serialises or does with atomics on GPU; a gather is a plain read.

  Returns (y [G, S, d], kept [G, S, k]: True for every real token's claims).
  """
  g, s, d = x_GSD.shape
  kept_GSK = jnp.ones(expert_index_GSK.shape, bool)
  if token_mask_GS is not None:
    kept_GSK = kept_GSK & token_mask_GS[..., None]
    gates_GSK = jnp.where(kept_GSK, gates_GSK, 0.0)
  k = expert_index_GSK.shape[-1]
  expert_J = expert_index_GSK.reshape(-1)  # Claim j = (token j // k, rank j % k).
  perm_J = jnp.argsort(expert_J, stable=True).astype(jnp.int32)
  inverse_J = jnp.zeros_like(perm_J).at[perm_J].set(jnp.arange(perm_J.shape[0], dtype=jnp.int32))
  x_sorted = sort_claims(x_GSD.reshape(g * s, d), perm_J, inverse_J, k)
  group_sizes_E = jnp.bincount(expert_J, length=num_experts).astype(jnp.int32)
  y_sorted = grouped_fn(x_sorted, group_sizes_E).astype(x_GSD.dtype)
  y_JD = unsort_claims(y_sorted, perm_J, inverse_J)
  y_GSD = jnp.einsum("gsk,gskd->gsd", gates_GSK.astype(x_GSD.dtype), y_JD.reshape(g, s, k, d))
  return y_GSD, kept_GSK


def einsum_expert_choice(x_GSD, token_index_GEC, gates_GEC, experts_fn: ExpertsFn):
  """Experts choose, one-hot: dispatch [G, E, C, S]. Returns (y [G, S, d], covered [G, S, 1])."""
  s = x_GSD.shape[1]
  dispatch_GECS = jax.nn.one_hot(token_index_GEC, s, dtype=x_GSD.dtype)
  y_GECD = experts_fn(jnp.einsum("gecs,gsd->gecd", dispatch_GECS, x_GSD)).astype(x_GSD.dtype)
  y_GSD = jnp.einsum("gecs,gec,gecd->gsd", dispatch_GECS, gates_GEC.astype(x_GSD.dtype), y_GECD)
  covered_GS = jnp.sum(dispatch_GECS, axis=(1, 2)) > 0
  return y_GSD, covered_GS[..., None]


def gather_expert_choice(x_GSD, token_index_GEC, gates_GEC, experts_fn: ExpertsFn):
  """Experts choose, by index: gather, then scatter-add back.

  Returns (y [G, S, d], covered [G, S, 1]).
  """
  g, s, d = x_GSD.shape
  _, e, c = token_index_GEC.shape
  flat_GU = token_index_GEC.reshape(g, e * c)
  x_GECD = jnp.take_along_axis(x_GSD, flat_GU[..., None], axis=1).reshape(g, e, c, d)
  y_GECD = experts_fn(x_GECD).astype(x_GSD.dtype) * gates_GEC[..., None].astype(x_GSD.dtype)
  scatter = lambda idx, y: jnp.zeros((s, d), y.dtype).at[idx].add(y)
  y_GSD = jax.vmap(scatter)(flat_GU, y_GECD.reshape(g, e * c, d))
  covered_GS = jax.vmap(lambda idx: jnp.zeros(s, bool).at[idx].set(True))(flat_GU)
  return y_GSD, covered_GS[..., None]
