"""Import of Hugging Face diffusers `UNet2DModel` checkpoints into JAX (private package)."""

from ._loader import DiffusersDenoiser, load_diffusers_unet, prior_from_diffusers
from ._scheduler import DiscreteVPSchedule, schedule_from_diffusers
from ._unet import DiffusersUNet2D

__all__ = [
    "DiffusersDenoiser",
    "DiffusersUNet2D",
    "DiscreteVPSchedule",
    "load_diffusers_unet",
    "prior_from_diffusers",
    "schedule_from_diffusers",
]
