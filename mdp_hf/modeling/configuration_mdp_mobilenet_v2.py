"""Configuration of a structurally pruned MobileNetV2 (model_type ``mdp_mobilenet_v2``).

Self-contained (imports only transformers and its sibling configuration_mdp_common): copied next to saved weights
for ``trust_remote_code``.

transformers' MobileNetV2 derives every width from ``depth_multiplier`` / ``expand_ratio`` /
``min_depth`` / ``finegrained_output``; a pruned model has arbitrary widths, so they are explicit lists
here. Layers (the 16 inverted residual layers after the stem) are numbered as ``mobilenet_v2.layer.{i}``.
A *stage* is a group of layers whose outputs are summed together: stage 0 is written by the stem's
reduce conv, and every layer without a residual connection starts a new stage; a layer with a residual
connection reads and writes the width of the stage it belongs to.
"""

from transformers import PreTrainedConfig

from .configuration_mdp_common import StructureFingerprintMixin

# transformers' MobileNetV2 at depth_multiplier 1.0 (google/mobilenet_v2_1.0_224)
_DENSE_USE_RESIDUAL = [bool(int(c)) for c in "0101101110110110"]
_DENSE_STRIDES = [2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
_DENSE_STAGE_WIDTHS = [16, 24, 32, 64, 96, 160, 320]
_DENSE_LAYER_INPUTS = [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160]


class MDPMobileNetV2Config(StructureFingerprintMixin, PreTrainedConfig):
    r"""
    Args:
        stem_channels: output channels of the stem's first 3x3 conv (and of its depthwise conv when
            ``stem_expand_channels`` is None, i.e. the first layer is the expansion).
        stem_expand_channels: output channels of the stem's 1x1 expansion conv (transformers'
            ``first_layer_is_expansion=False``); None when the stem has no such conv.
        stage_widths: residual width of each stage (stage 0: the stem's output).
        expansion_widths: per layer, the channels of its 1x1 expansion conv (= its depthwise conv's channels);
            0 for a removed layer.
        layer_use_residual: per layer, whether its input is added to its output (fixed by the unpruned
            architecture: stride 1 and equal input / output widths there).
        layer_strides / layer_dilations: per layer, the depthwise conv's stride and dilation (transformers'
            ``output_stride`` turns strides into dilations).
        removed_layers: layers (with a residual connection) that were removed: identity on the stage width.
        final_channels: output channels of the final 1x1 conv before pooling.
        tf_padding: TensorFlow "SAME" padding (asymmetric for stride 2), as transformers' ``tf_padding``.
        add_pooling_layer: whether the base model pools the final features (``pooler_output``).
        base_model_type / base_model_name_or_path / base_config: what the model was pruned from.
    """

    model_type = "mdp_mobilenet_v2"

    num_channels: int = 3
    image_size: int | list[int] | tuple[int, int] = 224
    stem_channels: int = 32
    stem_expand_channels: int | None = None
    stage_widths: list[int] | None = None
    expansion_widths: list[int] | None = None
    layer_use_residual: list[bool] | None = None
    layer_strides: list[int] | None = None
    layer_dilations: list[int] | None = None
    removed_layers: list[int] | None = None
    final_channels: int = 1280
    hidden_act: str = "relu6"
    tf_padding: bool = True
    layer_norm_eps: float = 0.001
    classifier_dropout_prob: float = 0.8
    initializer_range: float = 0.02
    add_pooling_layer: bool = True
    base_model_type: str | None = None
    base_model_name_or_path: str | None = None
    base_config: dict | None = None
    structure_fingerprint: dict | None = None  # see configuration_mdp_common.py

    def __post_init__(self, **kwargs):
        self.layer_use_residual = [bool(r) for r in (self.layer_use_residual or _DENSE_USE_RESIDUAL)]
        num_layers = len(self.layer_use_residual)
        self.stage_widths = list(self.stage_widths or _DENSE_STAGE_WIDTHS)
        self.expansion_widths = list(self.expansion_widths or [6 * c for c in _DENSE_LAYER_INPUTS])
        self.layer_strides = list(self.layer_strides or _DENSE_STRIDES)
        self.layer_dilations = list(self.layer_dilations or [1] * num_layers)
        self.removed_layers = sorted(self.removed_layers or [])
        for name in ("expansion_widths", "layer_strides", "layer_dilations"):
            if len(getattr(self, name)) != num_layers:
                raise ValueError(
                    f"{name} must hold one entry per layer ({num_layers}, as layer_use_residual), "
                    f"got {getattr(self, name)}"
                )
        num_stages = 1 + sum(not r for r in self.layer_use_residual)
        if len(self.stage_widths) != num_stages:
            raise ValueError(
                f"stage_widths must hold {num_stages} widths (the stem's, then one per layer without a residual "
                f"connection), got {self.stage_widths}"
            )
        if any(s not in (1, 2) for s in self.layer_strides):
            raise ValueError(f"layer_strides must be 1 or 2, got {self.layer_strides}")
        bad = [i for i in self.removed_layers if not (0 <= i < num_layers and self.layer_use_residual[i])]
        if bad:
            raise ValueError(
                f"removed_layers {bad} are not layers with a residual connection (only those can be removed)"
            )
        super().__post_init__(**kwargs)
        self.check_structure_fingerprint()  # config.json edited after the save: an error naming the fields


__all__ = ["MDPMobileNetV2Config"]
