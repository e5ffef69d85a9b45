"""ViT-family adapter: transformers' ViT and DeiT (incl. the distilled, two-head one) and mdp_vit.

Dimensions: the embedding width E (one global dimension: patch embedding, CLS/distillation tokens,
position embeddings, every LayerNorm, every residual projection, classifier inputs), and per layer:
heads, per-head query/key width, per-head value width, MLP hidden width. Blocks: each layer's
attention and MLP sub-blocks (remove both to remove the layer).

A query/key (or value) unit j is column j of every kept head, so all heads of a layer keep the same
per-head width and attention stays one dense batched matmul after slicing.
"""

from __future__ import annotations

import torch
from transformers.initialization import no_init_weights

from ..modeling.configuration_mdp_vit import MDPViTConfig
from ..modeling.modeling_mdp_vit import MDPViTForImageClassification, MDPViTLayer, MDPViTModel
from .base import (
    Block,
    Dimension,
    GateSet,
    LatencyCells,
    ModelAdapter,
    PruningChoice,
    PruningSpace,
    PruningSpaceError,
    TimingGrid,
    TimingTerm,
    has_classifier,
)
from .registry import ModelFamily, register_family

# configuration fields copied unchanged from the model being pruned
_COPIED_FIELDS = (
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "pooler_act",
    "id2label",
    "label2id",
)
# mdp_vit's timm-layout fields (defaults for transformers sources), copied when an mdp_vit model is pruned again
_MDP_VIT_FIELDS = (
    "layer_scale",
    "pooling",
    "fc_norm",
    "no_embed_class",
    "pre_norm",
    "patch_bias",
    "classifier_dropout_prob",
    "preprocessing",
)


# gate hooks shared by the ViT-shaped families (vit, timm_vit, yolos) ---------------------------------------------
def scale_output(get_gate):
    """Forward hook: the module's output times ``get_gate(dtype)`` (a per-unit vector or a block's scalar)."""

    def hook(module, args, output):
        return output * get_gate(output.dtype)

    return hook


def masked_embed_layernorm(gates: GateSet):
    """Forward hook of a LayerNorm over the embedding width: statistics over the kept embedding units only, as the
    sliced LayerNorm computes them, and its output gated."""

    def hook(module, args, output):
        x = args[0]
        mask = gates.binary_mask("embed").to(x.dtype)
        count = mask.sum()
        mean = (x * mask).sum(-1, keepdim=True) / count
        var = (((x - mean) * mask) ** 2).sum(-1, keepdim=True) / count
        normed = (x - mean) / torch.sqrt(var + module.eps) * module.weight + module.bias
        return normed * gates.dim("embed", x.dtype)

    return hook


def gate_query(gates: GateSet, i: int, heads: int, qk: int):
    """Forward hook of layer ``i``'s query projection: each head's query dims gated."""

    def hook(module, args, output):
        shaped = output.unflatten(-1, (heads, qk)) * gates.dim(f"layers.{i}.qk_dim", output.dtype)
        return shaped.flatten(-2)

    return hook


def gate_heads_and_values(gates: GateSet, i: int, heads: int, v: int):
    """Forward pre-hook of layer ``i``'s attention output projection: its input (heads x value dims) gated per head
    and per value dim."""

    def hook(module, args):
        x = args[0]
        per_unit = gates.dim(f"layers.{i}.heads", x.dtype)[:, None] * gates.dim(f"layers.{i}.v_dim", x.dtype)
        return ((x.unflatten(-1, (heads, v)) * per_unit).flatten(-2),) + tuple(args[1:])

    return hook


class ViTAdapter(ModelAdapter):
    # Paper's DeiT-B groups: E 16, heads 1, QK 2, V 2, MLP 32.
    default_group_sizes = {"embed": 16, "heads": 1, "qk": 2, "v": 2, "mlp": 32}

    # model access -----------------------------------------------------------------------------------
    @staticmethod
    def _parts(model):
        """(base model, its attribute name in the wrapper or None, classifier heads by name)."""
        for prefix in ("vit", "deit"):
            base = getattr(model, prefix, None)
            if base is not None and hasattr(base, "layers"):
                heads = {
                    name: getattr(model, name)
                    for name in ("classifier", "cls_classifier", "distillation_classifier")
                    if isinstance(getattr(model, name, None), torch.nn.Linear)
                }
                return base, prefix, heads
        if hasattr(model, "layers") and hasattr(model, "embeddings"):
            return model, None, {}
        raise PruningSpaceError(f"{type(model).__name__} does not have the ViT layout (embeddings + layers)")

    @staticmethod
    def _norms(model, base) -> dict:
        """LayerNorms over the embedding outside the layers, by name: ``pre_layernorm`` and ``layernorm`` of the base
        model, ``fc_norm`` of the classification model (the last two: whichever the config has)."""
        norms = {name: getattr(base, name, None) for name in ("pre_layernorm", "layernorm")}
        norms["fc_norm"] = getattr(model, "fc_norm", None) if model is not base else None
        return {name: norm for name, norm in norms.items() if isinstance(norm, torch.nn.LayerNorm)}

    @staticmethod
    def _layer_shape(layer) -> dict:
        shape = {"attention": layer.attention is not None, "mlp": layer.mlp is not None}
        if layer.attention is not None:
            attn = layer.attention
            heads = attn.num_attention_heads
            shape.update(heads=heads, qk=attn.q_proj.out_features // heads, v=attn.v_proj.out_features // heads)
        if layer.mlp is not None:
            shape["mlp_dim"] = layer.mlp.fc1.out_features
        return shape

    # pruning space ----------------------------------------------------------------------------------
    def build_space(self, model, group_sizes=None, min_keep=None) -> PruningSpace:
        base, prefix, heads = self._parts(model)
        p = f"{prefix}." if prefix else ""
        hidden = base.embeddings.patch_embeddings.projection.out_channels
        dims, blocks, aliases = {}, {}, {}

        def add_dim(name, kind, size, block=None, coupled=()):
            group, minimum = self._group_and_min(name, kind, size, group_sizes, min_keep)
            dims[name] = Dimension(name, kind, size, group, minimum, block, coupled=list(coupled))

        embed_coupled = [f"{p}embeddings.patch_embeddings.projection", f"{p}embeddings.position_embeddings"]
        for name in ("cls_token", "distillation_token"):
            if getattr(base.embeddings, name, None) is not None:
                embed_coupled.append(f"{p}embeddings.{name}")
        for name, norm in self._norms(model, base).items():
            embed_coupled.append(f"{p}{name}" if name != "fc_norm" else name)
        embed_coupled += [f"{name}.weight[:, in]" for name in heads]
        add_dim("embed", "embed", hidden, coupled=embed_coupled)
        for i, layer in enumerate(base.layers):
            shape = self._layer_shape(layer)
            lp = f"{p}layers.{i}"
            if shape["attention"]:
                block = f"layers.{i}.attention"
                add_dim(
                    f"layers.{i}.heads", "heads", shape["heads"], block, [f"{lp}.attention.{n}_proj" for n in "qkvo"]
                )
                add_dim(
                    f"layers.{i}.qk_dim", "qk", shape["qk"], block, [f"{lp}.attention.q_proj", f"{lp}.attention.k_proj"]
                )
                add_dim(
                    f"layers.{i}.v_dim", "v", shape["v"], block, [f"{lp}.attention.v_proj", f"{lp}.attention.o_proj"]
                )
                blocks[block] = Block(
                    block, "attention", [f"layers.{i}.heads", f"layers.{i}.qk_dim", f"layers.{i}.v_dim"]
                )
                embed_coupled += [f"{lp}.layernorm_before", f"{lp}.attention.o_proj (out)"]
                if getattr(layer, "layer_scale_attention", None) is not None:
                    embed_coupled.append(f"{lp}.layer_scale_attention")
                for name in ("q_proj", "k_proj"):
                    aliases[f"layers.{i}.attention.{name}"] = f"layers.{i}.qk_dim"
            if shape["mlp"]:
                block = f"layers.{i}.mlp"
                add_dim(f"layers.{i}.mlp_dim", "mlp", shape["mlp_dim"], block, [f"{lp}.mlp.fc1", f"{lp}.mlp.fc2"])
                blocks[block] = Block(block, "mlp", [f"layers.{i}.mlp_dim"])
                embed_coupled += [f"{lp}.layernorm_after", f"{lp}.mlp.fc2 (out)"]
                if getattr(layer, "layer_scale_mlp", None) is not None:
                    embed_coupled.append(f"{lp}.layer_scale_mlp")
        dims["embed"].shared_by = list(blocks)
        dims["embed"].coupled = embed_coupled
        for name in ("patch_embeddings", "cls_token", "position_embeddings", "layernorm", "classifier", "hidden_size"):
            aliases[name] = "embed"
        return PruningSpace(model.config.model_type, dims, blocks, aliases)

    # gates ------------------------------------------------------------------------------------------
    def install_gates(self, model, space: PruningSpace) -> GateSet:
        base, _, _ = self._parts(model)
        gates = GateSet(space, device=next(model.parameters()).device)

        masked_layernorm = masked_embed_layernorm(gates)
        embed = lambda dtype: gates.dim("embed", dtype)  # noqa: E731
        gates.on_output(base.embeddings, scale_output(embed))
        for norm in self._norms(model, base).values():
            gates.on_output(norm, masked_layernorm)
        for i, layer in enumerate(base.layers):
            if layer.attention is not None:
                attn, block = layer.attention, f"layers.{i}.attention"
                heads = attn.num_attention_heads
                qk = attn.q_proj.out_features // heads
                v = attn.v_proj.out_features // heads
                gates.on_output(layer.layernorm_before, masked_layernorm)
                gates.on_output(attn.q_proj, gate_query(gates, i, heads, qk))
                gates.on_input(attn.o_proj, gate_heads_and_values(gates, i, heads, v))
                gates.on_output(
                    attn.o_proj, scale_output(lambda dtype, block=block: embed(dtype) * gates.block(block, dtype))
                )
            if layer.mlp is not None:
                block = f"layers.{i}.mlp"
                gates.on_output(layer.layernorm_after, masked_layernorm)
                gates.on_output(layer.mlp.fc1, scale_output(lambda dtype, i=i: gates.dim(f"layers.{i}.mlp_dim", dtype)))
                gates.on_output(
                    layer.mlp.fc2, scale_output(lambda dtype, block=block: embed(dtype) * gates.block(block, dtype))
                )
        pooler = getattr(base, "pooler", None)
        if pooler is not None:
            gates.on_input(pooler.dense, lambda m, args: (args[0] * embed(args[0].dtype),))
        return gates

    # surgery ----------------------------------------------------------------------------------------
    def slice(self, model, space: PruningSpace, choice: PruningChoice):
        choice.validate(space)
        base, prefix, heads = self._parts(model)
        E = torch.tensor(choice.kept_indices(space, "embed"))
        removed = set(choice.removed_blocks)
        state: dict[str, torch.Tensor] = {}

        def put(name, tensor):
            state[name] = tensor.detach().clone().contiguous()

        def put_linear(name, linear, rows=None, cols=None):
            weight = linear.weight
            if rows is not None:
                weight = weight[rows]
            if cols is not None:
                weight = weight[:, cols]
            put(f"{name}.weight", weight)
            if linear.bias is not None:
                put(f"{name}.bias", linear.bias if rows is None else linear.bias[rows])

        def put_layernorm(name, norm):
            put(f"{name}.weight", norm.weight[E])
            put(f"{name}.bias", norm.bias[E])

        emb = base.embeddings
        for name in ("cls_token", "distillation_token"):
            token = getattr(emb, name, None)
            if token is not None:
                put(f"vit.embeddings.{name}", token[..., E])
        put("vit.embeddings.position_embeddings", emb.position_embeddings[..., E])
        projection = emb.patch_embeddings.projection
        put("vit.embeddings.patch_embeddings.projection.weight", projection.weight[E])
        if projection.bias is not None:
            put("vit.embeddings.patch_embeddings.projection.bias", projection.bias[E])
        for name, norm in self._norms(model, base).items():
            put_layernorm(name if name == "fc_norm" else f"vit.{name}", norm)

        per_layer: dict[int, dict] = {}
        for i, layer in enumerate(base.layers):
            shape = self._layer_shape(layer)
            overrides: dict = {"skip": []}
            lp = f"vit.layers.{i}"
            if shape["attention"] and f"layers.{i}.attention" not in removed:
                H = choice.kept_indices(space, f"layers.{i}.heads")
                QK = choice.kept_indices(space, f"layers.{i}.qk_dim")
                V = choice.kept_indices(space, f"layers.{i}.v_dim")
                qk_rows = torch.tensor([h * shape["qk"] + j for h in H for j in QK])
                v_rows = torch.tensor([h * shape["v"] + j for h in H for j in V])
                attn = layer.attention
                put_layernorm(f"{lp}.layernorm_before", layer.layernorm_before)
                put_linear(f"{lp}.attention.q_proj", attn.q_proj, qk_rows, E)
                put_linear(f"{lp}.attention.k_proj", attn.k_proj, qk_rows, E)
                put_linear(f"{lp}.attention.v_proj", attn.v_proj, v_rows, E)
                put_linear(f"{lp}.attention.o_proj", attn.o_proj, E, v_rows)
                if getattr(layer, "layer_scale_attention", None) is not None:
                    put(f"{lp}.layer_scale_attention.gamma", layer.layer_scale_attention.gamma[E])
                overrides.update(num_attention_heads=len(H), qk_head_dim=len(QK), v_head_dim=len(V))
            else:
                overrides["skip"].append("attention")
            if shape["mlp"] and f"layers.{i}.mlp" not in removed:
                M = torch.tensor(choice.kept_indices(space, f"layers.{i}.mlp_dim"))
                put_layernorm(f"{lp}.layernorm_after", layer.layernorm_after)
                put_linear(f"{lp}.mlp.fc1", layer.mlp.fc1, M, E)
                put_linear(f"{lp}.mlp.fc2", layer.mlp.fc2, E, M)
                if getattr(layer, "layer_scale_mlp", None) is not None:
                    put(f"{lp}.layer_scale_mlp.gamma", layer.layer_scale_mlp.gamma[E])
                overrides["intermediate_size"] = len(M)
            else:
                overrides["skip"].append("mlp")
            per_layer[i] = overrides
        pooler = getattr(base, "pooler", None)
        if pooler is not None:
            put_linear("vit.pooler.dense", pooler.dense, None, E)
        for name, head in heads.items():
            put_linear(name, head, None, E)

        config = self._pruned_config(model, base, heads, len(E), per_layer)
        with no_init_weights():  # every parameter is overwritten below (strict load): skip the random init
            if prefix is None:  # a bare ViTModel / DeiTModel
                state = {k.removeprefix("vit."): v for k, v in state.items() if k.startswith("vit.")}
                pruned = MDPViTModel(config, add_pooling_layer=pooler is not None)
            else:
                pruned = MDPViTForImageClassification(config)
        pruned.load_state_dict(state, strict=True)
        return pruned.to(next(model.parameters()).dtype).eval()

    def _pruned_config(self, model, base, heads, hidden, per_layer) -> MDPViTConfig:
        source = model.config
        fields = {k: getattr(source, k) for k in _COPIED_FIELDS if hasattr(source, k)}
        if source.model_type == "mdp_vit":
            fields.update({k: getattr(source, k) for k in _MDP_VIT_FIELDS})
            scaling = source.attention_scaling
            base_type, base_path, base_config = (
                source.base_model_type,
                source.base_model_name_or_path,
                source.base_config,
            )
            defaults = (
                {
                    k: getattr(source, k)
                    for k in ("num_attention_heads", "qk_head_dim", "v_head_dim", "intermediate_size")
                }
                if not source.is_heterogeneous
                else {}
            )
        else:
            head_dim = getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads
            scaling = head_dim**-0.5
            base_type, base_path, base_config = source.model_type, source.name_or_path or None, source.to_dict()
            defaults = {}
        shapes = [self._layer_shape(layer) for layer in base.layers]
        first = next((s for s in shapes if s["attention"]), {"heads": 1, "qk": 1, "v": 1})
        defaults = defaults or {
            "num_attention_heads": first["heads"],
            "qk_head_dim": first["qk"],
            "v_head_dim": first["v"],
            "intermediate_size": next((s["mlp_dim"] for s in shapes if s["mlp"]), 1),
        }
        sparse = {}
        for i, overrides in per_layer.items():
            diff = {k: v for k, v in overrides.items() if k == "skip" and v or k != "skip" and defaults.get(k) != v}
            if diff:
                sparse[i] = diff
        classifier_heads = "cls+distillation" if "distillation_classifier" in heads else "cls"
        extra_tokens = sum(getattr(base.embeddings, t, None) is not None for t in ("cls_token", "distillation_token"))
        pooler = getattr(base, "pooler", None)
        return MDPViTConfig(
            hidden_size=hidden,
            num_hidden_layers=len(base.layers),
            attention_scaling=scaling,
            num_extra_tokens=extra_tokens,
            classifier_heads=classifier_heads,
            add_pooling_layer=pooler is not None,
            pooler_output_size=pooler.dense.out_features if pooler is not None else None,
            base_model_type=base_type,
            base_model_name_or_path=base_path,
            base_config=base_config,
            per_layer_config=sparse or None,
            architectures=[
                "MDPViTForImageClassification"
                if heads or isinstance(model, MDPViTForImageClassification)
                else "MDPViTModel"
            ],
            **defaults,
            **fields,
        )

    def layer_blocks(self, space: PruningSpace) -> dict[str, str]:
        # the official block notebook removes whole layers: attention and MLP share one keep bit
        return {name: name.rsplit(".", 1)[0] for name in space.blocks}

    # importance ----------------------------------------------------------------------------------------
    # The official DeiT engine (NVlabs/MDP 975f7c7, pruning_core/pruning_engine_general_minlp.py, method 23 of
    # add_criteria; links in deit/model_pruning.py) scores a unit by the signed sum of w * dL/dw over every
    # tensor linked to it, divides by a per-kind constant and squares (per iteration). Links per unit:
    #   embed: patch-embedding output (weight + bias), and in every layer the o_proj and fc2 outputs
    #          (weight + bias) and the q/k/v and fc1 inputs (weight columns); norms, tokens and heads unlinked.
    #   heads: the Q, K and V outputs of the head (weights + biases);  qk: the Q outputs (K unlinked);
    #   v: the V outputs;  mlp: the fc1 outputs.
    # Divisors (applied before squaring): embed / depth (12 for DeiT-B: the embedding is linked once per layer,
    # so its sum grows with depth), heads / 12 (the engine's /6 for the head and its /2 for the Q/V links),
    # qk / 2, v / 2, mlp / 1.
    scores_from_gates = False
    score_divisors = {"heads": 12.0, "qk": 2.0, "v": 2.0, "mlp": 1.0}  # embed: the number of layers

    @torch.no_grad()
    def taylor_scores(self, model, space: PruningSpace, gates: GateSet) -> dict[str, torch.Tensor]:
        base, _, _ = self._parts(model)

        def wg(param):  # w * dL/dw (zeros before the first backward)
            if param is None:
                return None
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            return (param.detach() * grad).double()

        def rows(linear, groups=None):  # per output unit: weight row + bias; groups=(H, d) -> [H, d]
            out = wg(linear.weight).sum(1)
            if linear.bias is not None:
                out = out + wg(linear.bias)
            return out if groups is None else out.view(*groups)

        def cols(linear):  # per input unit: weight column
            return wg(linear.weight).sum(0)

        projection = base.embeddings.patch_embeddings.projection
        embed = wg(projection.weight).flatten(1).sum(1) + (wg(projection.bias) if projection.bias is not None else 0)
        out = {}
        for i, layer in enumerate(base.layers):
            shape = self._layer_shape(layer)
            if shape["attention"]:
                attn, H = layer.attention, shape["heads"]
                q, k, v = (
                    rows(attn.q_proj, (H, shape["qk"])),
                    rows(attn.k_proj, (H, shape["qk"])),
                    rows(attn.v_proj, (H, shape["v"])),
                )
                out[f"layers.{i}.heads"] = (q.sum(1) + k.sum(1) + v.sum(1)) / self.score_divisors["heads"]
                out[f"layers.{i}.qk_dim"] = q.sum(0) / self.score_divisors["qk"]
                out[f"layers.{i}.v_dim"] = v.sum(0) / self.score_divisors["v"]
                embed = embed + rows(attn.o_proj) + cols(attn.q_proj) + cols(attn.k_proj) + cols(attn.v_proj)
            if shape["mlp"]:
                out[f"layers.{i}.mlp_dim"] = rows(layer.mlp.fc1) / self.score_divisors["mlp"]
                embed = embed + rows(layer.mlp.fc2) + cols(layer.mlp.fc1)
        out["embed"] = embed / len(base.layers)
        return {name: out[name].cpu() for name in space.dimensions}

    @torch.no_grad()
    def unit_magnitudes(self, model, space: PruningSpace) -> dict[str, torch.Tensor]:
        base, _, _ = self._parts(model)
        sq = lambda w: w.detach().float().square()  # noqa: E731
        embed = sq(base.embeddings.patch_embeddings.projection.weight).flatten(1).sum(1)
        out = {}
        for i, layer in enumerate(base.layers):
            shape = self._layer_shape(layer)
            if shape["attention"]:
                attn, H, qk, v = layer.attention, shape["heads"], shape["qk"], shape["v"]
                q = (sq(attn.q_proj.weight) + sq(attn.k_proj.weight)).sum(1).view(H, qk)
                vo = sq(attn.v_proj.weight).sum(1).view(H, v) + sq(attn.o_proj.weight).sum(0).view(H, v)
                out[f"layers.{i}.heads"] = q.sum(1) + vo.sum(1)
                out[f"layers.{i}.qk_dim"] = q.sum(0)
                out[f"layers.{i}.v_dim"] = vo.sum(0)
                embed = embed + sq(attn.o_proj.weight).sum(1)
            if shape["mlp"]:
                fc1, fc2 = layer.mlp.fc1, layer.mlp.fc2
                out[f"layers.{i}.mlp_dim"] = sq(fc1.weight).sum(1) + sq(fc2.weight).sum(0)
                embed = embed + sq(fc2.weight).sum(1)
        out["embed"] = embed  # writers into the residual stream: patch embedding, o_proj and fc2 rows
        return {name: out[name].double().cpu() for name in space.dimensions}

    def expected_num_parameters(self, config: MDPViTConfig) -> int:
        E = config.hidden_size
        channels = config.num_channels
        ph, pw = (config.patch_size, config.patch_size) if isinstance(config.patch_size, int) else config.patch_size
        ih, iw = (config.image_size, config.image_size) if isinstance(config.image_size, int) else config.image_size
        patches = (ih // ph) * (iw // pw)
        positions = patches + (0 if getattr(config, "no_embed_class", False) else config.num_extra_tokens)
        patch_bias = E if getattr(config, "patch_bias", True) else 0
        total = E * channels * ph * pw + patch_bias + config.num_extra_tokens * E + positions * E
        # final LayerNorm: over every token (base model), or over the pooled feature (fc_norm, classification model)
        if not getattr(config, "fc_norm", False) or has_classifier(config):
            total += 2 * E
        if getattr(config, "pre_norm", False):
            total += 2 * E
        scale = E if getattr(config, "layer_scale", None) is not None else 0  # LayerScale per kept sub-block
        bias = 1 if config.qkv_bias else 0
        for i in range(config.num_hidden_layers):
            lc = config.per_layer_config[i]
            skip = set(getattr(lc, "skip", None) or [])
            if "attention" not in skip:
                qk, v = lc.num_attention_heads * lc.qk_head_dim, lc.num_attention_heads * lc.v_head_dim
                total += 2 * E + 2 * (qk * E + bias * qk) + (v * E + bias * v) + (v * E + E) + scale
            if "mlp" not in skip:
                M = lc.intermediate_size
                total += 2 * E + M * E + M + M * E + E + scale
        if config.add_pooling_layer:
            out = config.pooler_output_size or E
            total += E * out + out
        if has_classifier(config) and config.num_labels > 0:
            heads = 2 if config.classifier_heads == "cls+distillation" else 1
            total += heads * (E * config.num_labels + config.num_labels)
        return total


# latency cells ---------------------------------------------------------------------------------------
"""Every cell times the deployed code: the modules are ``MDPViTLayer`` / ``MDPViTForImageClassification``
built from the dense model's own ``mdp_vit`` config with the cell's widths.

Tables (identical layers share one):
- ``vit.attn_qk`` [heads, embed, qk] — a layer with only its attention sub-block (pre-norm, q/k/v/o
  projections, SDPA or eager attention, residual add) at value width fixed to the dense V;
- ``vit.attn_vo`` [heads, embed, v] — the same at query/key width fixed to the dense QK;
- ``vit.mlp`` [embed, mlp] — a layer with only its MLP sub-block (norm, fc1, activation, fc2, add);
- ``vit.out`` [embed] — the whole model with every sub-block removed: patch embedding, CLS/distillation
  tokens, position embeddings, the (empty) layer loop, final LayerNorm, classifier head(s).

- ``vit.attn_core`` [heads, qk, v] — the attention-only layer at the smallest embedding width e0, over
  the *full* qk x v grid (never sub-sampled along qk or v: see below).

Attention decomposition (A = the attention-only layer, Q / V = dense widths):
    A(h,e,q,v) = [A(h,e,q,V) − ½A(h,e,Q,V)] + [A(h,e,Q,v) − ½A(h,e,Q,V)]
                 + [A(h,e0,q,v) − A(h,e0,q,V) − A(h,e0,Q,v) + A(h,e0,Q,V)]
i.e. T_qk[H,E,QK] + T_vo[H,E,V] (transform ``half_anchor``) + T_core[H,QK,V] (transform ``interaction``).
It is exact when the layer is P_q(h,e,q) + P_v(h,e,v) + C(h,q,v) + K(h,e): projections separable in q
and v, and the attention kernel (which never sees e) holding all q x v interaction. The interaction
matters: with SDPA on CPU, q == v runs the fused flash kernel and q != v falls back to the math kernel
(up to ~2x slower attention core), so T_core has a sharp diagonal and is measured on the full qk x v grid,
and along the qk (v) axis of T_qk (T_vo) — measured at dense v (qk), i.e. through the diagonal at the
dense width — the sub-grid always includes the width just below dense (``tail_axes``), so no
interpolation spans the fast dense cell.
"""


# mdp_vit fields that change the deployed code (so the cells' cost) and their transformers-layout defaults
_TIMM_LAYOUT_DEFAULTS = {
    "layer_scale": None,
    "pooling": "token",
    "fc_norm": False,
    "no_embed_class": False,
    "pre_norm": False,
    "patch_bias": True,
}


def _sig(dim) -> str:
    return f"{dim.size}/{dim.group_size}/{dim.min_keep}"


class ViTCells(LatencyCells):
    uses_attention = True
    #: the adapter that slices the source model into its deployed mdp_vit model (timm_vit's cells use theirs)
    adapter_class: type = ViTAdapter

    def __init__(self, model, space, settings):
        super().__init__(model, space, settings)
        dense = self.adapter_class().slice(model, space, space.full_choice())  # the deployed dense model (mdp_vit)
        self.base = dense.config.to_dict()
        for key in (
            "per_layer_config",
            "architectures",
            "transformers_version",
            "auto_map",
            "_name_or_path",
            "model_type",
            "base_config",
        ):
            self.base.pop(key, None)
        image = settings.image_size or dense.config.image_size
        self.image_size = list(image) if isinstance(image, (list, tuple)) else [image, image]
        patch = dense.config.patch_size
        patch = list(patch) if isinstance(patch, (list, tuple)) else [patch, patch]
        self.tokens = (self.image_size[0] // patch[0]) * (
            self.image_size[1] // patch[1]
        ) + dense.config.num_extra_tokens
        self.num_layers = dense.config.num_hidden_layers
        self._dense_config = dense.config
        del dense

    # metadata ----------------------------------------------------------------------------------------
    def model_shapes(self) -> dict:
        c = self._dense_config
        return {
            "family": "vit",
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "tokens": self.tokens,
            "image_size": self.image_size,
            "patch_size": c.patch_size,
            "num_extra_tokens": c.num_extra_tokens,
            "num_labels": c.num_labels,
            "classifier_heads": c.classifier_heads,
            "hidden_act": c.hidden_act,
            # timm-layout options, recorded only where they differ from the transformers layout (older tables match)
            **{k: getattr(c, k) for k, default in _TIMM_LAYOUT_DEFAULTS.items() if getattr(c, k) != default},
        }

    # plan --------------------------------------------------------------------------------------------
    def plan(self) -> tuple[list[TimingGrid], list[TimingTerm]]:
        dims = self.space.dimensions
        tables: dict[str, TimingGrid] = {}
        terms: list[TimingTerm] = []
        E = dims["embed"]
        n = self.tokens

        def table(key, kind, axis_dims, params):
            if key not in tables:
                tables[key] = TimingGrid(
                    key, kind, [d.kind for d in axis_dims], [d.widths() for d in axis_dims], params
                )
            return key

        for i in range(self.num_layers):
            block = f"layers.{i}.attention"
            if block in self.space.blocks:
                H, Q, V = dims[f"layers.{i}.heads"], dims[f"layers.{i}.qk_dim"], dims[f"layers.{i}.v_dim"]
                key = table(
                    f"vit.attn_qk(H={_sig(H)},E={_sig(E)},QK={_sig(Q)},V={V.size},N={n})",
                    "vit.attn_qk",
                    [H, E, Q],
                    {"v_head_dim": V.size, "tail_axes": [2]},
                )
                # q/k projections read the embedding: their input axis (HALP's linear model freezes it)
                terms.append(
                    TimingTerm(f"{block}.qk", key, [H.name, E.name, Q.name], block, "half_anchor", input_axes=[1])
                )
                key = table(
                    f"vit.attn_vo(H={_sig(H)},E={_sig(E)},V={_sig(V)},QK={Q.size},N={n})",
                    "vit.attn_vo",
                    [H, E, V],
                    {"qk_head_dim": Q.size, "tail_axes": [2]},
                )
                terms.append(TimingTerm(f"{block}.vo", key, [H.name, E.name, V.name], block, "half_anchor"))
                e0 = E.widths()[0]
                key = table(
                    f"vit.attn_core(H={_sig(H)},QK={_sig(Q)},V={_sig(V)},E0={e0},N={n})",
                    "vit.attn_core",
                    [H, Q, V],
                    {"embed": e0, "full_axes": [1, 2]},
                )
                terms.append(TimingTerm(f"{block}.qk_x_v", key, [H.name, Q.name, V.name], block, "interaction"))
            block = f"layers.{i}.mlp"
            if block in self.space.blocks:
                M = dims[f"layers.{i}.mlp_dim"]
                key = table(f"vit.mlp(E={_sig(E)},M={_sig(M)},N={n})", "vit.mlp", [E, M], {})
                terms.append(TimingTerm(block, key, [E.name, M.name], block))
        key = table(f"vit.out(E={_sig(E)},L={self.num_layers},N={n})", "vit.out", [E], {})
        terms.append(TimingTerm("embeddings+final_norm+classifier", key, [E.name], None))
        return list(tables.values()), terms

    # cells -------------------------------------------------------------------------------------------
    def _config(self, hidden: int, num_layers: int, per_layer: dict) -> MDPViTConfig:
        config = MDPViTConfig(
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

    def build_cell(self, table, widths: tuple[int, ...]):
        """(module, example input) for one cell, on the settings' device and dtype."""
        B, n = self.settings.batch_size, self.tokens
        if table.kind in ("vit.attn_qk", "vit.attn_vo"):
            h, e, w = widths
            qk, v = (w, table.params["v_head_dim"]) if table.kind == "vit.attn_qk" else (table.params["qk_head_dim"], w)
            layer_cfg = {"num_attention_heads": h, "qk_head_dim": qk, "v_head_dim": v, "skip": ["mlp"]}
            module = MDPViTLayer(self._config(e, 1, {0: layer_cfg}), 0)
            x = torch.randn(B, n, e)
        elif table.kind == "vit.attn_core":
            h, qk, v = widths
            e = table.params["embed"]
            layer_cfg = {"num_attention_heads": h, "qk_head_dim": qk, "v_head_dim": v, "skip": ["mlp"]}
            module = MDPViTLayer(self._config(e, 1, {0: layer_cfg}), 0)
            x = torch.randn(B, n, e)
        elif table.kind == "vit.mlp":
            e, m = widths
            module = MDPViTLayer(self._config(e, 1, {0: {"intermediate_size": m, "skip": ["attention"]}}), 0)
            x = torch.randn(B, n, e)
        elif table.kind == "vit.out":
            (e,) = widths
            skip_all = {i: {"skip": ["attention", "mlp"]} for i in range(self.num_layers)}
            module = self._deployed(self._config(e, self.num_layers, skip_all))
            x = torch.randn(B, self.base.get("num_channels", 3), *self.image_size)
        else:
            raise ValueError(f"unknown ViT table kind {table.kind!r}")
        return self.place(module, x)

    def dense_model(self):
        """The dense deployed model at the settings' image size (random weights: timing only)."""
        per_layer = {i: {} for i in range(self.num_layers)}
        c = self._dense_config
        for i in range(self.num_layers):
            lc = c.per_layer_config[i]
            per_layer[i] = {
                k: getattr(lc, k) for k in ("num_attention_heads", "qk_head_dim", "v_head_dim", "intermediate_size")
            }
            per_layer[i]["skip"] = list(getattr(lc, "skip", None) or [])
        return self._deployed(self._config(c.hidden_size, self.num_layers, per_layer))

    def _deployed(self, config):
        """The class the model is sliced into: with its classifier head(s), or headless (with its pooler, if any)."""
        if has_classifier(self._dense_config):
            return MDPViTForImageClassification(config)
        return MDPViTModel(config, add_pooling_layer=self._dense_config.add_pooling_layer)

    def example_input(self):
        return torch.randn(self.settings.batch_size, self.base.get("num_channels", 3), *self.image_size)


# registration ----------------------------------------------------------------------------------------
_TINY = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
    num_labels=5,
)


def _hf(model_cls, config_cls, **kwargs):
    """A builder of a randomly initialised transformers model (imported only when called)."""

    def build():
        import transformers

        config = getattr(transformers, config_cls)(**kwargs)
        model_class = getattr(transformers, model_cls)
        return model_class(config, add_pooling_layer=True) if model_cls == "ViTModel" else model_class(config)

    return build


def _deit(hidden, heads, **kw):
    return _hf(
        "DeiTForImageClassification",
        "DeiTConfig",
        hidden_size=hidden,
        num_hidden_layers=12,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        num_labels=1000,
        **kw,
    )


register_family(
    ModelFamily(
        name="vit",
        adapter=ViTAdapter(),
        kinds=("embed", "heads", "qk", "v", "mlp"),
        model_types=("vit", "deit", "mdp_vit"),
        pruned_classes=(MDPViTConfig, MDPViTModel, MDPViTForImageClassification),
        latency_cells=ViTCells,
        test_models={
            "vit": _hf("ViTForImageClassification", "ViTConfig", **_TINY),
            "vit_base_model": _hf("ViTModel", "ViTConfig", **_TINY),  # no head, with its pooler
            "deit": _hf("DeiTForImageClassification", "DeiTConfig", **_TINY),
            "deit_distilled": _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", **_TINY),
        },
        presets={
            "tiny-vit": _hf("ViTForImageClassification", "ViTConfig", **_TINY),
            "tiny-deit": _hf("DeiTForImageClassification", "DeiTConfig", **_TINY),
            "deit-tiny": _deit(192, 3),
            "deit-small": _deit(384, 6),
            "deit-base": _deit(768, 12),
            "vit-base": _hf(
                "ViTForImageClassification",
                "ViTConfig",
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
                num_labels=1000,
            ),
        },
    )
)
