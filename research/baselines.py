"""Dense baselines matched to a sparse config: on training FLOPs per token, active or total parameters.

    dense_cd = matched_dense(sparse_cd, on="active_flops")

Works on any sparse ConfigDict (any router, experts, k, layout, expert widths): only `model.mlp_hidden`
changes. From the command line: `python -m experiments.train --config=<any sparse config>
[--config.<field>=...] --match_dense=active_flops`; in a sweep: `research.sweep --baselines=...`.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import ml_collections

from moe.config.config_dict import model_from_config_dict
from moe.config.model import ModelConfig
from moe.models import accounting

MATCHES = ("active_flops", "total_params", "active_params")


def _measure(cfg: ModelConfig, seq_len: int, match: str) -> float:
  if match == "active_flops":
    return accounting.flops_per_token(cfg, seq_len, train=True).total
  counts = accounting.param_counts(cfg)
  return counts.total if match == "total_params" else counts.active


def matched_dense(
    cd: ml_collections.ConfigDict, on: str = "active_flops", *, multiple: int = 8
) -> ml_collections.ConfigDict:
  """The dense baseline of a sparse config: same everything, `model.moe=None`, a new `mlp_hidden`.

  Held fixed: width, depth, heads, vocabulary, embeddings, the dense activation (`model.activation`,
  even when the experts use another), sequence length, training and data. Only `mlp_hidden` of every
  (now dense) layer changes, to the multiple of `multiple` that best matches:

  * 'active_flops': `accounting.flops_per_token(..., train=True).total` at `train.seq_len`: what is
    computed, so the sparse side includes the router, the capacity slack (E * C / S expert evaluations
    per token, about cf * k, at the train capacity factor) and EINSUM dispatch. A Switch model with cf
    1.25 is thus matched by a dense FFN wider than its experts: the same compute budget per token.
  * 'active_params': `param_counts(...).active`: k experts per token, no capacity slack, which is the
    Switch paper's "FLOP-matched" baseline (Fedus et al. 2021, Sec. 2.4: T5-Base vs Switch-Base); with
    k=1 and expert_hidden == mlp_hidden it differs from the sparse model's own mlp_hidden only by the
    router's d * E weights per sparse layer.
  * 'total_params': `param_counts(...).total`: the same number of parameters.

  Args:
    cd: a sparse config (model.moe not None); not modified.
    on: what is matched, one of `MATCHES`.
    multiple: mlp_hidden is rounded to a multiple of this (hardware-friendly shapes).

  Returns:
    A new ConfigDict named "<name>_dense_<on>". The mismatch is at most half a rounding step:
    `multiple / 2` hidden units of every layer.
  """
  if on not in MATCHES:
    raise ValueError(f"matched_dense: on={on!r} is not one of {', '.join(MATCHES)}")
  if cd.model.moe is None:
    raise ValueError("matched_dense needs a sparse config (model.moe is None)")
  seq_len = cd.train.seq_len
  target = _measure(model_from_config_dict(cd.model), seq_len, on)
  out = copy.deepcopy(cd)
  out.model.moe = None
  out.mesh.rules = "data"
  dense = model_from_config_dict(out.model)
  # Both measures are affine in mlp_hidden: solve from two points, then round to the best multiple.
  measure_at = lambda f: _measure(dataclasses.replace(dense, mlp_hidden=f), seq_len, on)
  slope = (measure_at(2 * multiple) - measure_at(multiple)) / multiple
  exact = multiple + (target - measure_at(multiple)) / slope
  lo = max(multiple, math.floor(exact / multiple) * multiple)
  best = min((lo, lo + multiple), key=lambda f: (abs(measure_at(f) - target), f))
  out.model.mlp_hidden = int(best)
  out.name = f"{cd.name}_dense_{on}"
  return out


def describe(cd: ml_collections.ConfigDict) -> str:
  """One line: name, parameters and training FLOPs per token of a config."""
  return f"{cd.name}: {accounting.summary(model_from_config_dict(cd.model), cd.train.seq_len)}"
