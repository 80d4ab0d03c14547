""":class:`Model`: the value that flows through jaxft — structure, variables, metadata and history."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp

from jaxft import paths
from jaxft.models.layers import Layers
from jaxft.models.network import Network
from jaxft.models.spec import ModelSpec

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Model:
  """An immutable (structure, variables) pair plus what is needed to use and reproduce it.

  Attributes:
    spec: the structure; ``Network(spec)`` is the flax module.
    variables: ``{'params': …, 'batch_stats': …}`` as plain nested dicts of arrays. Never mutated by
      jaxft: every transform returns a new ``Model`` and shares the leaves it does not change.
    meta: plain data — ``arch`` (zoo name of the base model), ``mean``/``std``/``input_size`` for
      preprocessing, ``source`` (file name and sha256 of the converted weights), …
    history: the evolution log, one JSON-serialisable record per surgery op, oldest first; replaying it
      on the base model rebuilds ``spec`` (see ``jaxft.surgery.replay``).
  """

  spec: ModelSpec
  variables: Variables
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  history: tuple[Mapping[str, Any], ...] = ()

  @property
  def params(self) -> dict[str, Any]:
    """The ``params`` collection."""
    return self.variables["params"]

  @property
  def batch_stats(self) -> dict[str, Any]:
    """The ``batch_stats`` collection (empty dict if the model has no BatchNorm)."""
    return self.variables.get("batch_stats", {})

  def module(self, dtype: Any = jnp.float32, frozen_bn: tuple[str, ...] = (),
             layers: Layers = Layers()) -> Network:
    """Returns the flax module for this structure (``layers``: see :class:`~jaxft.models.layers.Layers`)."""
    return Network(self.spec, dtype=dtype, frozen_bn=frozen_bn, layers=layers)

  def apply(self, x: jax.Array, **kwargs: Any) -> Any:
    """Eval-mode forward pass on normalised NHWC images (not jitted; for jit use ``module().apply``)."""
    return self.module().apply(self.variables, x, **kwargs)

  def replace(self, **changes: Any) -> "Model":
    """Returns a copy with ``changes`` applied (``dataclasses.replace``); ``self`` is untouched."""
    return dataclasses.replace(self, **changes)


def abstract_variables(spec: ModelSpec) -> dict[str, Any]:
  """Returns ``jax.ShapeDtypeStruct`` leaves of ``Network(spec)``'s variables (plain nested dicts).

  Shapes only: nothing is allocated or computed, and the plain layers are traced (never a CPU kernel).
  """
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  tree = jax.eval_shape(lambda r, x: Network(spec).init(r, x, train=False), jax.random.key(0), x)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), flax.core.unfreeze(tree))


def init_flat(spec: ModelSpec, rng: jax.Array, wanted: Sequence[str] | None = None,
              input_size: int = 32) -> dict[str, jax.Array]:
  """Initial values of ``Network(spec)`` as ``{"<collection>/<path>": array}``.

  Args:
    spec: the structure.
    rng: the init key.
    wanted: only these flattened paths (default: all). Only they leave the jitted init, so XLA drops
      the rest of the init and the forward pass.
    input_size: spatial size of the dummy input (parameter shapes do not depend on it).
  """
  net = Network(spec)
  x = jnp.zeros((1, input_size, input_size, 3), jnp.float32)

  def init(key: jax.Array) -> dict[str, jax.Array]:
    flat = paths.flatten({k: dict(v) for k, v in net.init(key, x, train=False).items()})
    return flat if wanted is None else {p: flat[p] for p in wanted}

  lowered = jax.jit(init).lower(rng)
  # Init runs once, so code quality is irrelevant; on CPU, LLVM optimisation of the random-number
  # kernels otherwise dominates (tens of seconds for a ResNet).
  try:
    compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
  except (RuntimeError, ValueError, TypeError):  # an XLA build without that debug option
    compiled = lowered.compile()
  return compiled(rng)


def create(spec: ModelSpec, rng: jax.Array, meta: Mapping[str, Any] | None = None,
           input_size: int = 32) -> Model:
  """Returns a freshly initialised :class:`Model` for ``spec``."""
  variables = paths.unflatten(init_flat(spec, rng, input_size=input_size))
  return Model(spec=spec, variables=variables, meta=dict(meta or {}))


def count_params(model: Model) -> int:
  """Returns the number of trainable parameters of ``model`` (its ``params`` collection; BatchNorm
  running statistics excluded). ``model`` is never mutated."""
  return int(sum(jnp.size(v) for v in jax.tree.leaves(model.params)))
