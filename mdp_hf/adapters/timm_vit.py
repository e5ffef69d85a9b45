"""timm ViT family: timm's ``VisionTransformer`` and ``VisionTransformerDistilled`` (ViT, DeiT, DeiT-distilled,
DeiT-III), exported to the vit family's pruned format ``mdp_vit``.

The space has the vit family's dimension and block names (``embed``, ``layers.{i}.heads`` / ``qk_dim`` /
``v_dim`` / ``mlp_dim``; blocks ``layers.{i}.attention`` / ``layers.{i}.mlp``), so the vit family's latency
cells time a timm model and an exported model is pruned again (by the vit family) under the same names.

timm's fused ``qkv`` projection is split into q / k / v rows (q: the first ``heads * head_dim`` outputs, k the
next, v the last). Options ``mdp_vit`` cannot express (qk_norm, register tokens, attention pooling, GLU MLPs,
dynamic image size, norms other than LayerNorm, ...) are refused by :meth:`TimmViTAdapter.build_space` with the
option's name. Dropout, drop path and patch dropout act in training only; the exported model keeps dropout
rates where ``mdp_vit`` has them and has no drop path / patch dropout.

This file imports timm only inside functions (timm is optional).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.initialization import no_init_weights

from ..modeling.configuration_mdp_vit import MDPViTConfig
from ..modeling.modeling_mdp_vit import MDPViTForImageClassification
from .base import (
    Block,
    Dimension,
    GateSet,
    ModelAdapter,
    PruningChoice,
    PruningSpace,
    PruningSpaceError,
    has_classifier,
)
from .registry import ModelFamily, register_family
from .vit import ViTAdapter, ViTCells, gate_heads_and_values, masked_embed_layernorm, scale_output


class UnsupportedTimmViTError(PruningSpaceError):
    """A timm ViT option the pruned format ``mdp_vit`` cannot express."""


def _refuse(model, option: str, why: str):
    raise UnsupportedTimmViTError(
        f"cannot prune this timm {type(model).__name__}: {option} is not supported ({why}). The pruned format "
        "mdp_vit expresses plain pre-norm ViT / DeiT blocks (fused qkv Attention, Mlp with GELU / QuickGELU, "
        "LayerNorm, optional LayerScale), a class (+ distillation) token, learned position embeddings, "
        "global_pool 'token' or 'avg' (with or without fc_norm) and pre_norm; build the model without this option."
    )


def _activation_name(model, act) -> str:
    """The transformers ``ACT2FN`` name computing exactly what timm's MLP activation computes."""
    from timm.layers.activations import GELU, GELUTanh, QuickGELU

    if type(act) is nn.GELU:
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    names = {GELU: "gelu", GELUTanh: "gelu_pytorch_tanh", QuickGELU: "quick_gelu"}
    if type(act) in names:
        return names[type(act)]
    _refuse(model, f"act_layer={type(act).__name__}", "mdp_vit's MLP supports GELU (exact or tanh) and QuickGELU")


def _is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


class TimmViTAdapter(ModelAdapter):
    # the vit family's defaults (paper's DeiT-B groups: E 16, heads 1, QK 2, V 2, MLP 32)
    default_group_sizes = dict(ViTAdapter.default_group_sizes)

    # model inspection ---------------------------------------------------------------------------------------
    def _inspect(self, model) -> dict:
        """Check that ``model`` is a timm ViT mdp_vit can express; its structure facts (else a clear refusal)."""
        from timm.layers import Attention, LayerScale, Mlp, PatchEmbed
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import Block as TimmBlock
        from timm.models.vision_transformer import VisionTransformer

        if type(model) not in (VisionTransformer, VisionTransformerDistilled):
            _refuse(
                model,
                f"the subclass {type(model).__qualname__}",
                "only VisionTransformer and "
                "VisionTransformerDistilled themselves are known; a subclass may compute differently",
            )
        distilled = isinstance(model, VisionTransformerDistilled)
        if getattr(model, "reg_token", None) is not None:
            _refuse(model, f"reg_tokens={model.num_reg_tokens}", "mdp_vit has no register tokens")
        if model.dynamic_img_size:
            _refuse(model, "dynamic_img_size=True", "mdp_vit has a fixed image size")
        if model.attn_pool is not None:
            _refuse(model, f"global_pool={model.global_pool!r}", "mdp_vit has no attention pooling")
        if model.global_pool not in ("token", "avg"):
            _refuse(model, f"global_pool={model.global_pool!r}", "mdp_vit pools with 'token' or 'avg'")
        if model.pool_include_prefix and model.global_pool != "token":
            _refuse(model, "pool_include_prefix=True", "mdp_vit's average pooling excludes the class token")
        if model.pos_embed is None:
            _refuse(model, "pos_embed='none'", "mdp_vit has learned position embeddings")

        patch = model.patch_embed
        if type(patch) is not PatchEmbed:
            _refuse(model, f"embed_layer={type(patch).__name__}", "mdp_vit embeds patches with one convolution")
        proj = patch.proj
        if (
            not isinstance(proj, nn.Conv2d)
            or tuple(proj.kernel_size) != tuple(proj.stride)
            or tuple(proj.padding) != (0, 0)
            or tuple(proj.dilation) != (1, 1)
            or proj.groups != 1
        ):
            _refuse(model, "a patch projection other than a stride = kernel convolution", "mdp_vit's patch embedding")
        if getattr(patch, "dynamic_img_pad", False) or not getattr(patch, "flatten", True):
            _refuse(model, "dynamic_img_pad / unflattened patch output", "mdp_vit has a fixed image size")
        if not _is_identity(patch.norm):
            _refuse(model, "embed_norm_layer", "mdp_vit has no norm inside the patch embedding")
        if patch.img_size is None or tuple(proj.kernel_size) != tuple(patch.patch_size):
            _refuse(model, "img_size=None", "mdp_vit has a fixed image size")

        norms = {"norm_pre": model.norm_pre, "norm": model.norm, "fc_norm": model.fc_norm}
        for i, block in enumerate(model.blocks):
            if type(block) is not TimmBlock:
                _refuse(model, f"block_fn={type(block).__name__}", "mdp_vit has pre-norm sequential blocks")
            norms[f"blocks.{i}.norm1"], norms[f"blocks.{i}.norm2"] = block.norm1, block.norm2
        eps = set()
        for name, norm in norms.items():
            if _is_identity(norm) and name in ("norm_pre", "norm", "fc_norm"):
                continue
            if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
                _refuse(model, f"norm_layer={type(norm).__name__} ({name})", "mdp_vit normalises with LayerNorm")
            eps.add(float(norm.eps))
        if len(eps) > 1:
            _refuse(model, f"LayerNorms with different eps {sorted(eps)}", "mdp_vit has one layer_norm_eps")
        final = [name for name in ("norm", "fc_norm") if not _is_identity(norms[name])]
        if not final:
            _refuse(model, "final_norm=False", "mdp_vit has a final LayerNorm")
        fc_norm = final == ["fc_norm"]
        if distilled and fc_norm:
            _refuse(model, "fc_norm=True on VisionTransformerDistilled", "its head never applies fc_norm")
        if distilled and model.no_embed_class:
            _refuse(model, "no_embed_class=True on VisionTransformerDistilled", "timm itself cannot run it")

        layers, acts, scales = [], set(), set()
        for i, block in enumerate(model.blocks):
            attn, mlp = block.attn, block.mlp
            if type(attn) is not Attention:
                _refuse(model, f"attn_layer={type(attn).__name__}", "mdp_vit has plain multi-head attention")
            if not (_is_identity(attn.q_norm) and _is_identity(attn.k_norm)):
                _refuse(model, "qk_norm=True", "mdp_vit has no query/key norms")
            if not _is_identity(attn.norm):
                _refuse(model, "scale_attn_norm=True", "mdp_vit has no norm before the output projection")
            if getattr(attn, "gate", None) is not None:
                _refuse(model, "gated attention", "mdp_vit has no attention output gate")
            if attn.proj.bias is None:
                _refuse(model, "proj_bias=False", "mdp_vit's output projection has a bias")
            if attn.qkv.out_features != 3 * attn.num_heads * attn.head_dim or attn.proj.out_features != model.embed_dim:
                _refuse(model, "an attention whose qkv / proj widths differ from 3 x heads x head_dim / embed_dim", "")
            if type(mlp) is not Mlp:
                _refuse(model, f"mlp_layer={type(mlp).__name__}", "mdp_vit's MLP is fc1 -> activation -> fc2")
            if not _is_identity(mlp.norm):
                _refuse(model, "scale_mlp_norm=True", "mdp_vit has no norm inside the MLP")
            if not isinstance(mlp.fc1, nn.Linear) or mlp.fc1.bias is None or mlp.fc2.bias is None:
                _refuse(model, "an MLP without biases or with 1x1 convolutions", "mdp_vit's MLP is two biased Linears")
            acts.add(_activation_name(model, mlp.act))
            for ls in (block.ls1, block.ls2):
                if isinstance(ls, LayerScale):
                    scales.add(float(ls.init_values))
                elif not _is_identity(ls):
                    _refuse(model, f"layer scale {type(ls).__name__}", "mdp_vit's layer scale is timm's LayerScale")
                else:
                    scales.add(None)
            layers.append(
                {"heads": attn.num_heads, "qk": attn.head_dim, "v": attn.head_dim, "mlp": mlp.fc1.out_features}
            )
        if len(acts) > 1 or len(scales) > 1:
            _refuse(model, "blocks with different activations or layer scales", "mdp_vit sets them once per model")
        if len({float(b.attn.scale) for b in model.blocks}) > 1:
            _refuse(model, "blocks with different attention scales", "mdp_vit has one attention_scaling")
        heads = {"head": model.head}
        if distilled:
            heads["head_dist"] = model.head_dist
        for name, head in heads.items():
            if not isinstance(head, nn.Linear) and not _is_identity(head):
                _refuse(model, f"a {type(head).__name__} {name}", "mdp_vit's heads are Linear layers")
        kinds = {isinstance(head, nn.Linear) for head in heads.values()}
        if len(kinds) > 1:
            _refuse(model, "a Linear head next to an Identity one", "mdp_vit's two DeiT heads are alike")
        return {
            "distilled": distilled,
            "embed": model.embed_dim,
            "layers": layers,
            "act": acts.pop(),
            "eps": eps.pop(),
            "layer_scale": scales.pop(),
            "fc_norm": fc_norm,
            "pre_norm": not _is_identity(model.norm_pre),
            "extra_tokens": (model.cls_token is not None) + distilled,
            "heads": {name: head for name, head in heads.items() if isinstance(head, nn.Linear)},
        }

    # pruning space ---------------------------------------------------------------------------------------
    def build_space(self, model, group_sizes=None, min_keep=None) -> PruningSpace:
        info = self._inspect(model)
        dims, blocks, aliases = {}, {}, {}

        def add_dim(name, kind, size, block=None, coupled=()):
            group, minimum = self._group_and_min(name, kind, size, group_sizes, min_keep)
            dims[name] = Dimension(name, kind, size, group, minimum, block, coupled=list(coupled))

        embed_coupled = ["patch_embed.proj", "pos_embed"]
        embed_coupled += [n for n in ("cls_token", "dist_token") if getattr(model, n, None) is not None]
        embed_coupled += ["norm_pre"] if info["pre_norm"] else []
        embed_coupled += ["fc_norm" if info["fc_norm"] else "norm"]
        embed_coupled += [f"{name}.weight[:, in]" for name in info["heads"]]
        add_dim("embed", "embed", info["embed"])
        for i, shape in enumerate(info["layers"]):
            bp, block = f"blocks.{i}", f"layers.{i}.attention"
            add_dim(f"layers.{i}.heads", "heads", shape["heads"], block, [f"{bp}.attn.qkv", f"{bp}.attn.proj (in)"])
            add_dim(f"layers.{i}.qk_dim", "qk", shape["qk"], block, [f"{bp}.attn.qkv (q, k rows)"])
            add_dim(f"layers.{i}.v_dim", "v", shape["v"], block, [f"{bp}.attn.qkv (v rows)", f"{bp}.attn.proj (in)"])
            blocks[block] = Block(block, "attention", [f"layers.{i}.heads", f"layers.{i}.qk_dim", f"layers.{i}.v_dim"])
            block = f"layers.{i}.mlp"
            add_dim(f"layers.{i}.mlp_dim", "mlp", shape["mlp"], block, [f"{bp}.mlp.fc1", f"{bp}.mlp.fc2 (in)"])
            blocks[block] = Block(block, "mlp", [f"layers.{i}.mlp_dim"])
            embed_coupled += [f"{bp}.norm1", f"{bp}.attn.proj (out)", f"{bp}.norm2", f"{bp}.mlp.fc2 (out)"]
            embed_coupled += [f"{bp}.ls1", f"{bp}.ls2"] if info["layer_scale"] is not None else []
            aliases[f"{bp}.mlp.fc1"] = aliases[f"{bp}.mlp"] = f"layers.{i}.mlp_dim"
        dims["embed"].shared_by = list(blocks)
        dims["embed"].coupled = embed_coupled
        for name in ("patch_embed", "cls_token", "dist_token", "pos_embed", "norm", "fc_norm", "head", "embed_dim"):
            aliases[name] = "embed"
        return PruningSpace("timm_vit", dims, blocks, aliases)

    def layer_blocks(self, space: PruningSpace) -> dict[str, str]:
        # as the vit family: the official block notebook removes whole layers (attention and MLP share a bit)
        return {name: name.rsplit(".", 1)[0] for name in space.blocks}

    # gates ------------------------------------------------------------------------------------------------
    def install_gates(self, model, space: PruningSpace) -> GateSet:
        info = self._inspect(model)
        gates = GateSet(space, device=next(model.parameters()).device)
        embed = lambda dtype: gates.dim("embed", dtype)  # noqa: E731

        masked_layernorm = masked_embed_layernorm(gates)

        # pos_drop ends _pos_embed (both classes): patches + tokens + position embeddings, gated as one
        gates.on_output(model.pos_drop, scale_output(embed))
        for name in ("norm_pre", "norm", "fc_norm"):
            norm = getattr(model, name)
            if isinstance(norm, nn.LayerNorm):
                gates.on_output(norm, masked_layernorm)
        for i, (block, shape) in enumerate(zip(model.blocks, info["layers"])):
            attn, heads, hd = block.attn, shape["heads"], shape["qk"]
            attention, mlp = f"layers.{i}.attention", f"layers.{i}.mlp"
            gates.on_output(block.norm1, masked_layernorm)
            gates.on_output(block.norm2, masked_layernorm)

            def gate_query(module, args, output, i=i, heads=heads, hd=hd):
                qk = gates.dim(f"layers.{i}.qk_dim", output.dtype)
                rows = torch.stack([qk, torch.ones_like(qk), torch.ones_like(qk)])[:, None, :]  # [q|k|v, 1, hd]
                return (output.unflatten(-1, (3, heads, hd)) * rows).flatten(-3)

            gates.on_output(attn.qkv, gate_query)
            gates.on_input(attn.proj, gate_heads_and_values(gates, i, heads, hd))
            gates.on_output(attn.proj, scale_output(lambda dt, b=attention: embed(dt) * gates.block(b, dt)))
            gates.on_output(block.mlp.fc1, scale_output(lambda dt, i=i: gates.dim(f"layers.{i}.mlp_dim", dt)))
            gates.on_output(block.mlp.fc2, scale_output(lambda dt, b=mlp: embed(dt) * gates.block(b, dt)))
        return gates

    # surgery ----------------------------------------------------------------------------------------------
    def slice(self, model, space: PruningSpace, choice: PruningChoice):
        choice.validate(space)
        info = self._inspect(model)
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

        for name, token in (("cls_token", model.cls_token), ("distillation_token", getattr(model, "dist_token", None))):
            if token is not None:
                put(f"vit.embeddings.{name}", token[..., E])
        put("vit.embeddings.position_embeddings", model.pos_embed[..., E])
        proj = model.patch_embed.proj
        put("vit.embeddings.patch_embeddings.projection.weight", proj.weight[E])
        if proj.bias is not None:
            put("vit.embeddings.patch_embeddings.projection.bias", proj.bias[E])
        if info["pre_norm"]:
            put_layernorm("vit.pre_layernorm", model.norm_pre)

        per_layer: dict[int, dict] = {}
        for i, (block, shape) in enumerate(zip(model.blocks, info["layers"])):
            overrides: dict = {"skip": []}
            lp, hd = f"vit.layers.{i}", shape["qk"]
            if f"layers.{i}.attention" not in removed:
                H = choice.kept_indices(space, f"layers.{i}.heads")
                QK = choice.kept_indices(space, f"layers.{i}.qk_dim")
                V = choice.kept_indices(space, f"layers.{i}.v_dim")
                width = shape["heads"] * hd  # rows of each of q, k, v in the fused qkv projection
                q_rows = torch.tensor([h * hd + j for h in H for j in QK])
                v_rows = torch.tensor([h * hd + j for h in H for j in V])
                attn = block.attn
                put_layernorm(f"{lp}.layernorm_before", block.norm1)
                put_linear(f"{lp}.attention.q_proj", attn.qkv, q_rows, E)
                put_linear(f"{lp}.attention.k_proj", attn.qkv, width + q_rows, E)
                put_linear(f"{lp}.attention.v_proj", attn.qkv, 2 * width + v_rows, E)
                put_linear(f"{lp}.attention.o_proj", attn.proj, E, v_rows)
                if info["layer_scale"] is not None:
                    put(f"{lp}.layer_scale_attention.gamma", block.ls1.gamma[E])
                overrides.update(num_attention_heads=len(H), qk_head_dim=len(QK), v_head_dim=len(V))
            else:
                overrides["skip"].append("attention")
            if f"layers.{i}.mlp" not in removed:
                M = torch.tensor(choice.kept_indices(space, f"layers.{i}.mlp_dim"))
                put_layernorm(f"{lp}.layernorm_after", block.norm2)
                put_linear(f"{lp}.mlp.fc1", block.mlp.fc1, M, E)
                put_linear(f"{lp}.mlp.fc2", block.mlp.fc2, E, M)
                if info["layer_scale"] is not None:
                    put(f"{lp}.layer_scale_mlp.gamma", block.ls2.gamma[E])
                overrides["intermediate_size"] = len(M)
            else:
                overrides["skip"].append("mlp")
            per_layer[i] = overrides
        put_layernorm(
            "fc_norm" if info["fc_norm"] else "vit.layernorm", model.fc_norm if info["fc_norm"] else model.norm
        )
        names = {
            "head": "cls_classifier" if info["distilled"] else "classifier",
            "head_dist": "distillation_classifier",
        }
        for name, head in info["heads"].items():
            put_linear(names[name], head, None, E)

        config = self._pruned_config(model, info, len(E), per_layer)
        with no_init_weights():  # every parameter is overwritten below (strict load): skip the random init
            pruned = MDPViTForImageClassification(config)
        pruned.load_state_dict(state, strict=True)
        return pruned.to(next(model.parameters()).dtype).eval()

    def _pruned_config(self, model, info: dict, hidden: int, per_layer: dict) -> MDPViTConfig:
        first = info["layers"][0]
        defaults = {
            "num_attention_heads": first["heads"],
            "qk_head_dim": first["qk"],
            "v_head_dim": first["v"],
            "intermediate_size": first["mlp"],
        }
        sparse = {}
        for i, overrides in per_layer.items():
            diff = {k: v for k, v in overrides.items() if k == "skip" and v or k != "skip" and defaults.get(k) != v}
            if diff:
                sparse[i] = diff
        attn = model.blocks[0].attn
        patch = model.patch_embed
        cfg = _source_cfg(model)
        architecture = cfg.get("architecture") or type(model).__name__
        num_labels = model.head.out_features if isinstance(model.head, nn.Linear) else 0
        return MDPViTConfig(
            hidden_size=hidden,
            num_hidden_layers=len(model.blocks),
            attention_scaling=float(attn.scale),
            hidden_act=info["act"],
            hidden_dropout_prob=float(attn.proj_drop.p),
            attention_probs_dropout_prob=float(attn.attn_drop.p),
            layer_norm_eps=info["eps"],
            image_size=list(patch.img_size),
            patch_size=list(patch.patch_size),
            num_channels=patch.proj.in_channels,
            qkv_bias=attn.qkv.bias is not None,
            num_extra_tokens=info["extra_tokens"],
            classifier_heads="cls+distillation" if info["distilled"] else "cls",
            add_pooling_layer=False,
            layer_scale=info["layer_scale"],
            pooling=model.global_pool,
            fc_norm=info["fc_norm"],
            no_embed_class=bool(model.no_embed_class),
            pre_norm=info["pre_norm"],
            patch_bias=patch.proj.bias is not None,
            classifier_dropout_prob=float(model.head_drop.p),
            preprocessing=_preprocessing(model, cfg),
            base_model_type=f"timm:{architecture}",
            base_model_name_or_path=cfg.get("hf_hub_id") or None,
            base_config=_base_config(model, info, architecture, cfg),
            per_layer_config=sparse or None,
            num_labels=num_labels,
            architectures=["MDPViTForImageClassification"],
            **defaults,
        )

    # importance -------------------------------------------------------------------------------------------
    # The vit family's official score (ViTAdapter.taylor_scores: NVlabs/MDP's DeiT engine, signed sum of
    # w * dL/dw over each unit's linked tensors, per-kind divisors) with timm's fused qkv split into its q, k and
    # v rows: heads link their q, k and v rows, qk units their q rows, v units their v rows, mlp units their fc1
    # rows; the embedding links the patch projection's outputs and, per layer, proj / fc2 outputs and qkv / fc1
    # inputs (divided by the depth). Norms, tokens, position embeddings and layer scales are unlinked.
    scores_from_gates = False
    score_divisors = ViTAdapter.score_divisors

    @torch.no_grad()
    def taylor_scores(self, model, space: PruningSpace, gates: GateSet) -> dict[str, torch.Tensor]:
        info = self._inspect(model)

        def wg(param):  # w * dL/dw (zeros before the first backward)
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            return (param.detach() * grad).double()

        def rows(linear):  # per output unit: weight row + bias
            out = wg(linear.weight).sum(1)
            return out + wg(linear.bias) if linear.bias is not None else out

        proj = model.patch_embed.proj
        embed = wg(proj.weight).flatten(1).sum(1) + (wg(proj.bias) if proj.bias is not None else 0)
        out = {}
        for i, (block, shape) in enumerate(zip(model.blocks, info["layers"])):
            attn, H = block.attn, shape["heads"]
            q, k, v = rows(attn.qkv).view(3, H, shape["qk"]).unbind(0)
            out[f"layers.{i}.heads"] = (q.sum(1) + k.sum(1) + v.sum(1)) / self.score_divisors["heads"]
            out[f"layers.{i}.qk_dim"] = q.sum(0) / self.score_divisors["qk"]
            out[f"layers.{i}.v_dim"] = v.sum(0) / self.score_divisors["v"]
            out[f"layers.{i}.mlp_dim"] = rows(block.mlp.fc1) / self.score_divisors["mlp"]
            embed = embed + rows(attn.proj) + wg(attn.qkv.weight).sum(0)
            embed = embed + rows(block.mlp.fc2) + wg(block.mlp.fc1.weight).sum(0)
        out["embed"] = embed / len(model.blocks)
        return {name: out[name].cpu() for name in space.dimensions}

    @torch.no_grad()
    def unit_magnitudes(self, model, space: PruningSpace) -> dict[str, torch.Tensor]:
        info = self._inspect(model)
        sq = lambda w: w.detach().float().square()  # noqa: E731
        embed = sq(model.patch_embed.proj.weight).flatten(1).sum(1)
        out = {}
        for i, (block, shape) in enumerate(zip(model.blocks, info["layers"])):
            attn, H, hd = block.attn, shape["heads"], shape["qk"]
            q, k, v = sq(attn.qkv.weight).sum(1).view(3, H, hd).unbind(0)
            qk = q + k
            vo = v + sq(attn.proj.weight).sum(0).view(H, hd)
            out[f"layers.{i}.heads"] = qk.sum(1) + vo.sum(1)
            out[f"layers.{i}.qk_dim"] = qk.sum(0)
            out[f"layers.{i}.v_dim"] = vo.sum(0)
            fc1, fc2 = block.mlp.fc1, block.mlp.fc2
            out[f"layers.{i}.mlp_dim"] = sq(fc1.weight).sum(1) + sq(fc2.weight).sum(0)
            embed = embed + sq(attn.proj.weight).sum(1) + sq(fc2.weight).sum(1)
        out["embed"] = embed  # writers into the residual stream: patch embedding, proj and fc2 rows
        return {name: out[name].double().cpu() for name in space.dimensions}

    def expected_num_parameters(self, config: MDPViTConfig) -> int:
        return ViTAdapter().expected_num_parameters(config)  # a sliced timm ViT is an mdp_vit model


# source records ------------------------------------------------------------------------------------------
def _source_cfg(model) -> dict:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return dict(cfg) if isinstance(cfg, dict) else {}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _preprocessing(model, cfg: dict) -> dict | None:
    """Input preprocessing from the timm model's ``pretrained_cfg`` (None without one); ``input_size`` is the
    model's own (a model built with another ``img_size`` than its pretrained_cfg's takes only that size)."""
    if not cfg:
        return None
    out = {key: _jsonable(cfg[key]) for key in ("mean", "std", "interpolation", "crop_pct") if key in cfg}
    out["input_size"] = [model.patch_embed.proj.in_channels, *model.patch_embed.img_size]
    return out


def _base_config(model, info: dict, architecture: str, cfg: dict) -> dict:
    """What the dense timm model was: ``timm.create_model(architecture, **model_args)`` rebuilds its shape."""
    mlp_ratio = info["layers"][0]["mlp"] / info["embed"]
    return {
        "library": "timm",
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "architecture": architecture,
        "pretrained_tag": cfg.get("tag"),
        "model_args": {
            "img_size": list(model.patch_embed.img_size),
            "patch_size": list(model.patch_embed.patch_size),
            "in_chans": model.patch_embed.proj.in_channels,
            "num_classes": model.num_classes,
            "global_pool": model.global_pool,
            "embed_dim": info["embed"],
            "depth": len(model.blocks),
            "num_heads": info["layers"][0]["heads"],
            "mlp_ratio": mlp_ratio,
            "qkv_bias": model.blocks[0].attn.qkv.bias is not None,
            "init_values": info["layer_scale"],
            "class_token": model.cls_token is not None,
            "no_embed_class": bool(model.no_embed_class),
            "pre_norm": info["pre_norm"],
            "fc_norm": info["fc_norm"],
        },
    }


# timm-style wrapper ----------------------------------------------------------------------------------------
class PrunedTimmViT(nn.Module):
    """A pruned ``mdp_vit`` model seen as a timm model: ``forward(x)`` returns a logits tensor,
    ``forward_features`` the token sequence (after the final norm unless it is ``fc_norm``), ``forward_head``
    pools, normalises and classifies; ``num_classes``, ``pretrained_cfg`` / ``default_cfg`` (from the recorded
    ``preprocessing``, so ``timm.data.resolve_data_config(model=...)`` finds mean, std, size, crop) as timm has them.
    The distilled DeiT returns ``(cls, distillation)`` logits in training when ``distilled_training`` is set."""

    def __init__(self, pruned: MDPViTForImageClassification):
        super().__init__()
        config = pruned.config
        self.model = pruned
        self.num_classes = config.num_labels
        self.global_pool = config.pooling
        self.num_prefix_tokens = config.num_extra_tokens
        self.num_features = self.head_hidden_size = self.embed_dim = config.hidden_size
        self.distilled = config.classifier_heads == "cls+distillation"
        self.distilled_training = False
        self.pretrained_cfg = _timm_pretrained_cfg(config)

    @property
    def default_cfg(self) -> dict:
        return self.pretrained_cfg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.vit(x).last_hidden_state

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        pooled = self.model.pool(x)
        if not self.distilled:
            return pooled if pre_logits else self.model.classifier(pooled)
        cls, dist = pooled
        if pre_logits:
            return (cls + dist) / 2
        cls, dist = self.model.cls_classifier(cls), self.model.distillation_classifier(dist)
        if self.distilled_training and self.training:
            return cls, dist
        return (cls + dist) / 2

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        if self.distilled:
            return self.model.cls_classifier, self.model.distillation_classifier
        return self.model.classifier


def _timm_pretrained_cfg(config) -> dict:
    pre = dict(config.preprocessing or {})
    size = config.image_size if isinstance(config.image_size, (list, tuple)) else [config.image_size] * 2
    cfg = {
        "architecture": (config.base_model_type or "").removeprefix("timm:") or None,
        "hf_hub_id": config.base_model_name_or_path if (config.base_model_type or "").startswith("timm:") else None,
        "num_classes": config.num_labels,
        "input_size": tuple(pre.get("input_size") or (config.num_channels, *size)),
        "first_conv": "model.vit.embeddings.patch_embeddings.projection",
        "classifier": "model.cls_classifier" if config.classifier_heads == "cls+distillation" else "model.classifier",
    }
    for key in ("mean", "std"):
        if key in pre:
            cfg[key] = tuple(pre[key])
    for key in ("interpolation", "crop_pct"):
        if key in pre:
            cfg[key] = pre[key]
    return cfg


def as_timm_module(pruned_model) -> PrunedTimmViT:
    """``pruned_model`` (a sliced or loaded ``mdp_vit`` classification model) as a plain timm-style ``nn.Module``
    for users who stay in timm: ``model(x)`` is a logits tensor (timm's convention), and ``pretrained_cfg`` holds the
    source model's preprocessing. Parameters are shared with ``pruned_model``, not copied."""
    config = getattr(pruned_model, "config", None)
    if getattr(config, "model_type", None) != "mdp_vit" or not has_classifier(config):
        raise TypeError(
            "as_timm_module expects a pruned mdp_vit classification model (mdp_hf.slice_model of a ViT / DeiT, or "
            f"AutoModelForImageClassification.from_pretrained of a saved one), got {type(pruned_model).__name__}"
        )
    return PrunedTimmViT(pruned_model)


# latency cells ---------------------------------------------------------------------------------------------
class TimmViTCells(ViTCells):
    """The vit family's cells (they time the deployed mdp_vit modules), with the dense model sliced from timm."""

    adapter_class = TimmViTAdapter


# registration ----------------------------------------------------------------------------------------------
_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0, num_classes=5)


def _timm(name: str, **kwargs):
    """A builder of a randomly initialised timm model (timm imported only when called)."""

    def build():
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _tiny(name: str, **kwargs):
    """A tiny test variant: timm's 0.02-std init leaves attention almost uniform in a 32-wide model (pruning query/key
    units would barely change the logits), so Linear weights are redrawn at std 1/sqrt(fan_in)."""
    build_timm = _timm(name, **_TINY, **kwargs)

    def build():
        model = build_timm()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=module.in_features**-0.5)
        return model

    return build


register_family(
    ModelFamily(
        name="timm_vit",
        adapter=TimmViTAdapter(),
        kinds=("embed", "heads", "qk", "v", "mlp"),
        module_classes=("timm.models.vision_transformer.VisionTransformer",),
        pruned_classes=(),  # exports to mdp_vit, registered by the vit family
        latency_cells=TimmViTCells,
        test_models={
            "timm_vit": _tiny("vit_tiny_patch16_224"),
            "timm_vit_avgpool_layerscale": _tiny("vit_tiny_patch16_224", global_pool="avg", init_values=1e-1),
            "timm_deit_distilled": _tiny("deit_tiny_distilled_patch16_224"),
        },
        presets={
            "timm-deit-small": _timm("deit_small_patch16_224"),
            "timm-deit-base": _timm("deit_base_patch16_224"),
            "timm-deit-small-distilled": _timm("deit_small_distilled_patch16_224"),
            "timm-vit-base": _timm("vit_base_patch16_224"),
        },
    )
)
