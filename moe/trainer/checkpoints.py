"""Orbax checkpoints of a run: the train state and the data iterator, saved together.

Each checkpoint `checkpoints/<step>/` holds 'state' (params, opt_state, step and, for a model with selection
biases, router_bias: `moe.trainer.steps.TrainState`) and 'data' (the grain iterator's state), so a resumed run continues the exact batch sequence. Saves are
asynchronous (training continues while the arrays are written); a step directory appears only once
complete, so a crash mid-save leaves the previous checkpoint as the latest.

A checkpoint that cannot be restored (a truncated array file, a missing `_METADATA`, a missing or
unreadable data-iterator state), that holds another step than its name, or whose floating-point
values are not all finite is damaged: `restore_latest` logs a warning, renames it to
`checkpoints/<step>.damaged` (never deletes it; orbax does not list that name as a step) and falls
back to the previous one. Only when none restores does it raise `CheckpointsDamaged`, which names
each step tried, why, and where it went (and it raises again on the next start, rather than begin
from step 0 beside them). A readable checkpoint whose arrays are not the train state's is not
damaged but incompatible (`CheckpointIncompatible`): nothing is moved.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys
import traceback
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

DAMAGED_SUFFIX = ".damaged"  # checkpoints/<step>.damaged: a set-aside checkpoint.


class CheckpointsDamaged(RuntimeError):
  """No checkpoint of the run restores; the damaged ones were moved aside (see the message)."""


class SaveFailed(RuntimeError):
  """An asynchronous save failed (a full disk, a lost mount): the run stops at the next step."""


class CheckpointIncompatible(ValueError):
  """A readable checkpoint whose arrays are not the train state's: a code or config change, not
  damage, so nothing is moved aside."""


@dataclasses.dataclass(frozen=True)
class _Damaged:
  """A checkpoint that did not restore: its step, why, and where it now lies."""

  step: int
  cause: str
  moved_to: epath.Path


class _QuietOrbax:
  """A logging filter: orbax logs every save at INFO; keep its warnings and errors only, and those
  without a traceback (a failed background save logs one per thread; the loop then raises
  `SaveFailed`, one line with the root cause, whose chain --verbose shows)."""

  def filter(self, record) -> bool:
    if "orbax" not in record.pathname:
      return True
    record.exc_info, record.exc_text = None, None
    return record.levelno >= 30


def _quiet_orbax() -> None:
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _QuietOrbax) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietOrbax())
  if not getattr(sys.unraisablehook, "drops_abandoned_writes", False):
    sys.unraisablehook = _drop_abandoned_writes(sys.unraisablehook)


def _is_abandoned_write(error: BaseException) -> bool:
  """True for the error tensorstore meets when a write completes after its asyncio loop closed."""
  frames = traceback.extract_tb(error.__traceback__)
  return (
      isinstance(error, RuntimeError)
      and str(error) == "Event loop is closed"
      and any(frame.name == "call_soon_threadsafe" for frame in frames)
  )


def _drop_abandoned_writes(unraisablehook):
  """`unraisablehook` without the abandoned-write tracebacks. When one write of a save fails, orbax's
  `asyncio.run` closes its loop with the save's other writes in flight; tensorstore then reports
  each one's completion to the closed loop and hands the RuntimeError to sys.unraisablehook
  (PyErr_WriteUnraisable), dozens of tracebacks around the one line `SaveFailed` gives. Nothing is lost: the
  save already failed and the loop raises `SaveFailed` with its root cause."""

  def hook(unraisable):
    if _is_abandoned_write(unraisable.exc_value):
      logging.debug("A write of a failed save completed after its loop closed: %s", unraisable)
      return
    unraisablehook(unraisable)

  hook.drops_abandoned_writes = True
  return hook


def make_manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  """An asynchronous CheckpointManager keeping the `keep` latest checkpoints."""
  _quiet_orbax()
  return ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, enable_async_checkpointing=True
      ),
  )


def _as_saved(state: Any) -> dict:
  """The train state as a checkpoint holds it: its fields by name, bare arrays; a field without
  arrays (the router biases of a model that has none) is left out, so such a model's checkpoints
  keep the layout they had before the biases existed and old checkpoints restore."""
  fields = nnx.as_pure(state)._asdict()
  return {name: value for name, value in fields.items() if jax.tree.leaves(value)}


def _from_saved(saved: dict, like: Any) -> Any:
  """The TrainState of `like`'s type and structure with the arrays of `saved` (`_as_saved`)."""
  return type(like)(
      **{
          name: jax.tree.unflatten(jax.tree.structure(value), jax.tree.leaves(saved[name]))
          if name in saved
          else value
          for name, value in like._asdict().items()
      }
  )


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_it) -> None:
  """Starts saving `state` (a TrainState) and the iterator at `step`; returns once the arrays are
  copied off the device. Raises `SaveFailed` if the previous save failed (orbax waits for it here).
  """
  try:
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_as_saved(state)),
            data=grain.checkpoint.CheckpointSave(data_it),
        ),
    )
  except OSError:
    raise  # The save could not start (e.g. no space for its directory): the message says so.
  except Exception as error:  # pylint: disable=broad-except  # What the previous save raised.
    raise _save_failed(manager, error) from error


def raise_if_save_failed(manager: ocp.CheckpointManager) -> None:
  """Raises `SaveFailed` (one line: the directory and the root cause) if a background save failed;
  asked after every step, so training stops one step, not one checkpoint period, after the failure.

  Orbax's finalize thread waits for the writer and takes its error (clearing it for
  `check_for_errors`), then dies with it; only a `wait_until_finished` re-raises it. So once no save
  is in progress, the wait (immediate then) is the check.
  """
  try:
    manager.check_for_errors()
    if not manager.is_saving_in_progress():
      manager.wait_until_finished()
  except Exception as error:  # pylint: disable=broad-except  # Whatever the writer raised.
    raise _save_failed(manager, error) from error


def finish_saves(manager: ocp.CheckpointManager) -> None:
  """Waits for the save in flight to commit; `SaveFailed` if it failed."""
  try:
    manager.wait_until_finished()
  except Exception as error:  # pylint: disable=broad-except
    raise _save_failed(manager, error) from error


def _save_failed(manager: ocp.CheckpointManager, error: BaseException) -> SaveFailed:
  return SaveFailed(f"a checkpoint could not be written to {manager.directory}: {_describe(error)}")


def steps_of(workdir: str | pathlib.Path) -> list[int]:
  """The finalised checkpoint steps of the run in `workdir`, newest first (only listed: nothing is
  touched). A save in progress or cut short is a temporary directory, not a step, and a checkpoint
  set aside as damaged (`<step>.damaged`) is not one either."""
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  return (
      sorted(ocp.path.step.checkpoint_steps(directory), reverse=True) if directory.is_dir() else []
  )


def on_disk(workdir: str | pathlib.Path) -> str:
  """What the workdir holds, for a preemption line: its newest committed checkpoint, or none."""
  saved = steps_of(workdir)
  return f"checkpoint {saved[0]} is the newest on disk" if saved else "no checkpoint is on disk yet"


def restore_params(workdir: str | pathlib.Path, step: int, target: Any, **more: Any) -> Any:
  """The parameters alone of checkpoint `step` of the run in `workdir`: an orbax partial restore of
  the 'state' item's 'params' (the optimiser moments and the data iterator are not read).

  Args:
    target: the parameters' tree of `jax.ShapeDtypeStruct`s with shardings, as nested dicts.
    **more: other fields of the train state to read beside them, same form (e.g. router_bias=...,
      the selection biases the model routes with); then a dict {'params': ..., **more} is returned.
  """
  path = pathlib.Path(workdir).absolute() / "checkpoints" / str(step) / "state"
  items = {"params": target, **{name: tree for name, tree in more.items() if jax.tree.leaves(tree)}}
  checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
  try:
    restored = checkpointer.restore(
        path,
        args=ocp.args.PyTreeRestore(
            item=items,
            restore_args={
                k: ocp.checkpoint_utils.construct_restore_args(v) for k, v in items.items()
            },
            partial_restore=True,
        ),
    )
  finally:
    checkpointer.close()
  if not more:
    return restored["params"]
  return {name: restored.get(name, tree) for name, tree in {"params": target, **more}.items()}


def restore_latest(manager: ocp.CheckpointManager, state: Any, data_it) -> tuple[int, Any, Any]:
  """(step, state, data iterator) of the latest checkpoint that restores, or (0, state, data_it)
  when there is none.

  Damaged checkpoints (see the module docstring) are renamed to `<step>.damaged` and the previous
  one is tried. With several processes all of them try each step together, a step is damaged if it
  is damaged on any of them, and process 0 renames it.

  Args:
    manager: from `make_manager`.
    state: a TrainState with the target shapes, dtypes and shardings (e.g. freshly initialised).
    data_it: the run's grain iterator; restored in place, from the returned step only.

  Raises:
    CheckpointsDamaged: checkpoints exist (or were set aside before) but none restores.
    CheckpointIncompatible: the latest checkpoint is readable but its arrays are not `state`'s.
  """
  damaged: list[_Damaged] = []
  while (step := manager.latest_step()) is not None:
    restored, cause = _restore(manager, step, state, data_it)
    if _everywhere(cause is None):
      return step, restored, data_it
    cause = cause or "damaged on another process"
    moved_to = _set_aside(manager, step)
    logging.warning(
        "Checkpoint %d in %s does not restore (%s); moved it to %s and trying the previous one.",
        step,
        manager.directory,
        cause,
        moved_to,
    )
    damaged.append(_Damaged(step, cause, moved_to))
  if damaged:
    raise CheckpointsDamaged(
        f"no checkpoint in {manager.directory} restores; each was moved aside:\n"
        + "\n".join(f"  step {d.step}: {d.cause} -> {d.moved_to}" for d in damaged)
        + "\nA restart refuses too until one is repaired and renamed back to its step, or they "
        "are deleted to start over from step 0."
    )
  set_aside = sorted(p.name for p in manager.directory.glob(f"*{DAMAGED_SUFFIX}*"))
  if set_aside:
    # A run whose every checkpoint was set aside must not restart from step 0 unnoticed (e.g. when a
    # scheduler restarts it after the error above).
    raise CheckpointsDamaged(
        f"{manager.directory} holds no restorable checkpoint, only damaged ones set aside by an "
        f"earlier start: {', '.join(set_aside)}. Repair one and rename it back to its step, or "
        "delete them to start over from step 0."
    )
  return 0, state, data_it


def _restore(
    manager: ocp.CheckpointManager, step: int, state: Any, data_it
) -> tuple[Any, str | None]:
  """(restored state, None) when checkpoint `step` restores and is sound, else (None, why not).

  The data iterator is restored last, once the state is known good, so a checkpoint damaged here
  never touches it; one that restored here but is damaged on another process is overwritten by the
  fallback step's restore.
  """
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_saved(state))
  handler = ocp.StandardCheckpointHandler()
  try:
    saved = handler.metadata(manager.directory / str(step) / "state")
  except Exception as e:  # pylint: disable=broad-except  # Any failure to read is damage.
    return None, f"state metadata unreadable: {_describe(e)}"
  finally:
    handler.close()
  mismatch = _mismatch(saved, abstract)
  if mismatch:
    raise CheckpointIncompatible(
        f"checkpoint {step} in {manager.directory} does not match the train state "
        f"({'; '.join(mismatch)}): the model, optimiser or code changed since it was saved"
    )
  try:
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )["state"]
  except Exception as e:  # pylint: disable=broad-except  # tensorstore raises bare Exceptions.
    return None, f"state unreadable: {_describe(e)}"
  restored = _from_saved(restored, state)
  if int(restored.step) != step:
    return None, f"holds step {int(restored.step)}"
  non_finite = _non_finite(nnx.as_pure(restored))
  if non_finite:
    more = f" and {len(non_finite) - 3} more" if len(non_finite) > 3 else ""
    return None, f"non-finite values in {', '.join(non_finite[:3])}{more}"
  try:
    manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_it)))
  except Exception as e:  # pylint: disable=broad-except  # Missing file, bad JSON, bad state.
    return None, f"data iterator state unreadable: {_describe(e)}"
  return restored, None


def _mismatch(saved, abstract) -> list[str]:
  """How the saved arrays (orbax metadata) differ from the target's: names, shapes, dtypes."""
  want = {
      name: (tuple(x.shape), np.dtype(x.dtype))
      for name, x in zip(
          jax.tree.leaves(ocp.tree.get_param_names(abstract, include_empty_nodes=False)),
          jax.tree.leaves(abstract),
      )
  }
  have = {
      m.name: (tuple(getattr(m, "shape", ())), np.dtype(getattr(m, "dtype", None) or object))
      for m in jax.tree.leaves(saved)
  }
  diffs = [f"{n} missing" for n in sorted(want.keys() - have.keys())]
  diffs += [f"{n} unexpected" for n in sorted(have.keys() - want.keys())]
  diffs += [
      f"{n}: saved {have[n][0]} {have[n][1]}, wanted {want[n][0]} {want[n][1]}"
      for n in sorted(want.keys() & have.keys())
      if want[n] != have[n]
  ]
  return diffs[:3] + ([f"{len(diffs) - 3} more"] if len(diffs) > 3 else [])


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  """bool [len(leaves)]: whether each leaf is all finite (one reduction each, one transfer)."""
  return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def _non_finite(tree) -> list[str]:
  """Paths of the floating-point leaves of `tree` that hold a NaN or an infinity."""
  paths, leaves = [], []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jnp.issubdtype(x.dtype, jnp.floating):
      paths.append(jax.tree_util.keystr(path))
      leaves.append(x)
  if not leaves:
    return []
  finite = np.asarray(jax.device_get(_all_finite(leaves)))
  return [p for p, ok in zip(paths, finite) if not ok]


# Tensorstore appends `[source locations='...']` and `[tensorstore_spec='{...}']` to its reason: the
# spec alone can run to a kilobyte and bury the OS's reason. The OS error code is kept.
_TENSORSTORE_ANNOTATION = re.compile(r" \[(?!os_error_code=)[a-z_ ]+='.*?'\](?= \[|$)")


def _describe(error: BaseException) -> str:
  """The root cause of `error`, one line: orbax wraps tensorstore's reason (e.g. OUT_OF_RANGE reading
  a truncated file) in a message that is mostly the store's spec."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = _TENSORSTORE_ANNOTATION.sub("", (str(error).strip().splitlines() or [""])[0])
  # Long ones (tensorstore's) name the store first and the OS's reason last: keep both ends.
  text = text if len(text) <= 300 else f"{text[:150]} ... {text[-145:]}"
  return f"{type(error).__name__}: {text}"


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds on every process (all processes must take the same branch)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def _set_aside(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  """Renames checkpoint `step` to `<step>.damaged` (`.damaged.2`, ... if taken: the same step can
  be damaged again after a resume) and makes the manager forget it. Returns the new path."""
  directory = manager.directory
  target, n = directory / f"{step}{DAMAGED_SUFFIX}", 1
  while target.exists():
    n += 1
    target = directory / f"{step}{DAMAGED_SUFFIX}.{n}"
  # Every process picks the name before process 0 renames, so all report the same one.
  _sync(f"moe.trainer.checkpoints.set_aside.{step}.named")
  if jax.process_index() == 0:
    (directory / str(step)).rename(target)
  _sync(f"moe.trainer.checkpoints.set_aside.{step}.renamed")
  manager.reload()  # Re-lists the steps: the renamed directory is not one.
  return target
