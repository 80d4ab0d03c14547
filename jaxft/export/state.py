"""The torch-layout state dict of a :class:`~jaxft.models.Model`, and writing it to ``.pth`` /
``.safetensors``.

The rows of the conversion table (:func:`jaxft.convert.mapping_table`, generated from the spec) are read
backwards with :data:`~jaxft.convert.tables.INVERSE_RULES`, so import and export share one naming and a
torch → jaxft → torch round trip of an unmodified model gives the very same tensors. Export is strict the
other way round: every leaf of the model must have a row (nothing is silently dropped), and every row a
leaf. No torch is needed here except to write ``.pth``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxft import paths
from jaxft.convert.errors import ConversionError
from jaxft.convert.tables import INVERSE_RULES, Entry, mapping_table
from jaxft.models.model import Model
from jaxft.models.spec import ModelSpec

# file suffix → format written by save_torch
SUFFIXES = {".pth": "torch", ".pt": "torch", ".safetensors": "safetensors"}
# torch's BatchNorm2d counts training batches; jaxft does not, so an exported model starts at 0.
_COUNTER = "num_batches_tracked"


class ExportError(ValueError):
  """A model that cannot be written as a torch model; the message names the problem and the fix."""


def prepare(model: Model) -> Model:
  """Returns ``model`` ready to export: LoRA adapters merged into their layers
  (``jaxft.surgery.merge_lora``) when ``spec.lora`` lists any, else ``model`` itself. Never mutated.

  Raises:
    ExportError: the spec has LoRA but this jaxft has no ``merge_lora``.
  """
  if not getattr(model.spec, "lora", ()):
    return model
  from jaxft import surgery  # pylint: disable=import-outside-toplevel — only LoRA models need it
  merge = getattr(surgery, "merge_lora", None)
  if merge is None:
    raise ExportError("the model has LoRA adapters (spec.lora) but jaxft.surgery has no merge_lora to "
                      "merge them before export; upgrade jaxft")
  return merge(model)


def _table(spec: ModelSpec) -> list[Entry]:
  try:
    return mapping_table(spec)
  except ConversionError as e:
    raise ExportError(f"cannot export: {e}") from None


def module_names(spec: ModelSpec) -> dict[str, str]:
  """Returns ``{jaxft module path: torch module name}`` (``layer1/block0/conv1`` → ``layer1.0.conv1``)
  for every module with parameters in ``Network(spec)``, in torch order; a new dict.

  Raises:
    ExportError: a block kind the family's torch naming has no name for.
  """
  out: dict[str, str] = {}
  for e in _table(spec):
    out.setdefault(e.path.split("/", 1)[1].rsplit("/", 1)[0], e.torch.rsplit(".", 1)[0])
  return out


def _check_cover(table: list[Entry], flat: dict[str, Any]) -> None:
  """Raises :class:`ExportError` unless the rows of ``table`` and the leaves ``flat`` match one to one."""
  rows = {e.path for e in table}
  unnamed = sorted(set(flat) - rows)
  absent = sorted(rows - set(flat))
  if unnamed or absent:
    raise ExportError(
        "cannot export: the model's variables do not fit its spec's torch names"
        + (f"; leaves without a torch name: {unnamed[:8]}" if unnamed else "")
        + (f"; leaves the spec needs but the model lacks: {absent[:8]}" if absent else "")
        + " (was the model edited outside jaxft.surgery?)")


def torch_state_dict(model: Model, *, counters: bool = True) -> dict[str, np.ndarray]:
  """Returns the torch state dict of ``model`` as new, contiguous float32 numpy arrays in torch layout
  and torch order (LoRA merged first, see :func:`prepare`). ``model`` is never mutated.

  Args:
    model: any model jaxft can build (widened, pruned, adapters, extra heads, appended/removed blocks…).
    counters: also each BatchNorm's ``num_batches_tracked`` (int64 zero), as torch's own state dicts
      have: needed for a ``strict=True`` load into a torch model.

  Raises:
    ExportError: a structure without torch names, or variables that do not fit the spec.
  """
  model = prepare(model)
  table = _table(model.spec)
  flat = paths.flatten(model.variables)
  _check_cover(table, flat)
  out: dict[str, np.ndarray] = {}
  for e in table:
    out[e.torch] = np.array(INVERSE_RULES[e.rule](np.asarray(flat[e.path], np.float32)), np.float32,
                            order="C")
    if counters and e.torch.endswith(".running_var"):
      out[e.torch[:-len("running_var")] + _COUNTER] = np.zeros((), np.int64)
  return out


def _suffix_format(path: Path) -> str:
  try:
    return SUFFIXES[path.suffix.lower()]
  except KeyError:
    raise ExportError(f"cannot write {path.name!r}: unknown file type {path.suffix or '(none)'!r}; "
                      f"name the output {' or '.join(f'*{s}' for s in SUFFIXES)}") from None


def _write(sd: dict[str, np.ndarray], path: Path, fmt: str) -> None:
  if fmt == "safetensors":
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file(sd, str(path))
    return
  try:
    import torch  # pylint: disable=import-outside-toplevel — torch is optional
  except ImportError:
    raise ExportError("writing .pth needs torch (pip install 'jaxft[torch]'); or write .safetensors, "
                      "which needs no torch") from None
  # A plain {name: tensor} dict: torch.load(weights_only=True) reads it.
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, str(path))


def save_torch(model: Model, path: str | os.PathLike, *, force: bool = False) -> Path:
  """Writes the torch state dict of ``model`` (:func:`torch_state_dict`, counters included) to ``path``:
  ``.pth``/``.pt`` (a plain ``{name: tensor}`` dict, loadable with ``torch.load(weights_only=True)``) or
  ``.safetensors``. Written to a temporary file first, so ``path`` is never left half-written.

  Returns:
    The absolute path written. ``model`` is never mutated.

  Raises:
    ExportError: unknown suffix, ``path`` exists and not ``force``, ``.pth`` without torch, or a model
      that cannot be exported.
  """
  path = Path(path).absolute()
  fmt = _suffix_format(path)
  if path.exists() and not force:
    raise ExportError(f"{path} exists; pass force=True (--force) to overwrite it")
  if not path.parent.is_dir():
    raise ExportError(f"cannot write {path}: no directory {path.parent}")
  sd = torch_state_dict(model)
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  os.close(fd)
  try:
    _write(sd, Path(tmp), fmt)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path
