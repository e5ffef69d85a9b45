"""Model families: one adapter file each, registered with :func:`register_family`.

Importing this package imports every module in it, so each family file registers itself (a new family is
a new file here, plus its pruned-model files in ``mdp_hf/modeling/`` if it defines a format of its own).
Family files import neither timm nor other optional packages at import time.
"""

import importlib
import pkgutil

from .base import (
    Block,
    Dimension,
    GateSet,
    LatencyCells,
    ModelAdapter,
    PruningChoice,
    PruningSpace,
    PruningSpaceError,
    TimingGrid,
    TimingTerm,
    check_group_size_keys,
    check_group_sizes_fit,
)
from .registry import (
    TASK_AUTO_CLASSES,
    ModelFamily,
    UnsupportedModelError,
    auto_class_for_config,
    find_family,
    get_adapter,
    get_family,
    register_family,
    registered_families,
    registered_kinds,
    supported_model_types,
    task_of,
)

_INFRASTRUCTURE = {"base", "registry"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _INFRASTRUCTURE and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")


def build_space(
    model, group_sizes: dict[str, int] | None = None, min_keep: dict[str, int] | None = None
) -> PruningSpace:
    """The model's pruning space: dimensions (size, group, minimum, coupling) and removable blocks."""
    family = get_family(model)
    space = family.adapter.build_space(model, group_sizes, min_keep)
    undeclared = sorted({d.kind for d in space.dimensions.values()} - set(family.kinds))
    if undeclared:  # a family bug: such a kind could never be switched on or off by PrunableConfig.prune
        raise AssertionError(f"family {family.name!r} built dimensions of undeclared kinds {undeclared}")
    check_group_size_keys(space, group_sizes)
    check_group_sizes_fit(space, group_sizes, min_keep, family.adapter.stem_dimensions)
    return space


__all__ = [
    "TASK_AUTO_CLASSES",
    "Block",
    "Dimension",
    "GateSet",
    "LatencyCells",
    "ModelAdapter",
    "ModelFamily",
    "PruningChoice",
    "PruningSpace",
    "PruningSpaceError",
    "TimingGrid",
    "TimingTerm",
    "UnsupportedModelError",
    "auto_class_for_config",
    "build_space",
    "find_family",
    "get_adapter",
    "get_family",
    "register_family",
    "registered_families",
    "registered_kinds",
    "supported_model_types",
    "task_of",
]
