"""`mlmc_test`: the convergence diagnostic of Giles' `mlmc_test.m` (Acta Numerica 2015, sec. 4).

Fixed `N` draws on every level `l0 .. L` give per-level means and variances of `P_l` and
`Y_l = P_l - P_{l-1}`, the kurtosis of `Y_l`, the consistency check, and rates alpha, beta,
gamma fitted over all correction levels. Optionally MLMC is then run at several `rmse` values
for the `N_l` and cost panels.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ._allocation import fit_rate
from ._mlmc import KURTOSIS_WARNING, MLMC
from ._result import MLMCResult

__all__ = ["MLMCTestResult", "mlmc_test"]


class MLMCTestResult:
    """What `mlmc_test` returns.

    Attributes:
        result: the fixed-`N` `MLMCResult` (its `level_tables` hold every quantity's table).
        table: pandas DataFrame of the first (or chosen) quantity.
        alpha, beta, gamma: rates fitted over levels `l0 + 1 .. L` (no decay guard: this is the
            raw diagnostic).
        warnings: the findings (large kurtosis, failing consistency checks).
        runs: `rmse -> MLMCResult` for each requested accuracy.
    """

    def __init__(self, result: MLMCResult, quantity, alpha, beta, gamma, findings, runs):
        self.result = result
        self.quantity = quantity
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.warnings = tuple(findings)
        self.runs = runs

    @property
    def table(self):
        return self.result.level_tables[self.quantity].to_dataframe()

    def summary(self) -> str:
        lines = [
            f"mlmc_test: quantity {self.quantity!r}, levels {self.result.coarsest_level}.."
            f"{self.result.finest_level}",
            self.table.to_string(float_format=lambda v: f"{v:.4g}"),
            f"alpha {self.alpha:.3g}, beta {self.beta:.3g}, gamma {self.gamma:.3g}",
        ]
        for eps, run in self.runs.items():
            lines.append(
                f"rmse {eps:g}: levels {run.coarsest_level}..{run.finest_level}, cost "
                f"{run.cost:,}, plain MC ~{run.mc_cost_estimate:,} "
                f"({run.mc_cost_estimate / max(run.cost, 1):.2f}x)"
            )
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def plot(self, axes=None):
        """Giles' four panels: log_M variance and log_M |mean| of `P_l` and `Y_l` against `l`;
        `N_l` against `l` for each `rmse`; `eps^2 cost` against `eps` for MLMC and plain MC."""
        import matplotlib.pyplot as plt

        table = self.result.level_tables[self.quantity]
        if axes is None:
            fig, axes = plt.subplots(2, 2, figsize=(9, 7))
        else:
            fig = np.ravel(axes)[0].figure
        ax = np.ravel(axes)
        base = math.log(self.result.refinement)
        lev = table.level

        def logm(v):
            v = np.asarray(v, np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(v > 0, np.log(v) / base, np.nan)

        ax[0].plot(lev, logm(table.fine_variance), "o--", label="$P_l$")
        ax[0].plot(lev[1:], logm(table.variance[1:]), "o-", label="$P_l - P_{l-1}$")
        ax[0].set(xlabel="level $l$", ylabel=r"$\log_M$ variance", title=self.quantity)
        ax[0].legend()
        ax[1].plot(lev, logm(table.fine_mean_abs), "o--", label="$P_l$")
        ax[1].plot(lev[1:], logm(table.mean_abs[1:]), "o-", label="$P_l - P_{l-1}$")
        ax[1].set(xlabel="level $l$", ylabel=r"$\log_M |\mathrm{mean}|$")
        ax[1].legend()
        eps_list = sorted(self.runs)
        for eps in eps_list:
            t = self.runs[eps].level_tables[self.runs[eps].governing]
            ax[2].semilogy(t.level, t.samples, "o-", label=f"eps = {eps:g}")
        ax[2].set(xlabel="level $l$", ylabel="$N_l$")
        if eps_list:
            ax[2].legend()
            e = np.array(eps_list)
            ax[3].loglog(e, [x**2 * self.runs[x].cost for x in eps_list], "o-", label="MLMC")
            ax[3].loglog(
                e, [x**2 * self.runs[x].mc_cost_estimate for x in eps_list], "s--", label="MC"
            )
            ax[3].legend()
        ax[3].set(xlabel="eps", ylabel=r"$\epsilon^2$ cost")
        fig.tight_layout()
        return fig


def mlmc_test(
    sampler,
    key,
    *model_args,
    num_samples: int = 2000,
    max_level: int = 6,
    min_level: int = 0,
    rmse_values=(),
    functionals=None,
    quantity: str | None = None,
    refinement: int = 2,
    theta: float = 0.5,
    batch_size: int = 512,
    progress_bar: bool = False,
    **model_kwargs,
) -> MLMCTestResult:
    """Run `num_samples` draws on every level `min_level .. max_level` and report.

    Warns (`RuntimeWarning`) when the kurtosis of `Y_l` exceeds 100 (variance estimates from
    few samples are then unreliable) and when the consistency check fails (statistic > 1: the
    coarse path of level `l` differs in mean from the fine path of level `l - 1`, at familywise
    false-alarm rate 1% per level over the elements).

    `rmse_values`: for each, an adaptive `MLMC` run (with `min_level` fixed) for the `N_l` and
    cost panels. `quantity` picks the table (default: the first functional).
    """
    if max_level < min_level:
        raise ValueError(f"max_level ({max_level}) must be >= min_level ({min_level}).")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}.")
    engine = MLMC(
        sampler,
        refinement=refinement,
        min_level=min_level,
        max_level=max_level,
        theta=theta,
        batch_size=batch_size,
    )
    result = engine.run(
        key,
        *model_args,
        num_samples=[num_samples] * (max_level - min_level + 1),
        functionals=functionals,
        progress_bar=progress_bar,
        **model_kwargs,
    )
    name = quantity if quantity is not None else next(iter(result.level_tables))
    if name not in result.level_tables:
        raise KeyError(f"no quantity {name!r}; available: {sorted(result.level_tables)}.")
    table = result.level_tables[name]
    alpha = beta = gamma = float("nan")
    if table.level.size >= 3:
        alpha = fit_rate(table.level[1:], table.mean_abs[1:], refinement)
        beta = fit_rate(table.level[1:], table.variance[1:], refinement)
        gamma = -fit_rate(table.level[1:], table.cost_per_sample[1:], refinement)
    findings = []
    for qname, t in result.level_tables.items():
        for lev, kurt, cons in zip(t.level, t.kurtosis, t.consistency, strict=True):
            if np.isfinite(kurt) and kurt > KURTOSIS_WARNING:
                findings.append(
                    f"{qname}: kurtosis {kurt:.3g} at level {lev} exceeds {KURTOSIS_WARNING:g};"
                    " variance estimates there are unreliable."
                )
            if np.isfinite(cons) and cons > 1:
                findings.append(
                    f"{qname}: consistency check fails at level {lev} (statistic {cons:.3g} > 1)"
                    "; the coarse path of this level does not match the fine path below it."
                )
    for msg in findings:
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    runs = {}
    for i, eps in enumerate(rmse_values):
        import jax.random as jr

        runs[float(eps)] = engine.run(
            jr.fold_in(key, 1_000_003 + i),
            *model_args,
            rmse=eps,
            functionals=functionals,
            progress_bar=progress_bar,
            **model_kwargs,
        )
    return MLMCTestResult(result, name, alpha, beta, gamma, findings, runs)
