"""mdp_hf: latency-constrained multi-dimensional structural pruning (MDP) for Hugging Face vision models.

Importing the package registers the pruned-model classes (``mdp_vit``, ``mdp_resnet``) with the Auto API.
"""

__version__ = "0.1.0"

from . import modeling  # noqa: F401  (registers Auto classes)
from .adapters import PruningChoice, PruningSpace, get_adapter, register_adapter, supported_model_types
from .config import PrunableConfig
from .surgery import build_space, gate_model, slice_model

__all__ = [
    "PrunableConfig", "PruningChoice", "PruningSpace", "build_space", "gate_model", "get_adapter", "register_adapter",
    "slice_model", "supported_model_types",
]  # fmt: skip
