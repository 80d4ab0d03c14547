"""Adaptive regularization strengths: the ``adaptive(min, max, target_gap)`` spec and the controller's rule.

A regularization weight of the config (:data:`FIELDS`, and every ``loss.<term>`` weight) may be given as
``adaptive(min, max, target_gap)`` instead of a number::

  config.optim.l2sp.alpha = jaxft.adaptive(1e-4, 1e-1, 0.05)      # in a Python config
  --config.optim.l2sp.alpha='adaptive(1e-4,1e-1,0.05)'             # on the command line

The config then holds the canonical string (plain data: it goes to ``config.json`` and is compared on
resume like any value); :func:`parse` reads it strictly (a regular expression, never ``eval``). The
run starts the weight at the geometric mean of ``min`` and ``max`` and, at every evaluation, moves it by
:func:`move` (the rule is written out there and in ``docs/regularization.md``). Everything here is pure
Python on floats: the train loop (:mod:`jaxft.train.controller`) measures the gap and applies it.
Nothing here mutates its inputs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Any, Mapping

import numpy as np

# The fields that take adaptive(...) besides every float field of the ``loss`` section (LOSS_PREFIX).
FIELDS = ("optim.l2sp.alpha", "optim.weight_decay", "model.dropout")
LOSS_PREFIX = "loss."
SYNTAX = "adaptive(min, max, target_gap), e.g. adaptive(1e-4, 1e-1, 0.05)"
_NUM = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_SPEC = re.compile(rf"\s*adaptive\(\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*")
UP, HOLD, DOWN = 1, 0, -1  # the controller's modes (its hysteresis memory)


@dataclasses.dataclass(frozen=True)
class Adaptive:
  """One adaptive weight: it stays in ``[lo, hi]`` and is steered toward a val − train loss gap of
  ``target``."""

  lo: float
  hi: float
  target: float

  def __str__(self) -> str:
    return f"adaptive({self.lo!r}, {self.hi!r}, {self.target!r})"

  @property
  def start(self) -> float:
    """The value in effect at step 0: ``sqrt(lo * hi)`` (the geometric mean), rounded to float32."""
    return float(np.float32(math.sqrt(self.lo * self.hi)))


def supports(key: str) -> bool:
  """Whether the dotted config key ``key`` may be ``adaptive(...)`` (:data:`FIELDS`, ``loss.*``)."""
  return key in FIELDS or key.startswith(LOSS_PREFIX)


def supported_keys() -> str:
  """The supported keys, in words (for error messages)."""
  return ", ".join(FIELDS) + f", {LOSS_PREFIX}<term> (every loss weight)"


def looks_adaptive(value: Any) -> bool:
  """Whether ``value`` is meant as an adaptive spec (a string starting with ``adaptive``)."""
  return isinstance(value, str) and value.strip().startswith("adaptive")


def spec_problem(lo: float, hi: float, target: float) -> str | None:
  """Why ``adaptive(lo, hi, target)`` is invalid (None when it is valid)."""
  if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
             for x in (lo, hi, target)):
    return f"{SYNTAX}: min, max and target_gap must be finite numbers"
  if lo <= 0:
    return f"adaptive min = {lo!r}: must be > 0 (a multiplicative rule cannot move a weight off 0)"
  if lo > hi:
    return f"adaptive min = {lo!r} is above max = {hi!r}: swap them"
  if target <= 0:
    return f"adaptive target_gap = {target!r}: must be > 0 (the val - train loss gap to hold)"
  return None


def parse(value: Any) -> Adaptive | None:
  """The :class:`Adaptive` a config value spells, or None for a value that is not a string.

  Raises:
    ValueError: a string that is not exactly ``adaptive(NUMBER, NUMBER, NUMBER)``, or whose numbers
      :func:`spec_problem` refuses; one line saying what is wrong and the syntax.
  """
  if not isinstance(value, str):
    return None
  m = _SPEC.fullmatch(value)
  if m is None:
    raise ValueError(f"{value!r} is not {SYNTAX}")
  lo, hi, target = (float(g) for g in m.groups())
  problem = spec_problem(lo, hi, target)
  if problem:
    raise ValueError(problem)
  return Adaptive(lo, hi, target)


def adaptive(min_value: float, max_value: float, target_gap: float) -> str:
  """The config value of an adaptive weight (``config.optim.l2sp.alpha = jaxft.adaptive(…)``).

  Returns:
    The canonical string ``adaptive(min, max, target_gap)``, which :func:`parse` reads back.

  Raises:
    ValueError: ``min <= 0``, ``min > max``, ``target_gap <= 0`` or a non-number.
  """
  problem = spec_problem(min_value, max_value, target_gap)
  if problem:
    raise ValueError(problem)
  return str(Adaptive(float(min_value), float(max_value), float(target_gap)))


def _leaves(c: Any, prefix: str = "") -> list[tuple[str, Any]]:
  out = []
  for k, v in c.items():
    if hasattr(v, "items"):
      out += _leaves(v, f"{prefix}{k}.")
    else:
      out.append((prefix + k, v))
  return out


def specs(config: Any) -> dict[str, Adaptive]:
  """``{dotted key: Adaptive}`` of every adaptive field of ``config`` (never mutated), sorted by key.

  Raises:
    ValueError: a malformed spec (validate the config first for one line per problem).
  """
  return {k: parse(v) for k, v in sorted(_leaves(config)) if supports(k) and isinstance(v, str)}


def start_config(config: Any) -> Any:
  """A copy of ``config`` with each adaptive field at its start value (a float), for the code that
  builds a run (model, objective, optimizer): every value it reads is a number. ``config`` is not
  mutated."""
  out = copy.deepcopy(config)  # (keeps the untyped fields untyped, unlike copy_and_resolve_references)
  for key, spec in specs(config).items():
    *parents, last = key.split(".")
    node = out
    for p in parents:
      node = node[p]
    node[last] = spec.start
  return out


def move(value: float, mode: int, gap: float, spec: Adaptive, factor: float, band: float
         ) -> tuple[float, int]:
  """One step of the controller, at an evaluation: returns the new ``(value, mode)``.

  ``gap`` is the validation loss minus the training loss (both eval mode, see
  :mod:`jaxft.train.controller`); ``t = spec.target``, ``h = band`` (in ``[0, 1)``), ``f = factor``
  (``> 1``). The mode (the hysteresis memory, :data:`UP`, :data:`HOLD`, :data:`DOWN`) becomes:

  * ``UP`` when ``gap > t·(1+h)`` (overfitting: more regularization);
  * ``DOWN`` when ``gap < t·(1−h)`` (underfitting: less);
  * ``HOLD`` when it was ``UP`` and ``gap <= t``, or was ``DOWN`` and ``gap >= t`` (the target is
    reached: stop);
  * else it stays as it was (inside the band the last move continues until the target is crossed).

  Then the value is multiplied by ``f`` (``UP``), divided by ``f`` (``DOWN``) or kept (``HOLD``),
  clipped to ``[lo, hi]``; computed in float64, then rounded to float32 (the dtype the train step
  reads it in).
  """
  t = spec.target
  if gap > t * (1.0 + band):
    mode = UP
  elif gap < t * (1.0 - band):
    mode = DOWN
  elif (mode == UP and gap <= t) or (mode == DOWN and gap >= t):
    mode = HOLD
  f = float(factor)
  scaled = {UP: float(value) * f, DOWN: float(value) / f, HOLD: float(value)}[mode]
  return float(np.float32(min(spec.hi, max(spec.lo, scaled)))), mode


def initial(found: Mapping[str, Adaptive]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """The controller's state at step 0: ``({key: float32 start value}, {key: int32 HOLD})`` (new)."""
  return ({k: np.float32(s.start) for k, s in found.items()},
          {k: np.int32(HOLD) for k in found})
