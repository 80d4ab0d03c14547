"""jaxft: fine-tune pretrained vision models in JAX/Flax; evolve their structure with pure transforms.

Importing jaxft changes nothing in the process (no environment variable, allocator setting or native
build) and loads nothing heavy: the names below are imported on first access (PEP 562). The CPU
speed-ups are one explicit call, :func:`jaxft.cpu.enable`.
"""

from __future__ import annotations

from jaxft import _lazy

__version__ = "0.1.0"

# public name → the module it lives in (imported when the name is first used)
_EXPORTS = {
    "Model": "jaxft.models", "ModelSpec": "jaxft.models", "Network": "jaxft.models",
    "create_model": "jaxft.models", "get_spec": "jaxft.models", "list_archs": "jaxft.models",
    "load_model": "jaxft.checkpoint", "load_pretrained": "jaxft.checkpoint",
    "save_model": "jaxft.checkpoint", "convert_file": "jaxft.convert", "adaptive": "jaxft.adapt",
}

_SUBMODULES = ("adapt", "checkpoint", "config", "convert", "cpu", "data", "ema", "evaluate", "export",
               "losses", "models", "optim", "paths", "report", "safe_pickle", "surgery", "train")

__getattr__, __dir__, __all__ = _lazy.attach(__name__, _EXPORTS, _SUBMODULES)
