"""Multi-process (multi-host) runs on JAX's own distributed runtime.

Start one Python process per host (or per accelerator group), call
`nm.initialize_distributed(...)` in each before anything else touches JAX devices, and run the
same script everywhere with the same key. `MLMC.run` and `MonteCarlo.run` then split every batch
between the processes (each draws its share of every level on its own devices), all-gather the
per-draw functional values, and every process holds the same accumulators and returns the same
result, equal to a single-process run (`_sharding.py` explains why exactly). Write outputs
from process 0 only (`jax.process_index() == 0`); with `checkpoint=` only process 0 writes.

Launch recipe (two hosts; on CPU the collectives are gloo over TCP):

    # host 0                                      # host 1
    numpyro-mlmc --coordinator-address host0:12355 --num-processes 2 --process-id 0 demo ...
    numpyro-mlmc --coordinator-address host0:12355 --num-processes 2 --process-id 1 demo ...

or in a script: `nm.initialize_distributed("host0:12355", 2, process_id)`. On SLURM or other
clusters JAX can find all three values itself: call `nm.initialize_distributed()` with none.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["initialize_distributed"]


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
) -> None:
    """Join JAX's distributed runtime (`jax.distributed.initialize`), with CPU collectives.

    Args:
        coordinator_address: `"host:port"` of process 0 (its port must be free there).
        num_processes: number of processes, `>= 1`.
        process_id: this process's index, `0 .. num_processes - 1`.
        timeout_s: seconds to wait for every process to join before raising.

    All three `None` lets JAX detect them from the cluster environment (SLURM, Open MPI, ...).
    Call it once per process, before any other JAX computation.
    """
    given = [coordinator_address is None, num_processes is None, process_id is None]
    if any(given) and not all(given):
        raise ValueError(
            "pass all of coordinator_address, num_processes and process_id, or none of them "
            "(to let JAX read them from the cluster environment)."
        )
    if coordinator_address is not None:
        host, sep, port = str(coordinator_address).rpartition(":")
        if not (isinstance(coordinator_address, str) and sep and host and port.isdigit()):
            raise ValueError(
                f"coordinator_address must be 'host:port' (e.g. '10.0.0.1:12355'), got "
                f"{coordinator_address!r}."
            )
        for name, value in (("num_processes", num_processes), ("process_id", process_id)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {value!r}.")
        if num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {num_processes}.")
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"process_id must lie in 0..{num_processes - 1} (num_processes - 1), got "
                f"{process_id}."
            )
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, np.integer)) or timeout_s < 1:
        raise ValueError(f"timeout_s must be a positive int, got {timeout_s!r}.")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=None if num_processes is None else int(num_processes),
        process_id=None if process_id is None else int(process_id),
        initialization_timeout=int(timeout_s),
    )
