"""A slow, obviously correct MoE layer: one token and one claim at a time, in float64 numpy.

It re-derives capacity, routing, priority, slots, combine, the auxiliary losses and the routing
statistics from the rules written in the docstrings of moe/config/model.py, moe/layers/routing.py and
moe/layers/dispatch.py. It calls no function of the `moe` package: it only reads the attributes of an
`MoEConfig` and compares enum members.

Functions work on one routing group at a time (arrays [S, ...]) unless their shapes say [G, ...].
Padding: `real` is a bool array over tokens (True: a real token), None when every token is real.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, NamedTuple

import numpy as np

from moe.config.enums import (
    Activation,
    BalanceScope,
    Dispatch,
    Priority,
    RouterKind,
    Score,
    ServingOrder,
)
from moe.config.layer import MoEConfig

# --------------------------------------------------------------------------------------------------
# Capacity and routing groups.


def reference_capacity(s: int, e: int, k: int, cf: float | None, min_capacity: int) -> int:
  """C = min(S, max(ceil(cf * k * S / E), min_capacity)); C = S when cf is None (dropless).

  cf is read as the decimal number written in the config (`str(1.2)` is "1.2"), and the product is
  exact rational arithmetic, so 1.2 * 5 is exactly 6 (in floats it is 6.000000000000001). A factor
  <= 0 has no meaning (MoEConfig refuses it).
  """
  if cf is None:
    return s
  if cf <= 0:
    raise ValueError(f"capacity factor {cf!r}: None (dropless) or > 0")
  return min(s, max(math.ceil(Fraction(str(cf)) * k * s / e), min_capacity))


def tokens_per_group(cfg: MoEConfig, length: int) -> int:
  """S: a whole sequence when cfg.group_size is None, else cfg.group_size tokens."""
  return length if cfg.group_size is None else cfg.group_size


def cut_groups(x_BLD: np.ndarray, s: int) -> np.ndarray:
  """Tokens [B, L, d] -> routing groups [G, S, d], cut from the flattened batch * length axis."""
  x = np.asarray(x_BLD, np.float64)
  rows = [x[b, t] for b in range(x.shape[0]) for t in range(x.shape[1])]
  assert len(rows) % s == 0
  return np.stack([np.stack(rows[i : i + s]) for i in range(0, len(rows), s)])


# --------------------------------------------------------------------------------------------------
# Routing, one group.


def softmax(logits: np.ndarray) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def logsumexp(logits: np.ndarray) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1)
  return m + np.log(np.sum(np.exp(logits - m[..., None]), axis=-1))


def sigmoid(logits: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def scores(logits: np.ndarray, score: Score) -> tuple[np.ndarray, np.ndarray]:
  """(probabilities over experts, affinities): the softmax twice, or for sigmoid scores the
  per-expert sigmoids normalised over the experts, and the sigmoids themselves."""
  if score is Score.SOFTMAX:
    p = softmax(logits)
    return p, p
  a = sigmoid(logits)
  return a / a.sum(-1, keepdims=True), a


def top_k_choices(probs_SE: np.ndarray, k: int, bias_E: np.ndarray | None = None) -> np.ndarray:
  """Each token's k experts by score plus the selection bias, best first; ties go to the lower
  expert index. [S, k] int."""
  ranked_SE = probs_SE if bias_E is None else probs_SE + np.asarray(bias_E, np.float64)
  out = np.zeros((probs_SE.shape[0], k), int)
  for t in range(probs_SE.shape[0]):
    ranked = sorted(range(probs_SE.shape[1]), key=lambda e: (-ranked_SE[t, e], e))
    out[t] = ranked[:k]
  return out


def serving_order(probs_SE: np.ndarray, priority: Priority) -> list[int]:
  """Tokens in the order their claims are served within one rank: sequence order, or highest top-1
  probability first with ties in sequence order."""
  tokens = range(probs_SE.shape[0])
  if priority is Priority.INDEX:
    return list(tokens)
  return sorted(tokens, key=lambda t: (-probs_SE[t].max(), t))


NO_SLOT = 10**9  # The slot of a padded token's claim: it claims nothing, so no capacity reaches it.


def claim_slots(
    choices_SK: np.ndarray,
    order: list[int],
    num_experts: int,
    real: np.ndarray | None = None,
    token_major: bool = False,
) -> np.ndarray:
  """Slot of each claim = number of real claims on the same expert served before it. [S, k] int.

  Rank-major: every first choice is served before any second choice; within a rank, tokens in
  `order`. Token-major: tokens in `order`, each token's claims best first. A padded token's claims
  are skipped (slot NO_SLOT).
  """
  s, k = choices_SK.shape
  if token_major:
    claims = [(t, rank) for t in order for rank in range(k)]
  else:
    claims = [(t, rank) for rank in range(k) for t in order]
  served = [0] * num_experts
  slots = np.full(choices_SK.shape, NO_SLOT, int)
  for t, rank in claims:
    if real is not None and not real[t]:
      continue
    e = choices_SK[t, rank]
    slots[t, rank] = served[e]
    served[e] += 1
  return slots


def experts_pick(probs_SE: np.ndarray, c: int, real: np.ndarray | None = None) -> np.ndarray:
  """Experts choose: each expert's top-C tokens by probability, ties to the earlier one, every real
  token before any padded one: [E, C]."""
  s, e_count = probs_SE.shape
  is_pad = lambda t: real is not None and not real[t]
  return np.array(
      [sorted(range(s), key=lambda t: (is_pad(t), -probs_SE[t, e], t))[:c] for e in range(e_count)],
      int,
  ).reshape(e_count, c)


def combine(x_SD: np.ndarray, assignments, expert_fn: Callable[[int, np.ndarray], np.ndarray]):
  """y[t] = sum over (t, e, gate) in `assignments` of gate * expert_e(x[t]). [S, d]."""
  y = np.zeros_like(np.asarray(x_SD, np.float64))
  for t, e, gate in assignments:
    y[t] += gate * expert_fn(e, x_SD[t])
  return y


# --------------------------------------------------------------------------------------------------
# Losses and statistics, over groups [G, ...].


def _all_real(shape_GS, real_GS):
  return np.ones(shape_GS, bool) if real_GS is None else np.asarray(real_GS, bool)


def assignment_fraction(
    choices_GSK: np.ndarray, num_experts: int, real_GS: np.ndarray | None = None
) -> np.ndarray:
  """f [G, E]: real assignments per expert over each group's k * S (padded tokens count in S only,
  as in flaxformer), before capacity."""
  g, s, k = choices_GSK.shape
  real_GS = _all_real((g, s), real_GS)
  f = np.zeros((g, num_experts))
  for gi in range(g):
    for t in range(s):
      for r in range(k):
        if real_GS[gi, t]:
          f[gi, choices_GSK[gi, t, r]] += 1.0 / (k * s)
  return f


def balance_loss(
    probs_GSE: np.ndarray, choices_GSK: np.ndarray, real_GS: np.ndarray | None = None
) -> float:
  """Mean over groups of E * sum_e f_e * P_e, P_e = sum of expert e's probability over the group's
  real tokens / S (flaxformer: padded tokens out of f and P, still in S)."""
  g, s, e_count = probs_GSE.shape
  real_GS = _all_real((g, s), real_GS)
  f = assignment_fraction(choices_GSK, e_count, real_GS)
  per_group = [
      e_count
      * sum(
          f[gi, e] * sum(probs_GSE[gi, t, e] for t in range(s) if real_GS[gi, t]) / s
          for e in range(e_count)
      )
      for gi in range(g)
  ]
  return float(np.mean(per_group))


def global_balance_loss(
    probs_GSE: np.ndarray, choices_GSK: np.ndarray, real_GS: np.ndarray | None = None
) -> float:
  """E * sum_e f_e * P_e with f and P each pooled over all groups (the mean of the groups' f and of
  the groups' P; padding as `balance_loss`)."""
  g, s, e_count = probs_GSE.shape
  real_GS = _all_real((g, s), real_GS)
  f = assignment_fraction(choices_GSK, e_count, real_GS).mean(axis=0)
  p = [
      sum(probs_GSE[gi, t, e] for gi in range(g) for t in range(s) if real_GS[gi, t]) / (g * s)
      for e in range(e_count)
  ]
  return float(e_count * sum(f[e] * p[e] for e in range(e_count)))


def z_loss(logits_GSE: np.ndarray, real_GS: np.ndarray | None = None) -> float:
  """Mean over real tokens of logsumexp(logits)^2 (0.0 with no real token)."""
  lse = logsumexp(logits_GSE)
  values = [lse[idx] ** 2 for idx in np.ndindex(lse.shape) if real_GS is None or real_GS[idx]]
  return float(np.mean(values)) if values else 0.0


class Stats(NamedTuple):
  dropped_fraction: np.ndarray  # [k] (experts choose: [1], tokens no expert took).
  expert_load: np.ndarray  # [E]
  router_entropy: float
  top1_probability: float
  capacity_used: float


def router_stats(
    probs_GSE: np.ndarray,
    load_GE: np.ndarray,
    kept_GSK: np.ndarray,
    kept_per_group: np.ndarray,
    computed_slots: int,
    real_GS: np.ndarray | None = None,
) -> Stats:
  """Averages over the real tokens of all groups. `load_GE` is each group's share of its real
  assignments per expert (rows sum to 1; 0 for a group without real tokens), pooled over groups by
  their real tokens; `kept_per_group` [G] kept assignments, `computed_slots` the number of expert
  slots the dispatch path computes per group."""
  p = np.asarray(probs_GSE, np.float64)
  g, s, _ = p.shape
  real_GS = _all_real((g, s), real_GS)
  real = [(gi, t) for gi in range(g) for t in range(s) if real_GS[gi, t]]
  tokens_G = real_GS.sum(axis=1)
  entropy = [-sum(q * math.log(q) for q in p[gi, t] if q > 0) for gi, t in real]
  return Stats(
      dropped_fraction=1.0 - np.mean([kept_GSK[gi, t] for gi, t in real], axis=0),
      expert_load=(np.asarray(load_GE) * tokens_G[:, None]).sum(axis=0) / tokens_G.sum(),
      router_entropy=float(np.mean(entropy)),
      top1_probability=float(np.mean([p[gi, t].max() for gi, t in real])),
      capacity_used=float(np.mean(np.asarray(kept_per_group) / computed_slots)),
  )


# --------------------------------------------------------------------------------------------------
# The whole layer.


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def expert_ffn(x_D, params, e, activation):
  if activation is Activation.GELU:
    return gelu_tanh(x_D @ params["w_in"][e]) @ params["w_out"][e]
  gate = x_D @ params["w_gate"][e]
  return (gate / (1.0 + np.exp(-gate))) * (x_D @ params["w_in"][e]) @ params["w_out"][e]


def layer_params(layer) -> dict[str, np.ndarray]:
  """The layer's weights as float64 numpy arrays."""
  params = {"router": np.asarray(layer.router.w[...], np.float64)}
  for name in ("w_in", "w_out", "w_gate"):
    if hasattr(layer.experts, name):
      params[name] = np.asarray(getattr(layer.experts, name)[...], np.float64)
  return params


class Reference(NamedTuple):
  """Everything the layer computes, re-derived. G, S as the config cuts the tokens."""

  y: np.ndarray  # [B, L, d]
  kept: np.ndarray  # [G, S, k] bool; experts choose: covered [G, S, 1].
  choices: np.ndarray  # [G, S, k] experts per token; experts choose: tokens per expert [G, E, C].
  capacity: int
  balance: float  # 0.0 for experts choose (every expert is full by construction).
  z: float
  stats: Stats
  sequence_balance: float  # The Switch loss of each sequence, averaged (0.0 for experts choose).


def _real_groups(token_mask_BL, shape_GS) -> np.ndarray | None:
  """The padding mask cut like the tokens: bool [G, S] (True: real), or None."""
  if token_mask_BL is None:
    return None
  return np.asarray(token_mask_BL).astype(bool).reshape(-1).reshape(shape_GS)


def _experts_choose(x_GSD, probs_GSE, c, real_GS, expert_fn):
  """(y [G, S, d], covered [G, S, 1], picks [G, E, C], stats inputs) of experts choose."""
  g, s, _ = x_GSD.shape
  e_count = probs_GSE.shape[-1]
  real_GS = _all_real((g, s), real_GS)
  picks = np.stack([experts_pick(probs_GSE[gi], c, real_GS[gi]) for gi in range(g)])
  y, covered = np.zeros_like(x_GSD), np.zeros((g, s, 1), bool)
  load, kept_per_group = np.zeros((g, e_count)), np.zeros(g)
  for gi in range(g):
    # A padded pick has gate 0 and is no assignment: it adds nothing and covers nothing.
    assignments = [
        (t, e, probs_GSE[gi, t, e]) for e in range(e_count) for t in picks[gi, e] if real_GS[gi, t]
    ]
    y[gi] = combine(x_GSD[gi], assignments, expert_fn)
    for t, e, _ in assignments:
      covered[gi, t, 0] = True
      load[gi, e] += 1.0 / len(assignments)
    kept_per_group[gi] = len(assignments)  # A slot holding padding is computed but not used.
  return y, covered, picks, load, kept_per_group


def reference_moe(
    x_BLD, params, cfg: MoEConfig, train: bool = False, token_mask_BL=None, bias_E=None
) -> Reference:
  """The MoE layer (without a shared expert), token by token. `token_mask_BL`: 1 real, 0 padding;
  `bias_E`: the selection bias of auxiliary-loss-free balancing (None: no bias)."""
  b, l, _ = np.shape(x_BLD)
  s = tokens_per_group(cfg, l)
  x_GSD = cut_groups(x_BLD, s)
  g = x_GSD.shape[0]
  real_GS = _real_groups(token_mask_BL, (g, s))
  e_count, k = cfg.num_experts, cfg.top_k
  c = reference_capacity(s, e_count, k, cfg.capacity_factor(train), cfg.min_capacity)
  logits_GSE = np.stack([x_GSD[gi] @ params["router"] for gi in range(g)])
  probs_GSE, affinity_GSE = scores(logits_GSE, cfg.score)
  expert_fn = lambda e, x_D: expert_ffn(x_D, params, e, cfg.activation)
  z = z_loss(logits_GSE, real_GS)

  if cfg.router is RouterKind.EXPERTS_CHOOSE:
    y, covered, picks, load, used = _experts_choose(x_GSD, probs_GSE, c, real_GS, expert_fn)
    stats = router_stats(probs_GSE, load, covered, used, e_count * c, real_GS)
    return Reference(y.reshape(np.shape(x_BLD)), covered, picks, c, 0.0, z, stats, 0.0)

  dropless = cfg.dispatch is Dispatch.DROPLESS
  real = _all_real((g, s), real_GS)
  choices = np.stack([top_k_choices(affinity_GSE[gi], k, bias_E) for gi in range(g)])
  kept, y = np.zeros((g, s, k), bool), np.zeros_like(x_GSD)
  kept_per_group, load = np.zeros(g), np.zeros((g, e_count))
  for gi in range(g):
    gates = np.array([[affinity_GSE[gi, t, e] for e in choices[gi, t]] for t in range(s)])
    if cfg.renormalize_gates or cfg.score is Score.SIGMOID:
      gates = gates / gates.sum(-1, keepdims=True)
    order = serving_order(probs_GSE[gi], cfg.priority)
    token_major = cfg.serving_order is ServingOrder.TOKEN_MAJOR
    slots = claim_slots(choices[gi], order, e_count, real[gi], token_major)
    kept[gi] = real[gi][:, None] & (True if dropless else slots < c)
    assignments = [
        (t, choices[gi, t, r], gates[t, r]) for t in range(s) for r in range(k) if kept[gi, t, r]
    ]
    y[gi] = combine(x_GSD[gi], assignments, expert_fn)
    # DROPLESS computes a row for every claim, padded ones (gate 0) too, and counts each as used.
    kept_per_group[gi] = k * s if dropless else len(assignments)
    for t in np.flatnonzero(real[gi]):
      for e in choices[gi, t]:
        load[gi, e] += 1.0 / (k * real[gi].sum())
  # Slots computed per group: E * C buffer rows, or exactly the k * S assignments without buffers.
  computed_slots = k * s if dropless else e_count * c
  stats = router_stats(probs_GSE, load, kept, kept_per_group, computed_slots, real_GS)
  if cfg.balance_scope is BalanceScope.GLOBAL:
    balance = global_balance_loss(probs_GSE, choices, real_GS)
  else:
    balance = balance_loss(probs_GSE, choices, real_GS)
  # Per sequence: the same claims and probabilities, regrouped by sequence of length l.
  per_sequence = lambda a: a.reshape((b, l) + a.shape[2:])
  real_BL = None if real_GS is None else per_sequence(real_GS)
  sequence = balance_loss(per_sequence(probs_GSE), per_sequence(choices), real_BL)
  return Reference(y.reshape(np.shape(x_BLD)), kept, choices, c, balance, z, stats, sequence)


def reference_bias_update(bias_E, choices_GSK, real_GS, rate: float) -> np.ndarray:
  """One auxiliary-loss-free update: each expert's share of the step's real assignments (all groups
  together) against the mean share; the bias of an expert below it rises by `rate`, above it falls
  by `rate`, at it stays."""
  g, s, k = np.shape(choices_GSK)
  real_GS = _all_real((g, s), real_GS)
  e_count = len(bias_E)
  counts = np.zeros(e_count)
  for gi, t, r in np.ndindex(g, s, k):
    if real_GS[gi, t]:
      counts[choices_GSK[gi, t, r]] += 1
  share = counts / (k * g * s)  # Padded tokens count in S (as `assignment_fraction`).
  mean = share.sum() / e_count
  out = np.array(bias_E, np.float64)
  for e in range(e_count):
    if share[e] < mean:
      out[e] += rate
    elif share[e] > mean:
      out[e] -= rate
  return out
