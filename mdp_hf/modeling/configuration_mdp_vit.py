"""Configuration of a structurally pruned ViT / DeiT (model_type ``mdp_vit``).

Self-contained (imports only transformers and its sibling configuration_mdp_common) because it is copied next to
saved weights and loaded with ``trust_remote_code=True`` in processes where mdp_hf is not installed.

Per-layer sizes use transformers' ``per_layer_config`` (a sparse map layer index -> overrides), so a
layer may override ``num_attention_heads``, ``qk_head_dim``, ``v_head_dim`` and ``intermediate_size``,
and ``skip`` may list ``"attention"`` and/or ``"mlp"`` for a removed sub-block (identity on the
residual stream). Read per-layer values through ``config.per_layer_config[i]``.
"""

from transformers import PreTrainedConfig

from .configuration_mdp_common import StructureFingerprintMixin


class MDPViTConfig(StructureFingerprintMixin, PreTrainedConfig):
    r"""
    Args:
        hidden_size: embedding width E shared by every layer (the global pruned dimension).
        num_attention_heads / qk_head_dim / v_head_dim / intermediate_size: defaults for layers that
            ``per_layer_config`` does not override. Query/key width per head may differ from the value width.
        attention_scaling: multiplier of q.k. Kept from the unpruned model (its ``head_dim ** -0.5``) so that
            pruning query/key units does not change the function of the kept ones.
        num_extra_tokens: 1 for ViT (CLS), 2 for DeiT (CLS + distillation token), 0 for a model without a class
            token (timm ``class_token=False``; needs ``pooling="avg"``).
        classifier_heads: ``"cls"`` (one linear head on the pooled feature) or ``"cls+distillation"`` (DeiT with
            teacher: two heads on tokens 0 and 1, logits averaged).
        add_pooling_layer: whether the base model has ViT's pooler (dense + tanh on token 0).
        base_model_type / base_model_name_or_path / base_config: what the model was pruned from, so the dense
            model can be rebuilt for comparison.

        The fields below describe timm ViT options; their defaults are the transformers ViT / DeiT layout, so
        configs written before they existed load and compute as before.

        layer_scale: LayerScale (timm ``init_values``, DeiT-III): a learned per-channel scale on the output of
            every attention and MLP sub-block; the value is its initialisation. None: no layer scale.
        pooling: the feature the ``"cls"`` head reads: ``"token"`` (token 0) or ``"avg"`` (mean over the patch
            tokens, extra tokens excluded; timm ``global_pool="avg"``).
        fc_norm: whether the final LayerNorm normalises the pooled feature (timm ``fc_norm``, the
            classification model's ``fc_norm``) instead of every token (the base model's ``layernorm``).
        no_embed_class: position embeddings cover the patch tokens only and are added before the extra tokens
            are prepended (timm ``no_embed_class=True``).
        pre_norm: a LayerNorm after the embeddings, before the first layer (timm ``pre_norm``, CLIP).
        patch_bias: whether the patch projection has a bias (timm drops it with ``pre_norm``).
        classifier_dropout_prob: dropout on the pooled feature before the head(s) (timm ``drop_rate``).
        preprocessing: the source model's input preprocessing (mean, std, input_size, interpolation,
            crop_pct), for image processors and model cards. Informational: the model does not read it.
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
    layer_scale: float | None = None
    pooling: str = "token"
    fc_norm: bool = False
    no_embed_class: bool = False
    pre_norm: bool = False
    patch_bias: bool = True
    classifier_dropout_prob: float = 0.0
    preprocessing: dict | None = None
    structure_fingerprint: dict | None = None  # see configuration_mdp_common.py

    def __post_init__(self, **kwargs):
        if self.classifier_heads not in ("cls", "cls+distillation"):
            raise ValueError(f"classifier_heads must be 'cls' or 'cls+distillation', got {self.classifier_heads!r}")
        if self.num_extra_tokens not in (0, 1, 2):
            raise ValueError(
                f"num_extra_tokens must be 1 (ViT), 2 (DeiT) or 0 (no class token), got {self.num_extra_tokens}"
            )
        if self.pooling not in ("token", "avg"):
            raise ValueError(f"pooling must be 'token' or 'avg', got {self.pooling!r}")
        if self.pooling == "token" and self.num_extra_tokens == 0:
            raise ValueError("pooling='token' reads the class token, but num_extra_tokens is 0; use pooling='avg'")
        if self.classifier_heads == "cls+distillation" and (self.num_extra_tokens != 2 or self.pooling != "token"):
            raise ValueError("classifier_heads='cls+distillation' needs num_extra_tokens=2 and pooling='token'")
        super().__post_init__(**kwargs)
        self.check_structure_fingerprint()  # config.json edited after the save: an error naming the fields


__all__ = ["MDPViTConfig"]
