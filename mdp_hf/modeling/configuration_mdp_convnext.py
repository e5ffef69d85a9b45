"""Configuration of a structurally pruned ConvNeXt (model_type ``mdp_convnext``).

Self-contained (imports only transformers and its sibling configuration_mdp_common): copied next to saved weights
for ``trust_remote_code``.

A ConvNeXt has stages of layers; every layer of a stage reads and writes one residual width (the stage's
``hidden_sizes`` entry), and each layer has its own MLP hidden width. Layers are numbered flat across stages
(stage 0 layers first); a removed layer keeps its place in ``depths`` (identity on the residual stream) so
the names of the kept layers' weights, and their stochastic-depth rates, stay those of the unpruned model.
"""

from transformers import PreTrainedConfig

from .configuration_mdp_common import StructureFingerprintMixin


class MDPConvNextConfig(StructureFingerprintMixin, PreTrainedConfig):
    r"""
    Args:
        num_channels / patch_size: input channels and the patchify stem's kernel = stride.
        hidden_sizes: residual width of each stage (stage 0's is the stem's output width).
        depths: layers per stage, removed ones included.
        layer_mlp_widths: per flat layer, the MLP hidden width (pwconv1 outputs); 0 for a removed layer.
            Default: ``4 * hidden_size`` of the layer's stage, as transformers' ConvNeXt builds it.
        removed_layers: flat indices of layers whose residual branch was removed.
        layer_scale_init_value: > 0 when every layer has a per-channel layer scale (its initial value);
            <= 0: no layer scale parameters.
        layer_norm_eps: epsilon of the final LayerNorm on the pooled features (the stem's, the downsampling
            layers' and the layers' LayerNorms use 1e-6, as in transformers' ConvNeXt).
        drop_path_rate: stochastic depth, linearly increasing over the flat layers (training only).
        base_model_type / base_model_name_or_path / base_config: what the model was pruned from.
    """

    model_type = "mdp_convnext"

    num_channels: int = 3
    patch_size: int | list[int] | tuple[int, int] = 4
    hidden_sizes: list[int] | None = None
    depths: list[int] | None = None
    layer_mlp_widths: list[int] | None = None
    removed_layers: list[int] | None = None
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    layer_scale_init_value: float = 1e-6
    drop_path_rate: float = 0.0
    image_size: int | list[int] | tuple[int, int] = 224
    base_model_type: str | None = None
    base_model_name_or_path: str | None = None
    base_config: dict | None = None
    structure_fingerprint: dict | None = None  # see configuration_mdp_common.py

    def __post_init__(self, **kwargs):
        self.hidden_sizes = list(self.hidden_sizes or [96, 192, 384, 768])
        self.depths = list(self.depths or [3, 3, 9, 3])
        if len(self.hidden_sizes) != len(self.depths):
            raise ValueError(
                f"hidden_sizes ({self.hidden_sizes}) and depths ({self.depths}) must have one entry per stage"
            )
        num_layers = sum(self.depths)
        self.removed_layers = sorted(int(i) for i in (self.removed_layers or []))
        if any(not 0 <= i < num_layers for i in self.removed_layers):
            raise ValueError(
                f"removed_layers must be flat layer indices in [0, {num_layers}), got {self.removed_layers}"
            )
        if self.layer_mlp_widths is None:  # unpruned default: 4x the stage width, as transformers builds it
            self.layer_mlp_widths = [
                0 if flat in self.removed_layers else 4 * width
                for flat, width in enumerate(w for w, d in zip(self.hidden_sizes, self.depths) for _ in range(d))
            ]
        self.layer_mlp_widths = [int(w) for w in self.layer_mlp_widths]
        if len(self.layer_mlp_widths) != num_layers:
            raise ValueError(f"layer_mlp_widths must hold {num_layers} entries (one per layer, flat across stages)")
        bad = [i for i, w in enumerate(self.layer_mlp_widths) if i not in self.removed_layers and w < 1]
        if bad:
            raise ValueError(f"layers {bad} are not removed but have no MLP width; give each a width >= 1")
        super().__post_init__(**kwargs)
        self.check_structure_fingerprint()  # config.json edited after the save: an error naming the fields


__all__ = ["MDPConvNextConfig"]
