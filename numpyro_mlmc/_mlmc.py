"""The adaptive MLMC driver and the plain Monte Carlo baseline.

The loop runs on the host around jitted, fixed-shape batch kernels (STYLE.md): draw `i` of level
`l` uses the key `fold_in(fold_in(key, l), i)`, batches are padded to one of a few fixed shapes
and the padding is dropped, so a result depends on the key and not on the batch size, and
nothing recompiles between batches.

References: Giles, "Multilevel Monte Carlo path simulation" (Oper. Res. 2008); Giles,
"Multilevel Monte Carlo methods" (Acta Numerica 2015); Haji-Ali, Pereyra, Shaw and Zygalakis,
"Bayesian computation with generative diffusion models by Multilevel Monte Carlo"
(arXiv 2409.15511).
"""

from __future__ import annotations

import collections
import functools
import math
import numbers
import time
import warnings

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ._accumulators import LevelAccumulator
from ._allocation import (
    Allocation,
    QuantityLevels,
    coarse_level_pays,
    corrected_norm,
    optimal_samples,
    plan,
)
from ._levels import as_level_sampler
from ._result import LevelStatistics, MLMCResult
from ._sharding import DEFAULT_CHUNK_SIZE, BatchRunner, check_chunk_size, resolve_devices

__all__ = ["MLMC", "MonteCarlo"]

# Giles' threshold (mlmc_test.m): above it, variance estimates from a few hundred samples are
# unreliable.
KURTOSIS_WARNING = 100.0
# Familywise false-alarm rate of one consistency check over all elements (Bonferroni).
CONSISTENCY_FALSE_ALARM = 0.01
# Stop the adaptive loop after this many rounds (each round at least tops up one level).
MAX_ROUNDS = 200
# batches dispatched ahead of the one being merged (`_Engine.draw`)
_IN_FLIGHT = 2


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------
def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def _check_rmse(rmse):
    if isinstance(rmse, bool) or not isinstance(rmse, numbers.Real):
        raise TypeError(f"rmse must be a positive finite number, got {rmse!r}.")
    if not math.isfinite(rmse) or rmse <= 0:
        raise ValueError(f"rmse must be a positive finite number, got {rmse!r}.")
    return float(rmse)


def _check_theta(theta):
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not 0 < theta < 1:
        raise ValueError(
            f"theta (the variance share of rmse^2) must lie strictly between 0 and 1, got "
            f"{theta!r}."
        )
    return float(theta)


def _check_functionals(functionals):
    if functionals is None:
        return None
    if not isinstance(functionals, dict) or not functionals:
        raise TypeError(
            "functionals must be a non-empty dict name -> f(x) returning an array, got "
            f"{functionals!r}."
        )
    for name, f in functionals.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"functional names must be non-empty strings, got {name!r}.")
        if not callable(f):
            raise TypeError(f"functional {name!r} is not callable: {f!r}.")
    return dict(functionals)


def _check_key(key):
    try:
        jr.fold_in(key, 0)
    except Exception as err:  # noqa: BLE001 - re-raised with the fix
        raise TypeError(
            f"key must be a JAX PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)), got {key!r}."
        ) from err
    return key


# ----------------------------------------------------------------------------------------------
# functionals on device
# ----------------------------------------------------------------------------------------------
def _square(x):
    return x * x


def _identity(x):
    return x


def _default_functionals(sites):
    out = {}
    for site in sites:
        out[f"{site}_mean"] = _SiteFunctional(site, _identity)
        out[f"{site}_second_moment"] = _SiteFunctional(site, _square)
    return out


class _SiteFunctional:
    """`f(draw[site])`; hashable by value so jitted evaluators are cached across runs."""

    def __init__(self, site, fn):
        self.site, self.fn = site, fn

    def __call__(self, draw):
        return self.fn(draw[self.site])

    def __eq__(self, other):
        return isinstance(other, _SiteFunctional) and (self.site, self.fn) == (other.site, other.fn)

    def __hash__(self):
        return hash((self.site, self.fn))


class _UserFunctional:
    """A user's `f(x)`: `x` is the only site's array, or the dict of sites."""

    def __init__(self, name, fn, single_site):
        self.name, self.fn, self.single_site = name, fn, single_site

    def __call__(self, draw):
        x = draw[self.single_site] if self.single_site is not None else draw
        out = self.fn(x)
        if isinstance(out, bool) or not isinstance(out, (jax.Array, np.ndarray, numbers.Real)):
            raise TypeError(
                f"functional {self.name!r} returned {type(out).__name__}, not an array; "
                "return a jax/numpy array (or a real scalar) for each draw."
            )
        out = jnp.asarray(out)
        if not (jnp.issubdtype(out.dtype, jnp.floating) or jnp.issubdtype(out.dtype, jnp.integer)):
            raise TypeError(
                f"functional {self.name!r} returned dtype {out.dtype}; return real numbers."
            )
        return out

    def __eq__(self, other):
        return isinstance(other, _UserFunctional) and (
            self.name,
            self.fn,
            self.single_site,
        ) == (other.name, other.fn, other.single_site)

    def __hash__(self):
        return hash((self.name, self.fn, self.single_site))


@functools.lru_cache(maxsize=128)
def _evaluator(items):
    """Jitted `(fine, coarse) -> (values_fine, values_coarse, finite)` over a batch."""
    dtype = jnp.zeros(()).dtype

    def apply(draw):
        return {name: jnp.asarray(f(draw)).astype(dtype) for name, f in items}

    def row_finite(tree):
        leaves = jax.tree_util.tree_leaves(tree)
        ok = None
        for leaf in leaves:
            flag = jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
            ok = flag if ok is None else ok & flag
        return ok

    def evaluate(fine, coarse):
        vf = jax.vmap(apply)(fine)
        finite = row_finite(vf) & row_finite(fine)
        vc = None
        if coarse is not None:
            vc = jax.vmap(apply)(coarse)
            finite = finite & row_finite(vc) & row_finite(coarse)
        return vf, vc, finite

    return jax.jit(evaluate)


# ----------------------------------------------------------------------------------------------
# the engine: levels, draws and accumulators of one run
# ----------------------------------------------------------------------------------------------
class _Engine:
    def __init__(
        self,
        sampler,
        key,
        functionals,
        *,
        batch_size,
        max_stored_draws,
        on_nonfinite,
        progress_bar,
        description,
        devices=None,
        chunk_size=DEFAULT_CHUNK_SIZE,
    ):
        self.sampler = sampler
        # devices and processes sharing each batch, in chunks of a fixed number of rows
        self.runner = BatchRunner(devices, chunk_size)
        self.key = key
        self.user_functionals = functionals
        self.batch_size = batch_size
        self.batch_shapes = sorted({max(1, batch_size // 4**k) for k in range(3)}, reverse=True)
        self.max_stored_draws = max_stored_draws
        self.on_nonfinite = on_nonfinite
        self.accumulators = {}  # level -> LevelAccumulator (current role)
        self.next_index = {}  # level -> next sample index (never reused)
        self.discarded = {}  # level -> non-finite draws dropped
        self.stored = {}  # level -> dict site -> list of arrays (fine draws)
        self._roles = {}  # level -> coupled
        self.wasted_cost = 0  # draws whose level changed role (the coarsest-level search)
        self.functionals = None
        self.quantities = None  # name -> ("functional", name) | ("variance", mean, second)
        self.pairs = ()
        self.site_shapes = None
        self.default = functionals is None
        self.bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, desc=description, unit="draw", leave=True)

    # -- setup on the first batch ------------------------------------------------------------
    def _setup(self, fine):
        self.site_shapes = {k: tuple(v.shape[1:]) for k, v in fine.items()}
        sites = list(self.site_shapes)
        if self.default:
            self.functionals = _default_functionals(sites)
            self.quantities = {}
            pairs = []
            for site in sites:
                mean, second = f"{site}_mean", f"{site}_second_moment"
                self.quantities[mean] = ("functional", mean)
                self.quantities[second] = ("functional", second)
                self.quantities[f"{site}_variance"] = ("variance", mean, second)
                pairs.append((mean, second))
            self.pairs = tuple(pairs)
        else:
            single = sites[0] if len(sites) == 1 else None
            self.functionals = {
                name: _UserFunctional(name, f, single) for name, f in self.user_functionals.items()
            }
            self.quantities = {name: ("functional", name) for name in self.functionals}
            self.pairs = ()
        self.evaluate = _evaluator(tuple(self.functionals.items()))

    # -- drawing -------------------------------------------------------------------------------
    def count(self, level):
        acc = self.accumulators.get(level)
        return 0 if acc is None else acc.count

    def coupled(self, level):
        return self.accumulators[level].coupled

    def cost(self, level, coupled=None):
        coupled = self.coupled(level) if coupled is None else coupled
        return int(self.sampler.cost(level, coupled))

    def reset_level(self, level, coupled):
        """Start level `level` afresh in role `coupled` (its old draws count as waste)."""
        old = self.accumulators.pop(level, None)
        if old is not None:
            self.wasted_cost += old.count * self.cost(level, old.coupled)
        self.stored.pop(level, None)
        self._new_level(level, coupled)

    def _new_level(self, level, coupled):
        self.accumulators[level] = None if self.functionals is None else self._make_acc(coupled)
        self._roles[level] = coupled
        self.next_index.setdefault(level, 0)
        self.discarded.setdefault(level, 0)

    def _make_acc(self, coupled):
        return LevelAccumulator(self._value_shapes, coupled, self.pairs)

    def add_level(self, level, coupled):
        if level not in self.accumulators:
            self._new_level(level, coupled)

    def draw(self, level, count, show=None):
        """Add `count` finite draws to `level` (more attempts if non-finite ones are dropped
        with `on_nonfinite="discard"`).

        Batches are dispatched up to `_IN_FLIGHT` ahead of the one being merged: JAX runs a
        sampler call asynchronously, so the host merges batch `i` into the accumulators
        while the device computes batch `i + 1`. The batches, their keys and the merge order
        are those of a one-at-a-time loop (each batch takes the largest compiled shape that
        fits what is still planned), so results do not depend on the look-ahead. If starting
        a batch raises (an interrupt), the batches already started are merged first, so a
        checkpointed run loses no finished work."""
        level_key = jr.fold_in(self.key, level)
        target = self.count(level) + count
        while self.count(level) < target:
            planned = target - self.count(level)
            start = self.next_index[level]
            pending = collections.deque()
            while planned > 0 or pending:
                while planned > 0 and len(pending) < _IN_FLIGHT:
                    # the largest compiled shape that fits; only a last remainder below the
                    # smallest shape is padded, so padding wastes fewer than batch_size / 16
                    # draws per top-up
                    shape = next(
                        (s for s in self.batch_shapes if s <= planned), self.batch_shapes[-1]
                    )
                    take = min(shape, planned)
                    try:
                        dispatched = self._dispatch(level_key, level, start, shape)
                    except BaseException:  # e.g. KeyboardInterrupt: keep the batches started
                        while pending:
                            self._merge(level, *pending.popleft())
                        raise
                    pending.append((start, take, dispatched))
                    start += take
                    planned -= take
                self._merge(level, *pending.popleft())
        if show is not None and self.bar is not None:
            self.bar.set_postfix_str(show, refresh=False)

    def _dispatch(self, level_key, level, start, shape):
        """Start the sampler calls and the functionals of one batch (asynchronously): keys
        `start .. start + padded shape - 1` in fixed-size chunks, this process's chunks each on
        one of its devices (`_sharding.py`). Returns `(fine chunks, evaluated chunks)`."""
        coupled = self._roles[level]
        outputs = [
            self.sampler.sample(keys, level, coupled)
            for keys in self.runner.keys(level_key, start, shape)
        ]
        for fine, coarse in outputs:
            if not isinstance(fine, dict) or (coupled and not isinstance(coarse, dict)):
                raise TypeError(
                    f"{type(self.sampler).__name__}.sample must return (dict, dict | None), "
                    f"got ({type(fine).__name__}, {type(coarse).__name__})."
                )
        if self.functionals is None:
            fine = outputs[0][0]
            self._setup(fine)
            shapes = jax.eval_shape(lambda f: self.evaluate(f, None)[0], fine)
            self._value_shapes = {k: tuple(v.shape[1:]) for k, v in shapes.items()}
            for lev, role in self._roles.items():
                if self.accumulators[lev] is None:
                    self.accumulators[lev] = self._make_acc(role)
        evaluated = [self.evaluate(f, c if coupled else None) for f, c in outputs]
        return [f for f, _ in outputs], evaluated

    def _merge(self, level, start, take, dispatched):
        """Merge the first `take` rows of a dispatched batch into `level`'s accumulator."""
        coupled = self._roles[level]
        fine_chunks, evaluated = dispatched
        values_f, values_c, finite = self.runner.gather(evaluated)
        finite = np.asarray(finite)[:take]
        values_f = {k: np.asarray(v, np.float64)[:take] for k, v in values_f.items()}
        if coupled:
            values_c = {k: np.asarray(v, np.float64)[:take] for k, v in values_c.items()}
        self.next_index[level] = start + take
        bad = int(take - finite.sum())
        if bad:
            if self.on_nonfinite == "raise":
                first = start + int(np.nonzero(~finite)[0][0])
                raise FloatingPointError(
                    f"level {level} produced {bad} non-finite draw(s) (NaN or inf) among "
                    f"samples {start}..{start + take - 1} (first: sample {first}); check the "
                    "score model and step sizes at this level, or pass "
                    "on_nonfinite='discard' to drop such draws (this biases the estimate)."
                )
            self.discarded[level] += bad
            self.wasted_cost += bad * self.cost(level, coupled)
            kept = self.count(level) + int(finite.sum())
            if self.discarded[level] > max(kept, 64):  # also ends an all-NaN level
                raise FloatingPointError(
                    f"level {level}: {self.discarded[level]} of "
                    f"{self.discarded[level] + kept} draws so far are non-finite (NaN or "
                    "inf), more than half; discarding them would leave an estimate "
                    "dominated by that bias. Fix the score model or the step sizes at this "
                    "level (more steps, a later end time)."
                )
            values_f = {k: v[finite] for k, v in values_f.items()}
            if coupled:
                values_c = {k: v[finite] for k, v in values_c.items()}
        self.accumulators[level].update(values_f, values_c if coupled else None)
        self._store(level, fine_chunks, take, finite)
        self.after_batch(level)
        if self.bar is not None:
            self.bar.update(int(finite.sum()))

    def after_batch(self, level):
        """Hook after each merged batch (`_run_checkpoint.ResumableEngine` saves here)."""

    def _store(self, level, fine_chunks, take, finite):
        room = self.max_stored_draws - sum(
            a.shape[0] for a in self.stored.get(level, {}).get("__first__", [])
        )
        if room <= 0:
            return
        store = self.stored.setdefault(level, {"__first__": []})
        rows = np.nonzero(finite)[0][:room]
        if rows.size == 0:
            return
        for site, value in self.runner.gather(fine_chunks).items():
            store.setdefault(site, []).append(np.asarray(value)[:take][rows])
        store["__first__"].append(rows)

    def stored_draws(self, level):
        store = self.stored.get(level)
        if not store:
            return {}
        return {k: np.concatenate(v) for k, v in store.items() if k != "__first__"}

    def set_progress(self, needed, postfix):
        if self.bar is not None:
            self.bar.total = int(needed)
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()

    # -- statistics ----------------------------------------------------------------------------
    def _functional_level(self, acc, name):
        y, f = acc.correction[name], acc.fine[name]
        v = y.variance
        kurt = float("nan")
        if acc.coupled and acc.count >= 2:
            denom = float(np.sum(v**2))
            if denom > 0:
                kurt = float(np.sum(y.fourth_central_moment) / denom)
        return y.mean, v, f.mean, f.variance, kurt

    def level_values(self, level, name, mean_estimates):
        """Elementwise (mean Y, Var Y, mean P, Var P, kurtosis) of quantity `name`."""
        acc = self.accumulators[level]
        spec = self.quantities[name]
        if spec[0] == "functional":
            return self._functional_level(acc, spec[1])
        _, a, b = spec
        m = mean_estimates[a]
        ya, yb = acc.correction[a], acc.correction[b]
        cy = acc.correction_cross[(a, b)].covariance
        mean_y = yb.mean - 2 * m * ya.mean
        var_y = np.maximum(yb.variance + 4 * m**2 * ya.variance - 4 * m * cy, 0.0)
        fa, fb = acc.fine[a], acc.fine[b]
        cp = acc.fine_cross[(a, b)].covariance
        mean_p = fb.mean - fa.mean**2
        var_p = np.maximum(fb.variance + 4 * m**2 * fa.variance - 4 * m * cp, 0.0)
        return mean_y, var_y, mean_p, var_p, float("nan")

    def functional_estimates(self, levels):
        return {
            name: sum(self.accumulators[lev].correction[name].mean for lev in levels)
            for name in self.functionals
        }

    def quantity_levels(self, levels):
        means = self.functional_estimates(levels)
        out = {}
        for name in self.quantities:
            v, m, noise = [], [], []
            for lev in levels:
                mean_y, var_y, *_ = self.level_values(lev, name, means)
                n = self.count(lev)
                v.append(float(np.mean(var_y)))
                m.append(corrected_norm(mean_y, var_y, n))
                noise.append(math.sqrt(v[-1] / max(n, 1)))
            out[name] = QuantityLevels(np.array(v), np.array(m), np.array(noise))
        return out

    def consistency(self, level, name):
        """Max over elements of `|E Pc_l - E Pf_{l-1}| / se`, divided by the Bonferroni critical
        value at familywise level 1%: above 1 the coarse path of level `l` and the fine path of
        level `l - 1` disagree in mean (the telescoping sum is broken)."""
        from scipy.stats import norm

        spec = self.quantities[name]
        acc, prev = self.accumulators.get(level), self.accumulators.get(level - 1)
        if spec[0] != "functional" or acc is None or prev is None or not acc.coupled:
            return float("nan")
        c, f = acc.coarse[spec[1]], prev.fine[spec[1]]
        if c.count < 2 or f.count < 2:
            return float("nan")
        se2 = c.variance / c.count + f.variance / f.count
        diff = c.mean - f.mean
        ok = se2 > 0
        if not np.any(ok):
            exact_zero = np.all(diff == 0)
            return 0.0 if exact_zero else float("inf")
        z = np.abs(diff[ok]) / np.sqrt(se2[ok])
        crit = norm.isf(CONSISTENCY_FALSE_ALARM / (2 * z.size))
        return float(z.max() / crit)


def _engine_class(checkpoint, **identity):
    """`_Engine`, or with a `checkpoint` path the engine that saves after every batch and
    resumes from an existing file (`_run_checkpoint.py`)."""
    if checkpoint is None:
        return _Engine
    from ._run_checkpoint import ResumableEngine, fingerprint

    return functools.partial(
        ResumableEngine, checkpoint=checkpoint, identity=fingerprint(**identity)
    )


def _identity_config(obj):
    """The settings of an `MLMC` / `MonteCarlo` that a resumed run must share."""
    return {k: v for k, v in vars(obj).items() if k not in ("sampler", "devices")}


def _make_engine(
    estimator,
    method,
    checkpoint,
    key,
    sampler,
    functionals,
    model_args,
    model_kwargs,
    run_config,
    progress_bar,
    *,
    description,
):
    """The engine of one `MLMC` / `MonteCarlo` run (checkpointing when `checkpoint` is set)."""
    return _engine_class(
        checkpoint,
        method=method,
        key=key,
        config={**_identity_config(estimator), **run_config},
        sampler=sampler,
        functionals=functionals,
        model_args=model_args,
        model_kwargs=model_kwargs,
    )(
        sampler,
        key,
        functionals,
        batch_size=estimator.batch_size,
        max_stored_draws=estimator.max_stored_draws,
        on_nonfinite=estimator.on_nonfinite,
        progress_bar=progress_bar,
        devices=estimator.devices,
        chunk_size=estimator.chunk_size,
        description=description,
    )


# ----------------------------------------------------------------------------------------------
# building the result
# ----------------------------------------------------------------------------------------------
def _finalise(
    engine,
    levels,
    *,
    method,
    rmse,
    theta,
    refinement,
    allocation,
    wall_time,
    converged,
    extra_warnings=(),
):
    levels = list(levels)
    means = engine.functional_estimates(levels)
    estimates, stderr, tables = {}, {}, {}
    var_budget = None if rmse is None else theta * rmse**2
    costs = np.array([engine.cost(lev) for lev in levels], np.float64)
    counts = np.array([engine.count(lev) for lev in levels], np.int64)
    mc_costs = {}
    finest = levels[-1]
    num_steps_fn = getattr(engine.sampler, "num_steps", None)
    for name, spec in engine.quantities.items():
        rows = [engine.level_values(lev, name, means) for lev in levels]
        if spec[0] == "functional":
            est = means[spec[1]]
        else:
            est = means[spec[2]] - means[spec[1]] ** 2
        var_est = sum(r[1] / max(n, 1) for r, n in zip(rows, counts, strict=True))
        estimates[name] = est
        stderr[name] = np.sqrt(var_est)
        tables[name] = LevelStatistics(
            level=np.array(levels),
            num_steps=np.array(
                [num_steps_fn(lev) if num_steps_fn else np.nan for lev in levels], np.float64
            ),
            samples=counts,
            cost_per_sample=costs,
            variance=np.array([float(np.mean(r[1])) for r in rows]),
            mean_abs=np.array(
                [corrected_norm(r[0], r[1], n) for r, n in zip(rows, counts, strict=True)]
            ),
            fine_variance=np.array([float(np.mean(r[3])) for r in rows]),
            fine_mean_abs=np.array([float(np.sqrt(np.mean(r[2] ** 2))) for r in rows]),
            kurtosis=np.array([r[4] for r in rows]),
            consistency=np.array(
                [engine.consistency(lev, name) if j else np.nan for j, lev in enumerate(levels)]
            ),
        )
        # plain MC at the finest level for the same variance target
        fine_var = tables[name].fine_variance[-1]
        target = var_budget if var_budget is not None else float(np.mean(var_est))
        mc_costs[name] = (
            math.ceil(fine_var / target) * engine.cost(finest, False) if target > 0 else 0
        )
    if allocation is not None:
        alpha, beta, bias = allocation.alpha, allocation.beta, allocation.bias
        governing = allocation.governing
        # with a fixed allocation there is no target, so no bias test
        bias_ok = allocation.bias_ok if rmse is not None else dict.fromkeys(bias)
    else:
        nan = {name: float("nan") for name in engine.quantities}
        alpha, beta, bias, bias_ok = nan, dict(nan), dict(nan), dict.fromkeys(nan, False)
        governing = max(
            engine.quantities, key=lambda q: float(np.sum(tables[q].variance * costs / counts))
        )
    gamma = float("nan")
    if len(levels) >= 2:
        c1, c0 = engine.cost(levels[-1], False), engine.cost(levels[-2], False)
        gamma = math.log(c1 / c0) / math.log(refinement) if c0 > 0 else float("nan")
    rmse_est = {}
    for name in engine.quantities:
        b = bias.get(name, float("nan"))
        var_part = float(np.mean(stderr[name] ** 2))
        rmse_est[name] = math.sqrt(var_part + (b**2 if math.isfinite(b) else 0.0))
    cost = int(np.sum(counts * costs)) + int(engine.wasted_cost)
    site_draws = engine.stored_draws(finest)
    warn_list = list(extra_warnings)
    for name, table in tables.items():
        big = table.kurtosis[np.isfinite(table.kurtosis)]
        if big.size and big.max() > KURTOSIS_WARNING:
            lev = int(table.level[np.nanargmax(table.kurtosis)])
            warn_list.append(
                f"{name}: kurtosis {big.max():.3g} at level {lev} exceeds {KURTOSIS_WARNING:g}; "
                "variance estimates there are unreliable (use more pilot samples)."
            )
        cons = table.consistency[np.isfinite(table.consistency)]
        if cons.size and cons.max() > 1:
            lev = int(table.level[np.nanargmax(table.consistency)])
            warn_list.append(
                f"{name}: consistency check fails at level {lev} (statistic {cons.max():.3g} > 1):"
                " the coarse path of that level does not match the fine path of the level below;"
                " the coupling or the level sampler is wrong."
            )
    discarded = {lev: engine.discarded.get(lev, 0) for lev in levels}
    if any(discarded.values()):
        warn_list.append(
            f"non-finite draws were discarded: {discarded} (per level); the estimate may be biased."
        )
    # Kurtosis and consistency findings go to `result.warnings` and the summary (`mlmc_test`
    # raises them as Python warnings); only what makes the estimate untrustworthy is raised.
    for msg in extra_warnings:
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
    if any(discarded.values()):
        warnings.warn(warn_list[-1], RuntimeWarning, stacklevel=3)
    sites = list(engine.site_shapes)
    if engine.default:
        mean = {s: estimates[f"{s}_mean"].reshape(engine.site_shapes[s]) for s in sites}
        variance = {s: estimates[f"{s}_variance"].reshape(engine.site_shapes[s]) for s in sites}
    else:
        mean, variance = {}, {}
    return MLMCResult(
        method=method,
        estimates=estimates,
        stderr=stderr,
        mean=mean,
        variance=variance,
        rmse_estimates=rmse_est,
        bias_estimates=dict(bias),
        target_rmse=rmse,
        theta=theta,
        refinement=refinement,
        cost=cost,
        wasted_cost=int(engine.wasted_cost),
        wall_time=wall_time,
        level_tables=tables,
        governing=governing,
        alphas=dict(alpha),
        betas=dict(beta),
        gamma=gamma,
        mc_cost_estimates=mc_costs,
        bias_test_passed=dict(bias_ok),
        converged=converged,
        discarded=discarded,
        draws=site_draws,
        warnings=tuple(warn_list),
    )


# ----------------------------------------------------------------------------------------------
# public classes
# ----------------------------------------------------------------------------------------------
class MLMC:
    """Adaptive Multilevel Monte Carlo for posterior expectations (Giles 2008, 2015; Haji-Ali et
    al., arXiv 2409.15511).

    `E[P_L] = E[P_l0] + sum_{l=l0+1}^{L} E[P_l - P_{l-1}]`, each term averaged over its own
    independent draws; level `l` of a diffusion posterior runs `refinement**l` reverse steps.

    Args:
        sampler: a `LevelSampler` (see `numpyro_mlmc.LevelSampler`), or an object with
            `level_sampler(model_args, model_kwargs, *, refinement)` such as
            `nm.DiffusionPosterior(model, ...)`.
        refinement: `M`, the step ratio between levels (default 2).
        min_level: the coarsest level `l0`; `None` chooses it from a pilot by the paper's
            criterion (`V_l < (sqrt(M)-1)^2 V[P_l]/(M+1)`, see `coarse_level_pays`).
        max_level: the finest level allowed; if the bias test still fails there the result says
            so (`result.converged`) and a warning is raised.
        theta: share of `rmse^2` given to the variance (`theta eps^2`); the bias gets the rest.
        batch_size: draws per batch (one host round: sample, evaluate, merge); remainders are
            drawn in batches of `batch_size / 4` and `batch_size / 16`, so padding wastes
            fewer than `batch_size / 16` draws per top-up (plus fewer than one per chunk) and
            only three shapes compile per level.
        pilot_samples: draws per level in the pilot and the least number on any level.
        min_num_levels: levels `l0 .. l0 + min_num_levels - 1` are sampled from the start
            (Giles' `Lmin + 1`, default 3).
        decay_levels: trailing correction levels that must show decay before the bias test is
            trusted (guard against the pre-asymptotic regime, DESIGN.md section 4; default 3).
        max_stored_draws: finest-level fine draws kept for `to_inference_data` (default 1000).
        on_nonfinite: `"raise"` (default) stops with an error naming the level and the count
            of NaN/inf draws; `"discard"` drops them, reports the count and warns.
        devices: `None` (default) spreads every batch over all local devices
            (`jax.local_devices()`); an int `n` uses the first `n`, or pass a list of devices.
            Under `jax.distributed.initialize` each process also draws its share of every
            batch (`numpyro_mlmc._sharding`).
        chunk_size: most rows per sampler call (default 64). A batch runs as
            `ceil(B / chunk_size)` equal chunks, handed round-robin to the devices; the chunk
            shape depends on the batch size and `chunk_size` only, so with the same key the
            result is bit-identical whatever the number of devices or processes. `None` runs
            each batch as one chunk per device (fewer, larger calls, e.g. to fill a large
            GPU): results then change with the device count at float32 rounding level, since
            XLA rounds a row differently depending on how many rows it computes together.
            Larger chunks use more memory per device.

    The estimate does not depend on `batch_size` (up to float32 rounding) as long as the key's
    draws do not depend on how keys are batched under `vmap`: true of JAX's default threefry
    keys, not of `"rbg"` keys.
    """

    def __init__(
        self,
        sampler,
        *,
        refinement: int = 2,
        min_level: int | None = None,
        max_level: int = 12,
        theta: float = 0.5,
        batch_size: int = 512,
        pilot_samples: int = 128,
        min_num_levels: int = 3,
        decay_levels: int = 3,
        max_stored_draws: int = 1000,
        on_nonfinite: str = "raise",
        devices=None,
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    ):
        self.sampler = sampler
        self.refinement = _check_int("refinement", refinement, 2)
        self.max_level = _check_int("max_level", max_level, 0)
        if min_level is not None:
            min_level = _check_int("min_level", min_level, 0)
            if self.max_level < min_level:
                raise ValueError(
                    f"max_level ({self.max_level}) must be >= min_level ({min_level})."
                )
        self.min_level = min_level
        self.theta = _check_theta(theta)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.pilot_samples = _check_int("pilot_samples", pilot_samples, 2)
        self.min_num_levels = _check_int("min_num_levels", min_num_levels, 1)
        self.decay_levels = _check_int("decay_levels", decay_levels, 1)
        self.max_stored_draws = _check_int("max_stored_draws", max_stored_draws, 0)
        if on_nonfinite not in ("raise", "discard"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'discard', got {on_nonfinite!r}.")
        self.on_nonfinite = on_nonfinite
        self.devices = None if devices is None else resolve_devices(devices)
        self.chunk_size = check_chunk_size(chunk_size)

    def run(
        self,
        key,
        *model_args,
        rmse=None,
        functionals=None,
        num_samples=None,
        progress_bar: bool = True,
        checkpoint=None,
        **model_kwargs,
    ) -> MLMCResult:
        """Estimate the expectations to root-mean-square error `rmse`.

        Args:
            key: a JAX PRNG key; draw `i` of level `l` uses `fold_in(fold_in(key, l), i)`.
            *model_args, **model_kwargs: data for the model (for `DiffusionPosterior`).
            rmse: target `eps`: RMS over the elements of each estimate
                (`||estimate - truth||_2 / sqrt(size)`); every estimate meets it.
            functionals: `None` for the mean and second moment of every site (and the
                variance), or a dict `name -> f(x)` returning an array; `x` is one draw of the
                only site, or the dict of sites. Applied jitted and vmapped on device.
            num_samples: one count per level from `min_level` (0 if None): a fixed allocation
                instead of `rmse`.
            progress_bar: show a tqdm bar (levels, draws done/needed, current RMSE estimate).
            checkpoint: a file path: the run's state is saved there atomically after every
                batch, and a run started with the same arguments and an existing checkpoint
                resumes from it, with estimates equal to an uninterrupted run's
                (`numpyro_mlmc._run_checkpoint`). A checkpoint of another run raises
                `nm.RunCheckpointError`. The file is kept at the end; delete it yourself.
        """
        key = _check_key(key)
        if (rmse is None) == (num_samples is None):
            raise ValueError("pass exactly one of rmse=... and num_samples=[...].")
        eps = None if rmse is None else _check_rmse(rmse)
        functionals = _check_functionals(functionals)
        fixed = None
        if num_samples is not None:
            if not isinstance(num_samples, (list, tuple, np.ndarray)):
                raise TypeError(
                    f"num_samples must be a list of sample counts, one per level from min_level, "
                    f"e.g. [4000, 1000, 250]; got {num_samples!r}."
                )
            fixed = [_check_int("num_samples[l]", int_like, 1) for int_like in num_samples]
            l0 = 0 if self.min_level is None else self.min_level
            if not fixed or l0 + len(fixed) - 1 > self.max_level:
                raise ValueError(
                    f"num_samples must give 1..{self.max_level - l0 + 1} counts (levels {l0}.."
                    f"{self.max_level}), got {len(fixed)}."
                )
        sampler = as_level_sampler(
            self.sampler, model_args, model_kwargs, refinement=self.refinement
        )
        engine = _make_engine(
            self,
            "MLMC",
            checkpoint,
            key,
            sampler,
            functionals,
            model_args,
            model_kwargs,
            {"rmse": eps, "num_samples": fixed},
            progress_bar,
            description="MLMC",
        )
        start = time.perf_counter()
        try:
            if fixed is not None:
                levels = list(range(l0, l0 + len(fixed)))
                engine.set_progress(sum(fixed), f"levels {levels[0]}-{levels[-1]}")
                for lev, n in zip(levels, fixed, strict=True):
                    engine.add_level(lev, lev > l0)
                    engine.draw(lev, n)
                allocation = None
                if len(levels) >= 2:
                    allocation = plan(
                        levels,
                        engine.quantity_levels(levels),
                        [engine.cost(lev) for lev in levels],
                        rmse=1.0,  # only the rates and remainders are used
                        theta=self.theta,
                        refinement=self.refinement,
                        decay_levels=self.decay_levels,
                    )
                converged, extra = True, ()
            else:
                levels, allocation, converged, extra = self._adaptive(engine, eps)
        finally:
            engine.close()
        wall = time.perf_counter() - start
        return _finalise(
            engine,
            levels,
            method="MLMC",
            rmse=eps,
            theta=self.theta,
            refinement=self.refinement,
            allocation=allocation,
            wall_time=wall,
            converged=converged,
            extra_warnings=extra,
        )

    # -- the adaptive algorithm ---------------------------------------------------------------
    def _choose_coarsest(self, engine):
        """Smallest `l` whose correction at `l + 1` pays (`coarse_level_pays`) for every
        quantity; the coupled pilot draws at `l + 1` are kept."""
        m = self.refinement
        top = max(0, self.max_level - (self.min_num_levels - 1))
        for lev in range(0, top):
            engine.add_level(lev + 1, True)
            engine.set_progress(
                sum(engine.count(x) for x in engine.accumulators) + self.pilot_samples,
                f"choosing the coarsest level: testing {lev}",
            )
            engine.draw(lev + 1, self.pilot_samples)
            stats = engine.quantity_levels([lev + 1])
            pays = True
            for name in engine.quantities:
                means = engine.functional_estimates([lev + 1])
                _, _, _, var_p, _ = engine.level_values(lev + 1, name, means)
                if not coarse_level_pays(stats[name].variances[0], float(np.mean(var_p)), m):
                    pays = False
                    break
            if pays:
                return lev
        return top

    def _adaptive(self, engine, eps):
        m = self.refinement
        if self.min_level is None:
            l0 = self._choose_coarsest(engine)
            for lev in list(engine.accumulators):
                if lev <= l0:
                    engine.reset_level(lev, lev > l0)  # coupled pilot draws at l0 and below
                    if lev < l0:
                        engine.accumulators.pop(lev)
                        engine._roles.pop(lev)
        else:
            l0 = self.min_level
        top = min(self.max_level, l0 + self.min_num_levels - 1)
        levels = list(range(l0, top + 1))
        for lev in levels:
            engine.add_level(lev, lev > l0)
        for lev in levels:
            need = self.pilot_samples - engine.count(lev)
            if need > 0:
                engine.draw(lev, need)
        alpha_prev = beta_prev = 0.0
        extra = []
        converged = True
        allocation = None
        for _ in range(MAX_ROUNDS):
            costs = np.array([engine.cost(lev) for lev in levels], np.float64)
            stats = engine.quantity_levels(levels)
            if len(levels) == 1:
                allocation = _single_level_allocation(stats, costs, eps, self.theta)
            else:
                allocation = plan(
                    levels,
                    stats,
                    costs,
                    rmse=eps,
                    theta=self.theta,
                    refinement=m,
                    decay_levels=self.decay_levels,
                    alpha_prev=alpha_prev,
                    beta_prev=beta_prev,
                )
            g = allocation.governing
            if math.isfinite(allocation.alpha[g]):
                alpha_prev = allocation.alpha[g]
            if math.isfinite(allocation.beta[g]):
                beta_prev = allocation.beta[g]
            counts = np.array([engine.count(lev) for lev in levels])
            extra_need = np.maximum(0, allocation.samples - counts)
            if np.all(extra_need <= 0.01 * counts):
                if not all(allocation.bias_ok.values()):
                    if levels[-1] < self.max_level:
                        new = levels[-1] + 1
                        levels.append(new)
                        engine.add_level(new, True)
                        # Giles 2015: the new level's variance extrapolated by beta; at least a
                        # quarter pilot so its own statistics exist next round.
                        beta = max(beta_prev, 0.5)
                        v_new = {
                            q: allocation.variances[q][-1] / m**beta for q in allocation.variances
                        }
                        costs = np.append(costs, engine.cost(new))
                        need = 0
                        for q, v in allocation.variances.items():
                            vv = np.append(v, v_new[q])
                            need = max(
                                need, int(optimal_samples(vv, costs, self.theta * eps**2)[-1])
                            )
                        extra_need = np.append(extra_need, max(need, self.pilot_samples // 4, 2))
                    else:
                        failing = [q for q, ok in allocation.bias_ok.items() if not ok]
                        converged = False
                        extra.append(
                            f"the bias test still fails at max_level={self.max_level} for "
                            f"{failing}; the estimates may not meet rmse={eps:g}. Raise max_level."
                        )
            if int(np.sum(extra_need)) == 0:
                break
            needed = int(np.sum(np.maximum(counts, 0)) + np.sum(extra_need))
            rm = self._rmse_now(engine, levels, allocation)
            engine.set_progress(
                needed, f"levels {levels[0]}-{levels[-1]}, rmse~{rm:.3g} (target {eps:.3g})"
            )
            for lev, dn in zip(levels, extra_need, strict=True):
                if dn > 0:
                    engine.draw(lev, int(dn))
        else:
            converged = False
            extra.append(f"the adaptive loop stopped after {MAX_ROUNDS} rounds.")
        # final statistics with every draw
        if len(levels) >= 2:
            allocation = plan(
                levels,
                engine.quantity_levels(levels),
                [engine.cost(lev) for lev in levels],
                rmse=eps,
                theta=self.theta,
                refinement=m,
                decay_levels=self.decay_levels,
                alpha_prev=alpha_prev,
                beta_prev=beta_prev,
            )
        return levels, allocation, converged, tuple(extra)

    @staticmethod
    def _rmse_now(engine, levels, allocation):
        stats_var = 0.0
        worst = 0.0
        means = engine.functional_estimates(levels)
        for name in engine.quantities:
            stats_var = sum(
                float(np.mean(engine.level_values(lev, name, means)[1])) / max(engine.count(lev), 1)
                for lev in levels
            )
            b = allocation.bias.get(name, float("nan"))
            worst = max(worst, math.sqrt(stats_var + (b * b if math.isfinite(b) else 0.0)))
        return worst


def _single_level_allocation(stats, costs, eps, theta):
    samples = np.zeros(1, np.int64)
    nan = {q: float("nan") for q in stats}
    for q in stats.values():
        samples = np.maximum(samples, optimal_samples(q.variances, costs, theta * eps**2))
    governing = max(stats, key=lambda q: stats[q].variances[0])
    return Allocation(
        samples,
        nan,
        dict(nan),
        dict(nan),
        dict.fromkeys(stats, False),
        dict.fromkeys(stats, True),
        {q: s.variances for q, s in stats.items()},
        governing,
    )


class MonteCarlo:
    """Plain Monte Carlo at one level: the baseline MLMC is measured against.

    Args:
        sampler: as for `MLMC`.
        num_steps: reverse steps per draw (a power of `refinement` for a plain `LevelSampler`;
            any positive int for objects with `level_sampler`). Exclusive with `level`.
        level: the level to sample (`refinement**level` steps).
        refinement: `M` (default 2).
        theta: the variance budget is `theta rmse^2` as in MLMC (default 0.5), so both spend the
            same on statistical error; plain MC has no estimate of its discretisation bias
            (`bias_estimate` is nan), so choose `num_steps` large enough.
        batch_size, pilot_samples, max_stored_draws, on_nonfinite, devices, chunk_size: as
            for `MLMC`.
    """

    def __init__(
        self,
        sampler,
        *,
        num_steps: int | None = None,
        level: int | None = None,
        refinement: int = 2,
        theta: float = 0.5,
        batch_size: int = 512,
        pilot_samples: int = 128,
        max_stored_draws: int = 1000,
        on_nonfinite: str = "raise",
        devices=None,
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    ):
        if (num_steps is None) == (level is None):
            raise ValueError("pass exactly one of num_steps=... and level=....")
        self.sampler = sampler
        self.refinement = _check_int("refinement", refinement, 2)
        if level is not None:
            self.level = _check_int("level", level, 0)
        else:
            num_steps = _check_int("num_steps", num_steps, 1)
            lev = round(math.log(num_steps) / math.log(self.refinement))
            if self.refinement**lev == num_steps:
                self.level = lev
            elif hasattr(sampler, "level_sampler"):
                # one level of `num_steps` steps: refinement num_steps, level 1
                self.refinement, self.level = num_steps, 1
            else:
                raise ValueError(
                    f"num_steps={num_steps} is not a power of refinement={self.refinement}; "
                    "pass level=... or a power of the refinement."
                )
        self.num_steps = num_steps
        self.theta = _check_theta(theta)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.pilot_samples = _check_int("pilot_samples", pilot_samples, 2)
        self.max_stored_draws = _check_int("max_stored_draws", max_stored_draws, 0)
        if on_nonfinite not in ("raise", "discard"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'discard', got {on_nonfinite!r}.")
        self.on_nonfinite = on_nonfinite
        self.devices = None if devices is None else resolve_devices(devices)
        self.chunk_size = check_chunk_size(chunk_size)

    def run(
        self,
        key,
        *model_args,
        rmse=None,
        functionals=None,
        num_samples=None,
        progress_bar: bool = True,
        checkpoint=None,
        **model_kwargs,
    ) -> MLMCResult:
        """Same signature as `MLMC.run` (`checkpoint` included); `num_samples` is one count (an
        int or `[n]`)."""
        key = _check_key(key)
        if (rmse is None) == (num_samples is None):
            raise ValueError("pass exactly one of rmse=... and num_samples=....")
        eps = None if rmse is None else _check_rmse(rmse)
        functionals = _check_functionals(functionals)
        if num_samples is not None:
            if isinstance(num_samples, (list, tuple, np.ndarray)):
                if len(num_samples) != 1:
                    raise ValueError("MonteCarlo takes one sample count.")
                num_samples = num_samples[0]
            num_samples = _check_int("num_samples", num_samples, 2)
        sampler = as_level_sampler(
            self.sampler, model_args, model_kwargs, refinement=self.refinement
        )
        engine = _make_engine(
            self,
            "MonteCarlo",
            checkpoint,
            key,
            sampler,
            functionals,
            model_args,
            model_kwargs,
            {"rmse": eps, "num_samples": num_samples},
            progress_bar,
            description="MC",
        )
        lev = self.level
        start = time.perf_counter()
        try:
            engine.add_level(lev, False)
            if num_samples is not None:
                engine.set_progress(num_samples, f"level {lev}")
                engine.draw(lev, num_samples)
            else:
                pilot = self.pilot_samples
                engine.set_progress(pilot, f"level {lev} (pilot)")
                engine.draw(lev, pilot)
                for _ in range(MAX_ROUNDS):
                    stats = engine.quantity_levels([lev])
                    need = max(
                        math.ceil(q.variances[0] / (self.theta * eps**2)) for q in stats.values()
                    )
                    n = engine.count(lev)
                    if need <= n:
                        break
                    engine.set_progress(need, f"level {lev}")
                    engine.draw(lev, need - n)
        finally:
            engine.close()
        wall = time.perf_counter() - start
        return _finalise(
            engine,
            [lev],
            method="MonteCarlo",
            rmse=eps,
            theta=self.theta,
            refinement=self.refinement,
            allocation=None,
            wall_time=wall,
            converged=True,
        )
