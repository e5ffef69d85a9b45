"""Pruned-model classes (own ``model_type``), registered with the Auto API on import.

The four files here import only torch and transformers: ``save_pretrained`` copies them next to the
weights so ``trust_remote_code=True`` loads a pruned model without mdp_hf installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from .configuration_mdp_resnet import MDPResNetConfig
from .configuration_mdp_vit import MDPViTConfig
from .modeling_mdp_resnet import MDPResNetForImageClassification, MDPResNetModel
from .modeling_mdp_vit import MDPViTForImageClassification, MDPViTModel


def register_auto_classes() -> None:
    """Map our model_types in the Auto API, and mark the classes so that ``save_pretrained`` copies their
    source files next to the weights and writes ``auto_map`` (transformers' own custom-code mechanism)."""
    for config_cls, base_cls, head_cls in (
        (MDPViTConfig, MDPViTModel, MDPViTForImageClassification),
        (MDPResNetConfig, MDPResNetModel, MDPResNetForImageClassification),
    ):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, base_cls, exist_ok=True)
        AutoModelForImageClassification.register(config_cls, head_cls, exist_ok=True)
        config_cls.register_for_auto_class()
        base_cls.register_for_auto_class("AutoModel")
        head_cls.register_for_auto_class("AutoModelForImageClassification")


register_auto_classes()

__all__ = [
    "MDPResNetConfig",
    "MDPResNetForImageClassification",
    "MDPResNetModel",
    "MDPViTConfig",
    "MDPViTForImageClassification",
    "MDPViTModel",
    "register_auto_classes",
]
