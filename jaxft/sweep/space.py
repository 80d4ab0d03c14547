"""The search space: a Python file whose ``get_space()`` maps config keys to Optuna distributions.

A space file is code the user wrote, trusted like a ``configs/*.py`` file::

  from optuna.distributions import CategoricalDistribution, FloatDistribution

  def get_space():
    return {"optim.lr": FloatDistribution(1e-3, 1e-1, log=True),
            "optim.name": CategoricalDistribution(["sgd", "adamw"])}

:func:`check_space` refuses, one line each, a key the schema does not have (naming the nearest keys), a
value that is no Optuna distribution, a distribution whose values have the wrong type for the key (a
``FloatDistribution`` over an integer field), and one that reaches a value the field's check refuses
(each end of a range, each choice). Nothing here mutates a config or a space it is given.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any, Mapping

import ml_collections
from optuna import distributions as D

from jaxft import config as config_lib
from jaxft import validate

Space = dict[str, D.BaseDistribution]
KINDS = "FloatDistribution, IntDistribution or CategoricalDistribution (optuna.distributions)"


class SpaceError(ValueError):
  """A space file that cannot be searched; the message has one line per problem."""


def load_space(path: str | Path) -> Space:
  """Runs the space file at ``path`` and returns what its ``get_space()`` returns (a dict, unchecked).

  Raises:
    SpaceError: no such file, it fails to run, no ``get_space``, or it returns something else than a dict.
  """
  path = Path(path)
  if not path.is_file():
    raise SpaceError(f"space file {path} not found")
  spec = importlib.util.spec_from_file_location(f"jaxft_space_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not hasattr(module, "get_space"):
      raise SpaceError(f"space file {path} defines no get_space() (returning {{config key: distribution}})")
    space = module.get_space()
  except SpaceError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # the user's file may raise anything
    raise SpaceError(f"space file {path}: {type(e).__name__}: {e}") from None
  if not isinstance(space, Mapping) or not space:
    raise SpaceError(f"space file {path}: get_space() returned {type(space).__name__}; it must return a "
                     "non-empty dict {config key: distribution}")
  return dict(space)


def with_params(config: ml_collections.ConfigDict, params: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of ``config`` with each ``"a.b": value`` of ``params`` set (``config`` is never mutated).

  Raises:
    TypeError / KeyError: a value of the wrong type for its field, or a key the config does not have
      (:func:`check_space` rules both out for the values a checked space can produce).
  """
  out = copy.deepcopy(config)
  for key, value in params.items():
    node = out
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return out


def _type_problem(default: Any, dist: D.BaseDistribution) -> str | None:
  """Why ``dist``'s values cannot go into a field whose default is ``default`` (None if they can)."""
  kind = "bool" if isinstance(default, bool) else type(default).__name__
  if isinstance(dist, D.FloatDistribution):
    return None if kind == "float" else f"gives floats, but the field is {kind}"
  if isinstance(dist, D.IntDistribution):
    return None if kind in ("int", "float") else f"gives integers, but the field is {kind}"
  if isinstance(dist, D.CategoricalDistribution):
    for c in dist.choices:
      ckind = "bool" if isinstance(c, bool) else type(c).__name__
      if default is not None and ckind != kind and not (kind == "float" and ckind == "int"):
        return f"has the choice {c!r} ({ckind}), but the field is {kind}"
    return None
  return f"is a {type(dist).__name__}; use {KINDS}"


def _values(dist: D.BaseDistribution) -> list[Any]:
  """The values that decide whether ``dist`` is valid for a field: each end of a range, each choice."""
  if isinstance(dist, D.CategoricalDistribution):
    return list(dist.choices)
  if isinstance(dist, D.IntDistribution):
    return [dist.low, dist.high]
  return [float(dist.low), float(dist.high)]


def _key_problems(key: str, dist: Any, base: ml_collections.ConfigDict) -> list[str]:
  """The problems of one ``key: dist`` entry of a space over ``base``."""
  checks = config_lib.checks()
  if key not in checks:
    near = validate.nearest_keys(key, checks)
    return [f"unknown config key {key!r}; nearest: {', '.join(near) if near else 'none'} "
            "(every key: jaxft.config.default_config())"]
  if not isinstance(dist, D.BaseDistribution):
    return [f"{key}: {validate.shown(dist)} is not an Optuna distribution; use {KINDS}"]
  default = base
  for part in key.split("."):
    default = default[part]
  problem = _type_problem(default, dist)
  if problem:
    return [f"{key}: {_shown(dist)} {problem}"]
  out = []
  for value in _values(dist):
    try:
      lines = validate.validate(with_params(base, {key: value}), check_files=False)
    except (TypeError, KeyError) as e:
      lines = [f"config.{key} = {value!r}: {e}"]
    out += [f"{key}: {_shown(dist)} reaches a refused value: {line}" for line in lines
            if line.startswith(f"config.{key} ")][:1]
  return out


def check_space(space: Mapping[str, Any], base: ml_collections.ConfigDict) -> list[str]:
  """One line per problem of ``space`` over the config ``base`` (empty when every trial's config will be
  valid as far as the schema can tell, and has a validation set to be scored on); neither is mutated."""
  out = []
  if not base.data.val_source and not base.data.val_fraction:
    out.append("trials are scored by validation top-1, and the config has no validation set: set "
               "config.data.val_fraction > 0 or config.data.val_source")
  for key, dist in space.items():
    out += _key_problems(str(key), dist, base)
  return out


def _shown(dist: D.BaseDistribution) -> str:
  fields = {k: v for k, v in json.loads(D.distribution_to_json(dist))["attributes"].items()
            if v not in (None, False) or k == "log"}
  return f"{type(dist).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


def space_json(space: Space) -> dict[str, str]:
  """``{key: Optuna's JSON of its distribution}``: what a study records of the space it searches."""
  return {k: D.distribution_to_json(v) for k, v in sorted(space.items())}


def space_diff(recorded: Mapping[str, str], space: Space) -> list[str]:
  """How ``space`` differs from a study's recorded one (``space_json``), one phrase per key."""
  mine = space_json(space)
  out = [f"{k} is new" for k in mine if k not in recorded]
  out += [f"{k} is missing" for k in recorded if k not in mine]
  out += [f"{k} was {_shown(D.json_to_distribution(recorded[k]))}, now {_shown(space[k])}"
          for k in mine if k in recorded and D.json_to_distribution(recorded[k]) != space[k]]
  return out
