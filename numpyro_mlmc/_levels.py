"""The level-sampler protocol: what the MLMC engine needs from any multilevel problem.

A *level sampler* produces approximations `P_l` of a random quantity, indexed by a level `l`
(for diffusion: `refinement**l` reverse steps), and, for `l > l_min`, a *coupled* pair
`(P_l, P_{l-1})` drawn from one source of randomness so that `Var[P_l - P_{l-1}]` is small.
Diffusion posteriors are one implementation (`DiffusionPosterior.level_sampler`); SDEs with
known expectations are another, which is how the engine is tested apart from diffusion.

Protocol (duck-typed; `typing.Protocol` for documentation and `isinstance` checks):

* `refinement: int` - the factor `M` between levels.
* `cost(level, coupled) -> int` - network function evaluations (or another cost unit) of one
  draw at `level`: the fine path plus, when `coupled`, the coarse path.
* `sample(keys, level, coupled) -> (fine, coarse)` - `keys` is a batch of `B` PRNG keys (one
  per draw, shape `(B,)` of typed keys or `(B, 2)` raw); `fine` is a dict `site -> array of
  shape (B, *site_shape)`; `coarse` is the same for level `l - 1` when `coupled`, else `None`.
  Draw `i` must depend on `keys[i]` only.

Objects that need data first (a posterior needs its observation) expose
`level_sampler(model_args, model_kwargs, *, refinement) -> LevelSampler` instead.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["LevelSampler", "as_level_sampler"]


@runtime_checkable
class LevelSampler(Protocol):
    refinement: int

    def cost(self, level: int, coupled: bool) -> int: ...

    def sample(self, keys: Any, level: int, coupled: bool) -> tuple[dict, dict | None]: ...


def as_level_sampler(obj, model_args=(), model_kwargs=None, *, refinement: int = 2):
    """`obj` itself if it is a `LevelSampler`, else `obj.level_sampler(...)` bound to data."""
    if hasattr(obj, "level_sampler"):
        return obj.level_sampler(tuple(model_args), dict(model_kwargs or {}), refinement=refinement)
    if isinstance(obj, LevelSampler):
        if model_args or model_kwargs:
            raise TypeError(
                f"{type(obj).__name__} takes no model arguments, got {model_args!r} and "
                f"{model_kwargs!r}."
            )
        if obj.refinement != refinement:
            raise ValueError(
                f"the level sampler has refinement {obj.refinement}, but {refinement} was asked "
                "for; pass refinement equal to the sampler's."
            )
        return obj
    raise TypeError(
        f"{obj!r} is not a level sampler: pass nm.DiffusionPosterior(...) or an object with "
        "`refinement`, `cost(level, coupled)` and `sample(keys, level, coupled)`."
    )
