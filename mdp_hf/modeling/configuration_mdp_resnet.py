"""Configuration of a structurally pruned ResNet (model_type ``mdp_resnet``).

Self-contained (imports only transformers and its sibling configuration_mdp_common): copied next to saved weights
for ``trust_remote_code``.

Why not ``per_layer_config``: transformers' per-layer overrides are keyed by ``num_hidden_layers`` of a
flat layer stack with homogeneous attributes; a ResNet has stages of layers whose widths are coupled
across the stage (the residual width) and layers with 1 or 2 inner widths, so explicit lists are clearer.
Layers are numbered flat across stages (stage 0 layers first).
"""

from transformers import PreTrainedConfig

from .configuration_mdp_common import StructureFingerprintMixin


class MDPResNetConfig(StructureFingerprintMixin, PreTrainedConfig):
    r"""
    Args:
        embedding_size: stem output channels. hidden_sizes: residual width of each stage.
        depths: layers per stage. layer_type: ``"basic"`` or ``"bottleneck"``.
        layer_inner_widths: per flat layer, the output channels of its inner convs
            (``[c1]`` for basic layers, ``[c1, c2]`` for bottlenecks); the last conv outputs the stage width.
        layer_has_projection: per flat layer, whether its shortcut is a 1x1 conv + BN (fixed by the unpruned
            architecture: pruning may make widths equal without removing the projection's weights).
        removed_layers: flat indices of layers whose residual branch was removed (a projection shortcut stays).
        stem_inner_widths: output channels of the first two convs of a deep stem (three 3x3 convs, the first with
            stride 2, e.g. timm's ``stem_type="deep"`` of ResNet-C/D); the third outputs ``embedding_size``.
            None: transformers' single 7x7 stride-2 conv.
        avg_down: projection shortcuts average-pool (2x2, stride of the layer, ceil mode, padding not counted)
            before a stride-1 1x1 conv (ResNet-D, timm's ``avg_down=True``) instead of a strided 1x1 conv.
        preprocessing: how the source model expects its input (``mean``, ``std``, ``input_size``,
            ``interpolation``, ``crop_pct``; from a timm model's ``pretrained_cfg``); None when unknown.
    """

    model_type = "mdp_resnet"

    num_channels: int = 3
    embedding_size: int = 64
    hidden_sizes: list[int] | None = None
    depths: list[int] | None = None
    layer_type: str = "bottleneck"
    hidden_act: str = "relu"
    downsample_in_first_stage: bool = False
    downsample_in_bottleneck: bool = False
    layer_inner_widths: list[list[int]] | None = None
    layer_has_projection: list[bool] | None = None
    removed_layers: list[int] | None = None
    stem_inner_widths: list[int] | None = None
    avg_down: bool = False
    preprocessing: dict | None = None
    base_model_type: str | None = None
    base_model_name_or_path: str | None = None
    base_config: dict | None = None
    structure_fingerprint: dict | None = None  # see configuration_mdp_common.py

    def __post_init__(self, **kwargs):
        self.hidden_sizes = list(self.hidden_sizes or [256, 512, 1024, 2048])
        self.depths = list(self.depths or [3, 4, 6, 3])
        if self.layer_type not in ("basic", "bottleneck"):
            raise ValueError(f"layer_type must be 'basic' or 'bottleneck', got {self.layer_type!r}")
        if len(self.hidden_sizes) != len(self.depths):
            raise ValueError("hidden_sizes and depths must have one entry per stage")
        num_layers = sum(self.depths)
        if self.layer_inner_widths is None:  # unpruned defaults, as transformers' ResNet builds them
            reduction = 4 if self.layer_type == "bottleneck" else 1
            self.layer_inner_widths = [
                [width // reduction] * (2 if self.layer_type == "bottleneck" else 1)
                for width, depth in zip(self.hidden_sizes, self.depths)
                for _ in range(depth)
            ]
        if self.layer_has_projection is None:
            stage_inputs = [self.embedding_size] + self.hidden_sizes[:-1]
            self.layer_has_projection = []
            for stage, (width, depth) in enumerate(zip(self.hidden_sizes, self.depths)):
                stride = 2 if (stage > 0 or self.downsample_in_first_stage) else 1
                first = stage_inputs[stage] != width or stride != 1
                self.layer_has_projection += [first] + [False] * (depth - 1)
        self.removed_layers = sorted(self.removed_layers or [])
        expected_inner = 2 if self.layer_type == "bottleneck" else 1
        if len(self.layer_inner_widths) != num_layers or any(len(w) != expected_inner for w in self.layer_inner_widths):
            raise ValueError(
                f"layer_inner_widths must hold {num_layers} entries of {expected_inner} widths "
                f"({self.layer_type} layers), got {self.layer_inner_widths}"
            )
        if len(self.layer_has_projection) != num_layers:
            raise ValueError(f"layer_has_projection must hold {num_layers} booleans")
        if any(not 0 <= i < num_layers for i in self.removed_layers):
            raise ValueError(
                f"removed_layers must be flat layer indices in [0, {num_layers}), got {self.removed_layers}"
            )
        if self.stem_inner_widths is not None:
            self.stem_inner_widths = [int(w) for w in self.stem_inner_widths]
            if len(self.stem_inner_widths) != 2 or min(self.stem_inner_widths) < 1:
                raise ValueError(
                    "stem_inner_widths must be None (7x7 stem) or the two positive widths of a deep stem's first "
                    f"convs, got {self.stem_inner_widths}"
                )
        super().__post_init__(**kwargs)
        self.check_structure_fingerprint()  # config.json edited after the save: an error naming the fields


__all__ = ["MDPResNetConfig"]
