"""Model adapters: one file per family, looked up by ``config.model_type``.

To support a new family, subclass :class:`ModelAdapter` and call :func:`register_adapter`.
"""

from .base import Block, Dimension, GateSet, ModelAdapter, PruningChoice, PruningSpace, PruningSpaceError
from .resnet import ResNetAdapter
from .vit import ViTAdapter

_ADAPTERS: dict[str, ModelAdapter] = {}


class UnsupportedModelError(PruningSpaceError):
    """No adapter is registered for the model's ``model_type``."""


def register_adapter(adapter: ModelAdapter, model_types: tuple[str, ...] | None = None) -> None:
    """Register ``adapter`` for each ``config.model_type`` it handles."""
    for model_type in model_types or adapter.model_types:
        _ADAPTERS[model_type] = adapter


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def get_adapter(model_or_type) -> ModelAdapter:
    """The adapter for a model, a config, or a ``model_type`` string."""
    if isinstance(model_or_type, str):
        model_type = model_or_type
    else:
        config = getattr(model_or_type, "config", model_or_type)
        model_type = getattr(config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise UnsupportedModelError(
            f"mdp_hf has no adapter for model_type {model_type!r}. Supported: {', '.join(supported_model_types())}. "
            "To add a family, subclass mdp_hf.adapters.ModelAdapter (build_space, install_gates, slice, "
            "expected_num_parameters) and call mdp_hf.adapters.register_adapter(MyAdapter())."
        )
    return _ADAPTERS[model_type]


register_adapter(ViTAdapter())
register_adapter(ResNetAdapter())

__all__ = [
    "Block",
    "Dimension",
    "GateSet",
    "ModelAdapter",
    "PruningChoice",
    "PruningSpace",
    "PruningSpaceError",
    "ResNetAdapter",
    "UnsupportedModelError",
    "ViTAdapter",
    "get_adapter",
    "register_adapter",
    "supported_model_types",
]
