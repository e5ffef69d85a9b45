"""Structurally pruned ConvNeXt: per-stage residual widths, per-layer MLP widths, removable layers.

Self-contained (imports only torch and transformers): copied next to saved weights for
``trust_remote_code``. Module and parameter names follow transformers' ConvNeXt
(``convnext.encoder.stages.{s}.layers.{j}.pwconv1`` ...) so weights map one-to-one from the model it was
pruned from; a removed layer is an ``nn.Identity`` at its index (no parameters).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutputWithNoAttention

from .configuration_mdp_convnext import MDPConvNextConfig

INNER_LAYER_NORM_EPS = 1e-6  # stem, downsampling and per-layer LayerNorms (transformers' ConvNeXt fixes it)


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


class MDPConvNextLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of ``(N, H, W, C)`` (``channels_last``) or ``(N, C, H, W)`` (``channels_first``)."""

    def __init__(self, width, eps=INNER_LAYER_NORM_EPS, data_format="channels_last"):
        super().__init__(width, eps=eps)
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"data_format must be 'channels_last' or 'channels_first', got {data_format!r}")
        self.data_format = data_format

    def forward(self, features):
        if self.data_format == "channels_last":
            return F.layer_norm(features, self.normalized_shape, self.weight, self.bias, self.eps)
        normed = F.layer_norm(features.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return normed.permute(0, 3, 1, 2)


class MDPConvNextEmbeddings(nn.Module):
    """Patchify stem: conv with kernel = stride = patch size, then a channels-first LayerNorm."""

    def __init__(self, num_channels, width, patch_size):
        super().__init__()
        patch = _pair(patch_size)
        self.patch_embeddings = nn.Conv2d(num_channels, width, kernel_size=patch, stride=patch)
        self.layernorm = MDPConvNextLayerNorm(width, data_format="channels_first")
        self.num_channels = num_channels

    def forward(self, pixel_values):
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(f"Expected {self.num_channels} input channels, got {pixel_values.shape[1]}.")
        return self.layernorm(self.patch_embeddings(pixel_values))


class MDPConvNextDropPath(nn.Module):
    """Stochastic depth: in training, drop the whole residual branch of a sample with probability ``drop_prob``."""

    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, features):
        if not self.training or self.drop_prob == 0.0:
            return features
        keep = 1.0 - self.drop_prob
        mask = features.new_empty((features.shape[0],) + (1,) * (features.ndim - 1)).bernoulli_(keep)
        return features * mask / keep


def downsampling_layer(in_width, out_width):
    """Channels-first LayerNorm + 2x2 stride-2 conv (names ``0`` and ``1``, as transformers' ModuleList)."""
    return nn.Sequential(
        MDPConvNextLayerNorm(in_width, data_format="channels_first"),
        nn.Conv2d(in_width, out_width, kernel_size=2, stride=2),
    )


class MDPConvNextLayer(nn.Module):
    """Depthwise 7x7 conv -> LayerNorm -> Linear(C, M) -> activation -> Linear(M, C) -> layer scale -> + input."""

    def __init__(self, width, mlp_width, hidden_act="gelu", layer_scale_init_value=1e-6, drop_path=0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(width, width, kernel_size=7, padding=3, groups=width)
        self.layernorm = MDPConvNextLayerNorm(width)
        self.pwconv1 = nn.Linear(width, mlp_width)
        self.act = ACT2FN[hidden_act]
        self.pwconv2 = nn.Linear(mlp_width, width)
        self.layer_scale_parameter = (
            nn.Parameter(torch.full((width,), float(layer_scale_init_value))) if layer_scale_init_value > 0 else None
        )
        self.drop_path = MDPConvNextDropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, features):
        branch = self.layernorm(self.dwconv(features).permute(0, 2, 3, 1))
        branch = self.pwconv2(self.act(self.pwconv1(branch)))
        if self.layer_scale_parameter is not None:
            branch = branch * self.layer_scale_parameter
        return features + self.drop_path(branch.permute(0, 3, 1, 2))


class MDPConvNextStage(nn.Module):
    """An optional downsampling layer (every stage but the first), then the layers (``nn.Identity`` if removed)."""

    def __init__(self, config, stage, in_width, first_flat, drop_path_rates):
        super().__init__()
        width = config.hidden_sizes[stage]
        self.downsampling_layer = downsampling_layer(in_width, width) if stage > 0 else nn.Sequential()
        removed = set(config.removed_layers)
        layers = []
        for j in range(config.depths[stage]):
            flat = first_flat + j
            if flat in removed:
                layers.append(nn.Identity())
            else:
                layers.append(
                    MDPConvNextLayer(
                        width,
                        config.layer_mlp_widths[flat],
                        config.hidden_act,
                        config.layer_scale_init_value,
                        drop_path_rates[flat],
                    )
                )
        self.layers = nn.ModuleList(layers)

    def forward(self, features):
        features = self.downsampling_layer(features)
        for layer in self.layers:
            features = layer(features)
        return features


class MDPConvNextEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        num_layers = sum(config.depths)
        # the unpruned model's schedule over all flat layers (removed ones included), so kept layers keep their rate
        # (plain floats: models are also built on the meta device, where a tensor has no values)
        rate = float(config.drop_path_rate)
        rates = [rate * i / (num_layers - 1) if num_layers > 1 else 0.0 for i in range(num_layers)]
        self.stages = nn.ModuleList()
        in_width, flat = config.hidden_sizes[0], 0
        for stage, depth in enumerate(config.depths):
            self.stages.append(MDPConvNextStage(config, stage, in_width, flat, rates))
            in_width, flat = config.hidden_sizes[stage], flat + depth

    def forward(self, features, output_hidden_states=False):
        all_hidden = (features,) if output_hidden_states else None
        for stage in self.stages:
            features = stage(features)
            if output_hidden_states:
                all_hidden += (features,)
        return features, all_hidden


class MDPConvNextPreTrainedModel(PreTrainedModel):
    config_class = MDPConvNextConfig
    base_model_prefix = "convnext"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MDPConvNextLayer", "MDPConvNextStage"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, MDPConvNextLayer) and module.layer_scale_parameter is not None:
            nn.init.constant_(module.layer_scale_parameter, self.config.layer_scale_init_value)


class MDPConvNextModel(MDPConvNextPreTrainedModel):
    """Stem, stages, and the final LayerNorm on the globally average-pooled features (``pooler_output``)."""

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = MDPConvNextEmbeddings(config.num_channels, config.hidden_sizes[0], config.patch_size)
        self.encoder = MDPConvNextEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_sizes[-1], eps=config.layer_norm_eps)
        self.post_init()

    def forward(self, pixel_values, output_hidden_states=False, **kwargs):
        expected_dtype = self.embeddings.patch_embeddings.weight.dtype
        hidden_states, all_hidden = self.encoder(self.embeddings(pixel_values.to(expected_dtype)), output_hidden_states)
        pooled = self.layernorm(hidden_states.mean([-2, -1]))
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=hidden_states, pooler_output=pooled, hidden_states=all_hidden
        )


class MDPConvNextForImageClassification(MDPConvNextPreTrainedModel):
    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.convnext = MDPConvNextModel(config)
        self.classifier = (
            nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def forward(self, pixel_values, labels=None, output_hidden_states=False, **kwargs):
        outputs = self.convnext(pixel_values, output_hidden_states=output_hidden_states)
        logits = self.classifier(outputs.pooler_output)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = ["MDPConvNextForImageClassification", "MDPConvNextModel", "MDPConvNextPreTrainedModel"]
