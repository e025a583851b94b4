"""Damaged checkpoints: a resumed run sets the damaged one aside (renamed, never deleted), falls back
to the previous checkpoint and ends bit-identical to an uninterrupted run; when none restores, one
error names every step tried."""

from __future__ import annotations

import logging
import pathlib
import re
import shutil
from typing import NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import configs.switch
from moe.config.config_dict import experiment_from_config_dict
from moe.trainer import checkpoints, loop, steps
from moe.trainer.run_records import read_metrics

# Layout of one checkpoint after a smoke run (orbax 0.12, OCDBT; listed by hand):
#   checkpoints/<step>/_CHECKPOINT_METADATA, commit_success.txt
#   checkpoints/<step>/state/{_METADATA, _sharding, manifest.ocdbt, array_metadatas/, d/}
#   checkpoints/<step>/state/ocdbt.process_0/{manifest.ocdbt, d/<hash>}   (the array chunks)
#   checkpoints/<step>/data/process_0-of-1.json                          (the grain iterator)


def _config():
  """Switch smoke: 4 steps, checkpoints at 2 and 4 (both kept), no evaluation."""
  cd = configs.switch.get_config("size=smoke")
  cd.train.update(
      steps=4, warmup_steps=1, checkpoint_every=2, keep_checkpoints=3, eval_batches=0, log_every=1
  )
  return experiment_from_config_dict(cd)


def _records(workdir: pathlib.Path) -> list[dict]:
  """The metrics records without the timing fields (which differ between runs)."""
  return [
      {k: v for k, v in r.items() if k not in ("tokens_per_s", "time_s")}
      for r in read_metrics(workdir / "metrics.jsonl")
  ]


def _saved_state(step_dir: pathlib.Path) -> dict:
  """The arrays of a checkpoint's train state, as numpy, by orbax name."""
  tree = ocp.StandardCheckpointer().restore(step_dir / "state")
  return {
      name: np.asarray(x)
      for name, x in zip(
          jax.tree.leaves(ocp.tree.get_param_names(tree, include_empty_nodes=False)),
          jax.tree.leaves(tree),
          strict=True,
      )
  }


def _files(directory: pathlib.Path) -> dict[str, int]:
  """{relative path: size} of every file under `directory`."""
  return {
      str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()
  }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """(workdir, metrics records, final state arrays) of an uninterrupted 4-step run."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  loop.train_and_evaluate(_config(), str(workdir))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
  return workdir, _records(workdir), _saved_state(workdir / "checkpoints" / "4")


def _truncate_largest_chunk(step_dir: pathlib.Path) -> str:
  chunks = sorted(
      (step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size
  )
  data = chunks[-1].read_bytes()
  chunks[-1].write_bytes(data[: len(data) // 2])
  return "OUT_OF_RANGE"  # tensorstore's reason: a byte range past the end of the file.


def _delete_state_metadata(step_dir: pathlib.Path) -> str:
  (step_dir / "state" / "_METADATA").unlink()
  return "_METADATA"


def _delete_iterator_state(step_dir: pathlib.Path) -> str:
  (step_dir / "data" / "process_0-of-1.json").unlink()
  return "process_0-of-1.json"


@pytest.fixture
def restored_steps(monkeypatch):
  """The steps `checkpoints.restore_latest` returned during the test."""
  returned = []
  restore_latest = checkpoints.restore_latest

  def spy(*args):
    result = restore_latest(*args)
    returned.append(result[0])
    return result

  monkeypatch.setattr(checkpoints, "restore_latest", spy)
  return returned


@pytest.mark.parametrize(
    "damage", [_truncate_largest_chunk, _delete_state_metadata, _delete_iterator_state]
)
def test_damaged_latest_checkpoint_is_set_aside_and_the_run_ends_identical(
    damage, uninterrupted, tmp_path, caplog, restored_steps
):
  source, expected_records, expected_state = uninterrupted
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  ckpts = workdir / "checkpoints"
  cause = damage(ckpts / "4")
  damaged_files = _files(ckpts / "4")

  with caplog.at_level(logging.WARNING):
    final = loop.train_and_evaluate(_config(), str(workdir))

  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("Checkpoint 4 " in m and cause in m and "4.damaged" in m for m in warnings), warnings
  assert restored_steps == [2]
  # Set aside whole, under a name orbax does not take for a step; training re-saved step 4.
  assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4", "4.damaged"]
  assert _files(ckpts / "4.damaged") == damaged_files
  assert final["step"] == 4
  assert _records(workdir) == expected_records  # Exact float equality, every field.
  resumed_state = _saved_state(ckpts / "4")
  assert resumed_state.keys() == expected_state.keys()
  for name, array in expected_state.items():
    np.testing.assert_array_equal(resumed_state[name], array, err_msg=name, strict=True)


def test_when_no_checkpoint_restores_one_error_lists_every_step(uninterrupted, tmp_path):
  source, expected_records, _ = uninterrupted
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  ckpts = workdir / "checkpoints"
  _delete_state_metadata(ckpts / "4")
  _truncate_largest_chunk(ckpts / "2")

  with pytest.raises(checkpoints.CheckpointsDamaged) as error:
    loop.train_and_evaluate(_config(), str(workdir))
  message = str(error.value)
  assert "step 4: state metadata unreadable: FileNotFoundError" in message
  assert f"-> {ckpts / '4.damaged'}" in message
  assert "step 2: state unreadable: ValueError: OUT_OF_RANGE" in message
  assert f"-> {ckpts / '2.damaged'}" in message
  assert sorted(p.name for p in ckpts.iterdir()) == ["2.damaged", "4.damaged"]
  assert _records(workdir) == expected_records  # Nothing was trained or rewritten.

  # A restart (e.g. by a scheduler) must not quietly begin again from step 0.
  with pytest.raises(checkpoints.CheckpointsDamaged, match=r"only damaged ones .*2\.damaged, 4\."):
    loop.train_and_evaluate(_config(), str(workdir))
  assert _records(workdir) == expected_records


# ----------------------------------------------------------------------------------------------------
# `restore_latest` on a tiny train state: what counts as damaged, and what does not.


def _state(step: int, w: float = 1.0) -> steps.TrainState:
  return steps.TrainState(
      params={"w": jnp.full((4, 3), w, jnp.float32)},
      opt_state={"mu": jnp.zeros((4, 3), jnp.float32), "count": jnp.int32(step)},
      step=jnp.int32(step),
  )


def _iterator():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _save_run(directory: pathlib.Path, states: dict[int, steps.TrainState]) -> None:
  """Saves `states` by step, the iterator having yielded `step` elements at each."""
  manager = checkpoints.make_manager(directory, keep=10)
  it, consumed = _iterator(), 0
  for step, state in sorted(states.items()):
    for _ in range(step - consumed):
      next(it)
    consumed = step
    checkpoints.save(manager, step, state, it)
  manager.wait_until_finished()
  manager.close()


def _restore(directory: pathlib.Path):
  manager = checkpoints.make_manager(directory, keep=10)
  try:
    return checkpoints.restore_latest(manager, _state(0, w=0.0), _iterator())
  finally:
    manager.close()


def _one_nan_in_params():
  state = _state(4)
  return state._replace(params={"w": state.params["w"].at[1, 2].set(jnp.nan)})


def _one_inf_in_opt_state():
  state = _state(4)
  return state._replace(
      opt_state={**state.opt_state, "mu": state.opt_state["mu"].at[0, 0].set(jnp.inf)}
  )


@pytest.mark.parametrize(
    "make_bad, cause",
    [
        (_one_nan_in_params, r"non-finite values in .params\['w'\]"),
        (_one_inf_in_opt_state, r"non-finite values in .opt_state\['mu'\]"),
        (lambda: _state(3), "holds step 3"),  # Saved under the wrong step.
    ],
    ids=["nan in params", "inf in opt_state", "wrong step"],
)
def test_unsound_checkpoint_is_damaged_and_the_iterator_is_the_fallbacks(
    make_bad, cause, tmp_path, caplog
):
  ckpts = tmp_path / "checkpoints"
  _save_run(ckpts, {2: _state(2, w=2.0), 4: make_bad()})
  with caplog.at_level(logging.WARNING):
    step, state, it = _restore(ckpts)
  assert step == 2 and int(state.step) == 2
  np.testing.assert_array_equal(state.params["w"], np.full((4, 3), 2.0, np.float32))
  assert next(it) == 2  # Step 2's iterator position, not step 4's.
  assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4.damaged"]
  assert any(
      "Checkpoint 4 " in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records
  )
  assert re.search(cause, caplog.text), caplog.text


def test_a_step_damaged_twice_keeps_both_copies(tmp_path):
  ckpts = tmp_path / "checkpoints"
  _save_run(ckpts, {2: _state(2), 4: _state(3)})
  (ckpts / "4.damaged").mkdir()  # Left by an earlier fallback from the same step.
  assert _restore(ckpts)[0] == 2
  assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4.damaged", "4.damaged.2"]


def test_a_checkpoint_of_another_model_is_refused_not_moved(tmp_path):
  ckpts = tmp_path / "checkpoints"
  _save_run(ckpts, {2: _state(2)})
  manager = checkpoints.make_manager(ckpts, keep=10)
  other = _state(0)._replace(params={"w": jnp.zeros((4, 5), jnp.float32), "b": jnp.zeros(5)})
  with pytest.raises(
      checkpoints.CheckpointIncompatible, match=r"params.b missing; params.w: saved"
  ):
    checkpoints.restore_latest(manager, other, _iterator())
  manager.close()
  assert sorted(p.name for p in ckpts.iterdir()) == ["2"]


def test_no_checkpoint_starts_from_zero(tmp_path):
  state, it = _state(0), _iterator()
  manager = checkpoints.make_manager(tmp_path / "checkpoints", keep=10)
  assert checkpoints.restore_latest(manager, state, it) == (0, state, it)
  manager.close()


# ----------------------------------------------------------------------------------------------------
# The router biases (moe.balance='bias') in the train state.


class _StateBeforeRouterBias(NamedTuple):
  """The train state as checkpoints held it before selection biases existed."""

  params: dict
  opt_state: dict
  step: jax.Array


def test_a_checkpoint_from_before_the_router_bias_restores(tmp_path):
  """A checkpoint saved with the three-field state restores into today's state of a model without
  biases; saving that state writes the same three fields (no empty router_bias entry)."""
  ckpts = tmp_path / "checkpoints"
  manager = checkpoints.make_manager(ckpts, keep=10)
  it = _iterator()
  next(it)
  old = _StateBeforeRouterBias(
      **{k: v for k, v in _state(1, w=3.0)._asdict().items() if k != "router_bias"}
  )
  manager.save(
      1,
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(old), data=grain.checkpoint.CheckpointSave(it)
      ),
  )
  manager.wait_until_finished()
  manager.close()
  step, state, it = _restore(ckpts)
  assert step == 1 and next(it) == 1
  np.testing.assert_array_equal(state.params["w"], np.full((4, 3), 3.0, np.float32))
  _save_run(tmp_path / "new", {1: _state(1)})
  saved = ocp.StandardCheckpointHandler().metadata(tmp_path / "new" / "1" / "state").tree
  assert set(saved) == {"params", "opt_state", "step"}


def test_router_biases_are_saved_and_restored(tmp_path):
  with_bias = lambda step, b: _state(step)._replace(router_bias={"b": jnp.full((4,), b)})
  ckpts = tmp_path / "checkpoints"
  _save_run(ckpts, {2: with_bias(2, 0.002)})
  manager = checkpoints.make_manager(ckpts, keep=10)
  step, state, _ = checkpoints.restore_latest(manager, with_bias(0, 0.0), _iterator())
  manager.close()
  assert step == 2
  np.testing.assert_array_equal(state.router_bias["b"], np.full((4,), 0.002, np.float32))
  restored = checkpoints.restore_params(
      tmp_path,
      2,
      {"w": jax.ShapeDtypeStruct((4, 3), jnp.float32)},
      router_bias={"b": jax.ShapeDtypeStruct((4,), jnp.float32)},
  )
  np.testing.assert_array_equal(restored["router_bias"]["b"], np.full((4,), 0.002, np.float32))
  np.testing.assert_array_equal(restored["params"]["w"], np.ones((4, 3), np.float32))


def test_a_tensorstore_failure_is_described_by_its_os_reason_not_its_spec():
  """Tensorstore's reason ends in annotations; the spec one (a kilobyte here) must not push the OS's
  reason out of the one line a failed save prints."""
  spec = (
      '{"driver":"zarr3","kvstore":{"driver":"ocdbt"},' + '"metadata":{"x":1},' * 60 + '"z":true}'
  )
  reason = (
      'OUT_OF_RANGE: Error writing "opt_state.mu.embed/0.0" in OCDBT database at local file '
      f'"/tmp/{"d" * 120}/ocdbt.process_0/d/889e": Failed to write 2790738 bytes to file 11: '
      "File too large [source locations='tensorstore/kvstore/file/file_key_value_store.cc:350'] "
      f"[tensorstore_spec='{spec}'] [os_error_code='27']"
  )
  try:
    try:
      raise ValueError(reason)
    except ValueError as cause:
      raise RuntimeError("orbax: save failed") from cause
  except RuntimeError as error:
    line = checkpoints._describe(error)  # pylint: disable=protected-access
  assert line.startswith('ValueError: OUT_OF_RANGE: Error writing "opt_state.mu.embed/0.0"')
  assert line.endswith("File too large [os_error_code='27']")
  assert "tensorstore_spec" not in line and "source locations" not in line and len(line) < 320
