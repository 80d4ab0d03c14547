"""The one config schema: every key the code reads exists, every key exists because it is read; configs
build, are locked, and override only keys of the schema."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import ml_collections
import pytest

from jaxft import config as config_lib

REPO = Path(__file__).resolve().parents[1]
# Names that hold the whole config, or one section of it, in the library's code: file (relative to
# jaxft/, '*' = every file) → {variable: the schema prefix it stands for}.
ROOTS = {"*": {"config": ""}, "optim.py": {"cfg": "optim."}}
# ConfigDict methods: a chain ending in one reads the section as a whole, not a field.
METHODS = {"to_json", "to_dict", "items", "keys", "values", "lock", "unlock", "copy_and_resolve_references",
           "update", "is_locked"}
CONFIGS = {"cifar10": [""], "tiny": [""], "quickstart": [""], "cifar10_resnet56": [""], "multitask": [""],
           "cifar10_distill": ["", "base", "control", "teacher"]}


def schema_keys(c: ml_collections.ConfigDict, prefix: str = "") -> tuple[set[str], set[str]]:
  """``(sections, leaves)`` of ``c`` as dotted paths."""
  sections, leaves = set(), set()
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      sections.add(prefix + k)
      s, l = schema_keys(v, f"{prefix}{k}.")
      sections |= s
      leaves |= l
    else:
      leaves.add(prefix + k)
  return sections, leaves


def _chain(node: ast.AST) -> list[str] | None:
  """``['config', 'a', 'b']`` for the expression ``config.a.b``; None for anything else."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  return [node.id] + parts[::-1]


def config_reads(path: Path, roots: dict[str, str], sections: set[str]) -> dict[str, int]:
  """Every ``config.a.b`` read in ``path`` as ``{'a.b': line}``, through aliases of ``sections``
  (``dc = config.data`` makes ``dc.source`` read ``data.source``)."""
  tree = ast.parse(path.read_text())
  roots = dict(roots)
  for node in ast.walk(tree):  # aliases: NAME = <chain from a root> (or a, b = <chain>, <chain>)
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    target, value = node.targets[0], node.value
    pairs = (zip(target.elts, value.elts) if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
             else [(target, value)])
    for name, expr in pairs:
      chain = _chain(expr)
      if isinstance(name, ast.Name) and chain and chain[0] in roots:
        section = roots[chain[0]] + ".".join(chain[1:])
        if section in sections:
          roots[name.id] = section + "."
  inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
  reads = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and id(node) not in inner:
      chain = _chain(node)
      if chain and chain[0] in roots:
        assert chain[-1] != "get", f"{path}:{node.lineno}: config.….get(): a default in code"
        fields = [p for p in chain[1:] if p not in METHODS]
        if fields:
          reads[roots[chain[0]] + ".".join(fields)] = node.lineno
  return reads


def all_reads() -> dict[str, str]:
  sections, _ = schema_keys(config_lib.default_config())
  out = {}
  for path in sorted((REPO / "jaxft").rglob("*.py")):
    rel = str(path.relative_to(REPO / "jaxft"))
    roots = {**ROOTS["*"], **ROOTS.get(rel, {})}
    out.update({k: f"jaxft/{rel}:{line}" for k, line in config_reads(path, roots, sections).items()})
  return out


def test_every_key_the_code_reads_is_in_the_schema():
  sections, leaves = schema_keys(config_lib.default_config())
  unknown = {k: where for k, where in all_reads().items() if k not in sections | leaves}
  assert not unknown, f"read but not in jaxft.config.default_config(): {unknown}"


def test_every_schema_key_is_read_somewhere():
  _, leaves = schema_keys(config_lib.default_config())
  reads = set(all_reads())
  unread = sorted(k for k in leaves if k not in reads)
  assert not unread, f"in the schema but read nowhere in jaxft/: {unread}"


def test_the_reader_finds_reads_and_aliases(tmp_path: Path):
  f = tmp_path / "m.py"
  f.write_text("def f(config, cfg):\n  dc = config.data\n  return dc.source, config.train.batch_size, "
               "cfg.lr, config.to_json(), config.optim\n")
  assert config_reads(f, {"config": "", "cfg": "optim."}, {"data", "optim"}) == {
      "data": 2, "data.source": 3, "train.batch_size": 3, "optim.lr": 3, "optim": 3}
  f.write_text("def f(config):\n  return config.model.get('arch', 'x')\n")
  with pytest.raises(AssertionError, match="a default in code"):
    config_reads(f, {"config": ""}, set())


def test_default_config_is_locked_and_fresh():
  c = config_lib.default_config()
  assert c.is_locked
  with pytest.raises(AttributeError):
    c.train.bogus_key = 1
  c.train.batch_size = 3
  assert config_lib.default_config().train.batch_size != 3


@pytest.mark.parametrize("name,variant", [(n, v) for n, vs in CONFIGS.items() for v in vs])
def test_every_config_builds_locked_from_the_schema(name: str, variant: str):
  module = importlib.import_module(f"configs.{name}")
  c = module.get_config(variant) if variant else module.get_config()
  assert c.is_locked
  assert schema_keys(c) == schema_keys(config_lib.default_config())
  with pytest.raises(AttributeError):
    c.optim.learning_rate = 1.0  # a misspelt override is an error, never a new field


def test_every_config_file_is_listed():
  files = {p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__"}
  assert files == set(CONFIGS)


def test_optim_default_config_is_the_schema_section():
  from jaxft import optim
  assert optim.default_config().to_dict() == config_lib.default_config().optim.to_dict()
