"""Gradient clipping by global norm with the norm's sums as GEMVs (XLA:CPU).

``optax.clip_by_global_norm`` computes the same updates; XLA:CPU reduces one long vector serially, so
squaring and summing large leaves down their rows with one GEMV is faster there (docs/benchmarks.md,
"Norms"), enough to keep it: :func:`jaxft.cpu.norm_functions` hands these to the train step and the
optimizer when the backend is enabled on CPU (the measured gain is in docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxft.cpu.norm import channel_sum

Tree = Any


def global_norm(tree: Tree) -> jax.Array:
  """Returns the L2 norm of all leaves of ``tree`` together (float32 scalar): the value of
  ``optax.tree.norm``. Leaves of at least 4096 values and two axes are summed by GEMV rows.
  ``tree`` is not mutated."""

  def sq(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if x.ndim >= 2 and x.size >= 4096:
      a = x.reshape(-1, x.shape[-1])
      return jnp.sum(channel_sum(a * a, gemv=True))
    return jnp.sum(x * x)

  return jnp.sqrt(sum((sq(x) for x in jax.tree.leaves(tree)), jnp.float32(0.0)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Returns ``optax.clip_by_global_norm(max_norm)`` computed with :func:`global_norm`: the same
  updates and the same (empty) state, so checkpoints are interchangeable. Inputs are never mutated.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = clip_by_global_norm(1.0)
    >>> u, _ = tx.update({'a': jnp.array([3.0, 4.0])}, tx.init(None))
    >>> [round(float(v), 4) for v in u['a']]
    [0.6, 0.8]
  """

  def init(params: Tree) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update(updates: Tree, state: optax.EmptyState, params: Tree | None = None
             ) -> tuple[Tree, optax.EmptyState]:
    del params
    g = global_norm(updates)
    clip = lambda t: jnp.where(g < max_norm, t, (t / g.astype(t.dtype)) * max_norm)
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(init, update)
