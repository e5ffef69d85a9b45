"""Configuration of a DETR detector with a structurally pruned ResNet backbone (model_type ``mdp_detr``).

Self-contained (imports only transformers and its sibling configuration_mdp_common): copied next to saved weights
for ``trust_remote_code``.

It is transformers' ``DetrConfig`` (every DETR module and the Hungarian-matched loss read their fields from it)
plus ``backbone_structure``: the fields of an ``mdp_resnet`` configuration (per-conv widths, residual widths,
removed residual branches) that describe the pruned backbone. ``backbone_config`` stays None: transformers would
resolve it through ``AutoConfig``, which knows no ``mdp_resnet`` in a process without mdp_hf.
"""

from transformers.models.detr.configuration_detr import DetrConfig

from .configuration_mdp_common import StructureFingerprintMixin


class MDPDetrConfig(StructureFingerprintMixin, DetrConfig):
    r"""
    Args:
        backbone_structure: keyword arguments of the pruned backbone's ``MDPResNetConfig`` (``embedding_size``,
            ``hidden_sizes``, ``depths``, ``layer_type``, ``layer_inner_widths``, ``layer_has_projection``,
            ``removed_layers``, ...); the input projection reads ``hidden_sizes[-1]`` channels. None: the
            unpruned ResNet-50 layout (``MDPResNetConfig``'s defaults).
        The DETR fields (``d_model``, ``encoder_layers``, ``num_queries``, the loss weights, ...) are DetrConfig's;
        those that define what the model computes are declared again here so the structure fingerprint covers
        them. base_model_type / base_model_name_or_path / base_config: what the model was pruned from.
    """

    model_type = "mdp_detr"
    sub_configs_defaults = {}  # no backbone_config sub-config: the backbone is backbone_structure

    backbone_structure: dict | None = None
    num_channels: int = 3
    num_queries: int = 100
    encoder_layers: int = 6
    encoder_ffn_dim: int = 2048
    encoder_attention_heads: int = 8
    decoder_layers: int = 6
    decoder_ffn_dim: int = 2048
    decoder_attention_heads: int = 8
    activation_function: str = "relu"
    d_model: int = 256
    position_embedding_type: str = "sine"
    base_model_type: str | None = None
    base_model_name_or_path: str | None = None
    base_config: dict | None = None
    structure_fingerprint: dict | None = None  # see configuration_mdp_common.py

    def __post_init__(self, **kwargs):
        if self.backbone_config is not None:
            raise ValueError(
                "MDPDetrConfig describes its backbone with backbone_structure (the fields of an mdp_resnet config); "
                "backbone_config must be None"
            )
        kwargs["use_timm_backbone"] = False  # DetrConfig would otherwise invent a timm backbone config
        super().__post_init__(**kwargs)
        self.check_structure_fingerprint()  # config.json edited after the save: an error naming the fields


__all__ = ["MDPDetrConfig"]
