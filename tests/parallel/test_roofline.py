"""moe.parallel.roofline on hand-written HLO lines: the collectives and the bytes each device sends
by the ring algorithms' counts, computed here by hand."""

from __future__ import annotations

import pytest

from moe.parallel import roofline

MESH = {"data": 8, "fsdp": 2, "expert": 1, "tensor": 1}
NAMED = "replica_groups=mesh['data'=8,'fsdp'=2,'expert'=1,'tensor'=1]"
HLO = f"""
  %all-reduce.1 = bf16[258,768]{{1,0:T(8,128)(2,1)}} all-reduce(%f), channel_id=2, replica_groups=mesh['axis_0'=8] {{'axis_0'}}, to_apply=%add
  %all-reduce.2 = (f32[64,16]{{1,0}}, /*index=1*/f32[]{{:T(128)}}) all-reduce(%a, %b), {NAMED} {{'data','fsdp'}}, to_apply=%add
  %all-gather-start.3 = (f32[4,32]{{1,0}}, f32[8,32]{{1,0}}) all-gather-start(%c), {NAMED} {{'fsdp'}}, dimensions={{0}}
  %all-gather-done.3 = f32[8,32]{{1,0}} all-gather-done(%all-gather-start.3)
  %reduce-scatter.4 = f32[16]{{0}} reduce-scatter(%d), replica_groups=[2,8]<=[16], dimensions={{0}}
  %all-to-all.5 = s32[1024]{{0}} all-to-all(%e), replica_groups={{{{0,1,2,3}},{{4,5,6,7}}}}, dimensions={{0}}
  %add.6 = f32[8]{{0}} add(%x, %y)
"""


def test_collectives_and_their_groups():
  found = [(c.op, c.dtype, c.shape, c.group_size) for c in roofline.collectives(HLO, tuple(MESH))]
  assert found == [
      ("all-reduce", "bf16", (258, 768), 8),  # A combined collective's mesh of its own.
      ("all-reduce", "f32", (64, 16), 16),
      ("all-reduce", "f32", (), 16),
      ("all-gather", "f32", (8, 32), 2),  # The async start's result, once.
      ("reduce-scatter", "f32", (16,), 8),
      ("all-to-all", "s32", (1024,), 4),
  ]


@pytest.mark.parametrize(
    "index, want",
    [
        (0, 258 * 768 * 2 * 2 * 7 / 8),  # all-reduce: 2 (n - 1) / n of the array.
        (1, 64 * 16 * 4 * 2 * 15 / 16),
        (3, 8 * 32 * 4 * 1 / 2),  # all-gather: (n - 1) / n of the result.
        (4, 16 * 4 * 7),  # reduce-scatter: (n - 1) result shards.
        (5, 1024 * 4 * 3 / 4),  # all-to-all: (n - 1) / n.
    ],
)
def test_bytes_each_device_sends(index, want):
  c = roofline.collectives(HLO, tuple(MESH))[index]
  assert roofline.bytes_moved(c, MESH) == pytest.approx(want)


def test_a_group_of_one_moves_nothing():
  line = f"  %all-reduce.9 = f32[128]{{0}} all-reduce(%g), {NAMED} {{'expert'}}, to_apply=%add"
  (c,) = roofline.collectives(line, tuple(MESH))
  assert c.group_size == 1 and roofline.bytes_moved(c, MESH) == 0.0


class _Compiled:
  """What `analyse` reads of a `jax.stages.Compiled`: its cost analysis and HLO text."""

  def cost_analysis(self):
    return {"flops": 2e12, "bytes accessed": 1e9}

  def as_text(self):
    return HLO


def test_the_step_time_is_the_slowest_of_compute_hbm_and_ici():
  chip = roofline.Chip("test", 400e12, 16e9, 2e12, 1e9, "-", "-", 1)
  report = roofline.analyse(_Compiled(), MESH, chip)
  sent = sum(roofline.bytes_moved(c, MESH) for c in roofline.collectives(HLO, tuple(MESH)))
  assert report.compute_seconds == pytest.approx(2e12 / 400e12)
  assert report.hbm_seconds == pytest.approx(1e9 / 2e12)
  assert report.ici_seconds == pytest.approx(sent / 1e9)
  assert report.ici_seconds < report.compute_seconds  # About 1 MB at 1 GB/s against 5 ms.
  assert report.step_seconds == report.compute_seconds and report.bound == "compute"
