"""Measuring models: parameter and FLOP counts, a before/after :class:`Report`, a leaf-by-leaf :func:`diff`.

Nothing here mutates a model or executes it: FLOPs come from XLA's cost analysis of the lowered forward
pass, the rest from shapes and values already in the variables.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import paths
from jaxft.models.model import Model, count_params
from jaxft.models.network import Network


def count_flops(model: Model, input_size: int | None = None) -> int:
  """FLOPs of one eval-mode forward pass of a batch of one ``input_size``² image.

  Counted by XLA's cost analysis of the lowered (unoptimised) forward pass of the plain
  ``Network(model.spec)`` (default layers: ``lax.conv``, whatever a backend would run instead), so any
  architecture the network can build is covered; a multiply-add counts 2, and BN, activations and
  pooling are included. Nothing is executed.

  Args:
    model: never mutated.
    input_size: image side; default ``model.meta["input_size"]``, else 224.
  """
  size = int(input_size or model.meta.get("input_size") or 224)
  net = Network(model.spec)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)),
                          model.variables)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  lowered = jax.jit(lambda v, x: net.apply(v, x, train=False)).lower(abstract, x)
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0]
  return int(cost["flops"])


@dataclasses.dataclass(frozen=True)
class Report:
  """Parameters and FLOPs of two models (plain data; ``str()`` is a small table)."""

  params_before: int
  params_after: int
  flops_before: int
  flops_after: int
  input_size: int

  def to_dict(self) -> dict[str, int]:
    """The fields as a plain dict."""
    return dataclasses.asdict(self)

  def __str__(self) -> str:
    def row(name: str, a: int, b: int) -> str:
      pct = f"{100.0 * (b - a) / a:+.1f}%" if a else "n/a"
      return f"{name:<8s} {a:>16,d} {b:>16,d} {pct:>8s}"
    return "\n".join([f"{'':<8s} {'before':>16s} {'after':>16s} {'change':>8s}",
                      row("params", self.params_before, self.params_after),
                      row(f"FLOPs@{self.input_size}", self.flops_before, self.flops_after)])


def report(before: Model, after: Model, input_size: int | None = None) -> Report:
  """Parameters and FLOPs (see :func:`count_flops`) of ``before`` and ``after``; neither is mutated."""
  size = int(input_size or before.meta.get("input_size") or 224)
  return Report(count_params(before), count_params(after), count_flops(before, size),
                count_flops(after, size), size)


@dataclasses.dataclass(frozen=True)
class DiffResult:
  """What changed between two models' variables, as plain data.

  Leaves are named ``"<collection>/<path>"``. Entries are dicts: ``added`` / ``removed`` —
  ``{"path", "shape", "size"}``; ``reshaped`` — ``{"path", "before", "after", "size_before",
  "size_after"}``; ``unchanged`` (same shape) — ``{"path", "shape", "size", "modified"}`` where
  ``modified`` says the values differ. ``ops`` are the history records ``after`` has beyond ``before``.
  """

  added: list[dict[str, Any]]
  removed: list[dict[str, Any]]
  reshaped: list[dict[str, Any]]
  unchanged: list[dict[str, Any]]
  ops: list[dict[str, Any]]
  params_before: int
  params_after: int

  @property
  def modified(self) -> list[dict[str, Any]]:
    """The same-shaped leaves whose values differ."""
    return [e for e in self.unchanged if e["modified"]]

  @property
  def num_modified(self) -> int:
    """How many same-shaped leaves have different values."""
    return len(self.modified)

  def to_dict(self) -> dict[str, Any]:
    """The fields as a plain (JSON-serialisable) dict."""
    return dataclasses.asdict(self)

  def format(self, max_rows: int = 20) -> str:
    """A table of counts, then the changed leaves (at most ``max_rows`` per section)."""
    def size(entries: list[dict[str, Any]], key: str = "size") -> int:
      return sum(e[key] for e in entries)
    ops = "; ".join(f"{r['op']}({', '.join(f'{k}={v!r}' for k, v in r.get('args', {}).items())})"
                    for r in self.ops) or "(none recorded)"
    lines = [f"ops: {ops}",
             f"params: {self.params_before:,d} -> {self.params_after:,d} "
             f"({self.params_after - self.params_before:+,d})",
             f"{'':<10s} {'leaves':>7s} {'values':>12s}",
             f"{'added':<10s} {len(self.added):>7d} {size(self.added):>12,d}",
             f"{'removed':<10s} {len(self.removed):>7d} {size(self.removed):>12,d}",
             f"{'reshaped':<10s} {len(self.reshaped):>7d} "
             f"{size(self.reshaped, 'size_after') - size(self.reshaped, 'size_before'):>+12,d}",
             f"{'unchanged':<10s} {len(self.unchanged):>7d} {size(self.unchanged):>12,d}"
             f"  ({self.num_modified} with modified values)"]
    sections = [("+", self.added, lambda e: f"{tuple(e['shape'])}"),
                ("-", self.removed, lambda e: f"{tuple(e['shape'])}"),
                ("~", self.reshaped, lambda e: f"{tuple(e['before'])} -> {tuple(e['after'])}"),
                ("*", self.modified, lambda e: f"{tuple(e['shape'])} values changed")]
    for mark, entries, fmt in sections:
      for e in entries[:max_rows]:
        lines.append(f"  {mark} {e['path']:<48s} {fmt(e)}")
      if len(entries) > max_rows:
        lines.append(f"  {mark} … {len(entries) - max_rows} more")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.format()


def _same_values(a: Any, b: Any) -> bool:
  return a is b or bool(np.array_equal(np.asarray(a), np.asarray(b)))


def diff(before: Model, after: Model) -> DiffResult:
  """Compares the variables of two models leaf by leaf; neither is mutated."""
  a, b = paths.flatten(before.variables), paths.flatten(after.variables)
  shape = lambda v: [int(s) for s in np.shape(v)]
  added = [{"path": p, "shape": shape(b[p]), "size": int(np.size(b[p]))} for p in b if p not in a]
  removed = [{"path": p, "shape": shape(a[p]), "size": int(np.size(a[p]))} for p in a if p not in b]
  reshaped, unchanged = [], []
  for p in a:
    if p not in b:
      continue
    if np.shape(a[p]) != np.shape(b[p]):
      reshaped.append({"path": p, "before": shape(a[p]), "after": shape(b[p]),
                       "size_before": int(np.size(a[p])), "size_after": int(np.size(b[p]))})
    else:
      unchanged.append({"path": p, "shape": shape(a[p]), "size": int(np.size(a[p])),
                        "modified": not _same_values(a[p], b[p])})
  n = len(before.history)
  ops = [dict(r) for r in after.history[n:]] if tuple(after.history[:n]) == tuple(
      before.history) else [dict(r) for r in after.history]
  return DiffResult(added, removed, reshaped, unchanged, ops, count_params(before),
                    count_params(after))
