"""Bad config input through the real CLI (``python -m jaxft.train``): each case exits with its code, names
the problem in one ``error:`` line, prints no traceback, and leaves the workdir as it was.

Subprocess runs are few: the config-value cases share one run (each violation is its own line), and every
refusal here happens before any data or weights load (except the surgery, disk and signal cases, which
need a model and run on a 16-image folder).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxft.train import cli, errors

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp: Path, *, pythonpath: tuple[Path, ...] = (), env: dict | None = None
         ) -> subprocess.CompletedProcess:
  paths = os.pathsep.join(str(p) for p in (*pythonpath, ROOT))  # this checkout's jaxft (and configs)
  return subprocess.run([sys.executable, "-m", "jaxft.train", *args], cwd=tmp, capture_output=True,
                        text=True, timeout=600, env={**os.environ, "PYTHONPATH": paths, **(env or {})})


def _errors(r: subprocess.CompletedProcess) -> list[str]:
  """The ``error:`` lines, after asserting there is no traceback and that they end stderr."""
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert lines and lines == r.stderr.strip().splitlines()[-len(lines):], r.stderr[-3000:]
  return lines


def _tree(d: Path) -> dict[str, bytes]:
  return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _workdir(tmp: Path) -> Path:
  """A workdir that holds one file of the user's, to check that a refused run leaves it as it was."""
  wd = tmp / "run"
  wd.mkdir()
  (wd / "notes.txt").write_text("mine")
  return wd


TINY = str(ROOT / "configs" / "tiny.py")

# --config.KEY=VALUE → the line naming the key, the value and the valid range.
BAD_VALUES = {
    "optim.lr=-0.1": "config.optim.lr = -0.1: must be > 0",
    "train.label_smoothing=2.0": "config.train.label_smoothing = 2.0: must be in [0, 1)",
    "train.num_steps=-5": "config.train.num_steps = -5: must be an integer >= 0",
    "model.dtype=float8": "config.model.dtype = 'float8': must be one of 'float32', 'bfloat16'",
    "train.batch_size=0": "config.train.batch_size = 0: must be an integer >= 1",
    "optim.name=adam": "config.optim.name = 'adam': must be one of 'sgd', 'adamw', 'lamb', 'lion'",
    "ema.decay=1.0": "config.ema.decay = 1.0: must be in [0, 1)",
    "data.source=folder:/no/such/folder": "config.data.source = 'folder:/no/such/folder': no such file or "
                                          "directory: /no/such/folder",
}


@pytest.fixture(scope="module")
def bad_values_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
  tmp = tmp_path_factory.mktemp("bad_values")
  wd = _workdir(tmp)
  r = _run(["--config", TINY, "--workdir", str(wd), *(f"--config.{kv}" for kv in BAD_VALUES)], tmp)
  return r, wd


@pytest.mark.parametrize("override", list(BAD_VALUES))
def test_bad_value_is_one_line_naming_key_value_and_range(bad_values_run, override):
  r, wd = bad_values_run
  assert r.returncode == errors.EXIT_BAD_INPUT == 2
  lines = _errors(r)
  assert len(lines) == len(BAD_VALUES)
  assert f"error: {BAD_VALUES[override]}" in lines
  assert _tree(wd) == {"notes.txt": b"mine"}  # no config.json, no checkpoint: nothing was started


def _config_file(tmp: Path, name: str, body: str) -> Path:
  p = tmp / name
  p.write_text(textwrap.dedent(body))
  return p


# (name, config file body or None for a missing file, extra flags, what the one line says)
CONFIG_FILES = [
    ("missing", None, [], r"config file .*missing\.py not found"),
    ("syntax", "def get_config(:\n  pass\n", [], r"config file .*syntax\.py, line 1: syntax error: "),
    ("no_get_config", "import ml_collections\nCONFIG = 1\n", [],
     r"config file .*no_get_config\.py defines no get_config\(\)"),
    ("raises", "def get_config():\n  raise RuntimeError('no GPU here')\n", [],
     r"config file .*raises\.py, line 2 \(raise RuntimeError\('no GPU here'\)\): RuntimeError: no GPU here"),
    ("typo", "from configs import tiny\ndef get_config():\n  c = tiny.get_config()\n  c.optim.lrr = 0.1\n"
     "  return c\n", [], r"config file .*typo\.py, line 4 \(c\.optim\.lrr = 0\.1\): unknown config key "
     r"'optim\.lrr' \(in the config file\); nearest: optim\.lr, "),
    ("none", "def get_config():\n  pass\n", [], r"get_config\(\) returned NoneType, not an ml_collections"),
    ("variant", "from configs.tiny import get_config\n", [":small"],
     r"config file .*variant\.py: get_config\(\) takes 0 positional arguments but 1 was given"),
    ("unknown_key", "from configs.tiny import get_config\n", ["--config.optim.lrr=1"],
     r"unknown config key 'optim\.lrr' \(in --config\.optim\.lrr=1\); nearest: optim\.lr, optim\.llrd"),
    ("bad_flag_value", "from configs.tiny import get_config\n", ["--config.optim.lr=fast"],
     r"--config\.optim\.lr=fast: could not convert string to float: 'fast'"),
    ("unknown_flag", "from configs.tiny import get_config\n", ["--wrokdir=x"],
     r"Unknown command line flag 'wrokdir'"),
]


@pytest.mark.parametrize("name,body,flags,message", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_config_file_problem_is_one_line(tmp_path, name, body, flags, message):
  path = tmp_path / f"{name}.py"
  if body is not None:
    _config_file(tmp_path, path.name, body)
  wd = _workdir(tmp_path)
  variant = "".join(f for f in flags if f.startswith(":"))  # FILE:VARIANT, passed to get_config
  flags = [f for f in flags if not f.startswith(":")]
  r = _run(["--config", f"{path}{variant}", "--workdir", str(wd), *flags], tmp_path)
  assert r.returncode == errors.EXIT_BAD_INPUT, r.stderr[-3000:]
  lines = _errors(r)
  assert len(lines) == 1 and re.search(message, lines[0]), lines
  assert _tree(wd) == {"notes.txt": b"mine"}


def test_debug_shows_the_traceback(tmp_path):
  path = _config_file(tmp_path, "raises.py", "def get_config():\n  raise RuntimeError('no GPU here')\n")
  r = _run(["--config", str(path), "--workdir", str(tmp_path / "run"), "--debug"], tmp_path)
  assert r.returncode != 0 and "Traceback" in r.stderr and "no GPU here" in r.stderr


# ---------------------------------------------------------------------------------------------------
# Problems found once the run has started: a surgery op naming nothing, a read-only or full disk, Ctrl-C.


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
  root = tmp_path_factory.mktemp("data") / "tiny"
  rs = np.random.RandomState(0)
  for name, colour in (("blue", (20, 40, 200)), ("red", (200, 30, 20))):
    (root / name).mkdir(parents=True)
    for i in range(8):
      img = np.clip(np.array(colour) + rs.randint(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(root / name / f"{i:03d}.png")
  return root


def _data_flags(folder: Path, tmp: Path, config: str | Path = TINY) -> list[str]:
  return [f"--config={config}", f"--config.data.source=folder:{folder}",
          f"--config.data.cache_dir={tmp / 'c'}"]


def test_surgery_op_on_a_missing_block_is_one_line(folder, tmp_path):
  wd = _workdir(tmp_path)
  cfg = _config_file(tmp_path, "surgery.py", """
      from configs import tiny
      def get_config():
        c = tiny.get_config()
        c.surgery = [{"op": "add_adapters", "blocks": "layer9/.*", "width": 4}]
        return c
      """)
  r = _run([*_data_flags(folder, tmp_path, cfg), "--workdir", str(wd)], tmp_path)
  assert r.returncode == errors.EXIT_BAD_INPUT, r.stderr[-3000:]
  lines = _errors(r)
  assert len(lines) == 1 and lines[0].startswith("error: config.surgery: ") and "layer9" in lines[0], lines
  assert (wd / "notes.txt").read_text() == "mine" and not (wd / "checkpoints").exists()


# Makes every write under $JAXFT_TEST_FAULT_DIR fail with $JAXFT_TEST_FAULT_ERRNO, as a read-only or full
# file system does (the tests run as root, for whom a chmod'ed directory is writable).
SITECUSTOMIZE = '''
import builtins, errno, io, os
_DIR = os.environ.get("JAXFT_TEST_FAULT_DIR")
_NO = int(os.environ.get("JAXFT_TEST_FAULT_ERRNO", errno.EROFS))
def _under(path):
  try:
    p = os.path.abspath(os.fsdecode(path))
  except TypeError:
    return False
  return p == _DIR or p.startswith(_DIR + os.sep)
def _fail(path):
  raise OSError(_NO, os.strerror(_NO), os.fsdecode(path))
_open, _os_open, _mkdir = builtins.open, os.open, os.mkdir
def _patched_open(file, mode="r", *args, **kwargs):
  if not isinstance(file, int) and any(c in mode for c in "wax+") and _under(file):
    _fail(file)
  return _open(file, mode, *args, **kwargs)
def _patched_os_open(path, flags, *args, **kwargs):
  if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _under(path):
    _fail(path)
  return _os_open(path, flags, *args, **kwargs)
def _patched_mkdir(path, *args, **kwargs):
  if _under(path):
    if os.path.exists(path):
      raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(path))
    _fail(path)
  return _mkdir(path, *args, **kwargs)
if _DIR:
  builtins.open = io.open = _patched_open
  os.open, os.mkdir = _patched_os_open, _patched_mkdir
'''


@pytest.mark.parametrize("no,says", [(errno.EROFS, "Read-only file system; the file system is read-only"),
                                     (errno.ENOSPC, "No space left on device; the disk is full")])
def test_unwritable_workdir_is_one_line_naming_the_path(folder, tmp_path, no, says):
  inject = tmp_path / "inject"
  inject.mkdir()
  (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
  wd = _workdir(tmp_path)
  r = _run([*_data_flags(folder, tmp_path), "--workdir", str(wd)], tmp_path, pythonpath=(inject,),
           env={"JAXFT_TEST_FAULT_DIR": str(wd), "JAXFT_TEST_FAULT_ERRNO": str(no)})
  assert r.returncode == errors.EXIT_BAD_INPUT, r.stderr[-3000:]
  lines = _errors(r)
  assert len(lines) == 1 and lines[0].startswith(f"error: {wd}") and says in lines[0], lines
  assert _tree(wd) == {"notes.txt": b"mine"}


# A config that sends this process a signal at a chosen moment: while the data loads (before the loop),
# or from inside the loop after a given step.
SIGNAL_CONFIG = '''
import os, signal
from configs import tiny
from jaxft.train import monitor, setup

def get_config(when):
  c = tiny.get_config()
  if when == "setup":
    load_data = setup.load_data
    def interrupted_load(config):
      os.kill(os.getpid(), signal.SIGINT)
      return load_data(config)
    setup.load_data = interrupted_load
    return c
  kind, at = when.split("@")
  dispatched = monitor.TrainMonitor.dispatched
  def signalling(self, step, metrics):
    dispatched(self, step, metrics)
    if step == int(at):
      for sig in ([signal.SIGINT, signal.SIGINT] if kind == "twice" else [signal.SIGTERM]):
        os.kill(os.getpid(), sig)
  monitor.TrainMonitor.dispatched = signalling
  c.train.num_steps = 6
  return c
'''


@pytest.mark.parametrize("when,code,says", [
    ("setup", errors.EXIT_SIGINT, "interrupted before any checkpoint was saved: nothing to resume"),
    ("term@3", errors.EXIT_INTERRUPTED, "interrupted: checkpoint of step 3 saved in "),
    ("twice@3", errors.EXIT_INTERRUPTED, "interrupted: checkpoint of step 2 saved in "),
])
def test_signals_end_without_traceback_and_with_their_code(folder, tmp_path, when, code, says):
  cfg = _config_file(tmp_path, "signalling.py", SIGNAL_CONFIG)
  wd = tmp_path / "run"
  r = _run([*_data_flags(folder, tmp_path, f"{cfg}:{when}"), "--workdir", str(wd)], tmp_path)
  assert r.returncode == code, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(says), last
  if code == errors.EXIT_INTERRUPTED:
    assert str(wd / "checkpoints") in last and "rerun the same command to resume" in last


# ---------------------------------------------------------------------------------------------------
# In-process: what each failure says, and its code.


def test_describe_names_the_path_of_a_disk_error(tmp_path):
  code, lines = cli.describe(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "m.jsonl")),
                             tmp_path)
  assert code == 2 and lines == [f"{tmp_path / 'm.jsonl'}: No space left on device; the disk is full: free "
                                 "space or use another --workdir"]
  try:  # wrapped, and carried as text only (as tensorstore does)
    raise ValueError("Error writing local file: No space left on device")
  except ValueError as e:
    code, lines = cli.describe(e, tmp_path)
  assert code == 2 and lines[0].startswith(f"{tmp_path}: Error writing local file")


def test_describe_gives_each_error_its_code(tmp_path):
  assert cli.describe(errors.TrainError("loss became nan", exit_code=errors.EXIT_NONFINITE), tmp_path) == (
      3, ["loss became nan"])
  assert cli.describe(errors.TrainError("a\nb"), tmp_path) == (2, ["a", "b"])
  from jaxft import paths
  assert cli.describe(paths.PathError("no block 'layer9/block0'"), tmp_path) == (
      2, ["no block 'layer9/block0'"])
  code, lines = cli.describe(ZeroDivisionError("division by zero"), tmp_path)
  assert code == 1 and "internal error: ZeroDivisionError: division by zero" in lines[0]
  assert "--debug" in lines[0]


def test_interrupted_names_the_checkpoint_a_rerun_resumes_from(tmp_path):
  assert cli.interrupted(tmp_path) == (130, "interrupted before any checkpoint was saved: nothing to resume")
  assert cli.interrupted(tmp_path, signal.SIGTERM)[0] == 143 and cli.interrupted(None)[0] == 130
  for step in ("4", "12", "tmp.8"):
    (tmp_path / "checkpoints" / step).mkdir(parents=True)
  code, line = cli.interrupted(tmp_path)
  assert code == errors.EXIT_INTERRUPTED == 75
  assert line == (f"interrupted: checkpoint of step 12 saved in {tmp_path / 'checkpoints' / '12'}; rerun "
                  "the same command to resume")


def test_exit_codes_are_the_documented_contract():
  assert (errors.EXIT_OK, errors.EXIT_BAD_INPUT, errors.EXIT_NONFINITE, errors.EXIT_DAMAGED_CHECKPOINT,
          errors.EXIT_WORKDIR_BUSY, errors.EXIT_INTERRUPTED, errors.EXIT_SIGINT) == (0, 2, 3, 4, 5, 75, 130)
  assert errors.TrainError("x").exit_code == 2
  assert errors.TrainError("x", exit_code=errors.EXIT_WORKDIR_BUSY).exit_code == 5


def test_logged_exceptions_are_one_line():
  record = logging.LogRecord("x", logging.ERROR, __file__, 1, "saving step %d failed", (3,), None)
  try:
    raise OSError(errno.ENOSPC, "No space left on device")
  except OSError:
    record.exc_info = sys.exc_info()
  assert cli._NoTracebacks().filter(record)  # pylint: disable=protected-access
  assert record.exc_info is None
  assert record.getMessage() == "saving step 3 failed (OSError: [Errno 28] No space left on device)"


def test_help_lists_the_flags_and_exit_codes(tmp_path):
  r = _run(["--help"], tmp_path)
  assert r.returncode == 0, r.stderr
  for flag in ("--config", "--workdir", "--debug", "75"):
    assert flag in r.stdout, r.stdout
