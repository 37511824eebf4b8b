"""Resumable MLMC and Monte Carlo runs: `run(..., checkpoint=path)`.

After every batch the run's whole sampling state is written atomically (a temporary file in
the same folder, flushed and fsynced, then `os.replace`): every level's float64 accumulators,
the next sample index of every level (the sampling position: sample `i` of level `l` always
uses `fold_in(fold_in(key, l), i)`), the non-finite counts, the wasted cost and the stored
draws. A run killed at any moment (even by SIGKILL) and started again with the same arguments
and the same `checkpoint` continues from the last completed batch: no sample is lost or drawn
twice, and the final estimates equal those of an uninterrupted run bit for bit.

How the adaptive driver is resumed. Its decisions (which level to add, how many draws each
level needs) depend on the statistics it saw at each round, which the accumulators alone no
longer hold. The checkpoint therefore also keeps a *journal*: every top-up the driver asked
for (level, count, count before) and every statistic it read between top-ups
(`quantity_levels`, and the element means of `level_values`, which is all the driver takes
from them). On restart the driver runs again from the start; the journal answers its
questions and its top-ups draw nothing, until it reaches the last journalled top-up, where the
saved state is loaded and sampling continues. The journal grows with the number of rounds
(tens of numbers each), not with the number of samples. If the replayed driver asks anything
the journal does not hold, the code changed between the runs and `RunCheckpointError` is
raised.

A checkpoint is refused (`RunCheckpointError`, naming what differs) when the method, key,
configuration, level sampler (its parameters and arrays, e.g. network weights), model data or
functionals differ. The device and process counts are not part of the identity: they do not
change the result (resuming on another count is not covered by a test). With several
processes (`jax.distributed`) all hold the same state; process 0 writes the file, and every
process reads it on restart (use a shared filesystem).

The file is an `.npz` archive of arrays plus a JSON header; no pickle, so loading one cannot
run code.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tempfile

import jax
import numpy as np

from ._allocation import QuantityLevels
from ._mlmc import _Engine

__all__ = ["RunCheckpointError", "fingerprint", "ResumableEngine", "check_checkpoint_path"]

FORMAT = "numpyro-mlmc-run/1"


class RunCheckpointError(ValueError):
    """A run checkpoint cannot be used: it belongs to another run, or it is damaged."""


# ----------------------------------------------------------------------------------------------
# identity of a run
# ----------------------------------------------------------------------------------------------
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _update(h, obj, depth=0, seen=None):
    seen = set() if seen is None else seen
    if depth > 8:
        h.update(b"<deep>")
        return
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        h.update(repr(obj).encode())
        return
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
        if isinstance(obj, jax.Array) and jax.dtypes.issubdtype(obj.dtype, jax.dtypes.prng_key):
            obj = jax.random.key_data(obj)
        a = np.asarray(obj)
        h.update(f"array{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
        return
    if isinstance(obj, dict):
        h.update(b"dict")
        for k in sorted(obj, key=repr):
            _update(h, k, depth + 1, seen)
            _update(h, obj[k], depth + 1, seen)
        return
    if isinstance(obj, (list, tuple)):
        h.update(type(obj).__name__.encode())
        for item in obj:
            _update(h, item, depth + 1, seen)
        return
    if id(obj) in seen:
        h.update(b"<cycle>")
        return
    seen.add(id(obj))
    code = getattr(obj, "__code__", None)
    if code is not None:  # a function: its name and byte code, not its address
        h.update(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}".encode())
        h.update(code.co_code)
        _update(h, [c for c in code.co_consts if not hasattr(c, "co_code")], depth + 1, seen)
        return
    leaves, treedef = jax.tree_util.tree_flatten(obj)
    if not (len(leaves) == 1 and leaves[0] is obj):  # a pytree (e.g. an Equinox module)
        h.update(_ADDRESS.sub("", str(treedef)).encode())
        for leaf in leaves:
            _update(h, leaf, depth + 1, seen)
        return
    h.update(type(obj).__qualname__.encode())
    if hasattr(obj, "__dict__"):
        _update(h, {k: v for k, v in vars(obj).items() if not k.startswith("_")}, depth + 1, seen)


def _digest(obj) -> str:
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()[:16]


def fingerprint(*, method, key, config, sampler, functionals, model_args, model_kwargs) -> dict:
    """Per-component digests of what determines a run's result."""
    if jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        key_repr = [str(jax.random.key_impl(key)), np.asarray(jax.random.key_data(key)).tolist()]
    else:
        key_repr = ["raw", np.asarray(key).tolist()]
    return {
        "method": method,
        "key": _digest(key_repr),
        "configuration": {k: repr(v) for k, v in sorted(config.items())},
        "level sampler": f"{type(sampler).__qualname__}:{_digest(sampler)}",
        "functionals": _digest(functionals),
        "model data": _digest([tuple(model_args), dict(model_kwargs)]),
    }


def check_checkpoint_path(path):
    """`path` as a string; its folder must exist and `path` must not be a folder."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a file path (str or os.PathLike), got {path!r}.")
    path = os.fspath(path)
    if not path:
        raise ValueError("checkpoint is an empty path; pass a file path such as 'run.npz'.")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} is a folder; pass a file path inside it.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"the folder of checkpoint {path!r} does not exist; create it first."
        )
    return path


# ----------------------------------------------------------------------------------------------
# (de)serialising the engine state
# ----------------------------------------------------------------------------------------------
_MOMENT_FIELDS = ("mean", "m2", "m3", "m4")
_COVARIANCE_FIELDS = ("mean_a", "mean_b", "comoment")


def _dump_state(engine):
    meta = {
        "levels": [],
        "next_index": {str(k): int(v) for k, v in engine.next_index.items()},
        "discarded": {str(k): int(v) for k, v in engine.discarded.items()},
        "roles": [[int(k), bool(v)] for k, v in engine._roles.items()],
        "wasted_cost": int(engine.wasted_cost),
        "site_shapes": {k: list(v) for k, v in engine.site_shapes.items()},
        "site_dtypes": dict(engine._site_dtypes),
        "value_shapes": {k: list(v) for k, v in engine._value_shapes.items()},
        "stored": {},
    }
    arrays = {}
    for j, (level, acc) in enumerate(engine.accumulators.items()):
        meta["levels"].append([int(level), bool(acc.coupled), int(acc.count)])
        groups = {"correction": acc.correction, "fine": acc.fine}
        if acc.coupled:
            groups["coarse"] = acc.coarse
        for group, moments in groups.items():
            for name, m in moments.items():
                arrays[f"acc/{j}/{group}/{name}/count"] = np.asarray(m.count)
                for field in _moment_fields(m.order):
                    arrays[f"acc/{j}/{group}/{name}/{field}"] = getattr(m, field)
        for group in ("correction_cross", "fine_cross"):
            for p, c in getattr(acc, group).items():
                base = f"acc/{j}/{group}/{p[0]}|{p[1]}"
                arrays[f"{base}/count"] = np.asarray(c.count)
                for field in _COVARIANCE_FIELDS:
                    arrays[f"{base}/{field}"] = getattr(c, field)
    for level, store in engine.stored.items():
        meta["stored"][str(level)] = sorted(store)
        for site, parts in store.items():
            arrays[f"stored/{level}/{site}"] = np.concatenate(parts) if parts else np.zeros(0)
    return meta, arrays


def _moment_fields(order):
    return _MOMENT_FIELDS if order == 4 else _MOMENT_FIELDS[:2]


def _load_state(engine, meta, arrays):
    engine.accumulators = {}
    for j, (level, coupled, count) in enumerate(meta["levels"]):
        acc = engine._make_acc(coupled)
        groups = {"correction": acc.correction, "fine": acc.fine}
        if coupled:
            groups["coarse"] = acc.coarse
        for group, moments in groups.items():
            for name, m in moments.items():
                m.count = int(arrays[f"acc/{j}/{group}/{name}/count"])
                for field in _moment_fields(m.order):
                    setattr(m, field, np.array(arrays[f"acc/{j}/{group}/{name}/{field}"]))
        for group in ("correction_cross", "fine_cross"):
            for p, c in getattr(acc, group).items():
                base = f"acc/{j}/{group}/{p[0]}|{p[1]}"
                c.count = int(arrays[f"{base}/count"])
                for field in _COVARIANCE_FIELDS:
                    setattr(c, field, np.array(arrays[f"{base}/{field}"]))
        acc.count = int(count)
        engine.accumulators[int(level)] = acc
    engine.next_index = {int(k): v for k, v in meta["next_index"].items()}
    engine.discarded = {int(k): v for k, v in meta["discarded"].items()}
    engine._roles = {int(k): bool(v) for k, v in meta["roles"]}
    engine.wasted_cost = int(meta["wasted_cost"])
    engine.stored = {
        int(level): {site: [np.array(arrays[f"stored/{level}/{site}"])] for site in sites}
        for level, sites in meta["stored"].items()
    }


def _temp_prefix(path):
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-")


def _write_atomic(path, meta, arrays):
    buffer = io.BytesIO()
    header = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(buffer, __header__=header, **arrays)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(_temp_prefix(path)), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read(path):
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        meta = json.loads(arrays.pop("__header__").tobytes().decode())
    except Exception as err:  # noqa: BLE001 - any damage is reported the same way
        raise RunCheckpointError(
            f"checkpoint {path!r} is not a readable numpy-mlmc run checkpoint ({err}); delete "
            "it or pass another path to start afresh."
        ) from None
    if meta.get("format") != FORMAT:
        raise RunCheckpointError(
            f"checkpoint {path!r} has format {meta.get('format')!r}, expected {FORMAT!r}; "
            "delete it or pass another path to start afresh."
        )
    return meta, arrays


# ----------------------------------------------------------------------------------------------
# the engine that saves after every batch and replays its journal on restart
# ----------------------------------------------------------------------------------------------
class ResumableEngine(_Engine):
    """`_Engine` that checkpoints after every batch (see the module docstring)."""

    def __init__(self, *args, checkpoint, identity, **kwargs):
        self.checkpoint_path = check_checkpoint_path(checkpoint)
        super().__init__(*args, **kwargs)
        self.identity = identity
        self.journal = []  # events: ["call", level, count, start] | ["query", key, value]
        self._replay = None  # events still to replay, or None when live
        self._saved = None  # (meta, arrays) of the checkpoint to load at the last call
        self._fake_counts = {}
        self._depth = 0
        self._site_dtypes = {}
        # temporary files of a writer killed mid-write (`_write_atomic`)
        for stale in glob.glob(_temp_prefix(self.checkpoint_path) + "*"):
            os.remove(stale)
        if os.path.exists(self.checkpoint_path):
            meta, arrays = _read(self.checkpoint_path)
            self._check_identity(meta["identity"])
            state = meta["state"]
            fake_fine = {
                site: jax.ShapeDtypeStruct((1, *shape), np.dtype(state["site_dtypes"][site]))
                for site, shape in state["site_shapes"].items()
            }
            self._setup(fake_fine)
            self._site_dtypes = dict(state["site_dtypes"])
            self._value_shapes = {k: tuple(v) for k, v in state["value_shapes"].items()}
            self._replay = list(meta["journal"])
            self._saved = (state, arrays)

    def _check_identity(self, saved):
        if saved == self.identity:
            return
        differ = [k for k in self.identity if saved.get(k) != self.identity[k]]
        detail = ""
        if "configuration" in differ:
            a, b = saved.get("configuration", {}), self.identity["configuration"]
            fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            detail = "; configuration fields: " + ", ".join(
                f"{k} {a.get(k, '-')} -> {b.get(k, '-')}" for k in fields
            )
        raise RunCheckpointError(
            f"checkpoint {self.checkpoint_path!r} belongs to a different run: the "
            f"{', '.join(differ)} differ{detail}. Resume with the same arguments, or pass "
            "another checkpoint path (or delete this file) to start afresh."
        )

    # -- replay ------------------------------------------------------------------------------
    def _next_event(self, kind, detail):
        if not self._replay or self._replay[0][0] != kind:
            got = self._replay[0][:2] if self._replay else "the end of the journal"
            raise RunCheckpointError(
                f"resuming from {self.checkpoint_path!r}: the run asked for {kind} {detail} "
                f"where the checkpoint recorded {got}; it was written by another version of "
                "the code. Delete it to start afresh."
            )
        return self._replay.pop(0)

    def _journalled(self, key, compute, encode, decode):
        if self._depth:  # an inner call of a journalled method
            return compute()
        if self._replay is not None:
            event = self._next_event("query", key)
            if event[1] != key:
                raise RunCheckpointError(
                    f"resuming from {self.checkpoint_path!r}: the run asked for {key} where the "
                    f"checkpoint recorded {event[1]}; delete it to start afresh."
                )
            self.journal.append(event)  # kept for a later resume of this run
            return decode(event[2])
        self._depth += 1
        try:
            value = compute()
        finally:
            self._depth -= 1
        self.journal.append(["query", key, encode(value)])
        return value

    def count(self, level):
        if self._replay is not None:
            return self._fake_counts.get(level, 0)
        return super().count(level)

    def reset_level(self, level, coupled):
        if self._replay is not None:
            self._fake_counts[level] = 0
        super().reset_level(level, coupled)

    def quantity_levels(self, levels):
        return self._journalled(
            ["quantity_levels", [int(v) for v in levels]],
            lambda: super(ResumableEngine, self).quantity_levels(levels),
            lambda out: {k: [q.tolist() for q in v] for k, v in out.items()},
            lambda enc: {
                k: QuantityLevels(*(np.array(a, np.float64) for a in v)) for k, v in enc.items()
            },
        )

    def level_values(self, level, name, mean_estimates):
        # the driver only averages these over elements, so the element means are journalled
        return self._journalled(
            ["level_values", int(level), name],
            lambda: super(ResumableEngine, self).level_values(level, name, mean_estimates),
            lambda out: [float(np.mean(a)) for a in out[:4]] + [float(out[4])],
            lambda enc: tuple(np.array([v]) for v in enc[:4]) + (enc[4],),
        )

    def functional_estimates(self, levels):
        if self._replay is not None and not self._depth:
            return None  # only passed on to level_values, which the journal answers
        return super().functional_estimates(levels)

    def draw(self, level, count, show=None):
        if self._depth:
            return super().draw(level, count, show)
        start = self.count(level)
        record = ["call", int(level), int(count), int(start)]
        if self._replay is not None:
            event = self._next_event("call", record[1:])
            if event != record:
                raise RunCheckpointError(
                    f"resuming from {self.checkpoint_path!r}: the run drew {record[1:]} (level, "
                    f"count, count before) where the checkpoint recorded {event[1:]}; delete it "
                    "to start afresh."
                )
            self.journal.append(record)
            if self._replay:  # an earlier top-up: already in the saved state
                self._fake_counts[level] = start + count
                return None
            # the last top-up of the checkpoint: load the state and finish it for real
            state, arrays = self._saved
            _load_state(self, state, arrays)
            self._replay = self._saved = None
            remaining = start + count - self.count(level)
            if remaining > 0:
                super().draw(level, remaining, show)
            return None
        self.journal.append(record)
        return super().draw(level, count, show)

    # -- saving --------------------------------------------------------------------------------
    def _setup(self, fine):
        self._site_dtypes = {k: str(v.dtype) for k, v in fine.items()}
        super()._setup(fine)

    def after_batch(self, level):
        """Called by `_Engine.draw` after each batch is merged."""
        if jax.process_index() != 0:
            return
        state, arrays = _dump_state(self)
        meta = {"format": FORMAT, "identity": self.identity, "journal": self.journal}
        meta["state"] = state
        _write_atomic(self.checkpoint_path, meta, arrays)
