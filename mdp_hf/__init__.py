"""mdp_hf: latency-constrained multi-dimensional structural pruning (MDP) for Hugging Face vision models.

The package root is lazy (trl style): ``import mdp_hf`` imports neither torch nor transformers, and each
public name (``mdp_hf.build_space``, ``mdp_hf.PrunableConfig``, ...) or submodule (``mdp_hf.solver``,
``mdp_hf.hub``, ...) is imported on first access. That is what lets ``mdp-hf solve`` start in a fraction of
a second.

Auto API registration: the pruned-model classes (``mdp_vit``, ``mdp_resnet``, ...) are registered with
transformers' ``AutoConfig`` / ``AutoModel`` / ``AutoModelForImageClassification`` as soon as
``mdp_hf.adapters`` is imported (each family registers its format), which every model-facing module does
(``build_space``, ``slice_model``, ``mdp_hf.hub``, the trainer). After ``import mdp_hf`` they are also registered when transformers itself is
imported later (a one-shot post-import hook), or right away when transformers is already imported; so
``import mdp_hf`` followed by ``AutoModelForImageClassification.from_pretrained(pruned_dir)`` keeps working
without ``trust_remote_code``.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY_ATTRIBUTES = {
    "PrunableConfig": "config",
    "as_timm_module": "adapters.timm_vit",
    "ModelFamily": "adapters",
    "PruningChoice": "adapters",
    "PruningSpace": "adapters",
    "build_space": "adapters",
    "get_adapter": "adapters",
    "get_family": "adapters",
    "register_family": "adapters",
    "registered_families": "adapters",
    "supported_model_types": "adapters",
    "gate_model": "masks",
    "slice_model": "surgery",
}
_SUBMODULES = {
    "adapters",
    "cli",
    "config",
    "data",
    "distributed",
    "hub",
    "importance",
    "latency",
    "losses",
    "masks",
    "metrics",
    "modeling",
    "pruning",
    "recipes",
    "reporting",
    "solver",
    "surgery",
    "trainer",
}

__all__ = sorted(_LAZY_ATTRIBUTES)

if TYPE_CHECKING:  # pragma: no cover - static analysers see the eager names
    from .adapters import (
        ModelFamily,
        PruningChoice,
        PruningSpace,
        build_space,
        get_adapter,
        get_family,
        register_family,
        registered_families,
        supported_model_types,
    )
    from .adapters.timm_vit import as_timm_module
    from .config import PrunableConfig
    from .masks import gate_model
    from .surgery import slice_model


def __getattr__(name: str):
    if name in _LAZY_ATTRIBUTES:
        value = getattr(importlib.import_module(f".{_LAZY_ATTRIBUTES[name]}", __name__), name)
        globals()[name] = value  # later accesses skip __getattr__
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES) | _SUBMODULES)


def _register_auto_classes() -> None:
    """Import mdp_hf.adapters (whose families register the Auto classes) unless it is already being imported."""
    if f"{__name__}.adapters" in sys.modules:
        return
    try:
        importlib.import_module(f"{__name__}.adapters")
    except Exception as e:  # never break the caller's `import transformers`
        import warnings

        warnings.warn(
            f"mdp_hf could not register its pruned-model classes with transformers' Auto API ({e!r}); "
            "import mdp_hf.adapters to see the error",
            stacklevel=2,
        )


class _RegisterAfterTransformers:
    """A one-shot meta-path finder: when ``transformers`` is first imported, let its normal loader run, then
    register our Auto classes. It removes itself on first use and changes nothing else about the import."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            try:
                exec_module(module)
            finally:
                del loader.exec_module  # back to the class's own method
            _register_auto_classes()

        loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    _register_auto_classes()
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
