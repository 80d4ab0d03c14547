"""Addressing leaves of nested-dict pytrees by ``/``-joined paths, and mapping over them with rules.

One way to name a leaf: ``layer3/block2/conv1/kernel``. Selectors are regular expressions matched
against *whole* paths (``re.fullmatch``); :func:`glob` turns a shell-style pattern into one. Rules are
ordered ``(pattern, value)`` pairs and the first match wins. Surgery, freezing, learning-rate multipliers
and weight-decay masks all use the same helpers, so a selector means the same thing everywhere.

Nothing here mutates its inputs.
"""

from __future__ import annotations

import difflib
import logging
import re
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import numpy as np

Tree = Mapping[str, Any]
T = TypeVar("T")
Rule = tuple[str, Any]


class PathError(KeyError):
  """A path or selector that names nothing (or the wrong number of things) in a tree."""

  def __str__(self) -> str:  # KeyError would repr() the message.
    return str(self.args[0])


def glob(pattern: str) -> str:
  """Returns a regex equivalent to a shell-style ``pattern`` where ``*`` stays inside one path
  component and ``**`` crosses components, e.g. ``glob('layer*/**/kernel')``."""
  out = []
  i = 0
  while i < len(pattern):
    if pattern.startswith("**", i):
      out.append(".*")
      i += 2
    elif pattern[i] == "*":
      out.append("[^/]*")
      i += 1
    elif pattern[i] == "?":
      out.append("[^/]")
      i += 1
    else:
      out.append(re.escape(pattern[i]))
      i += 1
  return "".join(out)


def compile_pattern(pattern: str) -> re.Pattern[str]:
  """Compiles a selector; raises ``ValueError`` naming the pattern when it is not a valid regex."""
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"invalid selector regex {pattern!r}: {e}. Use jaxft.paths.glob() for "
                     "shell-style patterns.") from None


def flatten(tree: Tree, prefix: str = "") -> dict[str, Any]:
  """Returns ``{path: leaf}`` for a nested dict, in sorted path order. Leaves are returned as they are."""
  out: dict[str, Any] = {}
  for k in sorted(tree):
    v = tree[k]
    p = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, p))
    else:
      out[p] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of :func:`flatten`: returns a new nested dict of plain ``dict``s."""
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = v
  return out


def nearest(path: str, candidates: Iterable[str], n: int = 5) -> list[str]:
  """Returns the ``n`` candidates closest to ``path`` (by difflib ratio), best first."""
  return difflib.get_close_matches(path, list(candidates), n=n, cutoff=0.0)


def get(tree: Tree, path: str) -> Any:
  """Returns the leaf or subtree at ``path``.

  Raises:
    PathError: if nothing is there; the message names the nearest valid paths.
  """
  node: Any = tree
  for part in path.split("/"):
    if not isinstance(node, Mapping) or part not in node:
      valid = set(flatten(tree))
      valid |= {"/".join(p.split("/")[:i]) for p in list(valid) for i in range(1, p.count("/") + 1)}
      raise PathError(f"no path {path!r} in tree; nearest valid paths: {nearest(path, valid)}")
    node = node[part]
  return node


def select(paths_or_tree: Tree | Iterable[str], pattern: str, expect: int | None = None) -> list[str]:
  """Returns the paths (sorted) that ``pattern`` full-matches.

  Args:
    paths_or_tree: a nested dict, or the paths themselves.
    pattern: a regex matched against whole paths.
    expect: if given, the exact number of matches required.

  Raises:
    PathError: when the number of matches differs from ``expect`` (or is zero when ``expect`` is None),
      naming the nearest valid paths.
  """
  paths = sorted(flatten(paths_or_tree) if isinstance(paths_or_tree, Mapping) else paths_or_tree)
  rx = compile_pattern(pattern)
  hits = [p for p in paths if rx.fullmatch(p)]
  if (expect is None and not hits) or (expect is not None and len(hits) != expect):
    want = "at least 1" if expect is None else str(expect)
    raise PathError(f"selector {pattern!r} matched {len(hits)} paths, expected {want}"
                    f"{': ' + str(hits[:8]) if hits else ''}; nearest valid paths: "
                    f"{nearest(pattern, paths)}")
  return hits


def match_rules(path: str, rules: Sequence[Rule]) -> tuple[int, Any] | None:
  """Returns ``(index, value)`` of the first rule whose pattern full-matches ``path``, or ``None``."""
  for i, (pattern, value) in enumerate(rules):
    if compile_pattern(pattern).fullmatch(path):
      return i, value
  return None


def assign(tree: Tree, rules: Sequence[Rule], *, strict: bool = True, default: Any = None,
           log_name: str | None = None) -> dict[str, Any]:
  """Returns a tree with the structure of ``tree`` whose leaves are the value of the first matching rule.

  Args:
    tree: nested dict of leaves (only its structure and leaf sizes are read).
    rules: ordered ``(regex, value)`` pairs.
    strict: every leaf must match a rule; otherwise unmatched leaves get ``default``.
    default: value of unmatched leaves when not strict.
    log_name: if set, log a table of rule → matched leaves / parameter count under this title.

  Raises:
    ValueError: for an invalid regex.
    PathError: when ``strict`` and some leaves match no rule (all of them are listed).
  """
  for pattern, _ in rules:
    compile_pattern(pattern)
  flat = flatten(tree)
  out: dict[str, Any] = {}
  unmatched = []
  counts = [[0, 0] for _ in rules]
  for path, leaf in flat.items():
    m = match_rules(path, rules)
    if m is None:
      unmatched.append(path)
      out[path] = default
    else:
      out[path] = m[1]
      counts[m[0]][0] += 1
      counts[m[0]][1] += int(np.size(leaf))
  if strict and unmatched:
    raise PathError(f"{len(unmatched)} leaves match no rule: {unmatched[:10]}"
                    f"{' …' if len(unmatched) > 10 else ''}; add a rule for them or a final "
                    "catch-all rule ('.*', value)")
  if log_name:
    lines = [f"{log_name}:", f"  {'rule':40s} {'value':>12s} {'leaves':>7s} {'params':>12s}"]
    for (pattern, value), (n, size) in zip(rules, counts):
      lines.append(f"  {pattern:40s} {str(value):>12s} {n:7d} {size:12,d}")
    if unmatched:
      lines.append(f"  {'(no rule)':40s} {str(default):>12s} {len(unmatched):7d}")
    logging.info("\n".join(lines))
  return unflatten(out)


def map_leaves(fn: Callable[[str, Any], Any], tree: Tree) -> dict[str, Any]:
  """Returns a new nested dict with ``fn(path, leaf)`` at every leaf."""
  return unflatten({p: fn(p, v) for p, v in flatten(tree).items()})
