"""The device mesh of a run: its axes, their sizes, and which rule table maps parameters onto them.

`MeshConfig` is validated in `__post_init__` like every config dataclass; `moe.parallel.sharding`
builds the mesh and the shardings from it.
"""

from __future__ import annotations

import dataclasses
import enum
import math

from moe.config.validation import as_enum

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # Mesh axes that split the batch outside the MoE layers.


class Rules(enum.Enum):
  """Which parallelism the parameters use. Activations are split the same way in every strategy."""

  DATA = "data"  # Parameters replicated.
  FSDP = "fsdp"  # Parameters split over 'fsdp' on their embed axis (ZeRO-3 style).
  EXPERT = "expert"  # Expert weights split over 'expert' on E; the rest replicated.
  EXPERT_FSDP = "expert_fsdp"  # Experts over 'expert', and every parameter over 'fsdp' on embed.
  EXPERT_TENSOR = "expert_tensor"  # Experts over 'expert'; hidden, heads and vocab over 'tensor'.


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
  """Mesh axis sizes (one of them may be -1: all remaining devices) and the rule table.

  Attributes:
    data, fsdp, expert, tensor: sizes of the mesh axes; their product must be the device count.
    rules: which logical-axis table (`Rules`) maps parameters to the mesh.
  """

  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  rules: Rules | str = Rules.DATA

  def __post_init__(self):
    object.__setattr__(self, "rules", as_enum(Rules, self.rules, "mesh.rules"))
    sizes = self.sizes_requested()
    if sum(s == -1 for s in sizes) > 1:
      raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    for name, size in zip(MESH_AXES, sizes):
      if not (isinstance(size, int) and (size >= 1 or size == -1)):
        raise ValueError(f"mesh.{name}={size!r} must be an integer >= 1, or -1 (fill)")

  def sizes_requested(self) -> tuple[int, ...]:
    return tuple(getattr(self, name) for name in MESH_AXES)

  def axis_sizes(self, num_devices: int) -> tuple[int, ...]:
    """The four axis sizes for `num_devices`, with -1 filled; raises if they do not fit."""
    sizes = list(self.sizes_requested())
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
      if num_devices % known:
        raise ValueError(
            f"mesh {self._show(sizes)} does not fit {num_devices} devices: the fixed axes "
            f"({known} devices) must divide the device count"
        )
      sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
      raise ValueError(
          f"mesh {self._show(sizes)} needs {math.prod(sizes)} devices, but "
          f"{num_devices} are present; make the product of mesh.data, mesh.fsdp, "
          "mesh.expert and mesh.tensor equal the device count (or set one to -1)"
      )
    return tuple(sizes)

  @staticmethod
  def _show(sizes) -> str:
    return "(" + ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes)) + ")"
