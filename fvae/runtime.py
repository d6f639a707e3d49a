"""Process start-up that is not about the CPU: multi-host JAX.

`initialize_distributed()` calls `jax.distributed.initialize()` when the environment
asks for it (JAX_COORDINATOR_ADDRESS, or a SLURM/Open MPI job of more than one task,
or FVAE_DISTRIBUTED=1 on a TPU pod or GKE). fvae.cpu.setup calls it first.
"""

from __future__ import annotations

import logging
import os

import jax


def backends_started() -> bool:
    from jax._src import xla_bridge  # no public API says whether backends exist yet
    return xla_bridge.backends_are_initialized()


def initialize_distributed() -> bool:
    """Starts multi-host JAX when the environment describes a multi-process job.

    A cluster JAX detects itself (SLURM, Open MPI, Cloud TPU, ...) needs nothing else;
    by hand, set JAX_COORDINATOR_ADDRESS (host:port of process 0) with JAX_NUM_PROCESSES
    and JAX_PROCESS_ID on every process (jax reads only the first of the three)."""
    env = os.environ
    wanted = (env.get("JAX_COORDINATOR_ADDRESS") or env.get("FVAE_DISTRIBUTED") == "1"
              or int(env.get("SLURM_NTASKS", "1")) > 1
              or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if not wanted:
        return False
    counts = {name: env.get(name) for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    try:
        num_processes, process_id = (None if v is None else int(v) for v in counts.values())
    except ValueError:
        raise ValueError(f"JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got "
                         f"{counts}") from None
    jax.distributed.initialize(num_processes=num_processes, process_id=process_id)
    logging.info("multi-host JAX: process %d of %d, %d local of %d devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return True
