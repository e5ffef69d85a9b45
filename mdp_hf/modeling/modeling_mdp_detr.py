"""DETR with a structurally pruned ResNet backbone: transformers' DETR, its backbone an ``mdp_resnet`` encoder.

Self-contained (imports only torch and transformers, and its sibling mdp_resnet files): copied next to saved weights
for ``trust_remote_code``. Everything after the backbone is transformers' own DETR code (``DetrModel.forward``,
``DetrForObjectDetection.forward``, the encoder, decoder, heads and the Hungarian-matched loss); only the backbone
differs: ``MDPResNetModel`` (per-conv widths, per-stage residual widths, removed residual branches) with DETR's
frozen BatchNorm, and the input projection reads the pruned last residual width. Parameter names follow
transformers' DETR with an HF ResNet backbone (``model.backbone.model.encoder.stages.{s}.layers.{j}...``).
"""

import torch
from torch import nn
from transformers.models.detr.modeling_detr import (
    DetrDecoder,
    DetrEncoder,
    DetrForObjectDetection,
    DetrLearnedPositionEmbedding,
    DetrMLPPredictionHead,
    DetrModel,
    DetrPreTrainedModel,
    DetrSinePositionEmbedding,
    replace_batch_norm,
)

from .configuration_mdp_detr import MDPDetrConfig
from .configuration_mdp_resnet import MDPResNetConfig
from .modeling_mdp_resnet import MDPResNetModel


class MDPDetrConvEncoder(nn.Module):
    """DETR's conv encoder (``DetrConvEncoder``) over a pruned ResNet: BatchNorms frozen and backbone parameters
    frozen exactly as transformers does for an HF ResNet backbone; returns the last stage's feature map and mask."""

    def __init__(self, config):
        super().__init__()
        self.model = MDPResNetModel(MDPResNetConfig(**(config.backbone_structure or {})))
        self.intermediate_channel_sizes = [self.model.config.hidden_sizes[-1]]
        with torch.no_grad():
            replace_batch_norm(self.model)
        # the same rule over the same parameter names as DetrConvEncoder, so fine-tuning trains what DETR trains
        for name, parameter in self.model.named_parameters():
            if "stage.1" not in name and "stage.2" not in name and "stage.3" not in name:
                parameter.requires_grad_(False)

    def forward(self, pixel_values, pixel_mask):
        feature_map = self.model(pixel_values).last_hidden_state
        mask = nn.functional.interpolate(pixel_mask[None].float(), size=feature_map.shape[-2:]).to(torch.bool)[0]
        return [(feature_map, mask)]


class MDPDetrModel(DetrModel):
    """``DetrModel`` with :class:`MDPDetrConvEncoder` as its backbone; ``forward`` is DetrModel's."""

    config_class = MDPDetrConfig

    def __init__(self, config):
        DetrPreTrainedModel.__init__(self, config)  # DetrModel.__init__ would build a backbone from backbone_config
        self.backbone = MDPDetrConvEncoder(config)
        if config.position_embedding_type == "sine":
            self.position_embedding = DetrSinePositionEmbedding(config.d_model // 2, normalize=True)
        elif config.position_embedding_type == "learned":
            self.position_embedding = DetrLearnedPositionEmbedding(config.d_model // 2)
        else:
            raise ValueError(f"Not supported {config.position_embedding_type}")
        self.query_position_embeddings = nn.Embedding(config.num_queries, config.d_model)
        self.input_projection = nn.Conv2d(self.backbone.intermediate_channel_sizes[-1], config.d_model, kernel_size=1)
        self.encoder = DetrEncoder(config)
        self.decoder = DetrDecoder(config)
        self.post_init()


class MDPDetrForObjectDetection(DetrForObjectDetection):
    """``DetrForObjectDetection`` over :class:`MDPDetrModel`; ``forward`` (logits, pred_boxes, loss given labels)
    is DetrForObjectDetection's, so DETR's image processor post-processes its outputs."""

    config_class = MDPDetrConfig

    def __init__(self, config):
        DetrPreTrainedModel.__init__(self, config)
        self.model = MDPDetrModel(config)
        self.class_labels_classifier = nn.Linear(config.d_model, config.num_labels + 1)  # + the "no object" class
        self.bbox_predictor = DetrMLPPredictionHead(
            input_dim=config.d_model, hidden_dim=config.d_model, output_dim=4, num_layers=3
        )
        self.post_init()


__all__ = ["MDPDetrForObjectDetection", "MDPDetrModel"]
