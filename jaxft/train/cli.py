"""``python -m jaxft.train --config configs/X.py --workdir DIR [--config.a.b=v …] [--debug]``: flags only.

``main`` parses the flags, checks the config (:func:`jaxft.validate.validate`, before anything is loaded)
and calls :func:`jaxft.train.loop.train_and_evaluate`, which does the work. Whatever goes wrong ends in
one line per problem on stderr (``error: …``) and an exit code a scheduler can act on; ``--debug`` shows
the raw traceback instead. The codes (constants in :mod:`jaxft.train.errors`):

====  ===============================================================================================
0     done
1     an internal error (a bug: rerun with ``--debug`` and report the traceback)
2     bad input: config (file, key, value), data, weights, surgery, usage; or a full or read-only disk
3     the loss became non-finite (NaN stop); the last good checkpoint is kept
4     a damaged checkpoint that no intact step could replace
5     the workdir is busy (another process holds its lock)
75    interrupted (SIGTERM/SIGINT) after a checkpoint was saved: rerun the same command to resume
130   interrupted (SIGINT) before any checkpoint was saved: nothing to resume
====  ===============================================================================================
"""

from __future__ import annotations

import errno
import json
import linecache
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, NoReturn

from jaxft import checkpoint as ckpt_lib
from jaxft import config as config_lib
from jaxft import adapt, cpu, report, validate
from jaxft.train import errors
from jaxft.train.errors import TrainError

EXIT_INTERNAL = 1
# errno values that mean "the disk cannot take what the run writes", and what to do about each.
DISK_ERRNOS = {errno.ENOSPC: "the disk is full: free space or use another --workdir",
               errno.EDQUOT: "the disk quota is exhausted: free space or use another --workdir",
               errno.EROFS: "the file system is read-only: use a writable --workdir",
               errno.EACCES: "permission denied: use a --workdir you can write",
               errno.EPERM: "permission denied: use a --workdir you can write"}
HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


class _QuietOrbax(logging.Filter):
  """Drops orbax's per-save INFO chatter from the CLI's log; its warnings and errors still show."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


class _NoTracebacks(logging.Filter):
  """Turns a logged exception into one line (``message (Type: reason)``): tracebacks only with --debug."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and record.exc_info[1] is not None:
      exc = record.exc_info[1]
      record.msg, record.args = f"{record.getMessage()} ({type(exc).__name__}: {_first_line(exc)})", ()
      record.exc_info, record.exc_text = None, None
    return True


def _first_line(e: BaseException) -> str:
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def _fail(lines: list[str], code: int) -> NoReturn:
  for line in lines:
    print(f"error: {line}", file=sys.stderr)
  sys.exit(code)


# ---------------------------------------------------------------------------------------------------
# Before main: the config file and the flags.


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of ``--name=V`` / ``--name V`` in ``argv`` (the last one), or None."""
  value = None
  for i, a in enumerate(argv):
    m = re.fullmatch(rf"--?{name}(=(.*))?", a)
    if m:
      value = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else "")
  return value


def _debug(argv: list[str]) -> bool:
  return any(re.fullmatch(r"--?debug(=(true|True|1))?", a) for a in argv)


def _unknown_overrides(argv: list[str]) -> list[str]:
  """One line per ``--config.KEY`` whose KEY is not in the schema, naming the nearest keys."""
  checks = config_lib.checks()
  known = set(checks) | {k.rsplit(".", i)[0] for k in checks for i in range(1, k.count(".") + 1)}
  out = []
  for a in argv:
    m = re.match(r"--?(?:no)?config\.([^=\[\s]+)", a)
    if m and m.group(1) not in known:
      out.append(_unknown_key(m.group(1), a, checks))
  return out


def _unknown_key(key: str, where: str, keys: Any) -> str:
  near = validate.nearest_keys(key, keys)
  return (f"unknown config key {key!r} (in {where}); nearest: {', '.join(near) if near else 'none'} "
          "(every key: jaxft.config.default_config())")


def _check_argv(argv: list[str]) -> list[str]:
  """What is wrong with the command line before any flag is parsed (no file is executed)."""
  if any(a in HELP_FLAGS for a in argv):
    return []
  spec = _flag_value(argv, "config")
  if not spec:
    return ["--config is required: a config file such as --config configs/tiny.py"]
  path = Path(spec.split(":", 1)[0])
  if not path.is_file():
    return [f"config file {path} not found" + (" (it is a directory)" if path.is_dir() else "")]
  return _unknown_overrides(argv) + _unsupported_adaptive(argv)


def _unsupported_adaptive(argv: list[str]) -> list[str]:
  """One line per ``--config.KEY=adaptive(...)`` whose KEY cannot be adaptive (a number field)."""
  out = []
  for a in argv:
    m = re.match(r"--?config\.([^=\s]+)=(.*)", a, re.S)
    if (m and adapt.looks_adaptive(m.group(2)) and m.group(1) in config_lib.checks()
        and not adapt.supports(m.group(1))):
      out.append(f"--config.{m.group(1)} cannot be adaptive(...); fields that can: "
                 f"{adapt.supported_keys()}")
  return out


def _chain(e: BaseException) -> Iterator[BaseException]:
  """``e`` and the exceptions it was raised from or while handling, outermost first."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _config_file_problem(e: BaseException, config_file: str) -> str | None:
  """One line for an exception raised while loading ``config_file`` (None if it is not about it)."""
  path = os.path.realpath(config_file)
  for exc in reversed(list(_chain(e))):  # the root cause first
    if isinstance(exc, SyntaxError) and exc.filename and os.path.realpath(exc.filename) == path:
      return f"config file {config_file}, line {exc.lineno}: syntax error: {exc.msg}"
    if isinstance(exc, AttributeError) and "has no attribute 'get_config'" in str(exc):
      return f"config file {config_file} defines no get_config() (returning an ml_collections.ConfigDict)"
    if isinstance(exc, TypeError) and str(exc).startswith("get_config()"):  # e.g. FILE:VARIANT, no variants
      return f"config file {config_file}: {_first_line(exc)}"
    tb, line = exc.__traceback__, None
    while tb is not None:
      if os.path.realpath(tb.tb_frame.f_code.co_filename) == path:
        line = tb.tb_lineno
      tb = tb.tb_next
    if line is not None:
      source = linecache.getline(path, line).strip()
      return f"config file {config_file}, line {line} ({source}): {_config_error(exc, source)}"
  return None


def _config_error(exc: BaseException, source: str) -> str:
  """``exc`` raised by the config file line ``source``, said shortly (a locked key: the nearest keys)."""
  m = re.search(r'Key "(\w+)" does not exist and cannot be added', str(exc))
  bad = re.search(r"Could not override field '(\w+)'.* adaptive\(", str(exc))
  if bad:  # an adaptive(...) string given to a number field
    return (f"field {bad.group(1)!r} cannot be adaptive(...); fields that can: "
            f"{adapt.supported_keys()}")
  if not m:
    return f"{type(exc).__name__}: {_first_line(exc)}"
  chain = re.match(r"\w+((?:\.\w+)+)\s*=", source)
  key = chain.group(1)[1:] if chain and chain.group(1).endswith("." + m.group(1)) else m.group(1)
  return _unknown_key(key, "the config file", config_lib.checks())


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (``app.run(flags_parser=...)``) where every problem is one line and exit 2: no
  or a missing config file, one that fails to load (syntax error, no ``get_config``, ``get_config``
  raising), an unknown ``--config.KEY`` (naming the nearest keys), a bad flag value or an unknown flag.

  Returns:
    The arguments left after the flags, for ``main``.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  if any(a in ("-h", "-?", "--help") for a in argv[1:]):  # absl would print this too, but exit 1
    print(sys.modules["__main__"].__doc__ or "")
    sys.exit(errors.EXIT_OK)
  problems = _check_argv(argv)
  if problems:
    _fail(problems, errors.EXIT_BAD_INPUT)
  try:
    return flags.FLAGS(argv)
  except (KeyboardInterrupt, SystemExit):
    raise
  except Exception as e:  # pylint: disable=broad-except  # the user's config file may raise anything
    if _debug(argv):
      raise
    spec = _flag_value(argv, "config") or ""
    line = _config_file_problem(e, spec.split(":", 1)[0]) or _first_line(e)
    _fail([line], errors.EXIT_BAD_INPUT)


def define_flags() -> None:
  """``--config`` (a configs/*.py file, locked: unknown override keys are errors), ``--workdir`` and
  ``--debug``."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go (default runs/<config>).")
  flags.DEFINE_bool("debug", False, "Show raw tracebacks instead of one-line errors.")


# ---------------------------------------------------------------------------------------------------
# After main has started: what each failure tells the user, and its exit code.


def _disk_problem(e: BaseException, workdir: Path) -> str | None:
  """One line when ``e`` (or what it was raised from) is a full, read-only or unwritable disk."""
  for exc in _chain(e):
    if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
      return f"{exc.filename or workdir}: {exc.strerror}; {DISK_ERRNOS[exc.errno]}"
  for exc in _chain(e):  # e.g. tensorstore's errors carry the OS error as text only
    for no, fix in DISK_ERRNOS.items():
      if no in (errno.ENOSPC, errno.EROFS, errno.EDQUOT) and os.strerror(no) in str(exc):
        return f"{workdir}: {_first_line(exc)}; {fix}"
  return None


def _saved_step(workdir: Path) -> int | None:
  """The newest checkpoint step in ``workdir`` (None when there is none)."""
  d = workdir / ckpt_lib.CHECKPOINTS_SUBDIR
  steps = [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.is_dir() else []
  return max(steps) if steps else None


def interrupted(workdir: Path | None, signum: int = signal.SIGINT) -> tuple[int, str]:
  """``(exit code, line)`` for a run stopped by signal ``signum``: 75 naming the checkpoint a rerun
  resumes from, or 128 + ``signum`` (130 for SIGINT) when there is none."""
  step = None if workdir is None else _saved_step(workdir)
  if step is None:
    return 128 + signum, "interrupted before any checkpoint was saved: nothing to resume"
  return errors.EXIT_INTERRUPTED, (f"interrupted: checkpoint of step {step} saved in "
                                   f"{workdir / ckpt_lib.CHECKPOINTS_SUBDIR / str(step)}; rerun the same "
                                   "command to resume")


def _workdir(workdir_flag: str | None, config_spec: str | None) -> Path | None:
  """The run's workdir, absolute: ``--workdir``, else ``runs/<config file name>`` (None: neither)."""
  if workdir_flag:
    return Path(workdir_flag).absolute()
  return Path("runs", Path(config_spec.split(":", 1)[0]).stem).absolute() if config_spec else None


def _exit_at_once(signum: int, frame: Any) -> None:
  """SIGINT/SIGTERM outside the step loop (whose StopFlag saves a checkpoint first): one line and exit
  now. Nothing of this run is being written then, and checkpoints are atomic; exiting from the handler
  (rather than raising KeyboardInterrupt) also works where Python would swallow the exception, such as
  inside a garbage-collector callback."""
  del frame
  argv = sys.argv
  code, line = interrupted(_workdir(_flag_value(argv, "workdir"), _flag_value(argv, "config")), signum)
  os.write(2, (line + "\n").encode())  # not print(): the handler may run inside a write to stderr
  os._exit(code)  # pylint: disable=protected-access


def describe(e: Exception, workdir: Path) -> tuple[int, list[str]]:
  """``(exit code, lines)`` telling the user about ``e``, raised by a run in ``workdir``."""
  disk = _disk_problem(e, workdir)
  if disk:
    return errors.EXIT_BAD_INPUT, [disk]
  if isinstance(e, TrainError):
    return e.exit_code, str(e).strip().splitlines() or [type(e).__name__]
  from jaxft import convert, data, paths  # pylint: disable=g-import-not-at-top
  if isinstance(e, (data.DataError, convert.ConversionError, ckpt_lib.CheckpointError)):
    return getattr(e, "exit_code", errors.EXIT_BAD_INPUT), str(e).strip().splitlines() or [type(e).__name__]
  if isinstance(e, (paths.PathError, ValueError)):
    # jaxft raises these for values the user chose: selectors naming nothing, bad surgery arguments.
    prefix = "config.surgery: " if any(f.startswith("jaxft/surgery/") for f in _jaxft_frames(e)) else ""
    return errors.EXIT_BAD_INPUT, [prefix + _first_line(e)]
  if isinstance(e, OSError):
    return errors.EXIT_BAD_INPUT, [_first_line(e)]
  where = (_jaxft_frames(e) or ["?"])[-1]
  return EXIT_INTERNAL, [f"internal error: {type(e).__name__}: {_first_line(e)} (in {where}); rerun with "
                         "--debug for the traceback and please report it"]


def _jaxft_frames(e: BaseException) -> list[str]:
  """``jaxft/…/module.py`` of each jaxft frame that ``e`` passed through, outermost first."""
  root = Path(__file__).resolve().parents[2]
  out, tb = [], e.__traceback__
  while tb is not None:
    f = Path(tb.tb_frame.f_code.co_filename)
    if f.is_absolute() and root in f.parents and f.parts[len(root.parts)] == "jaxft":
      out.append(str(f.relative_to(root)))
    tb = tb.tb_next
  return out


def _thread_exception(args: threading.ExceptHookArgs) -> None:
  logging.error("thread %s failed: %s: %s", getattr(args.thread, "name", "?"), args.exc_type.__name__,
                _first_line(args.exc_value) if args.exc_value is not None else "")


def _unraisable(args: Any) -> None:  # e.g. a file's close() failing at exit on a full disk
  logging.error("%s: %s: %s", args.err_msg or "exception ignored", args.exc_type.__name__,
                _first_line(args.exc_value) if args.exc_value is not None else "")


def main(argv: list[str]) -> None:
  """CLI entry point: checks the config, calls :func:`train_and_evaluate` and prints its result as JSON;
  every failure is one line per problem on stderr and an exit code (module docstring)."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  debug = flags.FLAGS.debug
  handler = absl_logging.get_absl_handler()
  handler.addFilter(_QuietOrbax())
  if not debug:
    handler.addFilter(_NoTracebacks())
    threading.excepthook, sys.unraisablehook = _thread_exception, _unraisable
  config = flags.FLAGS.config
  config_file = flags.FLAGS["config"].config_filename
  workdir = _workdir(flags.FLAGS.workdir, config_file)
  try:
    if not isinstance(config, ml_collections.ConfigDict):
      raise TrainError(f"config file {config_file}: get_config() returned {type(config).__name__}, "
                       "not an ml_collections.ConfigDict")
    errors.check_config(config)
    from jaxft.train.loop import train_and_evaluate  # pylint: disable=g-import-not-at-top
    result = train_and_evaluate(config, workdir)
  except KeyboardInterrupt:
    code, line = interrupted(workdir)
    print(line, file=sys.stderr)
    sys.exit(code)
  except Exception as e:  # pylint: disable=broad-except  # each failure becomes one line and its code
    if debug:
      raise
    code, lines = describe(e, workdir)
    _fail(lines, code)
  print(json.dumps(report.json_ready({k: v for k, v in result.items() if k != "per_class"}), allow_nan=False))
  if result.get("interrupted"):
    code, line = interrupted(workdir)
    print(line, file=sys.stderr)
    sys.exit(code)


def run() -> None:
  """The process entry point: the CPU backend first (it may re-exec this process under tcmalloc, so
  before any JAX computation), then flags, then :func:`main`. A signal outside the step loop ends the
  process at once with one line (:func:`_exit_at_once`)."""
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, _exit_at_once)
  try:
    cpu.enable(relaunch=True)
    from absl import app  # pylint: disable=g-import-not-at-top
    define_flags()
    app.run(main, flags_parser=parse_flags)
  except KeyboardInterrupt:
    print("interrupted before the run started: nothing was saved", file=sys.stderr)
    sys.exit(errors.EXIT_SIGINT)
