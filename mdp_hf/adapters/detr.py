"""DETR-family adapter: transformers' ``DetrForObjectDetection`` / ``DetrModel`` with an HF ResNet backbone
(``use_timm_backbone=False, backbone_config=ResNetConfig(...)``), and its pruned format ``mdp_detr``.

Why DETR and not RT-DETR: DETR reads one feature map (the backbone's last stage) through one 1x1 input projection,
so the backbone's pruned output width couples into exactly one tensor; RT-DETR reads three stages into a hybrid
CSP/FPN encoder and its ResNet is its own variant (``RTDetrResNetBackbone``), not the ResNet family's layout.

Dimensions and blocks are the ResNet family's, on the backbone (``model.backbone.model``): inner conv channels,
one residual width per group of coupled convs, each layer's residual branch removable. The last residual width
also couples into the input projection (its input channels are sliced) and may be pruned like any other. The
transformer part (encoder, decoder, query embeddings, class and box heads) is kept as it is.

Importance: the backbone's BatchNorms are DETR's frozen ones (buffers, no gradients) and transformers freezes the
backbone's parameters, so the official BN-Taylor score (gamma dL/dgamma + beta dL/dbeta) is read where it is equal
by construction: the gradient of the gate right after each BatchNorm, sum over the channel of y dL/dy. A shared
residual width is scored as a whole (no per-member shares). The loss is the detector's own (Hungarian-matched
classification + L1 + GIoU box losses, ``model(pixel_values, labels=[{"class_labels", "boxes"}, ...]).loss``).

Latency: the ResNet family's backbone terms, plus the input projection over the last residual width and one
constant for the rest (position embeddings, transformer encoder and decoder, heads at the table's resolution).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.initialization import no_init_weights
from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d, replace_batch_norm

from ..modeling.configuration_mdp_detr import MDPDetrConfig
from ..modeling.configuration_mdp_resnet import MDPResNetConfig
from ..modeling.modeling_mdp_detr import MDPDetrForObjectDetection, MDPDetrModel
from ..modeling.modeling_mdp_resnet import MDPResNetModel
from .base import GridCatalog, LatencyCells, ModelAdapter, PruningChoice, PruningSpace, PruningSpaceError, TimingTerm
from .registry import ModelFamily, register_family
from .resnet import ResNetAdapter, ResNetCells

#: the MDPResNetConfig fields that define a pruned backbone (what MDPDetrConfig.backbone_structure holds)
BACKBONE_STRUCTURE_FIELDS = (
    "num_channels",
    "embedding_size",
    "hidden_sizes",
    "depths",
    "layer_type",
    "hidden_act",
    "downsample_in_first_stage",
    "downsample_in_bottleneck",
    "layer_inner_widths",
    "layer_has_projection",
    "removed_layers",
    "stem_inner_widths",
    "avg_down",
)


class _ResNetView(nn.Module):
    """A headless-ResNet view (embedder + encoder + config) of a detector's backbone, for the ResNet family's code."""

    def __init__(self, embedder, encoder, config):
        super().__init__()
        self.embedder, self.encoder, self.config = embedder, encoder, config


def _thawed(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose frozen BatchNorms are ordinary eval-mode BatchNorm2d with the same values (what the
    ResNet family slices); the model itself is not touched."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DetrFrozenBatchNorm2d):
                norm = nn.BatchNorm2d(child.weight.numel(), device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    for attr in ("weight", "bias", "running_mean", "running_var"):
                        getattr(norm, attr).copy_(getattr(child, attr))
                setattr(parent, name, norm.eval())
    return module


class DetrAdapter(ResNetAdapter):
    # gate gradients == BN-Taylor scores of DETR's frozen BatchNorms (see the module docstring); |.| as for CNNs
    scores_from_gates = True
    taylor_scores = ModelAdapter.taylor_scores
    score_shares = ModelAdapter.score_shares

    @staticmethod
    def _detector(model):
        """(the DetrModel part, its attribute prefix in ``model``): ``model.`` for a detector, ``""`` for DetrModel."""
        name = type(model).__name__
        if hasattr(model, "detr") or name.endswith("ForSegmentation"):
            raise PruningSpaceError(
                f"{name} adds a mask head that reads several backbone stages, which mdp_hf cannot slice; prune "
                "DetrForObjectDetection (or DetrModel)"
            )
        base, prefix = (model.model, "model.") if hasattr(model, "class_labels_classifier") else (model, "")
        if not (hasattr(base, "backbone") and hasattr(base, "input_projection")):
            raise PruningSpaceError(f"{name} does not have DETR's layout (backbone + input_projection + transformer)")
        config = model.config
        if not isinstance(config, MDPDetrConfig):
            backbone_type = getattr(config.backbone_config, "model_type", None)
            if backbone_type != "resnet":
                what = "a timm backbone (use_timm_backbone=True)" if backbone_type == "timm_backbone" else None
                raise PruningSpaceError(
                    f"{name} has {what or f'a {backbone_type!r} backbone'}; mdp_hf prunes DETR only with transformers' "
                    "ResNet backbone: build it with DetrConfig(use_timm_backbone=False, backbone_config=ResNetConfig("
                    "..., out_features=['stage4'])) (its weights convert from timm's resnet50 by name)"
                )
            backbone = base.backbone.model
            if list(backbone.out_features)[-1] != backbone.stage_names[-1]:
                raise PruningSpaceError(
                    f"{name}'s backbone ends at out_features {list(backbone.out_features)} but DETR reads the last "
                    f"of them and the backbone computes every stage up to {backbone.stage_names[-1]!r}; set "
                    f"backbone_config.out_features=[{backbone.stage_names[-1]!r}] (DETR's default)"
                )
        return base, prefix

    def _parts(self, model):
        if isinstance(model, _ResNetView):
            return model, None, None
        base, prefix = self._detector(model)
        return base.backbone.model, f"{prefix}backbone.model", base.input_projection

    @staticmethod
    def _backbone_config(model):
        """The backbone's ResNet fields: the dense backbone's ResNetConfig, or the pruned one's MDPResNetConfig."""
        if isinstance(model.config, MDPDetrConfig):
            return MDPResNetConfig(**(model.config.backbone_structure or {}))
        return model.config.backbone_config

    def build_space(self, model, group_sizes=None, min_keep=None) -> PruningSpace:
        space = super().build_space(model, group_sizes, min_keep)  # the ResNet family's, with the backbone's prefix
        _, prefix = self._detector(model)
        for dim in space.dimensions.values():  # the last residual width feeds the input projection, not a classifier
            dim.coupled = [f"{prefix}input_projection (in)" if c == "classifier.1 (in)" else c for c in dim.coupled]
        return space

    def slice(self, model, space: PruningSpace, choice: PruningChoice):
        choice.validate(space)
        base, prefix = self._detector(model)
        backbone = _thawed(base.backbone.model)
        view = _ResNetView(backbone.embedder, backbone.encoder, self._backbone_config(model))
        pruned_backbone = ResNetAdapter.slice(self, view, space, choice)  # an MDPResNetModel
        _, stage_names = self._residual_names(backbone)
        last = torch.tensor(choice.kept_indices(space, stage_names[-1]))

        state = {
            f"{prefix}backbone.model.{k}": v
            for k, v in pruned_backbone.state_dict().items()
            if not k.endswith("num_batches_tracked")  # frozen BatchNorms have no counter
        }
        for k, v in model.state_dict().items():  # the transformer part and the heads, unchanged
            if not k.startswith(f"{prefix}backbone."):
                state[k] = v.detach().clone()
        projection = base.input_projection.weight
        state[f"{prefix}input_projection.weight"] = projection[:, last].detach().clone()

        source = model.config
        if isinstance(source, MDPDetrConfig):
            base_info = (source.base_model_type, source.base_model_name_or_path, source.base_config)
        else:
            base_info = (source.model_type, source.name_or_path or None, source.to_dict())
        detr_fields = {k: getattr(source, k) for k in _DETR_FIELDS}
        head = hasattr(model, "class_labels_classifier")
        config = MDPDetrConfig(
            **detr_fields,
            backbone_structure={k: getattr(pruned_backbone.config, k) for k in BACKBONE_STRUCTURE_FIELDS},
            base_model_type=base_info[0],
            base_model_name_or_path=base_info[1],
            base_config=base_info[2],
            id2label=source.id2label,
            label2id=source.label2id,
            architectures=["MDPDetrForObjectDetection" if head else "MDPDetrModel"],
        )
        with no_init_weights():  # every parameter and buffer is overwritten below (strict load)
            pruned = MDPDetrForObjectDetection(config) if head else MDPDetrModel(config)
        pruned.load_state_dict(state, strict=True)
        return pruned.to(next(model.parameters()).dtype).eval()

    def default_image_processor(self, config):
        """DETR's standard ``DetrImageProcessor`` (shortest edge 800, longest 1333, padded with a pixel mask), for
        ``pipeline("object-detection", ...)`` of a saved pruned detector; the run's own processor replaces it."""
        from transformers import DetrImageProcessor

        return DetrImageProcessor()

    def expected_num_parameters(self, config: MDPDetrConfig) -> int:
        backbone = MDPResNetConfig(**(config.backbone_structure or {}))
        with torch.device("meta"):  # frozen BatchNorms hold buffers: the ResNet count less its BN affine parameters
            norms = sum(m.num_features for m in MDPResNetModel(backbone).modules() if isinstance(m, nn.BatchNorm2d))
        total = ResNetAdapter.expected_num_parameters(self, backbone) - 2 * norms
        d = config.d_model

        def linear(n_in, n_out):
            return n_in * n_out + n_out

        attention = 4 * linear(d, d)
        encoder_layer = attention + linear(d, config.encoder_ffn_dim) + linear(config.encoder_ffn_dim, d) + 4 * d
        decoder_layer = 2 * attention + linear(d, config.decoder_ffn_dim) + linear(config.decoder_ffn_dim, d) + 6 * d
        total += backbone.hidden_sizes[-1] * d + d  # input projection (1x1 conv)
        total += config.num_queries * d
        if config.position_embedding_type == "learned":
            total += 2 * 50 * (d // 2)
        total += config.encoder_layers * encoder_layer + config.decoder_layers * decoder_layer + 2 * d  # decoder norm
        if config.architectures and config.architectures[0].endswith("ForObjectDetection"):
            total += linear(d, config.num_labels + 1) + 2 * linear(d, d) + linear(d, 4)
        return total


def _detr_fields() -> tuple[str, ...]:
    """DetrConfig's own fields that an mdp_detr config carries over (all but the backbone's)."""
    from transformers import DetrConfig

    own = vars(DetrConfig).get("__annotations__", {})
    return tuple(k for k in own if k not in ("backbone_config", "dilation"))


_DETR_FIELDS = _detr_fields()


# latency cells ---------------------------------------------------------------------------------------
"""The ResNet family's cells for the backbone (with DETR's frozen BatchNorms, as deployed), then

- ``detr.input_projection`` [last residual]: the 1x1 conv to ``d_model`` at the backbone's output resolution;
- ``detr.transformer`` [] (a constant): everything after the projection, DETR's own forward from the projected
  feature map (sine/learned position embeddings, encoder, decoder, class and box heads).
"""


class _GivenFeatureMap(nn.Module):
    """Stands in for the conv encoder of a transformer cell: the input is already the projected feature map."""

    def forward(self, pixel_values, pixel_mask):
        return [(pixel_values, pixel_mask.to(torch.bool))]


class _Projection(nn.Module):
    def __init__(self, cin, d_model):
        super().__init__()
        self.input_projection = nn.Conv2d(cin, d_model, kernel_size=1)

    def forward(self, feature_map):
        return self.input_projection(feature_map).flatten(2).transpose(1, 2)


class DetrCells(ResNetCells):
    uses_attention = True

    def __init__(self, model, space, settings):
        LatencyCells.__init__(self, model, space, settings)
        self.adapter = DetrAdapter()
        self.base, _, self.linear = self.adapter._parts(model)
        self.detr_config = model.config
        self.config = self.adapter._backbone_config(model)
        self.act = self.config.hidden_act
        size = settings.image_size or 800  # DETR's usual shortest edge
        self.image_size = list(size) if isinstance(size, (list, tuple)) else [size, size]
        self.num_channels = model.config.num_channels
        self.num_labels = 0  # no classifier after the backbone (ResNetCells' head term is replaced)
        self._record_shapes(model)

    def model_shapes(self) -> dict:
        c = self.detr_config
        return {
            **super().model_shapes(),
            "family": "detr",
            "num_labels": c.num_labels,
            "detr": {
                k: getattr(c, k)
                for k in (
                    "d_model",
                    "num_queries",
                    "encoder_layers",
                    "decoder_layers",
                    "encoder_ffn_dim",
                    "decoder_ffn_dim",
                    "encoder_attention_heads",
                    "decoder_attention_heads",
                    "activation_function",
                    "position_embedding_type",
                )
            },
        }

    def plan(self):
        grids, terms = super().plan()
        terms = [t for t in terms if t.name != "pool+classifier"]  # a classifier's head; DETR has none there
        used = {t.grid for t in terms}
        grids = [g for g in grids if g.key in used]
        _, stage_names = self.adapter._residual_names(self.base)
        last = stage_names[-1]
        _, out = self.shapes[id(self.base.encoder)]
        at = f"{out[2]}x{out[3]}"
        c = self.detr_config
        table = GridCatalog()
        key = table("detr.input_projection", [self.space.dimensions[last]], {"at": at, "d_model": c.d_model})
        terms.append(TimingTerm("input_projection", key, [last], None))
        shapes = self.model_shapes()["detr"]
        key = table("detr.transformer", [], {"at": at, "labels": c.num_labels, **shapes})
        terms.append(TimingTerm("transformer", key, [], None))
        return grids + table.all(), terms

    def build_cell(self, table, widths):
        B, p = self.settings.batch_size, table.params
        if table.kind not in ("detr.input_projection", "detr.transformer"):
            return super().build_cell(table, widths)
        h, w = (int(v) for v in p["at"].split("x"))
        if table.kind == "detr.input_projection":
            return self._place(_Projection(widths[0], p["d_model"]), (torch.randn(B, widths[0], h, w),))
        config = MDPDetrConfig(
            **{k: getattr(self.detr_config, k) for k in _DETR_FIELDS},
            backbone_structure=dict(embedding_size=1, hidden_sizes=[1], depths=[1], layer_type="basic"),
            id2label=self.detr_config.id2label,
        )
        config._attn_implementation = self.settings.attn_implementation
        module = MDPDetrForObjectDetection(config)
        module.model.backbone = _GivenFeatureMap()  # DETR's own forward from the projected map on
        module.model.input_projection = nn.Identity()
        return self._place(module, (torch.randn(B, p["d_model"], h, w),))

    def _place(self, module, args):
        with torch.no_grad():
            replace_batch_norm(module)  # the deployed backbone's BatchNorms are DETR's frozen ones
        return super()._place(module, args)

    def dense_model(self):
        return self.adapter.slice(self.model, self.space, self.space.full_choice())


# registration ----------------------------------------------------------------------------------------
def _detr(embedding_size, hidden_sizes, depths, layer_type, num_labels, *, d_model, layers, ffn, heads, queries):
    """A builder of a randomly initialised DetrForObjectDetection with an HF ResNet backbone (nothing downloaded)."""

    def build():
        from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

        backbone = ResNetConfig(
            embedding_size=embedding_size,
            hidden_sizes=hidden_sizes,
            depths=depths,
            layer_type=layer_type,
            out_features=[f"stage{len(depths)}"],
        )
        config = DetrConfig(
            use_timm_backbone=False,
            backbone_config=backbone,
            d_model=d_model,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_ffn_dim=ffn,
            decoder_ffn_dim=ffn,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            num_queries=queries,
            num_labels=num_labels,
        )
        return DetrForObjectDetection(config)

    return build


#: tiny variants (5 labels) for the registry-driven matrix and tests/test_family_detr.py
TEST_MODELS = {
    "detr_bottleneck": _detr(
        8, [16, 24, 32], [2, 2, 1], "bottleneck", 5, d_model=16, layers=1, ffn=32, heads=2, queries=6
    ),
    # stage 0 has an identity shortcut: stem and stage-0 widths are coupled
    "detr_basic": _detr(8, [8, 16], [2, 2], "basic", 5, d_model=16, layers=1, ffn=32, heads=2, queries=6),
}

register_family(
    ModelFamily(
        name="detr",
        adapter=DetrAdapter(),
        task="object-detection",
        kinds=("channels", "residual"),
        model_types=("detr", "mdp_detr"),
        pruned_classes=(MDPDetrConfig, MDPDetrModel, MDPDetrForObjectDetection),
        latency_cells=DetrCells,
        test_models=TEST_MODELS,
        presets={
            "detr-resnet50": _detr(
                64,
                [256, 512, 1024, 2048],
                [3, 4, 6, 3],
                "bottleneck",
                91,
                d_model=256,
                layers=6,
                ffn=2048,
                heads=8,
                queries=100,
            ),
        },
    )
)
