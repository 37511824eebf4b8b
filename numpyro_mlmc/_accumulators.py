"""Streaming central moments, float64 on the host, memory independent of the sample count.

Batches are merged with the pairwise update formulas of Chan, Golub and LeVeque (1979) extended
to third and fourth central moments by Pebay ("Formulas for robust, one-pass parallel
computation of covariances and arbitrary-order statistical moments", Sandia report
SAND2008-6212). Central moments are kept instead of raw power sums because raw sums of
`x^4` lose every significant digit when the mean is large against the spread.
"""

from __future__ import annotations

import numpy as np

__all__ = ["StreamingMoments", "StreamingCovariance", "LevelAccumulator"]


class StreamingMoments:
    """Elementwise count, mean and central sums `M_p = sum (x - mean)^p`, `p = 2..order`.

    Args:
        shape: shape of one observation.
        order: highest central moment kept (2 or 4).
    """

    def __init__(self, shape, order: int = 4):
        if order not in (2, 4):
            raise ValueError(f"order must be 2 or 4, got {order}.")
        self.shape = tuple(shape)
        self.order = order
        self.count = 0
        self.mean = np.zeros(self.shape)
        self.m2 = np.zeros(self.shape)
        self.m3 = np.zeros(self.shape) if order == 4 else None
        self.m4 = np.zeros(self.shape) if order == 4 else None

    def update(self, batch) -> None:
        """Merge a batch of shape `(n, *shape)`."""
        batch = np.asarray(batch, dtype=np.float64)
        nb = batch.shape[0]
        if nb == 0:
            return
        mean_b = batch.mean(axis=0)
        dev = batch - mean_b
        dev2 = dev * dev
        m2_b = dev2.sum(axis=0)
        if self.order == 4:
            m3_b = (dev2 * dev).sum(axis=0)
            m4_b = (dev2 * dev2).sum(axis=0)
        na = self.count
        if na == 0:
            self.count, self.mean, self.m2 = nb, mean_b, m2_b
            if self.order == 4:
                self.m3, self.m4 = m3_b, m4_b
            return
        n = na + nb
        delta = mean_b - self.mean
        new_mean = self.mean + delta * (nb / n)
        new_m2 = self.m2 + m2_b + delta**2 * (na * nb / n)
        if self.order == 4:
            new_m3 = (
                self.m3
                + m3_b
                + delta**3 * (na * nb * (na - nb) / n**2)
                + 3.0 * delta * (na * m2_b - nb * self.m2) / n
            )
            new_m4 = (
                self.m4
                + m4_b
                + delta**4 * (na * nb * (na * na - na * nb + nb * nb) / n**3)
                + 6.0 * delta**2 * (na * na * m2_b + nb * nb * self.m2) / n**2
                + 4.0 * delta * (na * m3_b - nb * self.m3) / n
            )
            self.m3, self.m4 = new_m3, new_m4
        self.count, self.mean, self.m2 = n, new_mean, new_m2

    @property
    def variance(self):
        """Unbiased elementwise variance (`ddof = 1`); zeros with fewer than two samples."""
        if self.count < 2:
            return np.zeros(self.shape)
        return self.m2 / (self.count - 1)

    @property
    def fourth_central_moment(self):
        """Elementwise `E (x - mean)^4` (plug-in)."""
        if self.order < 4 or self.count == 0:
            return np.full(self.shape, np.nan)
        return self.m4 / self.count


class StreamingCovariance:
    """Elementwise co-moment `sum (a - mean_a)(b - mean_b)` of two paired streams."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.count = 0
        self.mean_a = np.zeros(self.shape)
        self.mean_b = np.zeros(self.shape)
        self.comoment = np.zeros(self.shape)

    def update(self, a, b) -> None:
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        nb = a.shape[0]
        if nb == 0:
            return
        ma, mb = a.mean(axis=0), b.mean(axis=0)
        c_b = ((a - ma) * (b - mb)).sum(axis=0)
        na = self.count
        if na == 0:
            self.count, self.mean_a, self.mean_b, self.comoment = nb, ma, mb, c_b
            return
        n = na + nb
        da, db = ma - self.mean_a, mb - self.mean_b
        self.comoment = self.comoment + c_b + da * db * (na * nb / n)
        self.mean_a = self.mean_a + da * (nb / n)
        self.mean_b = self.mean_b + db * (nb / n)
        self.count = n

    @property
    def covariance(self):
        if self.count < 2:
            return np.zeros(self.shape)
        return self.comoment / (self.count - 1)


class LevelAccumulator:
    """All running sums of one level, for every functional.

    For each functional `f`: moments up to fourth order of the correction `Y_l = f(fine) -
    f(coarse)` (`Y = f(fine)` on the coarsest level) and of `P_l = f(fine)`, moments up to
    second order of `f(coarse)` (for the consistency check), and the co-moments of declared
    pairs `(f, g)` of `Y` and of `P` (used by derived quantities such as the variance).

    Args:
        shapes: dict `name -> shape` of each functional's value.
        coupled: whether this level's draws are (fine, coarse) pairs.
        pairs: list of `(name_a, name_b)` whose co-moments are kept.
    """

    def __init__(self, shapes: dict, coupled: bool, pairs=()):
        self.coupled = coupled
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.correction = {k: StreamingMoments(s, 4) for k, s in self.shapes.items()}
        self.fine = {k: StreamingMoments(s, 4) for k, s in self.shapes.items()}
        self.coarse = (
            {k: StreamingMoments(s, 2) for k, s in self.shapes.items()} if coupled else None
        )
        self.pairs = tuple(tuple(p) for p in pairs)
        self.correction_cross = {p: StreamingCovariance(self.shapes[p[0]]) for p in self.pairs}
        self.fine_cross = {p: StreamingCovariance(self.shapes[p[0]]) for p in self.pairs}
        self.count = 0

    def update(self, fine: dict, coarse: dict | None) -> None:
        """Merge a batch: `fine[name]` (and `coarse[name]`) of shape `(n, *shape)`."""
        corrections = {}
        n = None
        for name in self.shapes:
            f = np.asarray(fine[name], dtype=np.float64)
            n = f.shape[0]
            if self.coupled:
                c = np.asarray(coarse[name], dtype=np.float64)
                self.coarse[name].update(c)
                y = f - c
            else:
                y = f
            corrections[name] = y
            self.correction[name].update(y)
            self.fine[name].update(f)
        for a, b in self.pairs:
            self.correction_cross[(a, b)].update(corrections[a], corrections[b])
            self.fine_cross[(a, b)].update(fine[a], fine[b])
        if n is not None:
            self.count += n
