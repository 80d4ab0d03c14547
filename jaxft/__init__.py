"""jaxft: fine-tune pretrained vision models in JAX/Flax; evolve their structure with pure transforms."""

import os as _os

# XLA reads XLA_FLAGS once, when its first backend starts, so CPU tuning can only happen here, before
# any array exists. Only when the user has set no XLA_FLAGS at all; JAXFT_CPU_FLAGS=0 opts out.
# See jaxft.models.conv.configure_cpu and docs/benchmarks.md (+34% ResNet-50 training at 224 px).
if "XLA_FLAGS" not in _os.environ and _os.environ.get("JAXFT_CPU_FLAGS", "1") != "0":
  from jaxft.models import conv as _conv
  _conv.configure_cpu()

# XLA:CPU frees and re-allocates hundreds of MB of temporaries per step; keep glibc from handing them
# back to the kernel between steps (jaxft.runtime.retain_freed_memory). JAXFT_MALLOC_TUNING=0 opts out.
if _os.environ.get("JAXFT_MALLOC_TUNING", "1") != "0":
  from jaxft import runtime as _runtime
  _runtime.retain_freed_memory()

from jaxft.models import Model, ModelSpec, Network, create_model, get_spec, list_archs
from jaxft.checkpoint import load_model, load_pretrained, save_model
from jaxft.convert import convert_file

__version__ = "0.1.0"
