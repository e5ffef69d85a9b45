"""Configuration of a structurally pruned ViT / DeiT (model_type ``mdp_vit``).

Self-contained (imports only transformers) because it is copied next to saved weights and loaded with
``trust_remote_code=True`` in processes where mdp_hf is not installed.

Per-layer sizes use transformers' ``per_layer_config`` (a sparse map layer index -> overrides), so a
layer may override ``num_attention_heads``, ``qk_head_dim``, ``v_head_dim`` and ``intermediate_size``,
and ``skip`` may list ``"attention"`` and/or ``"mlp"`` for a removed sub-block (identity on the
residual stream). Read per-layer values through ``config.per_layer_config[i]``.
"""

from transformers import PreTrainedConfig


class MDPViTConfig(PreTrainedConfig):
    r"""
    Args:
        hidden_size: embedding width E shared by every layer (the global pruned dimension).
        num_attention_heads / qk_head_dim / v_head_dim / intermediate_size: defaults for layers that
            ``per_layer_config`` does not override. Query/key width per head may differ from the value width.
        attention_scaling: multiplier of q.k. Kept from the unpruned model (its ``head_dim ** -0.5``) so that
            pruning query/key units does not change the function of the kept ones.
        num_extra_tokens: 1 for ViT (CLS), 2 for DeiT (CLS + distillation token).
        classifier_heads: ``"cls"`` (one linear head on token 0) or ``"cls+distillation"`` (DeiT with teacher:
            two heads on tokens 0 and 1, logits averaged).
        add_pooling_layer: whether the base model has ViT's pooler (dense + tanh on token 0).
        base_model_type / base_model_name_or_path / base_config: what the model was pruned from, so the dense
            model can be rebuilt for comparison.
    """

    model_type = "mdp_vit"

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
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int | list[int] | tuple[int, int] = 16
    num_channels: int = 3
    qkv_bias: bool = True
    num_extra_tokens: int = 1
    classifier_heads: str = "cls"
    add_pooling_layer: bool = False
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    base_model_type: str | None = None
    base_model_name_or_path: str | None = None
    base_config: dict | None = None

    def __post_init__(self, **kwargs):
        if self.classifier_heads not in ("cls", "cls+distillation"):
            raise ValueError(f"classifier_heads must be 'cls' or 'cls+distillation', got {self.classifier_heads!r}")
        if self.num_extra_tokens not in (1, 2):
            raise ValueError(f"num_extra_tokens must be 1 (ViT) or 2 (DeiT), got {self.num_extra_tokens}")
        super().__post_init__(**kwargs)


__all__ = ["MDPViTConfig"]
