"""Gaussian-mixture priors: the analytic member of the diffusion-prior family.

For `x_0 ~ sum_k w_k N(mu_k, Sigma_k)` the diffused law is again a mixture,

    p_t = sum_k w_k N(alpha_t mu_k, alpha_t^2 Sigma_k + sigma_t^2 I),

so its score and Tweedie denoiser are exact at every `t`. With `Sigma_k = U_k diag(lam_k) U_k^T`
factorised once, every time costs `O(K D^2)` per sample (`O(K D r)` for rank-`r`-plus-isotropic
covariances). Under a linear-Gaussian likelihood
`y = A x + b + noise` the posterior is again a Gaussian mixture in closed form
(`GaussianMixturePrior.posterior`). These are the exact answers every sampler, guidance and
estimator in the library is tested against.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.scipy.special import logsumexp

from ._priors import AbstractDiffusionPrior
from ._schedules import AbstractSchedule, VPSchedule
from ._score_models import AbstractScoreModel

__all__ = ["GaussianMixturePrior", "GaussianMixtureScoreModel"]


class GaussianMixtureScoreModel(AbstractScoreModel):
    """Exact score of a diffused Gaussian mixture (flattened `D`-vectors inside).

    Each covariance is `Sigma_k = U_k diag(lam_k) U_k^T + c_k (I - U_k U_k^T)` with `U_k`
    of shape `(D, r)`: either the full eigendecomposition (`r = D`, `isotropic` is `None`) or,
    for low-rank-plus-isotropic covariances such as `GaussianMixturePrior.fit(rank=...)`, the
    top `r` eigenpairs and the common variance `c_k` of the other `D - r` directions. With
    `v = alpha_t^2 lam + sigma_t^2`, `v_c = alpha_t^2 c + sigma_t^2` and `d = x - alpha_t mu_k`,

        (alpha_t^2 Sigma_k + sigma_t^2 I)^{-1} d = U_k (U_k^T d / v) + (d - U_k U_k^T d) / v_c,

    so a score costs `O(K D r)` instead of `O(K D^2)`; both forms are exact.

    Attributes: `log_weights (K,)`, `means (K, D)`, `eigenvectors (K, D, r)` (columns),
    `eigenvalues (K, r)`, `isotropic (K,)` or `None`, `schedule`, `event_shape`.
    """

    log_weights: jax.Array
    means: jax.Array
    eigenvectors: jax.Array
    eigenvalues: jax.Array
    schedule: AbstractSchedule
    event_shape: tuple[int, ...] = eqx.field(static=True)
    isotropic: jax.Array | None = None

    def _components(self, x, t):
        """Per component: `log N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I)` without the
        `-D/2 log 2 pi` constant `(K,)`, and the component scores `(K, D)`."""
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        diff = x.reshape(-1)[None, :] - a * self.means  # (K, D)
        proj = jnp.einsum("kdj,kd->kj", self.eigenvectors, diff)  # U_k^T (x - a mu_k)
        var = a**2 * self.eigenvalues + s**2  # (K, r)
        quad = jnp.sum(proj**2 / var + jnp.log(var), axis=-1)
        score = jnp.einsum("kdj,kj->kd", self.eigenvectors, proj / var)
        if self.isotropic is not None:
            resid = diff - jnp.einsum("kdj,kj->kd", self.eigenvectors, proj)  # (K, D)
            var_c = (a**2 * self.isotropic + s**2)[:, None]  # (K, 1)
            rest = diff.shape[-1] - proj.shape[-1]
            quad = quad + jnp.sum(resid**2 / var_c, axis=-1) + rest * jnp.log(var_c[:, 0])
            score = score + resid / var_c
        return -0.5 * quad, -score

    def log_density(self, x, t):
        """`log p_t(x)`, exact."""
        comp, _ = self._components(x, t)
        d = self.means.shape[-1]
        return logsumexp(self.log_weights + comp) - 0.5 * d * math.log(2 * math.pi)

    def responsibilities(self, x, t):
        """Posterior component probabilities `p(k | x_t = x)`, shape `(K,)`."""
        comp, _ = self._components(x, t)
        return jax.nn.softmax(self.log_weights + comp)

    def sample_marginal(self, key, t, dtype=jnp.float32):
        """One exact draw of `x_t ~ p_t` (shape `event_shape`): a component `k ~ w`, then
        `alpha_t mu_k + (alpha_t^2 Sigma_k + sigma_t^2 I)^{1/2} z`. Reverse diffusion started
        from this law at `t_max` has no start-law bias (`N(0, I)` misses `alpha_{t_max} mu`)."""
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        k_comp, k_noise = jr.split(key)
        k = jr.categorical(k_comp, self.log_weights)
        z = jr.normal(k_noise, (self.means.shape[-1],), dtype)
        # every component's draw, then pick one: no per-path gather of a (D, r) basis
        coef = jnp.einsum("kdj,d->kj", self.eigenvectors, z)  # (K, r)
        scale = jnp.sqrt(a**2 * self.eigenvalues + s**2)
        x = a * self.means + jnp.einsum("kdj,kj->kd", self.eigenvectors, scale * coef)
        if self.isotropic is not None:
            inside = jnp.einsum("kdj,kj->kd", self.eigenvectors, coef)
            x = x + jnp.sqrt(a**2 * self.isotropic + s**2)[:, None] * (z[None, :] - inside)
        return x[k].reshape(self.event_shape).astype(dtype)

    def score(self, x, t):
        comp, per_comp = self._components(x, t)
        resp = jax.nn.softmax(self.log_weights + comp)
        return jnp.einsum("k,kd->d", resp, per_comp).reshape(x.shape)


# Components lighter than this (normalised weight) are left out of the score model: the law it
# defines moves by at most their total weight in total variation, far below float32 resolution.
# Sharp posteriors (`GaussianMixturePrior.posterior`) often leave one or two components.
NEGLIGIBLE_WEIGHT = 1e-20
# Eigenvalues within this fraction of a component's largest one of its smallest count as the
# isotropic floor (fitted `rank + regularization * I` covariances hit it to round-off).
ISOTROPIC_RTOL = 1e-9


def low_rank_split(eigenvalues, eigenvectors, rtol=ISOTROPIC_RTOL):
    """Split ascending eigenpairs `(K, D)`, `(K, D, D)` into the top-`r` pairs and a common
    floor per component when at most `D / 2` eigenvalues per component stand above their
    smallest one (by `rtol` times the largest). Returns `(eigenvalues (K, r), eigenvectors
    (K, D, r), isotropic (K,))`, or the inputs and `None` when the covariances are not of that
    form (the floor of a component is the mean of its `D - r` smallest eigenvalues)."""
    lam = np.asarray(eigenvalues, np.float64)
    d = lam.shape[-1]
    tol = rtol * lam[:, -1:]
    above = np.sum(lam - lam[:, :1] > tol, axis=-1)
    r = max(int(above.max()), 1)
    if r > d // 2 or r >= d:
        return eigenvalues, eigenvectors, None
    return lam[:, d - r :], np.asarray(eigenvectors)[:, :, d - r :], lam[:, : d - r].mean(-1)


def _as_float64(name, value, ndim):
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf; pass finite values.")
    return arr


class GaussianMixturePrior(AbstractDiffusionPrior):
    """`x ~ sum_k w_k N(mu_k, Sigma_k)`, with its exact diffused score under `schedule`.

    Args:
        weights: `(K,)` non-negative, normalised here.
        means: `(K, D)` or `(K, *event_shape)`.
        covariances: `(K, D, D)`, symmetric positive definite.
        schedule: the noise process that defines the diffused score (default `VPSchedule()`).
        event_shape: shape of one sample (default `(D,)`, or the trailing shape of `means`).
        num_steps, sampler, spacing: settings of `sample_reverse` (`.sample` is exact).

    Factorisations are computed once, in float64 on the host; arrays used under `jit` are in
    JAX's default float dtype.
    """

    pytree_aux_fields = ("weights", "means", "covariances", "_eigenvalues", "_eigenvectors")

    def __init__(
        self,
        weights,
        means,
        covariances,
        *,
        schedule: AbstractSchedule | None = None,
        event_shape=None,
        num_steps: int = 256,
        sampler="ancestral",
        spacing: str = "uniform",
        batch_size: int = 512,
    ):
        weights = _as_float64("weights", weights, 1)
        means_in = np.asarray(means, dtype=np.float64)
        if means_in.ndim < 2:
            raise ValueError(
                f"means must have shape (K, D) or (K, *event_shape), got {means_in.shape}."
            )
        k = weights.shape[0]
        if means_in.shape[0] != k:
            raise ValueError(
                f"means has {means_in.shape[0]} components but weights has {k}; give one mean "
                "per weight."
            )
        if event_shape is None:
            event_shape = means_in.shape[1:]
        event_shape = tuple(int(d) for d in event_shape)
        d = math.prod(event_shape)
        means = _as_float64("means", means_in.reshape(k, -1), 2)
        if means.shape[1] != d:
            raise ValueError(
                f"means have {means.shape[1]} elements; event_shape {event_shape} has {d}."
            )
        covariances = _as_float64("covariances", covariances, 3)
        if covariances.shape != (k, d, d):
            raise ValueError(
                f"covariances must have shape (K, D, D) = {(k, d, d)}, got {covariances.shape}."
            )
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError("weights must be non-negative with a positive sum.")
        if not np.allclose(covariances, np.swapaxes(covariances, 1, 2), atol=1e-8, rtol=1e-6):
            raise ValueError("covariances must be symmetric; pass (C + C^T) / 2.")
        covariances = 0.5 * (covariances + np.swapaxes(covariances, 1, 2))
        eigenvalues, eigenvectors = np.linalg.eigh(covariances)
        if np.any(eigenvalues <= 0):
            bad = sorted(set(np.nonzero(eigenvalues <= 0)[0].tolist()))
            raise ValueError(
                f"covariances of components {bad} are not positive definite (smallest "
                f"eigenvalue {eigenvalues.min():.3g}); add a small multiple of the identity, "
                "e.g. C + 1e-4 * I."
            )
        super().__init__(
            schedule=VPSchedule() if schedule is None else schedule,
            event_shape=event_shape,
            num_steps=num_steps,
            sampler=sampler,
            spacing=spacing,
            batch_size=batch_size,
        )
        self.weights = weights / weights.sum()
        self.means = means
        self.covariances = covariances
        self._eigenvalues = eigenvalues
        self._eigenvectors = eigenvectors

    # ----- exact quantities -------------------------------------------------------------
    @property
    def num_components(self) -> int:
        return self.weights.shape[0]

    @property
    def dimension(self) -> int:
        return self.means.shape[1]

    @property
    def mean(self):
        """Exact mean, shape `event_shape` (float64 numpy)."""
        return (self.weights @ self.means).reshape(self.event_shape)

    @property
    def covariance_matrix(self):
        """Exact covariance of the flattened sample, `(D, D)` (float64 numpy)."""
        m = self.weights @ self.means
        second = np.einsum("k,kij->ij", self.weights, self.covariances)
        second += np.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        return second - np.outer(m, m)

    @property
    def variance(self):
        """Exact pixelwise variance, shape `event_shape` (float64 numpy)."""
        return np.diag(self.covariance_matrix).reshape(self.event_shape)

    @property
    def second_moment(self):
        """Exact `E[x^2]` elementwise, shape `event_shape` (float64 numpy)."""
        return self.variance + self.mean**2

    def diffused_moments(self, t):
        """Exact mean and covariance `(D,), (D, D)` of `x_t` (float64 numpy)."""
        a = float(self.schedule.alpha(t))
        s = float(self.schedule.sigma(t))
        return a * (self.weights @ self.means), a**2 * self.covariance_matrix + s**2 * np.eye(
            self.dimension
        )

    def score_model(self, *, negligible_weight: float = NEGLIGIBLE_WEIGHT):
        """The exact diffused score as a `GaussianMixtureScoreModel`. Components of
        normalised weight below `negligible_weight` (default 1e-20; 0 keeps all) are left out,
        and low-rank-plus-isotropic covariances are kept in their `O(K D r)` form
        (`low_rank_split`)."""
        dtype = jnp.zeros(()).dtype
        keep = self.weights >= negligible_weight * self.weights.max()
        lam, vec, iso = low_rank_split(self._eigenvalues[keep], self._eigenvectors[keep])
        with np.errstate(divide="ignore"):
            log_weights = np.log(self.weights[keep])
        return GaussianMixtureScoreModel(
            log_weights=jnp.asarray(log_weights, dtype),
            means=jnp.asarray(self.means[keep], dtype),
            eigenvectors=jnp.asarray(vec, dtype),
            eigenvalues=jnp.asarray(lam, dtype),
            schedule=self.schedule,
            event_shape=self.event_shape,
            isotropic=None if iso is None else jnp.asarray(iso, dtype),
        )

    def log_prob(self, value):
        model = self.score_model(negligible_weight=0.0)  # exact far from the heavy components
        flat = jnp.reshape(value, (-1, *self.event_shape))
        out = jax.vmap(lambda x: model.log_density(x, 0.0))(flat)
        return out.reshape(jnp.shape(value)[: jnp.ndim(value) - len(self.event_shape)])

    def sample(self, key, sample_shape=()):
        """Exact draws, shape `sample_shape + event_shape`."""
        n = math.prod(sample_shape)
        dtype = jnp.zeros(()).dtype
        k_comp, k_noise = jr.split(key)
        comp = jr.choice(k_comp, self.num_components, (n,), p=jnp.asarray(self.weights, dtype))
        scale = np.einsum("kij,kj->kij", self._eigenvectors, np.sqrt(self._eigenvalues))
        z = jr.normal(k_noise, (n, self.dimension), dtype)
        x = jnp.asarray(self.means, dtype)[comp] + jnp.einsum(
            "nij,nj->ni", jnp.asarray(scale, dtype)[comp], z
        )
        return x.reshape(tuple(sample_shape) + self.event_shape)

    # ----- conditioning -------------------------------------------------------------------
    def posterior(self, matrix, observation, noise_std, offset=None) -> GaussianMixturePrior:
        """Exact posterior under `y = A x + b + noise_std * n`, `n ~ N(0, I)`.

        Args:
            matrix: `A`, shape `(m, D)` acting on the flattened sample.
            observation: `y`, shape `(m,)`.
            noise_std: scalar or `(m,)` standard deviations (> 0).
            offset: `b`, shape `(m,)` (default 0).

        Per component, with `S_k = A Sigma_k A^T + R` and `K_k = Sigma_k A^T S_k^{-1}`:
        `mu_k' = mu_k + K_k (y - A mu_k - b)`, `Sigma_k' = Sigma_k - K_k A Sigma_k`,
        `w_k' ~ w_k N(y; A mu_k + b, S_k)`. Returns a `GaussianMixturePrior` with the same
        schedule and event shape (its score is the exact posterior's diffused score).
        """
        a = _as_float64("matrix", matrix, 2)
        y = _as_float64("observation", np.reshape(observation, (-1,)), 1)
        m, d = a.shape
        if d != self.dimension:
            raise ValueError(f"matrix has {d} columns, the prior has dimension {self.dimension}.")
        if y.shape != (m,):
            raise ValueError(f"observation has shape {y.shape}, the matrix needs ({m},).")
        std = np.broadcast_to(np.asarray(noise_std, np.float64), (m,))
        if np.any(~np.isfinite(std)) or np.any(std <= 0):
            raise ValueError("noise_std must be positive and finite.")
        b = np.zeros(m) if offset is None else _as_float64("offset", np.reshape(offset, (-1,)), 1)
        noise_cov = np.diag(std**2)
        log_w, means, covs = [], [], []
        for k in range(self.num_components):
            sig = self.covariances[k]
            s = a @ sig @ a.T + noise_cov
            s = 0.5 * (s + s.T)
            chol = np.linalg.cholesky(s)
            resid = y - a @ self.means[k] - b
            gain = np.linalg.solve(s, a @ sig).T  # Sigma A^T S^{-1}
            means.append(self.means[k] + gain @ resid)
            cov = sig - gain @ a @ sig
            covs.append(0.5 * (cov + cov.T))
            white = np.linalg.solve(chol, resid)
            log_w.append(math.log(self.weights[k]) if self.weights[k] > 0 else -np.inf)
            log_w[-1] += (
                -0.5 * white @ white - np.log(np.diag(chol)).sum() - 0.5 * m * math.log(2 * math.pi)
            )
        log_w = np.asarray(log_w)
        weights = np.exp(log_w - log_w.max())
        covs = np.stack(covs)
        # Conditioning can leave eigenvalues at round-off level; keep the factorisation valid.
        lam, vec = np.linalg.eigh(covs)
        floor = 1e-12 * np.maximum(lam.max(axis=1, keepdims=True), 1e-300)
        lam = np.maximum(lam, floor)
        covs = np.einsum("kij,kj,klj->kil", vec, lam, vec)
        return GaussianMixturePrior(
            weights,
            np.stack(means),
            covs,
            schedule=self.schedule,
            event_shape=self.event_shape,
            num_steps=self.num_steps,
            sampler=self.sampler,
            spacing=self.spacing,
            batch_size=self.batch_size,
        )

    @classmethod
    def fit(
        cls,
        data,
        num_components: int,
        *,
        rank: int | None = None,
        regularization: float = 1e-4,
        event_shape=None,
        seed: int = 0,
        **kwargs,
    ) -> GaussianMixturePrior:
        """Fit a mixture to `data` of shape `(n, *event_shape)` by EM (scikit-learn).

        `rank` truncates each covariance to its top `rank` eigenpairs before adding
        `regularization * I`: sharp, low-rank components like those of real image priors
        (DESIGN.md, "Where MLMC pays"). Remaining keyword arguments go to the constructor.
        """
        from sklearn.mixture import GaussianMixture

        data = np.asarray(data, dtype=np.float64)
        if data.ndim < 2:
            raise ValueError(f"data must have shape (n, *event_shape), got {data.shape}.")
        if event_shape is None:
            event_shape = data.shape[1:]
        flat = data.reshape(data.shape[0], -1)
        if not isinstance(num_components, int) or num_components < 1:
            raise ValueError(f"num_components must be a positive int, got {num_components!r}.")
        if flat.shape[0] < num_components:
            raise ValueError(f"{flat.shape[0]} data points cannot fit {num_components} components.")
        gm = GaussianMixture(
            num_components, covariance_type="full", reg_covar=regularization, random_state=seed
        ).fit(flat)
        covs = gm.covariances_
        if rank is not None:
            lam, vec = np.linalg.eigh(covs)
            lam = lam[:, ::-1][:, :rank]
            vec = vec[:, :, ::-1][:, :, :rank]
            covs = np.einsum("kij,kj,klj->kil", vec, lam, vec) + regularization * np.eye(
                flat.shape[1]
            )
        return cls(gm.weights_, gm.means_, covs, event_shape=event_shape, **kwargs)

    def __repr__(self):
        return (
            f"GaussianMixturePrior(num_components={self.num_components}, "
            f"event_shape={self.event_shape}, schedule={self.schedule})"
        )
