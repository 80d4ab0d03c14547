"""jaxft: fine-tune pretrained vision models in JAX/Flax; evolve their structure with pure transforms."""

from jaxft.models import Model, ModelSpec, Network, create_model, get_spec, list_archs

__version__ = "0.1.0"
