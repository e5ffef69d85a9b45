"""Configuration of a structurally pruned YOLOS detector (model_type ``mdp_yolos``).

YOLOS is a plain ViT whose token sequence is [CLS, patches, detection tokens], with (optionally) position
embeddings added again after every layer but the last, and two MLP heads (classes + "no object", boxes) on the
detection tokens. The encoder layers are the vit family's pruned layers (``mdp_vit``): per-layer heads, query/key
and value widths per head, MLP width and removable sub-blocks, via ``per_layer_config`` as in ``MDPViTConfig``.

Self-contained (imports only transformers and its sibling configuration_mdp_common) because it is copied next to
saved weights and loaded with ``trust_remote_code=True`` in processes where mdp_hf is not installed.
"""

from transformers import PreTrainedConfig

from .configuration_mdp_common import StructureFingerprintMixin


class MDPYolosConfig(StructureFingerprintMixin, PreTrainedConfig):
    r"""
    Args:
        hidden_size: embedding width E shared by every layer, the tokens, the position embeddings and the heads'
            input (the global pruned dimension).
        num_attention_heads / qk_head_dim / v_head_dim / intermediate_size: defaults for layers that
            ``per_layer_config`` does not override; ``skip`` lists removed sub-blocks (``"attention"``, ``"mlp"``).
        attention_scaling: multiplier of q.k, kept from the unpruned model (its ``head_dim ** -0.5``).
        num_detection_tokens: detection tokens appended after the patch tokens (one prediction each); kept whole.
        use_mid_position_embeddings: position embeddings added after every layer but the last (YOLOS-S/B).
        detection_head_hidden_size: hidden width of the two 3-layer MLP heads (the unpruned model's hidden size:
            only the heads' input width follows the pruned embedding).
        add_pooling_layer / pooler_output_size / pooler_act: the base model's pooler (dense + tanh on token 0), as
            ``YolosModel``; detection models have none.
        class_cost ... eos_coefficient, auxiliary_loss: YOLOS' Hungarian matching and loss weights (training only).
        base_model_type / base_model_name_or_path / base_config: what the model was pruned from.
        layer_scale / patch_bias: the vit family's layer fields (YOLOS: no layer scale, a patch bias).
    """

    model_type = "mdp_yolos"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    qk_head_dim: int = 64
    v_head_dim: int = 64
    intermediate_size: int = 3072
    attention_scaling: float | None = None
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: list[int] | tuple[int, int] = (512, 864)
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    num_detection_tokens: int = 100
    use_mid_position_embeddings: bool = True
    detection_head_hidden_size: int = 768
    add_pooling_layer: bool = False
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    layer_scale: float | None = None
    patch_bias: bool = True
    auxiliary_loss: bool = False
    class_cost: float = 1
    bbox_cost: float = 5
    giou_cost: float = 2
    bbox_loss_coefficient: float = 5
    giou_loss_coefficient: float = 2
    eos_coefficient: float = 0.1
    base_model_type: str | None = None
    base_model_name_or_path: str | None = None
    base_config: dict | None = None
    structure_fingerprint: dict | None = None  # see configuration_mdp_common.py

    def __post_init__(self, **kwargs):
        if isinstance(self.image_size, int):
            self.image_size = [self.image_size, self.image_size]
        if len(self.image_size) != 2:
            raise ValueError(f"image_size must be (height, width), got {self.image_size!r}")
        if not isinstance(self.patch_size, int):
            raise ValueError(f"patch_size must be one int (YOLOS' square patches), got {self.patch_size!r}")
        if self.num_detection_tokens < 1:
            raise ValueError(f"num_detection_tokens must be >= 1, got {self.num_detection_tokens}")
        if self.auxiliary_loss:
            raise ValueError("auxiliary_loss=True is not supported by mdp_yolos (YOLOS has no decoder layers)")
        super().__post_init__(**kwargs)
        self.check_structure_fingerprint()  # config.json edited after the save: an error naming the fields


__all__ = ["MDPYolosConfig"]
