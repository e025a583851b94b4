"""Multi-host start-up: `jax.distributed` when the run has several processes."""

from __future__ import annotations

import os

import jax


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: bool = False,
) -> bool:
  """Starts multi-host JAX (`jax.distributed.initialize`) when there is more than one process.

  With no arguments, JAX detects TPU pods and SLURM/Open MPI GPU clusters from the environment
  (`JAX_COORDINATOR_ADDRESS`, `SLURM_*`, ...); on a plain single machine with none of those this is a
  no-op. Explicit arguments (the `--coordinator_address`, `--num_processes`, `--process_id` flags of
  `experiments.train`) override detection. `cpu_collectives` turns on gloo collectives so several CPU
  processes can run one job (tests, laptops). Returns whether multi-process mode was started.
  """
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  cluster_env = any(
      k in os.environ
      for k in (
          "JAX_COORDINATOR_ADDRESS",
          "SLURM_JOB_ID",
          "OMPI_COMM_WORLD_SIZE",
          "TPU_WORKER_HOSTNAMES",
          "MEGASCALE_COORDINATOR_ADDRESS",
      )
  )
  if not explicit and not cluster_env:
    return False
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  return jax.process_count() > 1
