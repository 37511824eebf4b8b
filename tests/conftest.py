"""Test configuration: strict JAX, fixed keys, a stated false-alarm budget.

Statistical tests compare Monte Carlo estimates with exact answers (Gaussian mixtures) using
thresholds in standard errors. Each moment check is Bonferroni-corrected over its elements so
that it fails by chance with probability <= 1e-3 (`tests/helpers.py`), each KS test uses
p > 1e-4, and the suite makes fewer than 50 moment checks and 200 KS tests: a false-alarm
budget below 7% for the whole suite. With the fixed keys used here every run is deterministic;
a failure is a bug to find, not a seed to change.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
jax.config.update("jax_numpy_rank_promotion", "raise")
