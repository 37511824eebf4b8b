"""Level samplers with known answers, for testing MLMC estimators apart from diffusion."""

from ._sde import GeometricBrownianMotion

__all__ = ["GeometricBrownianMotion"]
