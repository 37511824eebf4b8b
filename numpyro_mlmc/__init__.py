"""numpyro-mlmc: pretrained diffusion models as priors in NumPyro models, with posterior
expectations to a requested accuracy by Multilevel Monte Carlo (Haji-Ali, Pereyra, Shaw and
Zygalakis, arXiv 2409.15511)."""

from . import nets, operators, testing
from ._diagnostics import MLMCTestResult, mlmc_test
from ._diffusers import (
    DiffusersDenoiser,
    DiffusersUNet2D,
    DiscreteVPSchedule,
    load_diffusers_unet,
    schedule_from_diffusers,
)
from ._diffusion import DiffusionLevelSampler, ReverseDiffusion
from ._distributed import initialize_distributed
from ._gmm import GaussianMixturePrior, GaussianMixtureScoreModel
from ._kernel import DiffusionPosterior, DiffusionPosteriorState, sample_posterior
from ._levels import LevelSampler
from ._mlmc import MLMC, MonteCarlo
from ._pretrained import list_pretrained
from ._priors import AbstractDiffusionPrior, DiffusionPrior
from ._result import MLMCResult
from ._run_checkpoint import RunCheckpointError
from ._schedules import AbstractSchedule, CosineVPSchedule, VESchedule, VPSchedule, time_grid
from ._score_models import AbstractScoreModel, NetworkScoreModel
from ._solvers import (
    DDIM,
    AbstractReverseSampler,
    Ancestral,
    EulerMaruyama,
    Heun,
    coupled_reverse_paths,
    reverse_path,
)

__version__ = "0.1.0"

__all__ = [
    "list_pretrained",
    "initialize_distributed",
    "nets",
    "MLMC",
    "MLMCResult",
    "MLMCTestResult",
    "MonteCarlo",
    "RunCheckpointError",
    "mlmc_test",
    "testing",
    "AbstractDiffusionPrior",
    "AbstractReverseSampler",
    "AbstractSchedule",
    "AbstractScoreModel",
    "Ancestral",
    "CosineVPSchedule",
    "DDIM",
    "DiffusersDenoiser",
    "DiffusersUNet2D",
    "DiscreteVPSchedule",
    "DiffusionLevelSampler",
    "DiffusionPosterior",
    "DiffusionPosteriorState",
    "DiffusionPrior",
    "EulerMaruyama",
    "GaussianMixturePrior",
    "GaussianMixtureScoreModel",
    "Heun",
    "LevelSampler",
    "NetworkScoreModel",
    "ReverseDiffusion",
    "VESchedule",
    "VPSchedule",
    "coupled_reverse_paths",
    "load_diffusers_unet",
    "operators",
    "sample_posterior",
    "reverse_path",
    "schedule_from_diffusers",
    "time_grid",
]
