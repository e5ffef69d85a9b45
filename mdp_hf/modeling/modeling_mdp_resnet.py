"""Structurally pruned ResNet: per-conv widths, per-stage residual widths, removable residual branches.

Self-contained (imports only torch and transformers): copied next to saved weights for
``trust_remote_code``. Parameter names follow transformers' ResNet
(``resnet.encoder.stages.{s}.layers.{j}.layer.{k}.convolution`` ...).
"""

from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPoolingAndNoAttention, ImageClassifierOutputWithNoAttention

from .configuration_mdp_resnet import MDPResNetConfig


class MDPResNetConvLayer(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, activation="relu"):
        super().__init__()
        self.convolution = nn.Conv2d(
            in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        )
        self.normalization = nn.BatchNorm2d(out_channels)
        self.activation = ACT2FN[activation] if activation is not None else nn.Identity()

    def forward(self, hidden_states):
        return self.activation(self.normalization(self.convolution(hidden_states)))


class MDPResNetShortCut(nn.Module):
    """Projection shortcut: a strided 1x1 conv + BN, or with ``avg_down`` (ResNet-D) a 2x2 average pool
    (ceil mode, padding not counted, as timm's) that does the striding, then a stride-1 1x1 conv + BN."""

    def __init__(self, in_channels, out_channels, stride, avg_down=False):
        super().__init__()
        if avg_down and stride > 1:
            self.pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
        else:
            self.pool = nn.Identity()
        conv_stride = 1 if avg_down else stride
        self.convolution = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=conv_stride, bias=False)
        self.normalization = nn.BatchNorm2d(out_channels)

    def forward(self, hidden_states):
        return self.normalization(self.convolution(self.pool(hidden_states)))


class MDPResNetLayer(nn.Module):
    """Basic or bottleneck residual layer; ``layer`` is None when the residual branch was removed."""

    def __init__(self, config, in_channels, out_channels, inner_widths, stride, has_projection, removed):
        super().__init__()
        self.shortcut = (
            MDPResNetShortCut(in_channels, out_channels, stride, config.avg_down) if has_projection else nn.Identity()
        )
        act = config.hidden_act
        if removed:
            self.layer = None
        elif config.layer_type == "bottleneck":
            c1, c2 = inner_widths
            first_stride, second_stride = (stride, 1) if config.downsample_in_bottleneck else (1, stride)
            self.layer = nn.Sequential(
                MDPResNetConvLayer(in_channels, c1, kernel_size=1, stride=first_stride, activation=act),
                MDPResNetConvLayer(c1, c2, stride=second_stride, activation=act),
                MDPResNetConvLayer(c2, out_channels, kernel_size=1, activation=None),
            )
        else:
            (c1,) = inner_widths
            self.layer = nn.Sequential(
                MDPResNetConvLayer(in_channels, c1, stride=stride, activation=act),
                MDPResNetConvLayer(c1, out_channels, activation=None),
            )
        self.activation = ACT2FN[act]

    def forward(self, hidden_states):
        residual = self.shortcut(hidden_states)
        if self.layer is None:
            return self.activation(residual)
        return self.activation(self.layer(hidden_states) + residual)


class MDPResNetStage(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, hidden_states):
        return self.layers(hidden_states)


class MDPResNetEmbeddings(nn.Module):
    """Stem: a 7x7 stride-2 conv (transformers' ResNet), or with ``stem_inner_widths`` a deep stem of three
    3x3 convs (stride 2, 1, 1; ResNet-C/D), each + BN + activation; then a 3x3 stride-2 max-pool.
    ``embedder`` is always the conv that outputs ``embedding_size``; a deep stem's first two are ``stem``."""

    def __init__(self, config):
        super().__init__()
        act = config.hidden_act
        inner = config.stem_inner_widths
        if inner:
            c1, c2 = inner
            self.stem = nn.Sequential(
                MDPResNetConvLayer(config.num_channels, c1, kernel_size=3, stride=2, activation=act),
                MDPResNetConvLayer(c1, c2, kernel_size=3, stride=1, activation=act),
            )
            self.embedder = MDPResNetConvLayer(c2, config.embedding_size, kernel_size=3, stride=1, activation=act)
        else:
            self.stem = None
            self.embedder = MDPResNetConvLayer(
                config.num_channels, config.embedding_size, kernel_size=7, stride=2, activation=act
            )
        self.pooler = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.num_channels = config.num_channels

    def forward(self, pixel_values):
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(f"Expected {self.num_channels} input channels, got {pixel_values.shape[1]}.")
        hidden_states = pixel_values if self.stem is None else self.stem(pixel_values)
        return self.pooler(self.embedder(hidden_states))


class MDPResNetEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.stages = nn.ModuleList()
        removed = set(config.removed_layers)
        in_channels, flat = config.embedding_size, 0
        for stage, (width, depth) in enumerate(zip(config.hidden_sizes, config.depths)):
            layers = []
            for j in range(depth):
                stride = 2 if j == 0 and (stage > 0 or config.downsample_in_first_stage) else 1
                layers.append(
                    MDPResNetLayer(
                        config,
                        in_channels,
                        width,
                        config.layer_inner_widths[flat],
                        stride,
                        config.layer_has_projection[flat],
                        flat in removed,
                    )
                )
                in_channels, flat = width, flat + 1
            self.stages.append(MDPResNetStage(layers))

    def forward(self, hidden_states, output_hidden_states=False):
        all_hidden = () if output_hidden_states else None
        for stage in self.stages:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states = stage(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return hidden_states, all_hidden


class MDPResNetPreTrainedModel(PreTrainedModel):
    config_class = MDPResNetConfig
    base_model_prefix = "resnet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MDPResNetConvLayer", "MDPResNetShortCut"]

    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                bound = 1 / module.in_features**0.5
                nn.init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class MDPResNetModel(MDPResNetPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embedder = MDPResNetEmbeddings(config)
        self.encoder = MDPResNetEncoder(config)
        self.pooler = nn.AdaptiveAvgPool2d((1, 1))
        self.post_init()

    def forward(self, pixel_values, output_hidden_states=False, **kwargs):
        hidden_states, all_hidden = self.encoder(self.embedder(pixel_values), output_hidden_states)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=hidden_states, pooler_output=self.pooler(hidden_states), hidden_states=all_hidden
        )


class MDPResNetForImageClassification(MDPResNetPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.resnet = MDPResNetModel(config)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0 else nn.Identity(),
        )
        self.post_init()

    def forward(self, pixel_values, labels=None, output_hidden_states=False, **kwargs):
        outputs = self.resnet(pixel_values, output_hidden_states=output_hidden_states)
        logits = self.classifier(outputs.pooler_output)
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


__all__ = ["MDPResNetForImageClassification", "MDPResNetModel", "MDPResNetPreTrainedModel"]
