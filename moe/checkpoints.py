"""Orbax checkpoints of a run: the train state and the data iterator, saved together.

Each checkpoint `checkpoints/<step>/` holds 'state' (params, opt_state, step: `moe.steps.TrainState`)
and 'data' (the grain iterator's state), so a resumed run continues the exact batch sequence. Saves are
asynchronous (training continues while the arrays are written); a step directory appears only once
complete, so a crash mid-save leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx


class _QuietOrbax:
  """A logging filter: orbax logs every save at INFO; keep its warnings and errors only."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def _quiet_orbax() -> None:
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _QuietOrbax) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietOrbax())


def make_manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  """An asynchronous CheckpointManager keeping the `keep` latest checkpoints."""
  _quiet_orbax()
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, enable_async_checkpointing=True
      ),
  )


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_it) -> None:
  """Starts saving `state` (a TrainState) and the iterator at `step`; returns once the arrays are
  copied off the device."""
  manager.save(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(nnx.as_pure(state)),
          data=grain.checkpoint.CheckpointSave(data_it),
      ),
  )


def restore_latest(manager: ocp.CheckpointManager, state: Any, data_it) -> tuple[int, Any, Any]:
  """(step, state, data iterator) of the latest checkpoint, or (0, state, data_it) when there is none.

  Args:
    manager: from `make_manager`.
    state: a TrainState with the target shapes, dtypes and shardings (e.g. freshly initialised).
    data_it: the run's grain iterator; restored in place.
  """
  start = manager.latest_step() or 0
  if not start:
    return 0, state, data_it
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.as_pure(state))
  restored = manager.restore(
      start,
      args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(data_it)
      ),
  )
  state = jax.tree.unflatten(jax.tree.structure(state), jax.tree.leaves(restored["state"]))
  if int(state.step) != start:
    raise RuntimeError(f"checkpoint {start} holds step {int(state.step)}")
  return start, state, restored["data"]
