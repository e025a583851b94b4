"""The pure, jitted train and eval steps, the train state and its initialisation under a mesh.

    graphdef, rest, tx, state, state_sharding = init_train_state(cfg, mesh, rules)
    train_step = make_train_step(graphdef, rest, cfg, tx, state_sharding=..., batch_sharding=...)
    state, metrics = train_step(state, to_device(batch, batch_sharding))

The train state is `TrainState(params, opt_state, step, router_bias)`: the model's nnx.Param variables
(split from the model once), the optax state (over the bare arrays), the number of completed optimiser
steps and the selection biases of auxiliary-loss-free balancing (`moe.layers.balancing.RouterBias`;
empty unless `moe.balance='bias'`): training state outside the optimiser, so no gradient, weight
decay or Adam moment ever touches it. The step merges the graph definition with the parameters inside
`jax.jit`, so one compiled function runs the whole run. Randomness is a function of (seed, step): parameters come from `nnx.Rngs(train.seed)`,
the router jitter of step t from `fold_in(key(train.seed), t)`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe.config.experiment import ExperimentConfig
from moe.config.enums import RouterKind
from moe.config.train import NonFinite
from moe.layers import moe_layer
from moe.layers.balancing import RouterBias
from moe.models.transformer import Transformer
from moe.parallel import sharding
from moe.trainer import optimizer

Batch = dict[str, Any]  # 'inputs', 'targets' int32 [B, L], 'weights' float32 [B, L]


class TrainState(NamedTuple):
  """Everything that changes during training; a pytree, donated to each step."""

  params: nnx.State  # nnx.Param variables, as split from the model.
  opt_state: Any  # optax state over nnx.as_pure(params).
  step: jax.Array  # int32 []: completed optimiser steps.
  # RouterBias variables [E] per sparse layer (stacked when scanned); empty without moe.balance='bias'.
  router_bias: nnx.State = nnx.State({})


def model_variables(state: TrainState) -> nnx.State:
  """What the model computes with: the parameters and the selection biases, one nnx.State (works
  on a TrainState of shardings too). The eval step takes this."""
  return nnx.merge_state(state.params, state.router_bias)


def _forward(
    graphdef: nnx.GraphDef,
    states: tuple[nnx.State, ...],
    batch: Batch,
    *,
    train: bool,
    rng: jax.Array | None,
):
  """Weighted CE per token [B, L], the weights [B, L] and the MoE aux (None when dense).

  `states` together hold every variable of the model (parameters, biases, the rest)."""
  model = nnx.merge(graphdef, *states)
  weights_BL = batch["weights"].astype(jnp.float32)
  # Padding (weight 0) claims no expert slot and is left out of the router losses and statistics.
  logits_BLV, aux = model(batch["inputs"], train=train, rng=rng, token_mask_BL=weights_BL > 0)
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, batch["targets"])
  return ce_BL * weights_BL, weights_BL, aux


def _router_metrics(aux) -> dict[str, jax.Array]:
  """Per sparse layer statistics: dropped_fraction [n, k], expert_load [n, E], router_entropy [n]."""
  return dict(
      dropped_fraction=aux.stats.dropped_fraction,
      expert_load=aux.stats.expert_load,
      router_entropy=aux.stats.router_entropy,
  )


def _updated_router_bias(graphdef, state: TrainState, rest, load_NE, rate: float) -> nnx.State:
  """The selection biases after this step: each sparse layer's moved by its load of the step
  (`Transformer.update_router_bias`). `load_NE` is the layers' `expert_load` statistic, a mean over
  the whole global batch, so under a mesh it is already the [E] all-reduce of the devices' counts
  and every device computes the same biases."""
  model = nnx.merge(graphdef, state.params, state.router_bias, rest)
  model.update_router_bias(load_NE, rate)
  return nnx.state(model, RouterBias)


def _loss_and_metrics(graphdef, params, *, router_bias, rest, batch, rng, moe_cfg):
  """(loss, metrics) of one forward pass: the weighted mean token cross-entropy plus the MoE layers'
  weighted auxiliary losses (`moe_layer.auxiliary_loss`), and what the step logs of them."""
  # Fresh variables at this trace level: nnx refuses, under its scan, variables made outside.
  router_bias = jax.tree.map(lambda x: x, router_bias)
  ce_BL, weights_BL, aux = _forward(
      graphdef, (params, router_bias, rest), batch, train=True, rng=rng
  )
  w_sum = jnp.sum(weights_BL)
  ce = jnp.sum(ce_BL) / jnp.maximum(w_sum, 1.0)
  metrics = {"ce": ce, "tokens": w_sum}
  if moe_cfg is None:
    return ce, metrics
  metrics.update(z_loss=jnp.mean(aux.losses.z), **_router_metrics(aux))
  if moe_cfg.router is RouterKind.TOKENS_CHOOSE:  # Experts choose has no balance loss: every
    # expert is full by construction (Zhou et al. 2022). Logged whatever moe.balance is.
    metrics["balance_loss"] = jnp.mean(aux.losses.balance)
  if moe_cfg.sequence_balance_weight:
    metrics["sequence_balance_loss"] = jnp.mean(aux.losses.sequence_balance)
  return ce + moe_layer.auxiliary_loss(moe_cfg, aux.losses), metrics


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    cfg: ExperimentConfig,
    tx: optax.GradientTransformation,
    *,
    state_sharding: Any = None,
    batch_sharding: Any = None,
) -> Callable[[TrainState, Batch], tuple]:
  """Builds the jitted train step `(state, batch) -> (new state, metrics)`; `state` is donated.

  Loss = weighted mean token cross-entropy + the MoE layers' weighted auxiliary losses, each a mean
  over sparse layers (`moe.layers.moe_layer.auxiliary_loss`: the balance loss only with
  moe.balance='loss'); a dense model: the cross-entropy alone. With moe.balance='bias', after the
  gradient step the selection biases move by moe.bias_update_rate from the step's expert load
  (`moe.layers.balancing.updated_bias`); a step skipped as non-finite leaves them as they were.

  Args:
    graphdef: the model's graph definition (`nnx.split(model, nnx.Param, ...)`).
    rest: the model's non-parameter state from the same split (closed over as constants).
    cfg: the experiment (train.seed for the jitter, model.moe for the loss weights).
    tx: the optimiser (`moe.trainer.optimizer.make_optimizer`).
    state_sharding / batch_sharding: pytrees of shardings for `TrainState` and the batch; when either
      is given the step is jitted with in/out shardings (the state keeps its sharding).

  Returns:
    The step. Metrics: loss, ce, grad_norm (before clipping), learning_rate (of this step), tokens
    (weight sum) and, for a sparse model, z_loss, the per-layer `_router_metrics` and, when tokens
    choose, balance_loss.
  """
  moe_cfg = cfg.model.moe if cfg.model.num_sparse_layers else None
  schedule = optimizer.learning_rate_schedule(cfg.train)
  seed = cfg.train.seed
  skips_nonfinite = cfg.train.on_nonfinite is NonFinite.SKIP

  def train_step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)

    loss_fn = functools.partial(
        _loss_and_metrics,
        graphdef,
        router_bias=state.router_bias,
        rest=rest,
        batch=batch,
        rng=rng,
        moe_cfg=moe_cfg,
    )
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    pure_params, pure_grads = nnx.as_pure(state.params), nnx.as_pure(grads)
    updates, opt_state = tx.update(pure_grads, state.opt_state, pure_params)
    new_pure = optax.apply_updates(pure_params, updates)
    params = nnx.clone(state.params)  # The new arrays in the nnx.Param variables.
    nnx.replace_by_pure_dict(params, new_pure.to_pure_dict())
    grad_norm = optimizer.global_norm(pure_grads)
    metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=schedule(state.step))
    router_bias = state.router_bias
    if jax.tree.leaves(router_bias):
      # A skipped step (optax.apply_if_finite) leaves the biases as it leaves the parameters.
      skipped = jnp.logical_not(jnp.isfinite(grad_norm)) if skips_nonfinite else jnp.bool_(False)
      updated = _updated_router_bias(
          graphdef, state, rest, metrics["expert_load"], moe_cfg.bias_update_rate
      )
      router_bias = jax.tree.map(
          lambda new, old: jnp.where(skipped, old, new), updated, router_bias
      )
    return TrainState(params, opt_state, state.step + 1, router_bias), metrics

  kwargs = {}
  if batch_sharding is not None:  # Sharded: the state and the batch are placed, metrics replicated.
    # Metrics are replicated: every process can read them (a split metric is not addressable).
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.P())
    kwargs = dict(
        in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, replicated)
    )
  return jax.jit(train_step, donate_argnames=("state",), **kwargs)


def make_eval_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    cfg: ExperimentConfig,
    *,
    params_sharding: Any = None,
    batch_sharding: Any = None,
) -> Callable:
  """Builds the jitted eval step `(variables, batch) -> sums` (eval capacity factor, no jitter);
  `variables` is `model_variables(state)` (parameters and selection biases), `params_sharding` its
  shardings (`model_variables(state_sharding)`).

  Returns sums to be added over batches: ce_sum, tokens, the same two over the batch's even and odd
  rows (ce_halves, tokens_halves [2]: two disjoint halves of the scored windows, each spread over
  the whole split, whose difference measures the evaluation's own sampling noise) and, for a sparse
  model, the per-layer `_router_metrics` of the batch (averaged over batches by `evaluate`).
  """
  sparse = bool(cfg.model.num_sparse_layers)

  def eval_step(variables: nnx.State, batch: Batch):
    ce_BL, weights_BL, aux = _forward(graphdef, (variables, rest), batch, train=False, rng=None)
    half_B = jnp.arange(ce_BL.shape[0]) % 2
    out = {
        "ce_sum": jnp.sum(ce_BL),
        "tokens": jnp.sum(weights_BL),
        "ce_halves": jax.ops.segment_sum(jnp.sum(ce_BL, axis=1), half_B, 2),
        "tokens_halves": jax.ops.segment_sum(jnp.sum(weights_BL, axis=1), half_B, 2),
    }
    if sparse:
      out.update(_router_metrics(aux))
    return out

  kwargs = {}
  if batch_sharding is not None:
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.P())
    kwargs = dict(in_shardings=(params_sharding, batch_sharding), out_shardings=replicated)
  return jax.jit(eval_step, **kwargs)


def make_window_losses_step(graphdef: nnx.GraphDef, rest: nnx.State) -> Callable:
  """Builds the jitted `(params, batch) -> (ce [B], tokens [B])`: each row's (window's) summed
  cross-entropy and scored tokens, computed as the eval step computes them (no jitter, the eval
  capacity factor); `moe.trainer.evaluation` re-scores trained runs with it."""

  def window_losses(params: nnx.State, batch: Batch):
    ce_BL, weights_BL, _ = _forward(graphdef, (params, rest), batch, train=False, rng=None)
    return jnp.sum(ce_BL, axis=1), jnp.sum(weights_BL, axis=1)

  return jax.jit(window_losses)


def init_train_state(
    cfg: ExperimentConfig, mesh: jax.sharding.Mesh, rules, *, abstract: bool = False
):
  """Builds the model under the mesh, the optimiser and the train state, placed by the logical rules.

  Parameters are initialised inside one `jax.jit` whose out_shardings come from their logical axis
  names, so each device only ever holds its own shards; the optimiser moments mirror the parameters'
  shardings and scalars are replicated. Random initialisation does not depend on the mesh
  (partitionable threefry), so every mesh starts from the same parameters.

  Args:
    cfg: the experiment.
    mesh: from `moe.parallel.sharding.make_mesh`.
    rules: from `moe.parallel.sharding.logical_rules`.
    abstract: return ShapeDtypeStructs (with shardings) instead of arrays: nothing is allocated.

  Returns:
    (graphdef, rest, tx, state, state_sharding): the model's graph definition and the state that is
    neither a parameter nor a selection bias (for `make_train_step`), the optimiser, the `TrainState`
    and its pytree of NamedShardings (the biases replicated: `axes.ROUTER_EXPERTS` is never split).
  """
  make_model = lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed))
  replicated = sharding.replicated(mesh)
  with sharding.use_mesh(mesh, rules):
    graphdef, abstract_params, abstract_bias, rest = nnx.split(
        nnx.eval_shape(make_model), nnx.Param, RouterBias, ...
    )
    params_sharding = sharding.named_shardings(abstract_params, mesh, rules)
    bias_sharding = sharding.named_shardings(abstract_bias, mesh, rules)
    tx = optimizer.make_optimizer(cfg.train, abstract_params)
    # optax calls `init` on a placeholder to find the parameter-shaped parts of the state; traced
    # (eval_shape) it runs nothing, so the state can be built for devices that cannot run code (a TPU
    # topology compiled on the CPU: experiments/compile_check.py).
    opt_sharding = optax.tree_map_params(
        lambda placeholder: jax.eval_shape(tx.init, placeholder),
        lambda _, s: s,
        jax.eval_shape(tx.init, nnx.as_pure(abstract_params)),
        nnx.as_pure(params_sharding),
        transform_non_params=lambda _: replicated,
    )
    state_sharding = TrainState(params_sharding, opt_sharding, replicated, bias_sharding)

    def init() -> TrainState:
      params, bias = nnx.state(make_model(), nnx.Param, RouterBias)
      return TrainState(params, tx.init(nnx.as_pure(params)), jnp.zeros((), jnp.int32), bias)

    if abstract:
      state = jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          jax.eval_shape(init),
          state_sharding,
      )
    else:
      state = jax.jit(init, out_shardings=state_sharding)()
  return graphdef, rest, tx, state, state_sharding


def to_device(batch: Batch, batch_sharding: Any = None) -> Batch:
  """Numpy batch (this process's rows) -> jax arrays split over the batch axes.

  With several processes, each passes only its own rows (process p holds rows [p * B_local,
  (p + 1) * B_local) of the global batch, as `moe.data` produces them) and they are assembled into
  global arrays with `jax.make_array_from_process_local_data`.
  """
  if batch_sharding is not None and jax.process_count() > 1:
    return {
        k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
        for k, v in batch.items()
    }
  return {k: jax.device_put(np.asarray(v), batch_sharding) for k, v in batch.items()}


_SUMMED = ("ce_sum", "tokens", "ce_halves", "tokens_halves")  # Eval outputs added over batches.


def evaluate(eval_step: Callable, params: nnx.State, batches, batch_sharding: Any = None) -> dict:
  """The evaluation over `batches`: token-weighted loss (= cross-entropy), perplexity, the tokens
  scored, the loss of each half of the windows (even and odd rows: `loss_even_rows`,
  `loss_odd_rows`) and batch-averaged router statistics."""
  totals, stats, n = {}, {}, 0
  for batch in batches:
    out = jax.device_get(eval_step(params, to_device(batch, batch_sharding)))  # Blocks: no backlog.
    n += 1
    for key, value in out.items():
      into = totals if key in _SUMMED else stats
      into[key] = into.get(key, 0.0) + np.asarray(value, np.float64)
  ce = float(totals["ce_sum"]) / max(float(totals["tokens"]), 1.0)
  halves = totals["ce_halves"] / np.maximum(totals["tokens_halves"], 1.0)
  result = {
      "loss": ce,
      "ce": ce,
      "perplexity": math.exp(min(ce, 700.0)),
      "tokens": int(totals["tokens"]),
      "loss_even_rows": float(halves[0]),
      "loss_odd_rows": float(halves[1]),
  }
  result.update({k: (v / n).tolist() for k, v in stats.items()})
  return result
