"""What a compiled step costs per device: collectives parsed from its HLO, and a roofline step time.

    report = roofline.analyse(compiled, mesh, chip=roofline.CHIPS["v5p"])
    print(report.step_seconds, report.collective_bytes)

The estimate is a lower bound of the step time, the slowest of three: the FLOPs at the chip's peak,
the HBM traffic (`cost_analysis()["bytes accessed"]`) at its bandwidth, and the collective traffic
at its inter-chip (ICI) bandwidth. It assumes they overlap perfectly and ignores latency; what it
is good for is comparing meshes and chip counts, and seeing which of the three bounds a step.
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4}
_BYTES.update({"u32": 4, "f64": 8, "s64": 8, "u64": 8})


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip's figures, as Google Cloud's TPU documentation states them (`source`).

  Attributes:
    name: the generation. peak_flops: dense bf16 FLOP/s. hbm_bytes: HBM capacity. hbm_bandwidth:
    bytes/s. ici_bandwidth: bidirectional inter-chip interconnect bandwidth per chip, bytes/s.
    accelerator_type: the `TPU_ACCELERATOR_TYPE` prefix (with `cores_per_chip`: the name's count).
  """

  name: str
  peak_flops: float
  hbm_bytes: float
  hbm_bandwidth: float
  ici_bandwidth: float
  source: str
  accelerator_type: str
  cores_per_chip: int


CHIPS = {
    "v5e": Chip(
        "TPU v5e",
        197e12,
        16e9,
        819e9,
        400e9,
        "https://cloud.google.com/tpu/docs/v5e",
        "v5litepod",
        1,
    ),
    "v5p": Chip(
        "TPU v5p",
        459e12,
        95 * 2**30,
        2765e9,
        1200e9,
        "https://cloud.google.com/tpu/docs/v5p",
        "v5p",
        2,
    ),
    "v6e": Chip(
        "TPU v6e", 918e12, 32e9, 1640e9, 800e9, "https://cloud.google.com/tpu/docs/v6e", "v6e", 1
    ),
}


@dataclasses.dataclass(frozen=True)
class Collective:
  """One array a collective moves: its op, dtype, shape, the mesh axes it runs over and the number
  of devices in each of its groups (None: every device)."""

  op: str
  dtype: str
  shape: tuple[int, ...]
  mesh_axes: frozenset[str]
  group_size: int | None = None

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * _BYTES.get(self.dtype, 4)


def collectives(hlo: str, all_axes=("data", "fsdp", "expert", "tensor")) -> list[Collective]:
  """Every collective's result arrays in compiled HLO text (a tuple result, as combined all-reduces
  and CPU all-to-alls have, gives one entry per element), with the mesh axes it runs over from
  `replica_groups=mesh[...] {'data', ...}` and its group size; a collective with explicit device
  groups counts as running over `all_axes`. Async pairs count once (at `-start`; `-done` is
  skipped)."""
  found = []
  pattern = re.compile(rf"\s*(?:ROOT )?%\S+ = (.*?) ({'|'.join(COLLECTIVES)})(-start)?\(")
  for line in hlo.splitlines():
    match = pattern.match(line)
    if not match:
      continue
    groups = re.search(r"replica_groups=mesh\[[^\]]*\] \{([^}]*)\}", line)
    mesh_axes = frozenset(re.findall(r"'(\w+)'", groups.group(1)) if groups else all_axes)
    arrays = [
        (dtype, tuple(int(v) for v in dims.split(",") if v))
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1))
    ]
    op = match.group(2)
    if match.group(3) and op in ("all-gather", "collective-permute"):
      # An async start returns (operands, results[, contexts]): keep the results.
      arrays = [a for a in arrays if a[1]]
      arrays = arrays[len(arrays) // 2 :]
    size = group_size(line)
    found += [Collective(op, dtype, shape, mesh_axes, size) for dtype, shape in arrays]
  return found


def group_size(line: str) -> int | None:
  """The devices in each replica group of a collective's HLO line, in any of XLA's spellings:
  `mesh['data'=8,'fsdp'=2] {'data'}` (a combined collective may name a mesh of its own, e.g.
  `mesh['axis_0'=8] {'axis_0'}`), the iota list `[2,4]<=[8]` (2 groups of 4) or explicit groups
  `{{0,1},{2,3}}`; None when the line names none (every device)."""
  named = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
  if named:
    sizes = {a: int(n) for a, n in re.findall(r"'(\w+)'=(\d+)", named.group(1))}
    return math.prod(sizes[a] for a in re.findall(r"'(\w+)'", named.group(2)))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if iota:
    return int(iota.group(2))
  explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if explicit:
    return len(explicit.group(1).split(","))
  return None


def bytes_moved(c: Collective, mesh_shape: dict[str, int]) -> float:
  """Bytes one device sends for a collective, by the ring algorithms' counts over n devices: an
  all-gather sends (n - 1) / n of its result, a reduce-scatter (n - 1) of its result shard, an
  all-reduce 2 (n - 1) / n of its array, an all-to-all (n - 1) / n, a permute all of it."""
  n = c.group_size or math.prod(mesh_shape.values())
  if n <= 1 and c.op != "collective-permute":
    return 0.0
  share = (n - 1) / n
  factor = {"all-reduce": 2 * share, "reduce-scatter": n - 1, "collective-permute": 1.0}
  return c.nbytes * factor.get(c.op, share)


@dataclasses.dataclass(frozen=True)
class Report:
  """Per-device costs of one compiled step (see the module docstring)."""

  flops: float
  hbm_bytes: float
  collective_bytes: dict[str, float]  # Per kind of collective.
  compute_seconds: float
  hbm_seconds: float
  ici_seconds: float

  @property
  def step_seconds(self) -> float:
    return max(self.compute_seconds, self.hbm_seconds, self.ici_seconds)

  @property
  def bound(self) -> str:
    times = {"compute": self.compute_seconds, "HBM": self.hbm_seconds, "ICI": self.ici_seconds}
    return max(times, key=times.get)


def analyse(compiled, mesh_shape: dict[str, int], chip: Chip) -> Report:
  """The `Report` of a compiled step (`jax.stages.Compiled`) on a mesh of `chip`s."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops, hbm = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  per_kind = {op: 0.0 for op in COLLECTIVES}
  for c in collectives(compiled.as_text(), tuple(mesh_shape)):
    per_kind[c.op] += bytes_moved(c, mesh_shape)
  return Report(
      flops=flops,
      hbm_bytes=hbm,
      collective_bytes=per_kind,
      compute_seconds=flops / chip.peak_flops,
      hbm_seconds=hbm / chip.hbm_bandwidth,
      ici_seconds=sum(per_kind.values()) / chip.ici_bandwidth,
  )
