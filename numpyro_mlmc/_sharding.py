"""Batches of independent paths spread over devices, and over processes.

One batch of `B` draws is one array of `B` PRNG keys. `BatchRunner` pads `B` up to a multiple
of (processes x local devices), gives each process a contiguous slice of the keys and lays that
slice over the process's devices with a `NamedSharding` on a 1-D `Mesh` (axis `"batch"`). The
sampler's jitted, vmapped computation is then partitioned along the batch axis by XLA; every
path still depends on its own key only, and the host sees the whole batch in key order.

Determinism: the batches the engine draws (their sizes and order) do not depend on the device
count, padding rows are dropped, and each row is a function of its key, so the same key gives
the same accumulators on 1 or 4 devices, and on 1 or 2 processes (`tests/test_sharding.py`,
`tests/test_distributed.py`). This relies on XLA computing a row of a batched computation the
same way whatever the batch size per device, which holds for the elementwise and matrix
operations used here on CPU; a backend whose reductions depend on the batch size would break
it at float rounding level, not in distribution.

Across processes (`jax.distributed.initialize`) the engine does not reduce moment sums: each
process evaluates the functionals on its slice and the per-draw values (device dtype) are
all-gathered with a JAX collective (`multihost_utils.process_allgather`), so every process
merges the same values in the same order into identical float64 accumulators. The result is
then bit-identical to a single-process run, and all processes take identical adaptive
decisions with no further communication. The cost is one all-gather of `B x (size of the
functionals)` numbers per batch, small against the hundreds of network evaluations per path.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["BatchRunner", "resolve_devices"]

AXIS = "batch"


def resolve_devices(devices=None) -> list:
    """`None` -> every local device (`jax.local_devices()`); else a non-empty sequence of
    distinct local `jax.Device`s of one platform, or an int `n` for the first `n`."""
    local = jax.local_devices()
    if devices is None:
        return list(local)
    if isinstance(devices, bool):
        raise TypeError(f"devices must be None, an int or a list of jax devices, got {devices!r}.")
    if isinstance(devices, (int, np.integer)):
        if not 1 <= devices <= len(local):
            raise ValueError(
                f"devices={devices} but this process has {len(local)} local device(s); pass an "
                f"int between 1 and {len(local)}, a list of devices, or None for all."
            )
        return list(local[: int(devices)])
    if isinstance(devices, jax.Device):
        devices = [devices]
    try:
        devices = list(devices)
    except TypeError:
        raise TypeError(
            f"devices must be None, an int or a list of jax devices, got {devices!r}."
        ) from None
    if not devices:
        raise ValueError("devices is empty; pass None to use every local device.")
    for d in devices:
        if not isinstance(d, jax.Device):
            raise TypeError(
                f"devices must hold jax.Device objects (from jax.local_devices()), got {d!r}."
            )
        if d not in local:
            raise ValueError(
                f"device {d} is not local to this process; pass devices from jax.local_devices()."
            )
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices lists a device twice: {devices}.")
    if len({d.platform for d in devices}) != 1:
        raise ValueError(f"devices mixes platforms: {devices}; use devices of one platform.")
    return devices


def _fold_in_indices(level_key, indices):
    return jax.vmap(lambda i: jr.fold_in(level_key, i))(indices)


@functools.lru_cache(maxsize=32)
def _keys_function(sharding):
    """One jitted key maker per sharding, so runs after the first do not recompile it."""
    return jax.jit(_fold_in_indices, out_shardings=sharding)


class BatchRunner:
    """Where a batch of keyed draws runs: the local devices of this process, and this
    process's share when several processes work together (`jax.process_count() > 1`).

    Args:
        devices: as for `resolve_devices`.
    """

    def __init__(self, devices=None):
        self.devices = resolve_devices(devices)
        self.process_index = jax.process_index()
        self.process_count = jax.process_count()
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
        self._keys = _keys_function(self.sharding)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def multiple(self) -> int:
        """Batch shapes are padded up to a multiple of this."""
        return self.num_devices * self.process_count

    def padded(self, size: int) -> int:
        return int(math.ceil(size / self.multiple) * self.multiple)

    def keys(self, level_key, start: int, size: int):
        """This process's share of the keys `fold_in(level_key, i)`, `i = start .. start +
        size - 1` (`size` a multiple of `multiple`), sharded over the local devices."""
        share = size // self.process_count
        first = start + self.process_index * share
        indices = np.arange(first, first + share, dtype=np.uint32)
        return self._keys(level_key, jnp.asarray(indices))

    def put(self, array):
        """Shard a local array of `B` rows (`B` a multiple of `num_devices`) over the devices."""
        return jax.device_put(array, self.sharding)

    def gather(self, tree):
        """Host numpy copy of a pytree of per-draw arrays in key order: this process's rows
        when alone, every process's rows (all-gathered, in process order) otherwise."""
        if self.process_count == 1:
            return jax.tree_util.tree_map(np.asarray, tree)
        from jax.experimental import multihost_utils

        local = jax.tree_util.tree_map(np.asarray, tree)
        return jax.tree_util.tree_map(
            np.asarray, multihost_utils.process_allgather(local, tiled=True)
        )
