"""`MLMCResult`: estimates, their errors, the per-level table, plots and ArviZ export."""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np

__all__ = ["LevelStatistics", "MLMCResult"]


class LevelStatistics(NamedTuple):
    """Per-level statistics of one estimated quantity (arrays over levels `l0 .. L`).

    `variance` is `V_l`, the element-averaged variance of `Y_l = P_l - P_{l-1}`; `mean_abs` the
    element-RMS of `E Y_l` with the noisy-norm bias removed; `fine_variance` and
    `fine_mean_abs` the same for `P_l`; `cost_per_sample` `C_l` (fine plus coarse path);
    `kurtosis` of `Y_l` (sum of fourth central moments over sum of squared variances);
    `consistency` the statistic of `|E Pc_l - E Pf_{l-1}|` (above 1: the check fails).
    """

    level: np.ndarray
    num_steps: np.ndarray
    samples: np.ndarray
    cost_per_sample: np.ndarray
    variance: np.ndarray
    mean_abs: np.ndarray
    fine_variance: np.ndarray
    fine_mean_abs: np.ndarray
    kurtosis: np.ndarray
    consistency: np.ndarray

    def to_dataframe(self):
        import pandas as pd

        data = self._asdict()
        frame = pd.DataFrame(data).set_index("level")
        frame.insert(3, "cost", frame["samples"] * frame["cost_per_sample"])
        return frame


def _fmt(x, spec=".3g"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return format(x, spec)


class MLMCResult:
    """The outcome of `MLMC.run` or `MonteCarlo.run`.

    Attributes:
        estimates: name -> estimate (float64 numpy). Default names: `"{site}_mean"`,
            `"{site}_second_moment"`, `"{site}_variance"`.
        stderr: name -> elementwise standard error (square root of `sum_l V_l / N_l`; for the
            variance by the delta method).
        mean, variance: site -> arrays of the site's shape (default functionals only).
        rmse: the estimated RMSE, `sqrt(mean(stderr^2) + bias^2)`, largest over quantities
            (`rmse_estimates` per quantity). For `MonteCarlo` the bias is unknown and left out.
        bias_estimate: the largest bias remainder estimate (`bias_estimates` per quantity;
            nan where it could not be estimated).
        cost: total cost (NFEs for diffusion), including pilot draws that were not used.
        wall_time: seconds.
        levels: per-level table (pandas DataFrame) of the quantity that needs the most work;
            `level_tables[name]` has every quantity's.
        alpha, beta, gamma: fitted rates of that quantity (`alphas`, `betas` per quantity).
        mc_cost_estimate: predicted cost of plain MC at the finest level with the same variance
            budget, `V[P_L] C_L / (theta eps^2)` (largest over quantities).
        converged: False if the bias test still failed at `max_level`.

    No R-hat or ESS is reported: MLMC draws are independent by construction and an MLMC
    estimate is not an average of one chain.
    """

    def __init__(self, **fields):
        self.method = fields.pop("method")
        self.estimates = fields.pop("estimates")
        self.stderr = fields.pop("stderr")
        self.mean = fields.pop("mean")
        self.variance = fields.pop("variance")
        self.rmse_estimates = fields.pop("rmse_estimates")
        self.bias_estimates = fields.pop("bias_estimates")
        self.target_rmse = fields.pop("target_rmse")
        self.theta = fields.pop("theta")
        self.refinement = fields.pop("refinement")
        self.cost = fields.pop("cost")
        self.wasted_cost = fields.pop("wasted_cost")
        self.wall_time = fields.pop("wall_time")
        self.level_tables = fields.pop("level_tables")
        self.governing = fields.pop("governing")
        self.alphas = fields.pop("alphas")
        self.betas = fields.pop("betas")
        self.gamma = fields.pop("gamma")
        self.mc_cost_estimates = fields.pop("mc_cost_estimates")
        self.bias_test_passed = fields.pop("bias_test_passed")
        self.converged = fields.pop("converged")
        self.discarded = fields.pop("discarded")
        self.draws = fields.pop("draws")
        self.warnings = fields.pop("warnings")
        if fields:
            raise TypeError(f"unexpected fields {sorted(fields)}")

    # -- scalars -----------------------------------------------------------------------------
    @property
    def rmse(self) -> float:
        return max(self.rmse_estimates.values())

    @property
    def bias_estimate(self) -> float:
        finite = [b for b in self.bias_estimates.values() if math.isfinite(b)]
        return max(finite) if finite else float("nan")

    @property
    def alpha(self) -> float:
        return self.alphas[self.governing]

    @property
    def beta(self) -> float:
        return self.betas[self.governing]

    @property
    def mc_cost_estimate(self) -> int:
        return max(self.mc_cost_estimates.values())

    @property
    def levels(self):
        """Per-level table of the governing quantity (pandas DataFrame indexed by level)."""
        return self.level_tables[self.governing].to_dataframe()

    @property
    def finest_level(self) -> int:
        return int(self.level_tables[self.governing].level[-1])

    @property
    def coarsest_level(self) -> int:
        return int(self.level_tables[self.governing].level[0])

    # -- text ---------------------------------------------------------------------------------
    def summary(self) -> str:
        """A text report: settings, the per-level table, rates, errors and costs."""
        lines = [
            f"{self.method}: levels {self.coarsest_level}..{self.finest_level} "
            f"(refinement {self.refinement}), target rmse {_fmt(self.target_rmse)}, "
            f"theta {self.theta:g}",
            f"cost {self.cost:,} (of which {self.wasted_cost:,} in unused pilot draws), "
            f"wall time {self.wall_time:.2f} s; plain MC at the finest level would cost about "
            f"{self.mc_cost_estimate:,} ({_fmt(self.mc_cost_estimate / max(self.cost, 1))}x)",
            f"rates of {self.governing!r}: alpha {_fmt(self.alpha)}, beta {_fmt(self.beta)}, "
            f"gamma {_fmt(self.gamma)}",
            "",
            "level table (quantity " + repr(self.governing) + "):",
            self.levels.to_string(float_format=lambda v: f"{v:.4g}"),
            "",
            f"{'quantity':<28} {'est. rmse':>10} {'bias est.':>10} {'max stderr':>11} bias test",
        ]
        for name in self.estimates:
            passed = self.bias_test_passed.get(name)
            lines.append(
                f"{name:<28} {_fmt(self.rmse_estimates[name]):>10} "
                f"{_fmt(self.bias_estimates.get(name, float('nan'))):>10} "
                f"{_fmt(float(np.max(self.stderr[name]))):>11} "
                f"{'-' if passed is None else ('passed' if passed else 'FAILED')}"
            )
        if not self.converged:
            lines.append("WARNING: the bias test failed at max_level; raise max_level.")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)

    def __repr__(self):
        return (
            f"MLMCResult(method={self.method!r}, levels={self.coarsest_level}..{self.finest_level},"
            f" rmse={_fmt(self.rmse)}, cost={self.cost:,}, converged={self.converged})"
        )

    # -- plots --------------------------------------------------------------------------------
    def plot(self, quantity: str | None = None, axes=None):
        """The four standard MLMC panels (Giles 2015, Fig. 1) for one quantity: log_M variance
        of `P_l` and `Y_l`; log_M `|E P_l|` and `|E Y_l|`; `N_l`; and `eps^2 * cost` of this run
        against the predicted plain MC cost. Returns the matplotlib figure."""
        import matplotlib.pyplot as plt

        name = self.governing if quantity is None else quantity
        table = self.level_tables[name]
        if axes is None:
            fig, axes = plt.subplots(2, 2, figsize=(9, 7))
        else:
            fig = np.ravel(axes)[0].figure
        ax = np.ravel(axes)
        base = math.log(self.refinement)
        lev = table.level
        corr = slice(1, None)

        def logm(v):
            v = np.asarray(v, np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(v > 0, np.log(v) / base, np.nan)

        ax[0].plot(lev, logm(table.fine_variance), "o--", label="$P_l$")
        ax[0].plot(lev[corr], logm(table.variance[corr]), "o-", label="$P_l - P_{l-1}$")
        ax[0].set(xlabel="level $l$", ylabel=r"$\log_M$ variance", title=f"variance ({name})")
        ax[0].legend()
        ax[1].plot(lev, logm(table.fine_mean_abs), "o--", label="$P_l$")
        ax[1].plot(lev[corr], logm(table.mean_abs[corr]), "o-", label="$P_l - P_{l-1}$")
        ax[1].set(xlabel="level $l$", ylabel=r"$\log_M |\mathrm{mean}|$", title="mean")
        ax[1].legend()
        ax[2].semilogy(lev, table.samples, "o-", label=f"eps = {_fmt(self.target_rmse)}")
        ax[2].set(xlabel="level $l$", ylabel="$N_l$", title="samples per level")
        ax[2].legend()
        eps = self.target_rmse if self.target_rmse is not None else self.rmse
        ax[3].loglog([eps], [eps**2 * self.cost], "o", label=self.method)
        ax[3].loglog([eps], [eps**2 * self.mc_cost_estimate], "s", label="MC (predicted)")
        ax[3].set(xlabel="eps", ylabel=r"$\epsilon^2$ cost", title="cost")
        ax[3].legend()
        fig.tight_layout()
        return fig

    # -- ArviZ ----------------------------------------------------------------------------------
    def to_inference_data(self):
        """ArviZ `InferenceData`: a `posterior` group with the finest level's fine draws (up to
        `max_stored_draws`, dims `chain` (1) and `draw`), and an `mlmc` group with the
        estimates, standard errors, estimated RMSE and the level table. No R-hat or ESS: these
        draws are i.i.d. at the finest level and are not what the estimates average."""
        import arviz as az
        import xarray as xr

        posterior = {k: np.asarray(v)[None] for k, v in self.draws.items()}
        data_vars = {}
        for name, est in self.estimates.items():
            est = np.asarray(est)
            dims = [f"{name}_dim_{i}" for i in range(est.ndim)]
            data_vars[name] = (dims, est)
            data_vars[f"{name}_stderr"] = (dims, np.asarray(self.stderr[name]))
            data_vars[f"{name}_rmse"] = ((), self.rmse_estimates[name])
        table = self.level_tables[self.governing]
        for field, values in table._asdict().items():
            if field != "level":
                data_vars[f"level_{field}"] = (("level",), np.asarray(values))
        mlmc = xr.Dataset(
            data_vars,
            coords={"level": np.asarray(table.level)},
            attrs={
                "method": self.method,
                "target_rmse": float("nan") if self.target_rmse is None else self.target_rmse,
                "rmse": self.rmse,
                "cost": self.cost,
                "wall_time": self.wall_time,
                "alpha": self.alpha,
                "beta": self.beta,
                "gamma": self.gamma,
                "mc_cost_estimate": self.mc_cost_estimate,
                "governing_quantity": self.governing,
                "converged": int(self.converged),
            },
        )
        idata = az.from_dict(posterior=posterior) if posterior else az.InferenceData()
        with warnings.catch_warnings():
            # ArviZ warns that "mlmc" is not one of its schema's groups; that is the point.
            warnings.simplefilter("ignore", UserWarning)
            idata.add_groups({"mlmc": mlmc})
        return idata
