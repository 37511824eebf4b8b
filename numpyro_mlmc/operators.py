"""Linear forward operators for imaging inverse problems.

Each operator is an `equinox.Module` (its arrays are traced under `jit`) mapping an image `x` of
shape `(*batch, *image_shape)` to an observation `A x` of shape `(*batch, *output_shape)`; any
leading batch axes are carried through. `transpose(y)` applies the adjoint `A^T`. All are linear,
differentiable with JAX and safe under `jit`, `vmap` and `grad`.

| operator | `A x` | output shape |
|---|---|---|
| `Identity()` | `x` | image shape |
| `Inpaint(mask)` | the pixels where `mask` is True, flattened | `(mask.sum(),)` |
| `Blur(kernel, boundary)` | convolution with `kernel` over the last two axes (FFT) | image shape |
| `Downsample(factor)` | average pooling over the last two axes | `(..., H / f, W / f)` |
| `Project(matrix)` | `matrix @ x.ravel()` | `(m,)` |
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["AbstractOperator", "Identity", "Inpaint", "Blur", "Downsample", "Project"]


class AbstractOperator(eqx.Module):
    """A linear map `x -> A x` on images of a fixed shape, with its adjoint."""

    @abc.abstractmethod
    def __call__(self, x):
        """`A x`, for `x` of shape `(*batch, *image_shape)`."""

    def transpose(self, y):
        """`A^T y` (the adjoint), for `y` of shape `(*batch, *output_shape)`.

        The default differentiates `A` (exact for linear maps); subclasses override it with a
        closed form where one is cheaper."""
        raise NotImplementedError

    def _vjp_transpose(self, y, image_shape):
        batch = y.shape[: y.ndim - len(self.output_shape(image_shape))]
        x0 = jnp.zeros((*batch, *image_shape), y.dtype)
        _, vjp = jax.vjp(self, x0)
        return vjp(y)[0]

    @abc.abstractmethod
    def output_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of `A x` for one image of `image_shape`."""


def _check_ndim(x, ndim, name):
    if jnp.ndim(x) < ndim:
        raise ValueError(f"{name} expects inputs with at least {ndim} axes, got shape {x.shape}.")


class Identity(AbstractOperator):
    """`A = I`: denoising problems."""

    def __call__(self, x):
        return x

    def transpose(self, y):
        return y

    def output_shape(self, image_shape):
        return tuple(image_shape)


class Inpaint(AbstractOperator):
    """Observe the pixels where `mask` is True: `A x = x[mask]` (flattened, row-major order).

    Args:
        mask: boolean array of the image shape (the event shape of the prior).
    """

    indices: jax.Array
    mask_shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, mask):
        mask = np.asarray(mask)
        if mask.dtype != bool:
            if not np.all((mask == 0) | (mask == 1)):
                raise ValueError(
                    "Inpaint mask must be boolean (or 0/1): True marks observed pixels."
                )
            mask = mask.astype(bool)
        if not mask.any():
            raise ValueError("Inpaint mask observes no pixel; set at least one entry to True.")
        self.mask_shape = tuple(mask.shape)
        self.indices = jnp.asarray(np.flatnonzero(mask.reshape(-1)))

    @property
    def mask(self) -> np.ndarray:
        """The boolean mask (True where observed), of the image shape."""
        out = np.zeros(int(np.prod(self.mask_shape)), bool)
        out[np.asarray(self.indices)] = True
        return out.reshape(self.mask_shape)

    def __call__(self, x):
        nd = len(self.mask_shape)
        _check_ndim(x, nd, "Inpaint")
        if x.shape[x.ndim - nd :] != self.mask_shape:
            raise ValueError(
                f"Inpaint mask has shape {self.mask_shape} but the image has trailing shape "
                f"{x.shape[x.ndim - nd :]}; build the mask with the image's shape."
            )
        flat = x.reshape(*x.shape[: x.ndim - nd], -1)
        return flat[..., self.indices]

    def transpose(self, y):
        size = int(np.prod(self.mask_shape))
        out = jnp.zeros((*y.shape[:-1], size), y.dtype).at[..., self.indices].set(y)
        return out.reshape(*y.shape[:-1], *self.mask_shape)

    def output_shape(self, image_shape):
        return (int(self.indices.shape[0]),)


class Blur(AbstractOperator):
    """Convolution with a small kernel over the last two axes, computed by FFT.

    Args:
        kernel: `(kh, kw)` array, centred at `(kh // 2, kw // 2)` (odd sizes recommended).
        boundary: `"periodic"` (circular convolution) or `"reflect"` (the image is extended by
            mirror reflection, convolved, and cropped; the adjoint is taken exactly by `vjp`).
    """

    kernel: jax.Array
    boundary: str = eqx.field(static=True, default="periodic")

    def __init__(self, kernel, boundary: str = "periodic"):
        kernel = jnp.asarray(kernel)
        if kernel.ndim != 2:
            raise ValueError(f"Blur kernel must be 2-D (kh, kw), got shape {kernel.shape}.")
        if not isinstance(kernel, jax.core.Tracer) and not np.all(np.isfinite(kernel)):
            raise ValueError("Blur kernel contains NaN or inf; pass finite weights.")
        if boundary not in ("periodic", "reflect"):
            raise ValueError(f"boundary must be 'periodic' or 'reflect', got {boundary!r}.")
        self.kernel = kernel
        self.boundary = boundary

    @staticmethod
    def gaussian(size: int, width: float, boundary: str = "periodic") -> Blur:
        """A normalised Gaussian kernel of `size x size` pixels and standard deviation `width`."""
        r = np.arange(size) - (size - 1) / 2
        k = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2) / width**2)
        return Blur(k / k.sum(), boundary)

    def _transfer(self, h, w, dtype):
        kh, kw = self.kernel.shape
        if kh > h or kw > w:
            raise ValueError(
                f"Blur kernel {self.kernel.shape} is larger than the image ({h}, {w})."
            )
        padded = jnp.zeros((h, w), dtype).at[:kh, :kw].set(self.kernel.astype(dtype))
        padded = jnp.roll(padded, (-(kh // 2), -(kw // 2)), axis=(0, 1))
        return jnp.fft.rfft2(padded)

    def _periodic(self, x, adjoint=False):
        h, w = x.shape[-2:]
        transfer = self._transfer(h, w, x.dtype)
        if adjoint:
            transfer = jnp.conj(transfer)
        transfer = transfer.reshape((1,) * (x.ndim - 2) + transfer.shape)
        return jnp.fft.irfft2(jnp.fft.rfft2(x) * transfer, s=(h, w)).astype(x.dtype)

    def __call__(self, x):
        _check_ndim(x, 2, "Blur")
        if self.boundary == "periodic":
            return self._periodic(x)
        kh, kw = self.kernel.shape
        ph, pw = kh // 2, kw // 2
        pad = [(0, 0)] * (x.ndim - 2) + [(ph, ph), (pw, pw)]
        big = jnp.pad(x, pad, mode="reflect" if min(x.shape[-2:]) > max(ph, pw) else "symmetric")
        out = self._periodic(big)
        return out[..., ph : ph + x.shape[-2], pw : pw + x.shape[-1]]

    def transpose(self, y):
        if self.boundary == "periodic":
            return self._periodic(y, adjoint=True)
        return self._vjp_transpose(y, y.shape[-2:])

    def output_shape(self, image_shape):
        return tuple(image_shape)


class Downsample(AbstractOperator):
    """Average pooling by `factor` over the last two axes (super-resolution).

    `(..., H, W) -> (..., H / f, W / f)`; `H` and `W` must be multiples of `f`.
    """

    factor: int = eqx.field(static=True)

    def __init__(self, factor: int):
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
            raise ValueError(f"Downsample factor must be a positive int, got {factor!r}.")
        self.factor = int(factor)

    def __call__(self, x):
        _check_ndim(x, 2, "Downsample")
        f = self.factor
        h, w = x.shape[-2:]
        if h % f or w % f:
            raise ValueError(
                f"image size ({h}, {w}) is not a multiple of the downsampling factor {f}."
            )
        x = x.reshape(*x.shape[:-2], h // f, f, w // f, f)
        return x.mean(axis=(-3, -1))

    def transpose(self, y):
        f = self.factor
        up = jnp.repeat(jnp.repeat(y, f, axis=-2), f, axis=-1)
        return up / (f * f)

    def output_shape(self, image_shape):
        *lead, h, w = image_shape
        return (*lead, h // self.factor, w // self.factor)


class Project(AbstractOperator):
    """A dense matrix acting on the flattened image: `A x = matrix @ x.ravel()`.

    Args:
        matrix: `(m, D)` with `D` the number of image elements.
        image_shape: the image shape (default `(D,)`).
    """

    matrix: jax.Array
    image_shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, matrix, image_shape=None):
        matrix = jnp.asarray(matrix)
        if matrix.ndim != 2:
            raise ValueError(f"Project matrix must be 2-D (m, D), got shape {matrix.shape}.")
        if not isinstance(matrix, jax.core.Tracer) and not np.all(np.isfinite(matrix)):
            raise ValueError("Project matrix contains NaN or inf; pass finite entries.")
        self.matrix = matrix
        self.image_shape = (matrix.shape[1],) if image_shape is None else tuple(image_shape)
        if int(np.prod(self.image_shape)) != matrix.shape[1]:
            raise ValueError(
                f"Project matrix has {matrix.shape[1]} columns but image_shape "
                f"{self.image_shape} has {int(np.prod(self.image_shape))} elements."
            )

    def __call__(self, x):
        nd = len(self.image_shape)
        if x.shape[x.ndim - nd :] != self.image_shape:
            raise ValueError(
                f"Project expects images of shape {self.image_shape}, got trailing shape "
                f"{x.shape[x.ndim - nd :]}."
            )
        flat = x.reshape(*x.shape[: x.ndim - nd], -1)
        return flat @ self.matrix.T.astype(flat.dtype)

    def transpose(self, y):
        out = y @ self.matrix.astype(y.dtype)
        return out.reshape(*y.shape[:-1], *self.image_shape)

    def output_shape(self, image_shape):
        return (self.matrix.shape[0],)
