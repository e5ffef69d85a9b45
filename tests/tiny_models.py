"""Tiny models of every supported family, built from configs (no network)."""

import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

IMAGE_SIZE = 32
VIT_KW = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=IMAGE_SIZE,
    patch_size=8,
    num_labels=5,
)
# small groups so random choices cover many widths in tiny models
GROUPS = {"embed": 4, "heads": 1, "qk": 2, "v": 2, "mlp": 8, "channels": 2, "residual": 2}


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "vit":
        model = ViTForImageClassification(ViTConfig(**VIT_KW))
    elif family == "vit_base_model":  # ViTModel with its pooler
        model = ViTModel(ViTConfig(**VIT_KW), add_pooling_layer=True)
    elif family == "deit":
        model = DeiTForImageClassification(DeiTConfig(**VIT_KW))
    elif family == "deit_distilled":
        model = DeiTForImageClassificationWithTeacher(DeiTConfig(**VIT_KW))
    elif family == "resnet_bottleneck":
        model = ResNetForImageClassification(
            ResNetConfig(
                embedding_size=8, hidden_sizes=[16, 24, 32], depths=[2, 2, 1], layer_type="bottleneck", num_labels=5
            )
        )
    elif family == "resnet_basic":  # stage 0 has an identity shortcut: stem and stage-0 widths are coupled
        model = ResNetForImageClassification(
            ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic", num_labels=5)
        )
    else:
        raise ValueError(family)
    # non-trivial norm statistics and affine parameters, so slicing mistakes show in the logits
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def logits_of(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.pooler_output


FAMILIES = ["vit", "vit_base_model", "deit", "deit_distilled", "resnet_bottleneck", "resnet_basic"]
