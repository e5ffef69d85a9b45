"""YOLOS detector family: transformers' ``YolosForObjectDetection`` (and its base ``YolosModel``), exported as
``mdp_yolos`` (the vit family's pruned layers between YOLOS' embeddings and heads).

YOLOS is a plain ViT: its space has the vit family's dimensions and blocks, under the same names (``embed``,
``layers.{i}.heads`` / ``qk_dim`` / ``v_dim`` / ``mlp_dim``; blocks ``layers.{i}.attention`` / ``layers.{i}.mlp``),
so the vit family's latency cells and importance apply. The embedding width also sizes the CLS and detection
tokens, the position embeddings (initial and mid-layer) and the input of the two MLP heads; the detection tokens
are all kept (each is one prediction slot), and the heads' hidden widths stay as they are.

A pruned YOLOS saves as ``MDPYolosForObjectDetection`` (``AutoModelForObjectDetection``, ``trust_remote_code``) with
a ``YolosImageProcessor``, so ``pipeline("object-detection", ...)`` and ``post_process_object_detection`` work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.initialization import no_init_weights

from ..modeling.configuration_mdp_yolos import MDPYolosConfig
from ..modeling.modeling_mdp_yolos import MDPYolosForObjectDetection, MDPYolosModel
from .base import (
    Block,
    Dimension,
    GateSet,
    ModelAdapter,
    PruningChoice,
    PruningSpace,
    PruningSpaceError,
)
from .registry import ModelFamily, register_family
from .vit import ViTAdapter, ViTCells, gate_heads_and_values, gate_query, masked_embed_layernorm, scale_output

_HEADS = ("class_labels_classifier", "bbox_predictor")
# configuration fields copied unchanged from the model being pruned (either layout)
_COPIED_FIELDS = (
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "num_detection_tokens",
    "use_mid_position_embeddings",
    "class_cost",
    "bbox_cost",
    "giou_cost",
    "bbox_loss_coefficient",
    "giou_loss_coefficient",
    "eos_coefficient",
    "id2label",
    "label2id",
)


class UnsupportedYolosError(PruningSpaceError):
    """A YOLOS model or option the pruned format ``mdp_yolos`` cannot express."""


@dataclass
class _Layer:
    """One encoder layer in either layout (transformers' ``YolosLayer`` or mdp_yolos' ``MDPViTLayer``); the
    attention / MLP parts are None where a pruned layer has that sub-block removed."""

    ln_before: torch.nn.LayerNorm | None
    q: torch.nn.Linear | None
    k: torch.nn.Linear | None
    v: torch.nn.Linear | None
    o: torch.nn.Linear | None
    ln_after: torch.nn.LayerNorm | None
    fc1: torch.nn.Linear | None
    fc2: torch.nn.Linear | None
    heads: int = 0
    qk: int = 0
    v_dim: int = 0
    mlp: int = 0

    @property
    def has_attention(self) -> bool:
        return self.q is not None

    @property
    def has_mlp(self) -> bool:
        return self.fc1 is not None


@dataclass
class _Parts:
    base: torch.nn.Module
    prefix: str | None  # "vit" inside a detection model, None for a bare base model
    heads: dict  # name -> MLP prediction head (empty for a base model)
    layers: list[_Layer]
    final_norm: torch.nn.LayerNorm
    mid_positions: torch.nn.Parameter | None
    pooler: torch.nn.Module | None


def _refuse(model, option: str, why: str):
    raise UnsupportedYolosError(
        f"cannot prune this {type(model).__name__}: {option} ({why}). The pruned format mdp_yolos expresses "
        "transformers' YolosForObjectDetection / YolosModel as they are (string hidden_act, no auxiliary loss); "
        "change the option in the model's config, or use a model the family supports."
    )


class YolosAdapter(ModelAdapter):
    # the vit family's defaults (paper's DeiT-B groups: E 16, heads 1, QK 2, V 2, MLP 32)
    default_group_sizes = dict(ViTAdapter.default_group_sizes)

    # model access -----------------------------------------------------------------------------------------
    def _parts(self, model) -> _Parts:
        from transformers import YolosForObjectDetection, YolosModel

        known = (YolosForObjectDetection, YolosModel, MDPYolosForObjectDetection, MDPYolosModel)
        if type(model) not in known:
            _refuse(
                model,
                f"the class {type(model).__qualname__}",
                "only YolosForObjectDetection, YolosModel and their mdp_yolos exports are known; a subclass may "
                "compute differently",
            )
        config = model.config
        if getattr(config, "auxiliary_loss", False):
            _refuse(model, "auxiliary_loss=True", "transformers' YOLOS cannot compute it: YOLOS has no decoder layers")
        if not isinstance(config.hidden_act, str):
            _refuse(model, f"hidden_act={config.hidden_act!r}", "the exported model names its activation")
        detection = isinstance(model, (YolosForObjectDetection, MDPYolosForObjectDetection))
        base = model.vit if detection else model
        heads = {name: getattr(model, name) for name in _HEADS} if detection else {}
        if isinstance(base, YolosModel):
            layers = [self._hf_layer(layer) for layer in base.encoder.layer]
            interpolation = base.encoder.interpolation
            mid = interpolation.mid_position_embeddings if interpolation is not None else None
        else:
            layers = [self._mdp_layer(layer) for layer in base.layers]
            mid = base.mid_position_embeddings
        return _Parts(base, "vit" if detection else None, heads, layers, base.layernorm, mid, base.pooler)

    @staticmethod
    def _hf_layer(layer) -> _Layer:
        attn = layer.attention.attention
        heads = attn.num_attention_heads
        return _Layer(
            layer.layernorm_before,
            attn.query,
            attn.key,
            attn.value,
            layer.attention.output.dense,
            layer.layernorm_after,
            layer.intermediate.dense,
            layer.output.dense,
            heads=heads,
            qk=attn.query.out_features // heads,
            v_dim=attn.value.out_features // heads,
            mlp=layer.intermediate.dense.out_features,
        )

    @staticmethod
    def _mdp_layer(layer) -> _Layer:
        attn, mlp = layer.attention, layer.mlp
        heads = attn.num_attention_heads if attn is not None else 0
        return _Layer(
            layer.layernorm_before,
            attn.q_proj if attn is not None else None,
            attn.k_proj if attn is not None else None,
            attn.v_proj if attn is not None else None,
            attn.o_proj if attn is not None else None,
            layer.layernorm_after,
            mlp.fc1 if mlp is not None else None,
            mlp.fc2 if mlp is not None else None,
            heads=heads,
            qk=attn.qk_head_dim if attn is not None else 0,
            v_dim=attn.v_head_dim if attn is not None else 0,
            mlp=mlp.fc1.out_features if mlp is not None else 0,
        )

    # pruning space ----------------------------------------------------------------------------------------
    def build_space(self, model, group_sizes=None, min_keep=None) -> PruningSpace:
        parts = self._parts(model)
        p = f"{parts.prefix}." if parts.prefix else ""
        dims, blocks, aliases = {}, {}, {}

        def add_dim(name, kind, size, block=None, coupled=()):
            group, minimum = self._group_and_min(name, kind, size, group_sizes, min_keep)
            dims[name] = Dimension(name, kind, size, group, minimum, block, coupled=list(coupled))

        hidden = parts.base.embeddings.patch_embeddings.projection.out_channels
        embed_coupled = [
            f"{p}embeddings.patch_embeddings.projection",
            f"{p}embeddings.cls_token",
            f"{p}embeddings.detection_tokens",
            f"{p}embeddings.position_embeddings",
            f"{p}layernorm",
        ]
        if parts.mid_positions is not None:
            embed_coupled.append(f"{p}mid position embeddings")
        if parts.pooler is not None:
            embed_coupled.append(f"{p}pooler.dense.weight[:, in]")
        embed_coupled += [f"{name}.layers.0.weight[:, in]" for name in parts.heads]
        add_dim("embed", "embed", hidden)
        for i, layer in enumerate(parts.layers):
            lp = f"{p}layers.{i}"
            if layer.has_attention:
                block = f"layers.{i}.attention"
                add_dim(f"layers.{i}.heads", "heads", layer.heads, block, [f"{lp}.attention (q, k, v, o)"])
                add_dim(f"layers.{i}.qk_dim", "qk", layer.qk, block, [f"{lp}.attention (q, k)"])
                add_dim(f"layers.{i}.v_dim", "v", layer.v_dim, block, [f"{lp}.attention (v, o)"])
                blocks[block] = Block(
                    block, "attention", [f"layers.{i}.heads", f"layers.{i}.qk_dim", f"layers.{i}.v_dim"]
                )
                embed_coupled += [f"{lp}.layernorm_before", f"{lp}.attention output (out)"]
            if layer.has_mlp:
                block = f"layers.{i}.mlp"
                add_dim(f"layers.{i}.mlp_dim", "mlp", layer.mlp, block, [f"{lp}.mlp (fc1, fc2)"])
                blocks[block] = Block(block, "mlp", [f"layers.{i}.mlp_dim"])
                embed_coupled += [f"{lp}.layernorm_after", f"{lp}.mlp output (out)"]
        dims["embed"].shared_by = list(blocks)
        dims["embed"].coupled = embed_coupled
        for name in (
            "patch_embeddings",
            "cls_token",
            "detection_tokens",
            "position_embeddings",
            "hidden_size",
            *_HEADS,
        ):
            aliases[name] = "embed"
        return PruningSpace(model.config.model_type, dims, blocks, aliases)

    def layer_blocks(self, space: PruningSpace) -> dict[str, str]:
        # as the vit family: the official block notebook removes whole layers (attention and MLP share a bit)
        return {name: name.rsplit(".", 1)[0] for name in space.blocks}

    # gates ------------------------------------------------------------------------------------------------
    def install_gates(self, model, space: PruningSpace) -> GateSet:
        """The vit family's gates. Mid position embeddings are added ungated: the pruned embedding units they
        write are read only by the masked LayerNorms (statistics and outputs over kept units), as in the sliced
        model where those units do not exist."""
        parts = self._parts(model)
        gates = GateSet(space, device=next(model.parameters()).device)
        embed = lambda dtype: gates.dim("embed", dtype)  # noqa: E731

        masked_layernorm = masked_embed_layernorm(gates)
        gates.on_output(parts.base.embeddings, scale_output(embed))
        gates.on_output(parts.final_norm, masked_layernorm)
        for i, layer in enumerate(parts.layers):
            if layer.has_attention:
                block, heads, qk, v = f"layers.{i}.attention", layer.heads, layer.qk, layer.v_dim
                gates.on_output(layer.ln_before, masked_layernorm)
                gates.on_output(layer.q, gate_query(gates, i, heads, qk))
                gates.on_input(layer.o, gate_heads_and_values(gates, i, heads, v))
                gates.on_output(layer.o, scale_output(lambda dt, b=block: embed(dt) * gates.block(b, dt)))
            if layer.has_mlp:
                block = f"layers.{i}.mlp"
                gates.on_output(layer.ln_after, masked_layernorm)
                gates.on_output(layer.fc1, scale_output(lambda dt, i=i: gates.dim(f"layers.{i}.mlp_dim", dt)))
                gates.on_output(layer.fc2, scale_output(lambda dt, b=block: embed(dt) * gates.block(b, dt)))
        if parts.pooler is not None:
            gates.on_input(parts.pooler.dense, lambda m, args: (args[0] * embed(args[0].dtype),))
        return gates

    # surgery ----------------------------------------------------------------------------------------------
    def slice(self, model, space: PruningSpace, choice: PruningChoice):
        choice.validate(space)
        parts = self._parts(model)
        E = torch.tensor(choice.kept_indices(space, "embed"))
        removed = set(choice.removed_blocks)
        state: dict[str, torch.Tensor] = {}

        def put(name, tensor):
            state[name] = tensor.detach().clone().contiguous()

        def put_linear(name, linear, rows=None, cols=None):
            weight = linear.weight if rows is None else linear.weight[rows]
            put(f"{name}.weight", weight if cols is None else weight[:, cols])
            if linear.bias is not None:
                put(f"{name}.bias", linear.bias if rows is None else linear.bias[rows])

        def put_layernorm(name, norm):
            put(f"{name}.weight", norm.weight[E])
            put(f"{name}.bias", norm.bias[E])

        emb = parts.base.embeddings
        for name in ("cls_token", "detection_tokens", "position_embeddings"):
            put(f"vit.embeddings.{name}", getattr(emb, name)[..., E])
        projection = emb.patch_embeddings.projection
        put("vit.embeddings.patch_embeddings.projection.weight", projection.weight[E])
        put("vit.embeddings.patch_embeddings.projection.bias", projection.bias[E])
        if parts.mid_positions is not None:
            put("vit.mid_position_embeddings", parts.mid_positions[..., E])
        put_layernorm("vit.layernorm", parts.final_norm)

        per_layer: dict[int, dict] = {}
        for i, layer in enumerate(parts.layers):
            overrides: dict = {"skip": []}
            lp = f"vit.layers.{i}"
            if layer.has_attention and f"layers.{i}.attention" not in removed:
                H = choice.kept_indices(space, f"layers.{i}.heads")
                QK = choice.kept_indices(space, f"layers.{i}.qk_dim")
                V = choice.kept_indices(space, f"layers.{i}.v_dim")
                qk_rows = torch.tensor([h * layer.qk + j for h in H for j in QK])
                v_rows = torch.tensor([h * layer.v_dim + j for h in H for j in V])
                put_layernorm(f"{lp}.layernorm_before", layer.ln_before)
                put_linear(f"{lp}.attention.q_proj", layer.q, qk_rows, E)
                put_linear(f"{lp}.attention.k_proj", layer.k, qk_rows, E)
                put_linear(f"{lp}.attention.v_proj", layer.v, v_rows, E)
                put_linear(f"{lp}.attention.o_proj", layer.o, E, v_rows)
                overrides.update(num_attention_heads=len(H), qk_head_dim=len(QK), v_head_dim=len(V))
            else:
                overrides["skip"].append("attention")
            if layer.has_mlp and f"layers.{i}.mlp" not in removed:
                M = torch.tensor(choice.kept_indices(space, f"layers.{i}.mlp_dim"))
                put_layernorm(f"{lp}.layernorm_after", layer.ln_after)
                put_linear(f"{lp}.mlp.fc1", layer.fc1, M, E)
                put_linear(f"{lp}.mlp.fc2", layer.fc2, E, M)
                overrides["intermediate_size"] = len(M)
            else:
                overrides["skip"].append("mlp")
            per_layer[i] = overrides
        if parts.pooler is not None:
            put_linear("vit.pooler.dense", parts.pooler.dense, None, E)
        for name, head in parts.heads.items():
            for j, linear in enumerate(head.layers):
                put_linear(f"{name}.layers.{j}", linear, None, E if j == 0 else None)

        config = self._pruned_config(model, parts, len(E), per_layer)
        with no_init_weights():  # every parameter is overwritten below (strict load): skip the random init
            if parts.prefix is None:  # a bare YolosModel / MDPYolosModel
                state = {k.removeprefix("vit."): v for k, v in state.items()}
                pruned = MDPYolosModel(config, add_pooling_layer=parts.pooler is not None)
            else:
                pruned = MDPYolosForObjectDetection(config)
        pruned.load_state_dict(state, strict=True)
        return pruned.to(next(model.parameters()).dtype).eval()

    def _pruned_config(self, model, parts: _Parts, hidden: int, per_layer: dict) -> MDPYolosConfig:
        source = model.config
        fields = {k: getattr(source, k) for k in _COPIED_FIELDS if hasattr(source, k)}
        if source.model_type == "mdp_yolos":
            scaling = source.attention_scaling
            head_hidden = source.detection_head_hidden_size
            base_type, base_path, base_config = (
                source.base_model_type,
                source.base_model_name_or_path,
                source.base_config,
            )
        else:
            scaling = (source.hidden_size // source.num_attention_heads) ** -0.5  # YolosSelfAttention's scaling
            head_hidden = source.hidden_size  # YOLOS' heads: hidden_dim = hidden_size
            base_type, base_path, base_config = source.model_type, source.name_or_path or None, source.to_dict()
        first = next((layer for layer in parts.layers if layer.has_attention), None)
        first_mlp = next((layer for layer in parts.layers if layer.has_mlp), None)
        defaults = {
            "num_attention_heads": first.heads if first else 1,
            "qk_head_dim": first.qk if first else 1,
            "v_head_dim": first.v_dim if first else 1,
            "intermediate_size": first_mlp.mlp if first_mlp else 1,
        }
        sparse = {}
        for i, overrides in per_layer.items():
            diff = {k: v for k, v in overrides.items() if k == "skip" and v or k != "skip" and defaults.get(k) != v}
            if diff:
                sparse[i] = diff
        pooler = parts.pooler
        return MDPYolosConfig(
            hidden_size=hidden,
            num_hidden_layers=len(parts.layers),
            attention_scaling=scaling,
            image_size=list(source.image_size),
            detection_head_hidden_size=head_hidden,
            add_pooling_layer=pooler is not None,
            pooler_output_size=pooler.dense.out_features if pooler is not None else None,
            base_model_type=base_type,
            base_model_name_or_path=base_path,
            base_config=base_config,
            per_layer_config=sparse or None,
            architectures=["MDPYolosForObjectDetection" if parts.heads else "MDPYolosModel"],
            **defaults,
            **fields,
        )

    # importance -------------------------------------------------------------------------------------------
    # The vit family's official score (ViTAdapter.taylor_scores: NVlabs/MDP's DeiT engine, signed sum of
    # w * dL/dw over each unit's linked tensors, per-kind divisors), read through either layout; the loss is the
    # detector's own (Hungarian-matched classification + box losses).
    scores_from_gates = False
    score_divisors = ViTAdapter.score_divisors

    @torch.no_grad()
    def taylor_scores(self, model, space: PruningSpace, gates: GateSet) -> dict[str, torch.Tensor]:
        parts = self._parts(model)

        def wg(param):  # w * dL/dw (zeros before the first backward)
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            return (param.detach() * grad).double()

        def rows(linear, groups=None):  # per output unit: weight row + bias; groups=(H, d) -> [H, d]
            out = wg(linear.weight).sum(1)
            if linear.bias is not None:
                out = out + wg(linear.bias)
            return out if groups is None else out.view(*groups)

        def cols(linear):  # per input unit: weight column
            return wg(linear.weight).sum(0)

        projection = parts.base.embeddings.patch_embeddings.projection
        embed = wg(projection.weight).flatten(1).sum(1) + wg(projection.bias)
        out = {}
        for i, layer in enumerate(parts.layers):
            if layer.has_attention:
                H = layer.heads
                q, k, v = rows(layer.q, (H, layer.qk)), rows(layer.k, (H, layer.qk)), rows(layer.v, (H, layer.v_dim))
                out[f"layers.{i}.heads"] = (q.sum(1) + k.sum(1) + v.sum(1)) / self.score_divisors["heads"]
                out[f"layers.{i}.qk_dim"] = q.sum(0) / self.score_divisors["qk"]
                out[f"layers.{i}.v_dim"] = v.sum(0) / self.score_divisors["v"]
                embed = embed + rows(layer.o) + cols(layer.q) + cols(layer.k) + cols(layer.v)
            if layer.has_mlp:
                out[f"layers.{i}.mlp_dim"] = rows(layer.fc1) / self.score_divisors["mlp"]
                embed = embed + rows(layer.fc2) + cols(layer.fc1)
        out["embed"] = embed / len(parts.layers)
        return {name: out[name].cpu() for name in space.dimensions}

    @torch.no_grad()
    def unit_magnitudes(self, model, space: PruningSpace) -> dict[str, torch.Tensor]:
        parts = self._parts(model)
        sq = lambda w: w.detach().float().square()  # noqa: E731
        embed = sq(parts.base.embeddings.patch_embeddings.projection.weight).flatten(1).sum(1)
        out = {}
        for i, layer in enumerate(parts.layers):
            if layer.has_attention:
                H, qk, v = layer.heads, layer.qk, layer.v_dim
                q = (sq(layer.q.weight) + sq(layer.k.weight)).sum(1).view(H, qk)
                vo = sq(layer.v.weight).sum(1).view(H, v) + sq(layer.o.weight).sum(0).view(H, v)
                out[f"layers.{i}.heads"] = q.sum(1) + vo.sum(1)
                out[f"layers.{i}.qk_dim"] = q.sum(0)
                out[f"layers.{i}.v_dim"] = vo.sum(0)
                embed = embed + sq(layer.o.weight).sum(1)
            if layer.has_mlp:
                out[f"layers.{i}.mlp_dim"] = sq(layer.fc1.weight).sum(1) + sq(layer.fc2.weight).sum(0)
                embed = embed + sq(layer.fc2.weight).sum(1)
        out["embed"] = embed  # writers into the residual stream: patch embedding, attention output and fc2 rows
        return {name: out[name].double().cpu() for name in space.dimensions}

    def expected_num_parameters(self, config: MDPYolosConfig) -> int:
        E, D, L = config.hidden_size, config.num_detection_tokens, config.num_hidden_layers
        p = config.patch_size
        patches = (config.image_size[0] // p) * (config.image_size[1] // p)
        tokens = 1 + patches + D
        total = E * config.num_channels * p * p + (E if config.patch_bias else 0)  # patch projection
        total += E + D * E + tokens * E  # CLS, detection tokens, position embeddings
        if config.use_mid_position_embeddings:
            total += (L - 1) * tokens * E
        total += 2 * E  # final LayerNorm
        bias = 1 if config.qkv_bias else 0
        for i in range(L):
            lc = config.per_layer_config[i]
            skip = set(getattr(lc, "skip", None) or [])
            if "attention" not in skip:
                qk, v = lc.num_attention_heads * lc.qk_head_dim, lc.num_attention_heads * lc.v_head_dim
                total += 2 * E + 2 * (qk * E + bias * qk) + (v * E + bias * v) + (v * E + E)
            if "mlp" not in skip:
                M = lc.intermediate_size
                total += 2 * E + M * E + M + M * E + E
        if config.add_pooling_layer:
            out = config.pooler_output_size or E
            total += E * out + out
        if (config.architectures or [""])[0].endswith("ForObjectDetection"):
            Hd = config.detection_head_hidden_size
            for outputs in (config.num_labels + 1, 4):
                total += (E * Hd + Hd) + (Hd * Hd + Hd) + (Hd * outputs + outputs)
        return total

    def default_image_processor(self, config):
        """A ``YolosImageProcessor`` resizing to the model's image size (pixel_mask unused by YOLOS), for
        ``pipeline("object-detection", ...)``; the run's own processor replaces it when one is given."""
        from transformers import YolosImageProcessor

        height, width = (int(s) for s in config.image_size)
        return YolosImageProcessor(size={"height": height, "width": width}, do_pad=False)


# latency cells ---------------------------------------------------------------------------------------------
class YolosCells(ViTCells):
    """The vit family's cells with YOLOS' token count (CLS + patches + detection tokens); ``vit.out`` [embed] is the
    rest of the detector: embeddings, mid-layer position embeddings, final LayerNorm and both heads (their first
    layer reads the embedding, the rest is constant), timed as the whole mdp_yolos model with every sub-block
    removed. The table's budget is the whole detector."""

    adapter_class = YolosAdapter

    def __init__(self, model, space, settings):
        self.model, self.space, self.settings = model, space, settings
        dense = self.adapter_class().slice(model, space, space.full_choice())  # the deployed dense model
        self.base = dense.config.to_dict()
        for key in (
            "per_layer_config",
            "architectures",
            "transformers_version",
            "auto_map",
            "_name_or_path",
            "model_type",
            "base_config",
            "structure_fingerprint",
        ):
            self.base.pop(key, None)
        image = settings.image_size or dense.config.image_size
        self.image_size = list(image) if isinstance(image, (list, tuple)) else [image, image]
        patch = dense.config.patch_size
        self.tokens = (
            1 + (self.image_size[0] // patch) * (self.image_size[1] // patch) + dense.config.num_detection_tokens
        )
        self.num_layers = dense.config.num_hidden_layers
        self._dense_config = dense.config
        del dense

    def model_shapes(self) -> dict:
        c = self._dense_config
        return {
            "family": "yolos",
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "tokens": self.tokens,
            "image_size": self.image_size,
            "patch_size": c.patch_size,
            "num_detection_tokens": c.num_detection_tokens,
            "use_mid_position_embeddings": c.use_mid_position_embeddings,
            "detection_head_hidden_size": c.detection_head_hidden_size,
            "num_labels": c.num_labels,
            "hidden_act": c.hidden_act,
        }

    def _config(self, hidden: int, num_layers: int, per_layer: dict) -> MDPYolosConfig:
        config = MDPYolosConfig(
            **{
                **self.base,
                "hidden_size": hidden,
                "num_hidden_layers": num_layers,
                "per_layer_config": per_layer,
                "image_size": self.image_size,
            }
        )
        config._attn_implementation = self.settings.attn_implementation
        return config

    def _deployed(self, config):
        if (self._dense_config.architectures or [""])[0].endswith("ForObjectDetection"):
            return MDPYolosForObjectDetection(config)
        return MDPYolosModel(config, add_pooling_layer=self._dense_config.add_pooling_layer)


# registration ----------------------------------------------------------------------------------------------
_TINY = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=[32, 32],
    patch_size=8,
    num_detection_tokens=5,
    num_labels=5,
)


def _yolos(tiny: bool = False, **kwargs):
    """A builder of a randomly initialised YolosForObjectDetection (imported only when called). Tiny test variants
    get non-trivial tokens / position embeddings (YOLOS initialises them to zero: every detection token would be
    the same) and Linear weights at std 1/sqrt(fan_in) (near-uniform attention at 0.02 in a 32-wide model)."""

    def build():
        from transformers import YolosConfig, YolosForObjectDetection

        model = YolosForObjectDetection(YolosConfig(**kwargs))
        if tiny:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "token" in name or "position_embeddings" in name:
                        param.normal_(std=0.5)
                for module in model.modules():
                    if isinstance(module, torch.nn.Linear):
                        torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
        return model

    return build


register_family(
    ModelFamily(
        name="yolos",
        adapter=YolosAdapter(),
        kinds=("embed", "heads", "qk", "v", "mlp"),
        model_types=("yolos", "mdp_yolos"),
        task="object-detection",
        pruned_classes=(MDPYolosConfig, MDPYolosModel, MDPYolosForObjectDetection),
        latency_cells=YolosCells,
        test_models={
            "yolos": _yolos(True, **_TINY, use_mid_position_embeddings=False),
            "yolos_mid_pe": _yolos(True, **_TINY, use_mid_position_embeddings=True),
        },
        presets={
            # hustvl/yolos-tiny's shape (DeiT-Ti, 100 detection tokens, COCO's 91 labels) at 512x864
            "yolos-tiny": _yolos(
                hidden_size=192,
                num_hidden_layers=12,
                num_attention_heads=3,
                intermediate_size=768,
                image_size=[512, 864],
                num_detection_tokens=100,
                use_mid_position_embeddings=False,
                num_labels=91,
            ),
        },
    )
)
