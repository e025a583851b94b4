"""Sparse upcycling: a sparse model started from a trained dense run (Komatsuzaki et al. 2022,
"Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints").

    python -m experiments.train --config=configs/upcycle.py:size=tiny \\
        --config.train.init_from=runs/dense_tiny --workdir=runs/upcycled_tiny

Every parameter of the new model comes from the dense run's latest checkpoint: embeddings, attention,
norms and the dense layers' MLPs are copied from the same layer, each expert of a sparse layer is a copy
of that layer's dense MLP (times 1 + noise * N(0, 1) with `train.init_from_noise` > 0), and only the
routers keep their fresh initialisation, as in the paper (its routers are new, its experts copies).
With k experts per token, gates renormalised over the k (`moe.renormalize_gates`) and no
drops (dropless, or a capacity of S), a token's output is sum_i g_i MLP(x) = MLP(x): the upcycled model
computes the dense model's function at step 0 (tests/models/test_upcycle.py). With raw softmax gates it
computes g_1 MLP(x) instead, a smaller update the training soon rescales.

Only a new run reads `train.init_from`, at step 0; the optimiser state starts fresh (Adam moments of
zero), and a resumed run restores its own checkpoint. The dense run must have the same shapes (vocab,
width, depth, heads, dense MLP width = moe.expert_hidden, activations, norms, RoPE); `check_source`
names every field that differs. The source may not be sparse, and the target may not have a shared
expert (the dense MLP has no counterpart for it). A dense target is allowed: its parameters are a plain
copy, which is how the comparison below continues the dense model under the same schedule.

The comparison of upcycled against continued dense training (configs/upcycle.py, finding g of
docs/RESULTS.md) starts both arms from the dense run's last checkpoint with the same fresh AdamW
state, schedule and batches, so the arms differ only in the model. The sparse arm there is top-2 of 8
experts, every other layer, gates renormalised, dropless: the paper's decoders route token-choice
top-K with K=2 (expert choice is not causal); renormalised gates make step 0 exactly the dense model
and stay trainable (top-1 renormalised is a gate of 1); dropless routing is causal and drops nothing
(a capacity could drop tokens at step 0).
"""

from __future__ import annotations

import functools
import json
import pathlib
import zlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moe.config.config_dict import model_from_config_dict
from moe.config.experiment import ExperimentConfig
from moe.config.model import ModelConfig
from moe.models.transformer import scan_plan, Transformer
from moe.parallel import sharding
from moe.trainer import checkpoints
from moe.trainer.progress import print_line
from moe.trainer.steps import TrainState
from moe.trainer.workdir import CONFIG

# fold_in tag of the expert-noise stream: disjoint from the per-step jitter keys fold_in(seed, step).
NOISE_STREAM = 0x75706379  # "upcy"
# Fields of ModelConfig a dense run must share with the model started from it: they fix the shapes of
# the copied weights (or, for the last three, the function they compute).
SHARED_FIELDS = (
    "vocab_size",
    "d_model",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_hidden",
    "activation",
    "tie_embeddings",
    "rope_theta",
    "norm_eps",
)


def read_dense_config(workdir: str | pathlib.Path) -> ModelConfig:
  """The model of the run in `workdir`, from its config.json (`moe.trainer.workdir`).

  Raises:
    ValueError: no config.json there, or it does not hold a valid model.
  """
  path = pathlib.Path(workdir) / CONFIG
  if not path.is_file():
    raise ValueError(f"train.init_from={str(workdir)!r} holds no {CONFIG}: not a run's workdir")
  try:
    return model_from_config_dict(json.loads(path.read_text())["model"])
  except (ValueError, KeyError, TypeError) as error:
    raise ValueError(f"train.init_from={str(workdir)!r}: its {CONFIG} has no valid model ({error})")


def check_source(dense: ModelConfig, target: ModelConfig, source: str) -> None:
  """Raises one line naming every field that keeps `dense` from being upcycled into `target`.

  Args:
    dense: the model of the run in `source`.
    target: the model to start from it (sparse, or dense: a plain copy).
    source: the dense workdir, for the message.
  """
  if dense.num_sparse_layers:
    raise ValueError(
        f"train.init_from={source!r} holds a sparse model ({dense.num_sparse_layers} of "
        f"{dense.num_layers} layers MoE); upcycling starts from a dense run (model.moe=None)"
    )
  value = lambda x: getattr(x, "value", x)
  differ = [
      f"model.{name} {value(getattr(dense, name))!r} there, {value(getattr(target, name))!r} here"
      for name in SHARED_FIELDS
      if getattr(dense, name) != getattr(target, name)
  ]
  if target.num_sparse_layers:
    moe = target.moe
    if moe.expert_hidden != dense.mlp_hidden:
      differ.append(
          f"model.moe.expert_hidden {moe.expert_hidden} here, dense model.mlp_hidden "
          f"{dense.mlp_hidden} there"
      )
    if moe.activation != dense.activation:
      differ.append(
          f"model.moe.activation {moe.activation.value!r} here, dense model.activation "
          f"{dense.activation.value!r} there"
      )
    if moe.shared_expert_hidden:
      differ.append(
          f"model.moe.shared_expert_hidden {moe.shared_expert_hidden} here must be 0 (the dense "
          "MLP has no counterpart for a shared expert)"
      )
  if differ:
    raise ValueError(
        f"train.init_from={source!r}: the dense model does not fit this one: {'; '.join(differ)} "
        "(upcycling copies its weights)"
    )


def _key(path) -> tuple[str, ...]:
  """A pytree path as a tuple of strings (dict keys, list indices, attribute names)."""
  return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _block_sites(cfg: ModelConfig) -> list[tuple[tuple[str, ...], int | None]]:
  """Per layer i: where its Block's parameters live in `Transformer`'s tree (`moe.models.transformer`), and its
  index on the stacked 'layers' axis (None for an unrolled prefix layer)."""
  prefix, period = scan_plan(cfg.sparse_mask, cfg.scan_layers)
  sites: list[tuple[tuple[str, ...], int | None]] = [
      (("prefix", str(i)), None) for i in range(prefix)
  ]
  for i in range(prefix, cfg.num_layers):
    repeat, j = divmod(i - prefix, period)
    sites.append((("periods", "layers", str(j)), repeat))
  return sites


def upcycle(
    dense_params: Any,
    dense_cfg: ModelConfig,
    sparse_params: Any,
    sparse_cfg: ModelConfig,
    *,
    rng: jax.Array,
    noise: float = 0.0,
) -> Any:
  """The parameters of `sparse_cfg`'s model taken from a dense model's (jit-able).

  Each parameter of the sparse model is mapped to its source by layer, whatever either model's scan
  layout (`moe.models.transformer.scan_plan`: an unrolled prefix and a period stacked over a 'layers' axis):
  embeddings and the final norm by path; a layer's attention, norms and (dense layers) MLP from the same
  layer of the dense model; a sparse layer's experts w_in / w_gate / w_out from that layer's dense MLP,
  broadcast to [E, ...] and, when `noise` > 0, multiplied by 1 + noise * N(0, 1) (independent per
  expert and element; the key depends on the layer and the weight's name only, so the same for any
  scan layout). Routers keep their value in `sparse_params`.

  Args:
    dense_params: the dense model's parameters (nnx.State or nested dict of arrays).
    dense_cfg: the dense model; `check_source(dense_cfg, sparse_cfg, ...)` must pass.
    sparse_params: the freshly initialised parameters of the sparse model (`nnx.state(model,
      nnx.Param)`): their structure is the result's, their routers are kept.
    sparse_cfg: the sparse model (a dense one gives a plain copy, re-laid out if needed).
    rng: key of the expert noise.
    noise: relative std of the noise (0: exact copies).

  Returns:
    A tree of `sparse_params`' structure.
  """
  dense = {
      _key(p): x for p, x in jax.tree_util.tree_flatten_with_path(nnx.as_pure(dense_params))[0]
  }
  dense_sites = _block_sites(dense_cfg)
  blocks: dict[tuple[str, ...], list[int]] = {}  # Block path -> its layers, in stacking order.
  for layer, (block, _) in enumerate(_block_sites(sparse_cfg)):
    blocks.setdefault(block, []).append(layer)

  def dense_leaf(key: tuple[str, ...]) -> jax.Array:
    if key not in dense:
      raise ValueError(f"upcycle: the dense parameters have no {'/'.join(key)}")
    return dense[key]

  def layer_leaf(rest: tuple[str, ...], layer: int) -> jax.Array:
    block, repeat = dense_sites[layer]
    experts = rest[:2] == ("ffn", "experts")
    w = dense_leaf(block + (("ffn",) + rest[2:] if experts else rest))
    w = w if repeat is None else w[repeat]
    if not experts:
      return w
    stacked = jnp.broadcast_to(w, (sparse_cfg.moe.num_experts,) + w.shape)
    if noise:
      key = jax.random.fold_in(jax.random.fold_in(rng, layer), zlib.crc32(rest[-1].encode()))
      stacked = stacked * (1.0 + noise * jax.random.normal(key, stacked.shape, stacked.dtype))
    return stacked

  def source(path, init: jax.Array) -> jax.Array:
    key = _key(path)
    block = next((b for b in blocks if key[: len(b)] == b), None)
    if block is None:
      w = dense_leaf(key)
    elif key[len(block) :][:2] == ("ffn", "router"):
      return init  # The router is new (Komatsuzaki et al. 2022): it has no dense counterpart.
    else:
      rest, layers = key[len(block) :], blocks[block]
      w = layer_leaf(rest, layers[0])
      if block[0] == "periods":
        w = jnp.stack([layer_leaf(rest, layer) for layer in layers])
    if w.shape != init.shape:
      raise ValueError(
          f"upcycle: {'/'.join(key)} is {tuple(init.shape)} here but {tuple(w.shape)} from the "
          "dense model"
      )
    return w.astype(init.dtype)

  pure = nnx.as_pure(sparse_params)
  leaves = [source(p, x) for p, x in jax.tree_util.tree_flatten_with_path(pure)[0]]
  return jax.tree.unflatten(jax.tree.structure(sparse_params), leaves)


def _latest_step(workdir: str | pathlib.Path) -> int:
  """The latest checkpoint step of the run in `workdir` (only listed: nothing there is touched)."""
  steps = checkpoints.steps_of(workdir)
  if not steps:
    raise ValueError(
        f"train.init_from={str(workdir)!r} holds no checkpoint: train the dense run first"
    )
  return steps[0]


def restore_dense_params(
    workdir: str | pathlib.Path, dense_cfg: ModelConfig, mesh: jax.sharding.Mesh, rules
) -> tuple[int, dict]:
  """(step, parameters) of the latest checkpoint in `workdir`, placed on `mesh` by `rules`.

  Only the parameters are read (`moe.trainer.checkpoints.restore_params`), not the optimiser moments.
  Returns them as nested dicts of arrays.
  """
  step = _latest_step(workdir)
  with sharding.use_mesh(mesh, rules):
    abstract = nnx.state(
        nnx.eval_shape(lambda: Transformer(dense_cfg, rngs=nnx.Rngs(0))), nnx.Param
    )
    shardings = sharding.named_shardings(abstract, mesh, rules)
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nnx.as_pure(abstract).to_pure_dict(),
      nnx.as_pure(shardings).to_pure_dict(),
  )
  try:
    return step, checkpoints.restore_params(workdir, step, target)
  except Exception as error:  # pylint: disable=broad-except  # tensorstore raises bare Exceptions.
    first_line = (str(error).splitlines() or [""])[0]
    raise ValueError(
        f"train.init_from={str(workdir)!r}: checkpoint {step} does not restore as the model of its "
        f"{CONFIG} ({type(error).__name__}: {first_line})"
    ) from error


def _has_checkpoint(workdir: pathlib.Path) -> bool:
  directory = workdir / "checkpoints"
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_init_from(cfg: ExperimentConfig, workdir: pathlib.Path) -> None:
  """Refuses, in one line, a `train.init_from` that cannot start a new run in `workdir`: no run there,
  no checkpoint, a sparse source or other shapes. A workdir with checkpoints resumes from them and
  never reads the source (which may be gone by then): nothing is checked."""
  if cfg.train.init_from is None or _has_checkpoint(workdir):
    return
  check_source(read_dense_config(cfg.train.init_from), cfg.model, cfg.train.init_from)
  _latest_step(cfg.train.init_from)


def init_from_dense(
    cfg: ExperimentConfig, state: TrainState, state_sharding: TrainState, mesh, rules
) -> TrainState:
  """The fresh train state of a new run with its parameters upcycled from `cfg.train.init_from`.

  Args:
    cfg: the experiment; `train.init_from` names the dense workdir.
    state: the freshly initialised state (`moe.trainer.steps.init_train_state`): its routers and optimiser
      state (AdamW moments of zero, which do not depend on the parameters' values) are kept.
    state_sharding: its shardings (the upcycled parameters are placed like the fresh ones).
    mesh, rules: from `moe.parallel.sharding`.
  """
  source = cfg.train.init_from
  dense_cfg = read_dense_config(source)
  check_source(dense_cfg, cfg.model, source)
  step, dense_params = restore_dense_params(source, dense_cfg, mesh, rules)
  noise = cfg.train.init_from_noise
  build = jax.jit(
      functools.partial(upcycle, dense_cfg=dense_cfg, sparse_cfg=cfg.model, noise=noise),
      out_shardings=state_sharding.params,
      donate_argnames=("sparse_params",),
  )
  rng = jax.random.fold_in(jax.random.key(cfg.train.seed), NOISE_STREAM)
  with sharding.use_mesh(mesh, rules):
    params = build(dense_params, sparse_params=state.params, rng=rng)
  what = "copied"
  if cfg.model.num_sparse_layers:
    n = cfg.model.num_sparse_layers
    what = (
        f"upcycled: {n} sparse layer{'s' * (n > 1)} of {cfg.model.moe.num_experts} copies of the "
        f"dense MLP (noise {noise:g}), routers freshly initialised"
    )
  print_line(f"Parameters {what}, from {source} (dense, step {step}); optimiser state fresh")
  return state._replace(params=params)
