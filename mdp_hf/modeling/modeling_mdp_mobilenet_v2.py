"""Structurally pruned MobileNetV2: per-layer expansion widths, per-stage residual widths, removable layers.

Self-contained (imports only torch and transformers): copied next to saved weights for
``trust_remote_code``. Module and parameter names follow transformers' MobileNetV2
(``mobilenet_v2.layer.{i}.expand_1x1.convolution`` ...), and every conv computes what transformers' does,
TensorFlow "SAME" padding included, so a sliced model reproduces the gated dense one exactly.
"""

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutputWithNoAttention

from .configuration_mdp_mobilenet_v2 import MDPMobileNetV2Config


def tf_same_padding(features: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Zero-pad ``features`` as TensorFlow's "SAME" rule does for ``conv`` (the extra pixel of an odd total
    goes to the bottom / right), with the total scaled by the dilation as transformers' MobileNetV2 does."""
    pads = []
    for size, stride, kernel, dilation in zip(features.shape[-2:], conv.stride, conv.kernel_size, conv.dilation):
        remainder = int(size) % stride
        total = max(kernel - (remainder if remainder else stride), 0)
        pads.append((total // 2 * dilation, (total - total // 2) * dilation))
    (top, bottom), (left, right) = pads
    return nn.functional.pad(features, (left, right, top, bottom), "constant", 0.0)


class MDPMobileNetV2ConvLayer(nn.Module):
    """Conv (no bias) + BatchNorm + optional activation, padded as the config says."""

    def __init__(self, config, in_channels, out_channels, kernel_size, stride=1, groups=1, dilation=1, activation=True):
        super().__init__()
        self.tf_padding = config.tf_padding
        padding = 0 if config.tf_padding else (kernel_size - 1) // 2 * dilation
        self.convolution = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.normalization = nn.BatchNorm2d(out_channels, eps=config.layer_norm_eps, momentum=0.997)
        self.activation = ACT2FN[config.hidden_act] if activation else None

    def forward(self, features):
        if self.tf_padding:
            features = tf_same_padding(features, self.convolution)
        features = self.normalization(self.convolution(features))
        return self.activation(features) if self.activation is not None else features


class MDPMobileNetV2InvertedResidual(nn.Module):
    """1x1 expansion -> depthwise 3x3 -> 1x1 reduction, plus the input when ``use_residual``."""

    def __init__(self, config, in_channels, expanded_channels, out_channels, stride, dilation, use_residual):
        super().__init__()
        self.use_residual = use_residual
        self.expand_1x1 = MDPMobileNetV2ConvLayer(config, in_channels, expanded_channels, 1)
        self.conv_3x3 = MDPMobileNetV2ConvLayer(
            config, expanded_channels, expanded_channels, 3, stride, expanded_channels, dilation
        )
        self.reduce_1x1 = MDPMobileNetV2ConvLayer(config, expanded_channels, out_channels, 1, activation=False)

    def forward(self, features):
        out = self.reduce_1x1(self.conv_3x3(self.expand_1x1(features)))
        return features + out if self.use_residual else out


class MDPMobileNetV2Stem(nn.Module):
    """3x3 stride-2 conv, optional 1x1 expansion, depthwise 3x3, 1x1 reduction (no residual)."""

    def __init__(self, config):
        super().__init__()
        c, e = config.stem_channels, config.stem_expand_channels
        self.first_conv = MDPMobileNetV2ConvLayer(config, config.num_channels, c, 3, stride=2)
        self.expand_1x1 = MDPMobileNetV2ConvLayer(config, c, e, 1) if e is not None else None
        width = e if e is not None else c
        self.conv_3x3 = MDPMobileNetV2ConvLayer(config, width, width, 3, groups=width)
        self.reduce_1x1 = MDPMobileNetV2ConvLayer(config, width, config.stage_widths[0], 1, activation=False)
        self.num_channels = config.num_channels

    def forward(self, pixel_values):
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(f"Expected {self.num_channels} input channels, got {pixel_values.shape[1]}.")
        features = self.first_conv(pixel_values)
        if self.expand_1x1 is not None:
            features = self.expand_1x1(features)
        return self.reduce_1x1(self.conv_3x3(features))


class MDPMobileNetV2PreTrainedModel(PreTrainedModel):
    config_class = MDPMobileNetV2Config
    base_model_prefix = "mobilenet_v2"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MDPMobileNetV2ConvLayer"]

    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class MDPMobileNetV2Model(MDPMobileNetV2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.conv_stem = MDPMobileNetV2Stem(config)
        self.layer = nn.ModuleList()
        removed = set(config.removed_layers)
        stage = 0
        for i, use_residual in enumerate(config.layer_use_residual):
            in_channels = config.stage_widths[stage]
            stage += 0 if use_residual else 1
            if i in removed:  # identity on the stage width; the index stays so parameter names stay aligned
                self.layer.append(nn.Identity())
                continue
            self.layer.append(
                MDPMobileNetV2InvertedResidual(
                    config,
                    in_channels,
                    config.expansion_widths[i],
                    config.stage_widths[stage],
                    config.layer_strides[i],
                    config.layer_dilations[i],
                    use_residual,
                )
            )
        self.conv_1x1 = MDPMobileNetV2ConvLayer(config, config.stage_widths[-1], config.final_channels, 1)
        self.pooler = nn.AdaptiveAvgPool2d((1, 1)) if config.add_pooling_layer else None
        self.post_init()

    def forward(self, pixel_values, output_hidden_states=False, **kwargs):
        hidden_states = self.conv_stem(pixel_values)
        all_hidden = () if output_hidden_states else None
        for layer in self.layer:
            hidden_states = layer(hidden_states)
            if output_hidden_states:
                all_hidden += (hidden_states,)
        last_hidden_state = self.conv_1x1(hidden_states)
        pooled = torch.flatten(self.pooler(last_hidden_state), start_dim=1) if self.pooler is not None else None
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=all_hidden
        )


class MDPMobileNetV2ForImageClassification(MDPMobileNetV2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        if not config.add_pooling_layer:
            raise ValueError(
                "MDPMobileNetV2ForImageClassification needs add_pooling_layer=True (it classifies the pool)"
            )
        self.num_labels = config.num_labels
        self.mobilenet_v2 = MDPMobileNetV2Model(config)
        self.dropout = nn.Dropout(config.classifier_dropout_prob, inplace=True)
        self.classifier = (
            nn.Linear(config.final_channels, config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    def forward(self, pixel_values, labels=None, output_hidden_states=False, **kwargs):
        outputs = self.mobilenet_v2(pixel_values, output_hidden_states=output_hidden_states)
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = ["MDPMobileNetV2ForImageClassification", "MDPMobileNetV2Model", "MDPMobileNetV2PreTrainedModel"]
