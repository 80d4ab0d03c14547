"""jaxft: fine-tune pretrained vision models in JAX/Flax; evolve their structure with pure transforms."""

from jaxft.models import Model, ModelSpec, Network, create_model, get_spec, list_archs
from jaxft.checkpoint import load_model, load_pretrained, save_model
from jaxft.convert import convert_file

__version__ = "0.1.0"
