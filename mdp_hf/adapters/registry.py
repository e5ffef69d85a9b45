"""One registration per model family: its adapter, pruned-model classes, latency cells and dimension kinds.

A family is one adapter file in this package (plus its pruned-model files in ``mdp_hf/modeling/`` when it
exports a format of its own) that ends with::

    register_family(ModelFamily(name="vit", adapter=ViTAdapter(), kinds=(...), model_types=(...), ...))

Every module in ``mdp_hf/adapters/`` is imported when ``mdp_hf.adapters`` is, so a new file registers
itself; nothing else in the package names a family. Lookup is by ``config.model_type`` for transformers
models and by module class (its qualified name, so timm need not be imported) for plain ``nn.Module``s.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .base import LatencyCells, ModelAdapter, PruningSpaceError

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: task -> the transformers Auto class of its head models (also the pipeline task name)
TASK_AUTO_CLASSES = {
    "image-classification": "AutoModelForImageClassification",
    "object-detection": "AutoModelForObjectDetection",
}
#: task -> the suffix of its head models' class names (``architectures[0]`` of a saved config)
TASK_ARCHITECTURE_SUFFIXES = {
    "image-classification": "ForImageClassification",
    "object-detection": "ForObjectDetection",
}


@dataclass(frozen=True)
class ModelFamily:
    """Everything mdp_hf knows about one model family.

    - ``name``: identifier (``[a-z][a-z0-9_]*``), also the ``model_type`` of spaces of plain modules.
    - ``adapter``: the :class:`~mdp_hf.adapters.base.ModelAdapter` (space, gates, scores, slicing).
    - ``kinds``: the dimension kinds its spaces declare (``PrunableConfig.prune`` switches them on/off).
    - ``model_types``: transformers ``config.model_type`` values it handles (dense and pruned).
    - ``module_classes``: qualified class names of plain modules it handles (subclasses match too), e.g.
      ``"timm.models.resnet.ResNet"``.
    - ``task``: what the models compute, a key of :data:`TASK_AUTO_CLASSES`: ``"image-classification"`` (default;
      batches of integer or soft labels) or ``"object-detection"`` (``labels`` a list of dicts with
      ``class_labels`` and normalised cxcywh ``boxes``; outputs ``logits`` and ``pred_boxes``). It names the
      Auto class of the pruned head model, the pipeline, and what the test matrix compares.
    - ``pruned_classes``: ``(config class, base model class, head model class)`` of the pruned format it
      defines; registered with transformers' Auto API (the head model under the task's Auto class) and copied
      next to saved weights so ``trust_remote_code=True`` loads a pruned model without mdp_hf. Families that
      export into another family's format leave it empty.
    - ``latency_cells``: the :class:`~mdp_hf.adapters.base.LatencyCells` subclass that says which blocks
      to time for a lookup table and builds one at given widths.
    - ``test_models``: tiny variants (name -> zero-argument builder; 32x32 RGB input, 5 labels) that the
      registry-driven test matrix runs through every contract check.
    - ``presets``: named real shapes (name -> builder of a randomly initialised model) for
      ``mdp-hf latency build PRESET`` and the benchmarks.
    """

    name: str
    adapter: ModelAdapter
    kinds: tuple[str, ...]
    model_types: tuple[str, ...] = ()
    module_classes: tuple[str, ...] = ()
    task: str = "image-classification"
    pruned_classes: tuple[type, ...] = ()
    latency_cells: type | None = None
    test_models: Mapping[str, Callable] = field(default_factory=dict)
    presets: Mapping[str, Callable] = field(default_factory=dict)


class UnsupportedModelError(PruningSpaceError):
    """No registered family handles the model."""


_FAMILIES: dict[str, ModelFamily] = {}
_BY_MODEL_TYPE: dict[str, ModelFamily] = {}
_BY_CLASS: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Register ``family``; refuses duplicates and malformed entries with a message naming the field."""

    def bad(field_name: str, why: str):
        raise ValueError(f"register_family({family.name!r}): {field_name} {why}")

    if not isinstance(family.name, str) or not _NAME.match(family.name):
        bad("name", "must match [a-z][a-z0-9_]* (it is also a model_type)")
    if family.name in _FAMILIES:
        bad("name", "is already registered")
    if not isinstance(family.adapter, ModelAdapter):
        bad("adapter", f"must be a ModelAdapter instance, got {type(family.adapter).__name__}")
    if not family.kinds or not all(isinstance(k, str) and _NAME.match(k) for k in family.kinds):
        bad("kinds", f"must be a non-empty tuple of identifiers, got {family.kinds!r}")
    if "blocks" in family.kinds or "all" in family.kinds:
        bad("kinds", "may not contain 'blocks' or 'all' (PrunableConfig.prune uses those words)")
    if not family.model_types and not family.module_classes:
        bad("model_types", "and module_classes are both empty: nothing would ever be looked up")
    for model_type in family.model_types:
        if model_type in _BY_MODEL_TYPE:
            bad("model_types", f"{model_type!r} is already handled by family {_BY_MODEL_TYPE[model_type].name!r}")
    for cls_name in family.module_classes:
        if cls_name in _BY_CLASS or "." not in cls_name:
            bad("module_classes", f"{cls_name!r} is a duplicate or not a qualified class name (module.Class)")
    if family.task not in TASK_AUTO_CLASSES:
        bad("task", f"must be one of {sorted(TASK_AUTO_CLASSES)}, got {family.task!r}")
    if family.pruned_classes and len(family.pruned_classes) != 3:
        bad("pruned_classes", "must be (config class, base model class, head model class)")
    if family.latency_cells is not None and not (
        isinstance(family.latency_cells, type) and issubclass(family.latency_cells, LatencyCells)
    ):
        bad("latency_cells", "must be a LatencyCells subclass")
    for mapping_name in ("test_models", "presets"):
        for key, builder in getattr(family, mapping_name).items():
            if not callable(builder):
                bad(mapping_name, f"entry {key!r} is not callable")
    if family.pruned_classes:
        register_auto_classes(*family.pruned_classes, task=family.task)
    _FAMILIES[family.name] = family
    for model_type in family.model_types:
        _BY_MODEL_TYPE[model_type] = family
    for cls_name in family.module_classes:
        _BY_CLASS[cls_name] = family
    return family


def register_auto_classes(config_cls, base_cls, head_cls, task: str = "image-classification") -> None:
    """Map a pruned format in the Auto API (the head model under ``task``'s Auto class), and mark its classes so
    that ``save_pretrained`` copies their source files next to the weights and writes ``auto_map``
    (transformers' own custom-code mechanism)."""
    import transformers
    from transformers import AutoConfig, AutoModel

    head_auto = getattr(transformers, TASK_AUTO_CLASSES[task])
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModel.register(config_cls, base_cls, exist_ok=True)
    head_auto.register(config_cls, head_cls, exist_ok=True)
    config_cls.register_for_auto_class()
    base_cls.register_for_auto_class("AutoModel")
    head_cls.register_for_auto_class(TASK_AUTO_CLASSES[task])


def task_of_architecture(architecture: str | None) -> str | None:
    """The task whose head models are named ``...<suffix>`` (``TASK_ARCHITECTURE_SUFFIXES``); None: a base model."""
    for task, suffix in TASK_ARCHITECTURE_SUFFIXES.items():
        if architecture and architecture.endswith(suffix):
            return task
    return None


def auto_class_for_config(config):
    """The transformers Auto class that loads a saved model of ``config``: its task's Auto class for a head model
    (``config.architectures[0]`` ends with the task's suffix), else ``AutoModel``."""
    import transformers

    task = task_of_architecture((getattr(config, "architectures", None) or [None])[0])
    return getattr(transformers, TASK_AUTO_CLASSES[task] if task else "AutoModel")


def task_of(model_or_type) -> str:
    """The task of a model's family (``"image-classification"`` for a model no family handles)."""
    family = find_family(model_or_type)
    return family.task if family is not None else "image-classification"


def registered_families() -> list[ModelFamily]:
    return list(_FAMILIES.values())


def registered_kinds() -> tuple[str, ...]:
    """Every dimension kind some registered family declares, in registration order."""
    return tuple(dict.fromkeys(kind for family in _FAMILIES.values() for kind in family.kinds))


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def _qualified_names(cls: type) -> list[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__]


def find_family(model_or_type) -> ModelFamily | None:
    """The family of a model, a config, a family name or a ``model_type`` string; None if none handles it."""
    if isinstance(model_or_type, str):
        return _BY_MODEL_TYPE.get(model_or_type) or _FAMILIES.get(model_or_type)
    config = getattr(model_or_type, "config", model_or_type)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    for name in _qualified_names(type(model_or_type)):
        if name in _BY_CLASS:
            return _BY_CLASS[name]
    return None


def get_family(model_or_type) -> ModelFamily:
    """Like :func:`find_family`, but an unsupported model is a clear error naming what is supported."""
    family = find_family(model_or_type)
    if family is not None:
        return family
    if isinstance(model_or_type, str):
        what = f"model_type {model_or_type!r}"
    else:
        config = getattr(model_or_type, "config", None)
        model_type = getattr(config, "model_type", None)
        what = f"{type(model_or_type).__name__}" + (f" (model_type {model_type!r})" if model_type else "")
    modules = sorted({name.rsplit(".", 1)[-1] for name in _BY_CLASS})
    raise UnsupportedModelError(
        f"mdp_hf has no model family for {what}. Supported: transformers model_types "
        f"{', '.join(supported_model_types())}; timm / plain modules {', '.join(modules) or 'none'}. A headless "
        "backbone (e.g. ResNetModel, ResNetBackbone) is supported only where the family lists it. To add a family, "
        "write an adapter file in mdp_hf/adapters/ that subclasses ModelAdapter and LatencyCells and calls "
        "register_family(ModelFamily(...)) (see README, 'Adding a model family')."
    )


def get_adapter(model_or_type) -> ModelAdapter:
    """The adapter for a model, a config, a family name or a ``model_type`` string."""
    return get_family(model_or_type).adapter
