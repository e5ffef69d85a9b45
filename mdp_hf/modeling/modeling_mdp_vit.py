"""Structurally pruned ViT / DeiT: per-layer heads, separate query/key and value widths, per-layer MLP
width, removable attention / MLP sub-blocks; also the timm ViT options (layer scale, average pooling with
``fc_norm``, ``no_embed_class``, ``pre_norm``, no class token).

Self-contained (imports only torch and transformers) because it is copied next to saved weights and
loaded with ``trust_remote_code=True`` where mdp_hf is not installed. Parameter names follow
transformers' ViT (``vit.layers.{i}.attention.q_proj`` ...) so weights map one-to-one from the model it
was pruned from.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_mdp_vit import MDPViTConfig


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


@dataclass
class MDPImageClassifierOutput(ModelOutput):
    """Image-classification output; ``cls_logits``/``distillation_logits`` are set for DeiT with teacher heads."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cls_logits: torch.Tensor | None = None
    distillation_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class MDPViTPatchEmbeddings(nn.Module):
    def __init__(self, config: MDPViTConfig):
        super().__init__()
        image_size, patch_size = _pair(config.image_size), _pair(config.patch_size)
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = config.num_channels
        self.num_patches = (image_size[0] // patch_size[0]) * (image_size[1] // patch_size[1])
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=patch_size, stride=patch_size, bias=config.patch_bias
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(f"Expected {self.num_channels} input channels, got {pixel_values.shape[1]}.")
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class MDPViTEmbeddings(nn.Module):
    """CLS (+ distillation for DeiT) tokens, patch embeddings and learned position embeddings.

    Position embeddings cover the extra tokens too (added after they are prepended), or with
    ``no_embed_class`` only the patch tokens (added before). ``interpolate_pos_encoding=True`` accepts another
    resolution: the patch position embeddings are resized bicubically to the new patch grid, as transformers'
    ViT / DeiT do (the extra tokens' embeddings unchanged)."""

    def __init__(self, config: MDPViTConfig):
        super().__init__()
        self.num_extra_tokens = config.num_extra_tokens
        self.no_embed_class = config.no_embed_class
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.num_extra_tokens >= 1 else None
        self.distillation_token = (
            nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.num_extra_tokens == 2 else None
        )
        self.patch_embeddings = MDPViTPatchEmbeddings(config)
        num_positions = self.patch_embeddings.num_patches + (0 if config.no_embed_class else config.num_extra_tokens)
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """The position embeddings for a ``height`` x ``width`` input: the patch part resized (bicubic,
        ``align_corners=False``) from the trained patch grid to the input's, as transformers' ViT does."""
        grid = tuple(s // p for s, p in zip(self.patch_embeddings.image_size, self.patch_embeddings.patch_size))
        new_grid = (height // self.patch_embeddings.patch_size[0], width // self.patch_embeddings.patch_size[1])
        if new_grid == grid and not torch.jit.is_tracing():
            return self.position_embeddings
        extra = 0 if self.no_embed_class else self.num_extra_tokens
        extra_pos, patch_pos = self.position_embeddings[:, :extra], self.position_embeddings[:, extra:]
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, grid[0], grid[1], dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=new_grid, mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((extra_pos, patch_pos), dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if interpolate_pos_encoding:
            position_embeddings = self.interpolate_pos_encoding(height, width)
        elif (height, width) != tuple(self.patch_embeddings.image_size):
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match model {tuple(self.patch_embeddings.image_size)}; "
                "pass interpolate_pos_encoding=True to resize the position embeddings to it."
            )
        else:
            position_embeddings = self.position_embeddings
        embeddings = self.patch_embeddings(pixel_values)
        batch_size = embeddings.shape[0]
        tokens = [t.expand(batch_size, -1, -1) for t in (self.cls_token, self.distillation_token) if t is not None]
        if self.no_embed_class:
            embeddings = torch.cat(tokens + [embeddings + position_embeddings], dim=1)
        else:
            embeddings = torch.cat(tokens + [embeddings], dim=1) + position_embeddings
        return self.dropout(embeddings)


class MDPViTAttention(nn.Module):
    """Multi-head self-attention whose query/key width per head differs from its value width."""

    def __init__(self, config: MDPViTConfig, layer_config):
        super().__init__()
        self.config = config
        self.num_attention_heads = layer_config.num_attention_heads
        self.qk_head_dim = layer_config.qk_head_dim
        self.v_head_dim = layer_config.v_head_dim
        # The unpruned model's scaling is kept: dropping query/key units must not rescale the kept ones.
        scaling = config.attention_scaling
        self.scaling = scaling if scaling is not None else self.qk_head_dim**-0.5
        self.dropout = config.attention_probs_dropout_prob
        hidden, heads = config.hidden_size, self.num_attention_heads
        self.q_proj = nn.Linear(hidden, heads * self.qk_head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, heads * self.qk_head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, heads * self.v_head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(heads * self.v_head_dim, hidden, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        heads = self.num_attention_heads
        query = self.q_proj(hidden_states).view(batch, tokens, heads, self.qk_head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, tokens, heads, self.qk_head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, tokens, heads, self.v_head_dim).transpose(1, 2)
        dropout = self.dropout if self.training else 0.0
        if self.config._attn_implementation == "eager":
            weights = torch.matmul(query, key.transpose(-1, -2)) * self.scaling
            weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
            weights = F.dropout(weights, p=dropout, training=self.training)
            context = torch.matmul(weights, value)
        else:  # SDPA supports a value width different from the query/key width
            context = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=self.scaling)
        context = context.transpose(1, 2).reshape(batch, tokens, heads * self.v_head_dim)
        return self.o_proj(context)


class MDPViTMLP(nn.Module):
    def __init__(self, config: MDPViTConfig, layer_config):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, layer_config.intermediate_size)
        self.fc2 = nn.Linear(layer_config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class MDPViTLayerScale(nn.Module):
    """A learned per-channel scale on a sub-block's output (timm ``LayerScale``; ``config.layer_scale``)."""

    def __init__(self, config: MDPViTConfig):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((config.hidden_size,), float(config.layer_scale)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.gamma


class MDPViTLayer(nn.Module):
    """Pre-norm transformer layer; a skipped sub-block has no parameters and is identity on the residual."""

    def __init__(self, config: MDPViTConfig, layer_idx: int):
        super().__init__()
        layer_config = config.per_layer_config[layer_idx]
        skip = set(getattr(layer_config, "skip", None) or [])
        unknown = skip - {"attention", "mlp"}
        if unknown:
            raise ValueError(f"Layer {layer_idx}: unknown skip entries {sorted(unknown)}; use 'attention' or 'mlp'.")
        eps = config.layer_norm_eps
        has_attention, has_mlp = "attention" not in skip, "mlp" not in skip
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=eps) if has_attention else None
        self.attention = MDPViTAttention(config, layer_config) if has_attention else None
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=eps) if has_mlp else None
        self.mlp = MDPViTMLP(config, layer_config) if has_mlp else None
        scaled = config.layer_scale is not None
        self.layer_scale_attention = MDPViTLayerScale(config) if scaled and has_attention else None
        self.layer_scale_mlp = MDPViTLayerScale(config) if scaled and has_mlp else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.attention is not None:
            update = self.attention(self.layernorm_before(hidden_states))
            if self.layer_scale_attention is not None:
                update = self.layer_scale_attention(update)
            hidden_states = hidden_states + self.dropout(update)
        if self.mlp is not None:
            update = self.mlp(self.layernorm_after(hidden_states))
            if self.layer_scale_mlp is not None:
                update = self.layer_scale_mlp(update)
            hidden_states = hidden_states + self.dropout(update)
        return hidden_states


class MDPViTPooler(nn.Module):
    def __init__(self, config: MDPViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.pooler_output_size or config.hidden_size)
        self.activation = ACT2FN[config.pooler_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class MDPViTPreTrainedModel(PreTrainedModel):
    config_class = MDPViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["MDPViTEmbeddings", "MDPViTLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, MDPViTEmbeddings):
            nn.init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            for token in (module.cls_token, module.distillation_token):
                if token is not None:
                    nn.init.trunc_normal_(token, mean=0.0, std=std)
        elif isinstance(module, MDPViTLayerScale):
            nn.init.constant_(module.gamma, float(self.config.layer_scale))


class MDPViTModel(MDPViTPreTrainedModel):
    """Embeddings, (``pre_norm``: a LayerNorm,) the layers and the final LayerNorm over every token (absent with
    ``fc_norm``: the classification model normalises the pooled feature instead)."""

    def __init__(self, config: MDPViTConfig, add_pooling_layer: bool | None = None):
        super().__init__(config)
        if add_pooling_layer is None:
            add_pooling_layer = config.add_pooling_layer
        self.embeddings = MDPViTEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pre_norm else None
        self.layers = nn.ModuleList([MDPViTLayer(config, i) for i in range(config.num_hidden_layers)])
        self.layernorm = None if config.fc_norm else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = MDPViTPooler(config) if add_pooling_layer else None
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ):
        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        hidden_states = self.embeddings(pixel_values.to(expected_dtype), interpolate_pos_encoding)
        if self.pre_layernorm is not None:
            hidden_states = self.pre_layernorm(hidden_states)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        sequence_output = self.layernorm(hidden_states) if self.layernorm is not None else hidden_states
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence_output, pooler_output=pooled_output, hidden_states=all_hidden_states
        )


class MDPViTForImageClassification(MDPViTPreTrainedModel):
    """Classifier on the pooled feature (token 0 for ViT / DeiT, or the mean patch token with ``pooling="avg"``)
    or, for DeiT with teacher heads, the mean of the CLS and distillation heads (tokens 0 and 1)."""

    def __init__(self, config: MDPViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = MDPViTModel(config, add_pooling_layer=False)
        self.fc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.fc_norm else None
        self.dropout = nn.Dropout(config.classifier_dropout_prob)

        def head():
            return nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()

        if config.classifier_heads == "cls+distillation":
            self.cls_classifier = head()
            self.distillation_classifier = head()
        else:
            self.classifier = head()
        self.post_init()

    def pool(self, sequence_output: torch.Tensor):
        """The feature(s) the head(s) read: one tensor, or (CLS, distillation) tokens for the two-head DeiT."""
        if self.config.classifier_heads == "cls+distillation":
            return self.dropout(sequence_output[:, 0]), self.dropout(sequence_output[:, 1])
        if self.config.pooling == "avg":
            pooled = sequence_output[:, self.config.num_extra_tokens :].mean(dim=1)
        else:
            pooled = sequence_output[:, 0]
        if self.fc_norm is not None:
            pooled = self.fc_norm(pooled)
        return self.dropout(pooled)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ):
        outputs = self.vit(
            pixel_values,
            output_hidden_states=kwargs.get("output_hidden_states", False),
            interpolate_pos_encoding=interpolate_pos_encoding,
        )
        pooled = self.pool(outputs.last_hidden_state)
        cls_logits = distillation_logits = None
        if self.config.classifier_heads == "cls+distillation":
            cls_logits = self.cls_classifier(pooled[0])
            distillation_logits = self.distillation_classifier(pooled[1])
            logits = (cls_logits + distillation_logits) / 2
        else:
            logits = self.classifier(pooled)
        # as transformers' ViT: the loss kwargs (Trainer's num_items_in_batch under gradient accumulation) reach the
        # loss, so a loss Trainer treats as already scaled for accumulation is scaled
        loss = self.loss_function(labels, logits, self.config, **kwargs) if labels is not None else None
        return MDPImageClassifierOutput(
            loss=loss,
            logits=logits,
            cls_logits=cls_logits,
            distillation_logits=distillation_logits,
            hidden_states=outputs.hidden_states,
        )


__all__ = ["MDPViTForImageClassification", "MDPViTModel", "MDPViTPreTrainedModel"]
