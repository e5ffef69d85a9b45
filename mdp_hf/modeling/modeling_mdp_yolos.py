"""Structurally pruned YOLOS detector: the vit family's pruned layers (``MDPViTLayer``: per-layer heads, query/key and
value widths, MLP width, removable sub-blocks) between YOLOS' embeddings ([CLS, patches, detection tokens], position
embeddings resized to the input as YOLOS does) and its two MLP heads on the detection tokens.

Self-contained (imports only torch, transformers and its sibling pruned-model files) because it is copied next to
saved weights and loaded with ``trust_remote_code=True`` where mdp_hf is not installed. It computes what
transformers' ``YolosForObjectDetection`` computes (the same ops in the same order) and trains with the same
Hungarian-matched loss (transformers' ``ForObjectDetectionLoss``).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_mdp_yolos import MDPYolosConfig
from .modeling_mdp_vit import MDPViTLayer, MDPViTPatchEmbeddings, MDPViTPooler


@dataclass
class MDPYolosObjectDetectionOutput(ModelOutput):
    """As transformers' ``YolosObjectDetectionOutput``: ``logits`` (batch, detection tokens, labels + 1 "no object"),
    ``pred_boxes`` (normalised cx, cy, w, h), and with labels the matched loss and its parts."""

    loss: torch.Tensor | None = None
    loss_dict: dict | None = None
    logits: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    auxiliary_outputs: list[dict] | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


def _patch_grid(config: MDPYolosConfig) -> tuple[int, int]:
    return config.image_size[0] // config.patch_size, config.image_size[1] // config.patch_size


def interpolate_initial_positions(config, position_embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """YOLOS' ``InterpolateInitialPositionEmbeddings``: the patch part resized (bicubic) to the input's patch grid."""
    detection = config.num_detection_tokens
    cls_pos = position_embeddings[:, 0, :][:, None]
    det_pos = position_embeddings[:, -detection:, :]
    patch_pos = position_embeddings[:, 1:-detection, :].transpose(1, 2)
    batch, hidden, _ = patch_pos.shape
    patch_pos = patch_pos.view(batch, hidden, *_patch_grid(config))
    new_grid = (height // config.patch_size, width // config.patch_size)
    patch_pos = F.interpolate(patch_pos, size=new_grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.flatten(2).transpose(1, 2)
    return torch.cat((cls_pos, patch_pos, det_pos), dim=1)


def interpolate_mid_positions(config, mid_position_embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """YOLOS' ``InterpolateMidPositionEmbeddings``: per layer but the last, the patch part resized to the input."""
    detection = config.num_detection_tokens
    cls_pos = mid_position_embeddings[:, :, 0, :][:, None]
    det_pos = mid_position_embeddings[:, :, -detection:, :]
    patch_pos = mid_position_embeddings[:, :, 1:-detection, :].transpose(2, 3)
    depth, batch, hidden, _ = patch_pos.shape
    patch_pos = patch_pos.view(depth * batch, hidden, *_patch_grid(config))
    new_grid = (height // config.patch_size, width // config.patch_size)
    patch_pos = F.interpolate(patch_pos, size=new_grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.flatten(2).transpose(1, 2).contiguous().view(depth, batch, new_grid[0] * new_grid[1], hidden)
    return torch.cat((cls_pos, patch_pos, det_pos), dim=2)


class MDPYolosEmbeddings(nn.Module):
    """[CLS] + patch embeddings + detection tokens, plus the position embeddings resized to the input size."""

    def __init__(self, config: MDPYolosConfig):
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.detection_tokens = nn.Parameter(torch.zeros(1, config.num_detection_tokens, config.hidden_size))
        self.patch_embeddings = MDPViTPatchEmbeddings(config)
        num_positions = self.patch_embeddings.num_patches + config.num_detection_tokens + 1
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        embeddings = self.patch_embeddings(pixel_values)
        batch = embeddings.shape[0]
        cls_tokens = self.cls_token.expand(batch, -1, -1)
        detection_tokens = self.detection_tokens.expand(batch, -1, -1)
        embeddings = torch.cat((cls_tokens, embeddings, detection_tokens), dim=1)
        embeddings = embeddings + interpolate_initial_positions(self.config, self.position_embeddings, height, width)
        return self.dropout(embeddings)


class MDPYolosMLPPredictionHead(nn.Module):
    """YOLOS' (DETR's) prediction MLP: ``num_layers`` linears with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + hidden, hidden + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


class MDPYolosPreTrainedModel(PreTrainedModel):
    config_class = MDPYolosConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MDPYolosEmbeddings", "MDPViTLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, MDPYolosEmbeddings):
            for param in (module.position_embeddings, module.cls_token, module.detection_tokens):
                nn.init.trunc_normal_(param, mean=0.0, std=std)
        elif isinstance(module, MDPYolosModel) and module.mid_position_embeddings is not None:
            nn.init.trunc_normal_(module.mid_position_embeddings, mean=0.0, std=std)


class MDPYolosModel(MDPYolosPreTrainedModel):
    """Embeddings, the layers (mid position embeddings added after each but the last), the final LayerNorm over
    every token, and (``add_pooling_layer``) YOLOS' pooler."""

    def __init__(self, config: MDPYolosConfig, add_pooling_layer: bool | None = None):
        super().__init__(config)
        if add_pooling_layer is None:
            add_pooling_layer = config.add_pooling_layer
        self.embeddings = MDPYolosEmbeddings(config)
        self.layers = nn.ModuleList([MDPViTLayer(config, i) for i in range(config.num_hidden_layers)])
        self.mid_position_embeddings = None
        if config.use_mid_position_embeddings:
            seq = 1 + self.embeddings.patch_embeddings.num_patches + config.num_detection_tokens
            self.mid_position_embeddings = nn.Parameter(
                torch.zeros(config.num_hidden_layers - 1, 1, seq, config.hidden_size)
            )
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = MDPViTPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False, **kwargs):
        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        pixel_values = pixel_values.to(expected_dtype)
        height, width = pixel_values.shape[-2:]
        hidden_states = self.embeddings(pixel_values)
        mid = None
        if self.mid_position_embeddings is not None:
            mid = interpolate_mid_positions(self.config, self.mid_position_embeddings, height, width)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states)
            if mid is not None and i < last:
                hidden_states = hidden_states + mid[i].to(hidden_states.device)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        sequence_output = self.layernorm(hidden_states)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output, pooler_output=pooled_output, hidden_states=all_hidden_states
        )


class MDPYolosForObjectDetection(MDPYolosPreTrainedModel):
    """YOLOS' class (labels + "no object") and box heads on the final detection tokens."""

    def __init__(self, config: MDPYolosConfig):
        super().__init__(config)
        self.vit = MDPYolosModel(config, add_pooling_layer=False)
        hidden, head = config.hidden_size, config.detection_head_hidden_size
        self.class_labels_classifier = MDPYolosMLPPredictionHead(hidden, head, config.num_labels + 1, num_layers=3)
        self.bbox_predictor = MDPYolosMLPPredictionHead(hidden, head, 4, num_layers=3)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, labels: list[dict] | None = None, **kwargs):
        outputs = self.vit(pixel_values, output_hidden_states=kwargs.get("output_hidden_states", False))
        detection_tokens = outputs.last_hidden_state[:, -self.config.num_detection_tokens :, :]
        logits = self.class_labels_classifier(detection_tokens)
        pred_boxes = self.bbox_predictor(detection_tokens).sigmoid()
        loss = loss_dict = None
        if labels is not None:
            loss, loss_dict, _ = self.loss_function(logits, labels, self.device, pred_boxes, self.config, None, None)
        return MDPYolosObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
        )


__all__ = ["MDPYolosForObjectDetection", "MDPYolosModel", "MDPYolosPreTrainedModel"]
