"""Weight files in: ``.pth/.pt/.th`` or ``.safetensors`` → a flat ``{torch key: numpy array}`` dict."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from jaxft.convert import torch_pickle
from jaxft.convert.errors import ConversionError

TORCH_SUFFIXES = (".pth", ".pt", ".th", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
# Keys that carry no weights; torch's BatchNorm counts its updates in these.
IGNORED_SUFFIXES = ("num_batches_tracked",)
# Dict keys under which training scripts commonly nest the actual state dict.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


def _to_numpy(v: Any) -> np.ndarray | None:
  """A numpy *copy* of a tensor/array (torch's ``.numpy()`` shares memory), or None for non-arrays."""
  if hasattr(v, "detach"):  # torch.Tensor, without importing torch
    v = v.detach().cpu()
    if str(v.dtype) == "torch.bfloat16":
      v = v.float()
    return v.numpy().copy()
  if isinstance(v, (np.ndarray, jax.Array)):
    return np.array(v)
  return None


def unwrap_state_dict(obj: Any) -> dict[str, np.ndarray]:
  """Returns the flat ``{key: numpy array}`` state dict inside ``obj``.

  Accepts a plain state dict or one nested under ``state_dict``/``model``/… (repeatedly), strips a
  ``module.`` prefix (DataParallel) when every key has it, and drops ``num_batches_tracked`` counters.
  Arrays are copied; ``obj`` is never mutated.

  Raises:
    ConversionError: when ``obj`` holds no mapping of tensors.
  """
  seen = 0
  while isinstance(obj, Mapping) and seen < 4:
    inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      break
    obj, seen = inner, seen + 1
  if hasattr(obj, "state_dict") and callable(obj.state_dict):  # a pickled nn.Module
    obj = obj.state_dict()
  if not isinstance(obj, Mapping):
    raise ConversionError(f"expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
  out: dict[str, np.ndarray] = {}
  for k, v in obj.items():
    if str(k).endswith(IGNORED_SUFFIXES):
      continue
    a = _to_numpy(v)
    if a is not None:
      out[str(k)] = a
  if not out:
    raise ConversionError(f"found no tensors in the state dict (keys: {list(obj)[:8]})")
  if all(k.startswith("module.") for k in out):
    out = {k[len("module."):]: v for k, v in out.items()}
  return out


def load_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a ``.pth/.pt/.th`` (without torch when it holds only tensors, else through torch) or
  ``.safetensors`` (no torch needed) file. Nothing in the file runs unless ``trust_pickle``.

  Args:
    path: the file; only read.
    trust_pickle: let torch unpickle a file the restricted reader refuses with ``weights_only=False``,
      which runs code from the file: only for files you made yourself (see ``docs/security.md``).

  Returns:
    A new flat ``{torch key: numpy array}`` dict (wrappers and ``module.`` prefixes removed).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ConversionError: if the file is truncated, not a weights file, holds no tensors, or (without
      ``trust_pickle``) needs a pickle global that could run code (named in the message).
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"weights file not found: {path}")
  if path.suffix in SAFETENSORS_SUFFIXES:
    from safetensors.numpy import load_file
    try:
      obj = load_file(str(path))
    except Exception as e:  # noqa: BLE001 — safetensors raises its own error type
      raise ConversionError(f"{path} is not a readable .safetensors file (truncated?): {e}") from None
  else:
    obj = torch_pickle.load_torch(path, trust_pickle=trust_pickle)
  return unwrap_state_dict(obj)


def sha256(path: str | os.PathLike) -> str:
  """Returns the hex sha256 of the file at ``path`` (read in chunks; only read)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()
