"""Batches of independent paths spread over devices, and over processes, in fixed-size chunks.

One batch of `B` draws is one array of `B` PRNG keys. `BatchRunner` cuts it into equal chunks
of at most `chunk_size` rows (`layout`): `n = ceil(B / chunk_size)` chunks of
`ceil(B / n)` rows, `n` rounded up to a multiple of the process count, the last rows padding.
Each process takes a contiguous run of the chunks and hands them round-robin to its devices;
every chunk is one ordinary call of the sampler on one device (a key array committed to that
device), and JAX's asynchronous dispatch runs the devices' chunks at the same time. The host
then sees the whole batch in key order, padding rows dropped.

Determinism. The batches the engine draws (their sizes and order) do not depend on the device
count, and neither does the chunk layout, which depends on `B` and `chunk_size` only. So with
the same key every chunk is computed by the same compiled program, on the same shape, whichever
device or process runs it, and MLMC / Monte Carlo results are bit-identical on 1 or 4 devices
and on 1 or 2 processes (`tests/test_sharding.py`, `tests/test_distributed.py`), for diffusion
samplers with matrix products, reductions and convolutions as well as elementwise ones.
Two simpler layouts do not give this on XLA's CPU backend (checked with jax 0.10):
  * one computation sharded along the batch axis (`NamedSharding`, or `shard_map`): XLA
    compiles a partitioned program, which its simplifier and fusion passes optimise differently
    from the single-device program (e.g. a division by a broadcast value becomes a product by
    its reciprocal in one and not the other), so rows round differently even where each device
    computes as many rows as the single device would;
  * the same program on `B / devices` rows per device: a row's rounding depends on how many
    rows are computed together for some operations (dot products against 256 x 256 weights
    differ between 64 and 16 rows; with one row the batch axis is dropped and reductions and
    small products are vectorised differently).
Cost of the chunks: XLA compiles a program for one device, so the first batch of each chunk
shape compiles the sampler once per device that runs a chunk of it (later batches reuse them);
and a chunk computes fewer rows at a time than a whole batch would, which on one multi-core
CPU device loses some intra-op parallelism (for a batch of 512 reverse paths on a 2-core CPU,
chunks of 64 rows gave 0.4-0.65 of the NFE/s of one 512-row call for a 64-D Gaussian-mixture
score and an `MLPScoreNet` of width 256; chunks of 256, 0.66-1.0). Where throughput on one
device matters more than identical results across device counts, pass a larger `chunk_size`
or `None`.

`chunk_size=None` keeps the whole batch in one computation sharded along a 1-D `Mesh` of the
local devices (`NamedSharding`, axis `"batch"`; `ceil(B / (devices x processes))` rows per
device), compiled once for all devices: fewer, larger calls, but results then depend on the
device count at float32 rounding level (never in distribution). Key derivation is integer
arithmetic and exact in every layout.

Across processes (`jax.distributed.initialize`) the engine does not reduce moment sums: each
process evaluates the functionals on its chunks and the per-draw values (device dtype) are
all-gathered with a JAX collective (`multihost_utils.process_allgather`), so every process
merges the same values in the same order into identical float64 accumulators. The result is
then bit-identical to a single-process run, and all processes take identical adaptive
decisions with no further communication. The cost is one all-gather of `B x (size of the
functionals)` numbers per batch, small against the hundreds of network evaluations per path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["BatchRunner", "DEFAULT_CHUNK_SIZE", "check_chunk_size", "resolve_devices"]

# Rows per sampler call by default. Every chunk has the same shape whatever the device count
# (see the module docstring); 64 rows fill four devices from a batch of 256 and eight from the
# default batch of 512.
DEFAULT_CHUNK_SIZE = 64


def check_chunk_size(chunk_size):
    """`None` or an int >= 1."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (rows per device call), got {chunk_size}.")
    return int(chunk_size)


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


@jax.jit
def _fold_in_indices(level_key, indices):
    return jax.vmap(lambda i: jr.fold_in(level_key, i))(indices)


class BatchRunner:
    """Where a batch of keyed draws runs: fixed-size chunks on the local devices of this
    process, and this process's share of the chunks when several processes work together
    (`jax.process_count() > 1`).

    Args:
        devices: as for `resolve_devices`.
        chunk_size: most rows per sampler call (default `DEFAULT_CHUNK_SIZE`); `None` for
            `ceil(B / (devices x processes))` rows, which depends on the device count.
    """

    def __init__(self, devices=None, chunk_size=DEFAULT_CHUNK_SIZE):
        self.devices = resolve_devices(devices)
        self.chunk_size = check_chunk_size(chunk_size)
        self.process_index = jax.process_index()
        self.process_count = jax.process_count()
        # chunk_size=None: one computation per batch, sharded along a 1-D mesh of the devices
        self.sharding = NamedSharding(
            Mesh(np.array(self.devices), ("batch",)), PartitionSpec("batch")
        )

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def layout(self, size: int) -> tuple[int, int]:
        """`(rows, chunks)`: a batch of `size` draws runs as `chunks` calls of `rows` rows
        (`rows x chunks >= size`, `chunks` a multiple of the process count). With a
        `chunk_size`, both depend on `size` and `chunk_size` only (and `chunks` on the process
        count through padding chunks, which are dropped)."""
        size = int(size)
        if size < 1:
            raise ValueError(f"a batch needs at least one draw, got {size}.")
        if self.chunk_size is None:
            chunks = self.num_devices * self.process_count
            return -(-size // chunks), chunks
        chunks = -(-size // self.chunk_size)
        rows = -(-size // chunks)
        chunks = -(-chunks // self.process_count) * self.process_count
        return rows, chunks

    def padded(self, size: int) -> int:
        """Rows actually computed for a batch of `size` draws (padding included)."""
        rows, chunks = self.layout(size)
        return rows * chunks

    def _local_chunks(self, size):
        rows, chunks = self.layout(size)
        share = chunks // self.process_count
        first = self.process_index * share
        return rows, range(first, first + share)

    def keys(self, level_key, start: int, size: int) -> list:
        """This process's chunks of the keys `fold_in(level_key, i)`, `i = start .. start +
        padded(size) - 1`, in key order: one key array of `rows` rows per chunk, committed to
        the device that computes it (local chunk `j` on local device `j % num_devices`)."""
        rows, local = self._local_chunks(size)
        if self.chunk_size is None:  # one key array over this process's devices
            first = start + local[0] * rows
            indices = np.arange(first, first + rows * len(local), dtype=np.uint32)
            return [_fold_in_indices(level_key, jax.device_put(indices, self.sharding))]
        out = []
        for j, c in enumerate(local):
            first = start + c * rows
            indices = np.arange(first, first + rows, dtype=np.uint32)
            device = self.devices[j % self.num_devices]
            out.append(_fold_in_indices(level_key, jax.device_put(indices, device)))
        return out

    def split(self, array) -> list:
        """This process's chunks of a batch given as an array of `size` rows (e.g. keys),
        padded to `padded(size)` rows by repeating its last row, each chunk committed to its
        device."""
        size = array.shape[0]
        rows, local = self._local_chunks(size)
        pad = self.padded(size) - size
        if pad:
            array = jnp.concatenate([array, jnp.repeat(array[-1:], pad, axis=0)])
        if self.chunk_size is None:
            mine = array[local[0] * rows : (local[-1] + 1) * rows]
            return [jax.device_put(mine, self.sharding)]
        return [
            jax.device_put(array[c * rows : (c + 1) * rows], self.devices[j % self.num_devices])
            for j, c in enumerate(local)
        ]

    def gather(self, chunks):
        """Host numpy copy, in key order, of a list of pytrees of per-draw arrays (this
        process's chunks, as from `keys`): this process's rows when alone, every process's rows
        (all-gathered, in process order) otherwise."""
        local = jax.tree_util.tree_map(
            lambda *parts: np.concatenate([np.asarray(p) for p in parts]), *chunks
        )
        if self.process_count == 1:
            return local
        from jax.experimental import multihost_utils

        return jax.tree_util.tree_map(
            np.asarray, multihost_utils.process_allgather(local, tiled=True)
        )
