"""Equinox networks for diffusion priors: `UNet` for images, `MLPScoreNet` for vectors.

Both act on **one** sample, `net(x, t) -> array of x's shape`, and plug into
`nm.DiffusionPrior(net, ...)` directly. `config()` returns the constructor arguments that
rebuild the architecture (what a checkpoint's `config.json` stores).
"""

from ._mlp import MLPScoreNet
from ._unet import UNet

__all__ = ["MLPScoreNet", "UNet"]

# Architectures a checkpoint may name; loading builds only these (never arbitrary classes).
ARCHITECTURES = {"UNet": UNet, "MLPScoreNet": MLPScoreNet}
