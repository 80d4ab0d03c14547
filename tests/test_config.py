"""The one config schema: every key the code reads exists, every key exists because it is read; configs
build, are locked, and override only keys of the schema."""

from __future__ import annotations

import ast
import json
import importlib
from pathlib import Path

import ml_collections
import pytest

from jaxft import config as config_lib
from jaxft import validate

REPO = Path(__file__).resolve().parents[1]
# Names that hold the whole config, or one section of it, in the library's code: file (relative to
# jaxft/, '*' = every file) → {variable: the schema prefix it stands for}.
ROOTS = {"*": {"config": ""}, "optim.py": {"cfg": "optim."}}
# ConfigDict methods: a chain ending in one reads the section as a whole, not a field.
METHODS = {"to_json", "to_dict", "items", "keys", "values", "lock", "unlock", "copy_and_resolve_references",
           "update", "is_locked"}
CONFIGS = {"cifar10": [""], "tiny": [""], "quickstart": [""], "cifar10_resnet56": [""], "multitask": [""],
           "low_data": [""], "transfer_cifar10": [""],
           "cifar10_distill": ["", "base", "control", "teacher"]}
# configs/ files that are no fixed config: a sweep's space file and the loader of a config saved as JSON
# (both tested in tests/test_sweep.py).
NOT_CONFIGS = {"tiny_space", "from_json"}


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
  assert files == set(CONFIGS) | NOT_CONFIGS


def test_optim_default_config_is_the_schema_section():
  from jaxft import optim
  assert optim.default_config().to_dict() == config_lib.default_config().optim.to_dict()


# ---------------------------------------------------------------------------------------------------
# The checks: every field has one, each kind of check refuses what it should and names the valid range.


def test_every_schema_field_has_a_check():
  _, leaves = schema_keys(config_lib.default_config())
  assert set(config_lib.checks()) == leaves
  assert all(callable(c) for c in config_lib.checks().values())


def test_a_field_declared_without_a_check_is_an_error():
  s = config_lib._section()  # pylint: disable=protected-access
  s.ok = config_lib.field(1, validate.COUNT)
  with pytest.raises(TypeError, match=r"schema field new = 3 has no check: declare it as field"):
    s.new = 3


@pytest.mark.parametrize("name,variant", [(n, v) for n, vs in CONFIGS.items() for v in vs])
def test_every_shipped_config_is_valid(name: str, variant: str):
  module = importlib.import_module(f"configs.{name}")
  c = module.get_config(variant) if variant else module.get_config()
  assert validate.validate(c, check_files=False) == []


def test_the_default_config_fails_only_for_what_has_no_default():
  assert validate.validate(config_lib.default_config()) == [
      "config.data.source = '': must be one of folder:PATH, cifar:PATH, tfds:NAME, sklearn:NAME, "
      "arrayrecord:PATH"]


def _problems(**dotted) -> list[str]:
  c = config_lib.default_config()
  c.data.source = "sklearn:digits"
  c.model.arch = "cifar_resnet8"
  for key, value in dotted.items():
    *parents, last = key.split("__")
    node = c
    for p in parents:
      node = node[p]
    node[last] = value
  return validate.validate(c)


@pytest.mark.parametrize("key,value,message", [
    # numbers: > 0, >= 0, [0, 1), [0, 1], (0, 1], finite; integers >= 0 / >= 1
    ("optim__lr", -0.1, "config.optim.lr = -0.1: must be > 0"),
    ("optim__lr", 0.0, "config.optim.lr = 0.0: must be > 0"),
    ("optim__lr", float("nan"), "config.optim.lr = nan: must be a number > 0"),
    ("optim__weight_decay", -1e-4, "config.optim.weight_decay = -0.0001: must be >= 0"),
    ("train__label_smoothing", 2.0, "config.train.label_smoothing = 2.0: must be in [0, 1)"),
    ("train__label_smoothing", 1.0, "config.train.label_smoothing = 1.0: must be in [0, 1)"),
    ("ema__decay", 1.0, "config.ema.decay = 1.0: must be in [0, 1)"),
    ("mix__prob", 1.5, "config.mix.prob = 1.5: must be in [0, 1]"),
    ("data__random_erasing", -0.5, "config.data.random_erasing = -0.5: must be in [0, 1]"),
    ("mix__mixup_alpha", -1.0, "config.mix.mixup_alpha = -1.0: must be >= 0"),
    ("distill__temperature", 0.0, "config.distill.temperature = 0.0: must be > 0"),
    ("optim__llrd", 1.5, "config.optim.llrd = 1.5: must be in (0, 1]"),
    ("optim__lr_default", -2.0, "config.optim.lr_default = -2.0: must be >= 0"),
    ("train__num_steps", -5, "config.train.num_steps = -5: must be an integer >= 0"),
    ("train__batch_size", 0, "config.train.batch_size = 0: must be an integer >= 1"),
    ("train__log_every", 0, "config.train.log_every = 0: must be an integer >= 1"),
    ("seed", -1, "config.seed = -1: must be an integer in [0, 4294967295]"),
    # choices
    ("model__dtype", "float8", "config.model.dtype = 'float8': must be one of 'float32', 'bfloat16'"),
    ("optim__name", "adam", "config.optim.name = 'adam': must be one of 'sgd', 'adamw', 'lamb', 'lion'"),
    ("optim__schedule__kind", "cosine", "config.optim.schedule.kind = 'cosine': must be one of 'constant', "
                                        "'warmup_cosine', 'step', 'linear'"),
    ("train__progress", "tqdm", "config.train.progress = 'tqdm': must be one of 'auto', 'bar', 'log'"),
    ("distill__feature_mode", "l2", "config.distill.feature_mode = 'l2': must be one of 'auto', 'mse', "
                                    "'project', 'similarity'"),
    ("model__arch", "resnet5", "config.model.arch = 'resnet5': must be a known name (did you mean "),
    # rules
    ("optim__lr_rules", (("stem/[", "frozen"),), "config.optim.lr_rules = (('stem/[', 'frozen'),): rule 0: "
                                                 "'stem/[' is not a valid regex"),
    ("optim__lr_rules", (("stem/.*", -1.0),),
     "config.optim.lr_rules = (('stem/.*', -1.0),): rule 0 ('stem/.*', -1.0): the value must be a number "
     ">= 0 or 'frozen'"),
    ("optim__wd_rules", (("x", 1.0),), "config.optim.wd_rules = (('x', 1.0),): rule 0 ('x', 1.0): the value "
                                       "must be True or False"),
    ("optim__l2sp__rules", ("x",),
     "config.optim.l2sp.rules = ('x',): rule 0 'x' must be a (regex, bool) pair"),
    ("optim__schedule__boundaries", (10, -2), "config.optim.schedule.boundaries = (10, -2): must be a tuple "
                                              "of step numbers (integers >= 0)"),
    # sources
    ("data__source", "imagenet", "config.data.source = 'imagenet': must be one of folder:PATH, cifar:PATH"),
    ("data__source", "folder:/no/such/dir", "config.data.source = 'folder:/no/such/dir': no such file or "
                                            "directory: /no/such/dir"),
    ("data__val_source", "cifar:", "config.data.val_source = 'cifar:': must be one of folder:PATH"),
    ("model__pretrained", "/no/such.pth", "config.model.pretrained = '/no/such.pth': no such file or "
                                          "directory; valid: '' (none), a jaxft checkpoint or training workdir"),
    ("distill__teacher", "bse", "config.distill.teacher = 'bse': no such file or directory; valid: '' "
                                "(none), 'base', "),
    # lists: surgery ops, tasks
    ("surgery", [{"op": "add_adapter", "blocks": "x"}], "config.surgery = [{'op': 'add_adapter', 'blocks': "
                                                        "'x'}]: entry 0: unknown op 'add_adapter'; valid: "),
    ("surgery", [{"op": "add_adapters", "block": "x"}], "entry 0: op 'add_adapters' takes no argument block; "
                                                        "valid: blocks, "),
    ("surgery", [{"blocks": "x"}], "config.surgery = [{'blocks': 'x'}]: entry 0 {'blocks': 'x'} must be a "
                                   "dict naming its op under 'op'"),
    ("tasks", ({"name": "t", "classes": ("a",), "label_map": {}, "wieght": 1.0},),
     "entry 0 has unknown keys ['wieght'] / lacks []; keys: name, classes, label_map, weight, dropout"),
    ("tasks", ({"name": "t", "classes": ("a",), "label_map": {}, "weight": -1.0},),
     "entry 0 weight = -1.0: must be >= 0"),
    ("tasks", ({"name": "t", "classes": ("a",), "label_map": {}},) * 2,
     "task names must be unique, repeated: ['t']"),
])
def test_each_kind_of_check_names_the_key_the_value_and_the_valid_range(key, value, message):
  problems = _problems(**{key: value})
  assert len(problems) == 1 and message in problems[0], problems


def test_checks_refuse_other_types():
  # (ConfigDict refuses most type changes on assignment; configs built by hand or unlocked may not.)
  checks = config_lib.checks()
  assert checks["train.allow_config_change"](1) == "must be True or False"
  assert checks["data.cache_dir"](3) == "must be a string"
  assert checks["train.batch_size"](2.0) == "must be an integer >= 1"
  assert checks["train.batch_size"](True) == "must be an integer >= 1"
  assert checks["optim.lr"]("0.1") == "must be a number > 0"
  assert checks["optim.lr_default"](None) is None and checks["optim.lr"](None) == "must be a number > 0"
  assert checks["model.dtype"](None) == "must be one of 'float32', 'bfloat16'"
  assert checks["surgery"]("add_adapters").startswith("must be a list of op dicts")
  assert checks["tasks"]({"name": "t"}) == "must be a tuple of task dicts"


def test_valid_values_pass():
  assert _problems(optim__lr=0.1, train__label_smoothing=0.1, model__dtype="bfloat16", optim__name="lion",
                   optim__lr_rules=(("stem/.*", "frozen"), ("head/.*", 10)), optim__lr_default=None,
                   model__pretrained="torchvision:resnet50", distill__teacher="base",
                   data__val_source="", surgery=[{"op": "add_adapters", "blocks": "x", "width": 4}],
                   train__num_steps=0, train__epochs=1, ema__decay=0.999) == []


def test_rules_that_tie_fields_together():
  assert _problems(train__num_steps=0, train__epochs=0) == [
      "config.train.epochs = 0: must be >= 1 when config.train.num_steps = 0 (the run would train nothing)"]
  assert _problems(train__num_steps=5, train__epochs=0) == []
  assert _problems(model__arch="") == [
      "config.model.arch = '': must name an architecture (jaxft.models.list_archs()) when "
      "config.model.pretrained = '' (random init)"]


def test_every_violation_is_one_line():
  problems = _problems(optim__lr=-0.1, train__batch_size=0, model__dtype="float8")
  assert [p.split(" = ")[0] for p in problems] == ["config.model.dtype", "config.optim.lr",
                                                   "config.train.batch_size"]


def test_unknown_and_missing_keys_name_the_nearest():
  c = config_lib.default_config()
  c.unlock()
  c.optim.lrr = 0.1
  del c.train.num_steps
  c.data.source = "sklearn:digits"
  c.model.arch = "cifar_resnet8"
  problems = validate.validate(c)
  assert "config.optim.lrr: unknown key; nearest: optim.lr, optim.llrd" in problems[0]
  assert problems[1] == "config.train.num_steps: missing (a config holds every key of " \
                        "jaxft.config.default_config())"
  assert validate.nearest_keys("train.lr", config_lib.checks())[0] == "optim.lr"


def test_check_config_raises_train_error_with_one_line_per_problem():
  from jaxft.train import errors
  c = config_lib.default_config()
  c.data.source = "sklearn:digits"
  c.model.arch = "cifar_resnet8"
  errors.check_config(c)
  c.optim.lr = -0.1
  c.train.num_steps = -5
  with pytest.raises(errors.TrainError) as e:
    errors.check_config(c)
  assert str(e.value).splitlines() == ["config.optim.lr = -0.1: must be > 0",
                                       "config.train.num_steps = -5: must be an integer >= 0"]
  assert e.value.exit_code == errors.EXIT_BAD_INPUT == 2


def test_a_workdir_written_before_a_field_existed_resumes_at_its_default(tmp_path):
  from jaxft.train import workdir as workdir_lib
  from jaxft.train.errors import TrainError
  config = config_lib.default_config()
  old = json.loads(config.to_json())
  del old["loss"]["feature"]  # as if loss.feature had been added to the schema since
  (tmp_path / workdir_lib.CONFIG_FILE).write_text(json.dumps(old))
  assert workdir_lib.check_workdir_config(tmp_path, config, resuming=True) == {}
  with config.unlocked():
    config.loss.feature = 0.5  # not the default: the old run did not do this
  with pytest.raises(TrainError, match="loss.feature"):
    workdir_lib.check_workdir_config(tmp_path, config, resuming=True)
