"""A slow, obviously correct MoE layer: one token at a time, in float64 numpy.

It re-derives routing, priority, capacity and combine from the rules written in moe/dispatch.py's
docstring, without sharing any code with the implementation under test.
"""

from __future__ import annotations

import math

import numpy as np

from moe.config import Activation, MoEConfig, Priority, Router, capacity


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


def reference_moe(x_BLD, params, cfg: MoEConfig, train: bool = False):
  """Returns (y [B, L, d], kept [G, S, k] bool) for tokens choose, (y, covered [G, S, 1]) for experts."""
  x = np.asarray(x_BLD, np.float64)
  b, l, d = x.shape
  s = l if cfg.group_size is None else cfg.group_size
  g = b * l // s
  x_GSD = x.reshape(g, s, d)
  e_count, k = cfg.num_experts, cfg.top_k
  c = capacity(s, e_count, k, cfg.capacity_factor(train), cfg.min_capacity)
  y = np.zeros_like(x_GSD)
  kept = np.zeros((g, s, k if cfg.router is Router.TOKENS_CHOOSE else 1), bool)
  for gi in range(g):
    logits = x_GSD[gi] @ params["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if cfg.router is Router.EXPERTS_CHOOSE:
      for e in range(e_count):
        chosen = np.argsort(-probs[:, e], kind="stable")[:c]
        for t in chosen:
          y[gi, t] += probs[t, e] * expert_ffn(x_GSD[gi, t], params, e, cfg.activation)
          kept[gi, t, 0] = True
      continue
    choices = [list(np.argsort(-probs[t], kind="stable")[:k]) for t in range(s)]
    gates = [[probs[t, e] for e in choices[t]] for t in range(s)]
    if cfg.renormalize_gates:
      gates = [[gt / sum(gs) for gt in gs] for gs in gates]
    if cfg.priority is Priority.INDEX:
      order = list(range(s))
    else:
      order = list(np.argsort(-probs.max(-1), kind="stable"))
    used = [0] * e_count
    dropless = cfg.dispatch.value == "dropless"
    for rank in range(k):  # Every first choice before any second choice.
      for t in order:
        e = choices[t][rank]
        if dropless or used[e] < c:
          used[e] += 1
          kept[gi, t, rank] = True
          y[gi, t] += gates[t][rank] * expert_ffn(x_GSD[gi, t], params, e, cfg.activation)
  return y.reshape(b, l, d), kept
