"""ViT / DeiT profiling knowledge: which blocks to time and how to build one of given widths.

(Family knowledge that could move into ``mdp_hf/adapters/vit.py`` later; kept here, keyed by
``space.model_type`` in ``vit``, ``deit``, ``mdp_vit``.)

Every cell times the deployed code: the modules are ``MDPViTLayer`` / ``MDPViTForImageClassification``
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

from __future__ import annotations

import torch

from ..modeling import MDPViTConfig, MDPViTForImageClassification
from ..modeling.modeling_mdp_vit import MDPViTLayer
from .table import MeasuredTable, TermDef

MODEL_TYPES = ("vit", "deit", "mdp_vit")


def _sig(dim) -> str:
    return f"{dim.size}/{dim.group_size}/{dim.min_keep}"


class ViTBlocks:
    def __init__(self, model, space, settings):
        from ..surgery import slice_model

        self.space = space
        self.settings = settings
        dense = slice_model(model, space, space.full_choice())  # the deployed dense model (mdp_vit)
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
        }

    # plan --------------------------------------------------------------------------------------------
    def plan(self) -> tuple[list[MeasuredTable], list[TermDef]]:
        dims = self.space.dimensions
        tables: dict[str, MeasuredTable] = {}
        terms: list[TermDef] = []
        E = dims["embed"]
        n = self.tokens

        def table(key, kind, axis_dims, params):
            if key not in tables:
                tables[key] = MeasuredTable(
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
                    TermDef(f"{block}.qk", key, [H.name, E.name, Q.name], block, "half_anchor", input_axes=[1])
                )
                key = table(
                    f"vit.attn_vo(H={_sig(H)},E={_sig(E)},V={_sig(V)},QK={Q.size},N={n})",
                    "vit.attn_vo",
                    [H, E, V],
                    {"qk_head_dim": Q.size, "tail_axes": [2]},
                )
                terms.append(TermDef(f"{block}.vo", key, [H.name, E.name, V.name], block, "half_anchor"))
                e0 = E.widths()[0]
                key = table(
                    f"vit.attn_core(H={_sig(H)},QK={_sig(Q)},V={_sig(V)},E0={e0},N={n})",
                    "vit.attn_core",
                    [H, Q, V],
                    {"embed": e0, "full_axes": [1, 2]},
                )
                terms.append(TermDef(f"{block}.qk_x_v", key, [H.name, Q.name, V.name], block, "interaction"))
            block = f"layers.{i}.mlp"
            if block in self.space.blocks:
                M = dims[f"layers.{i}.mlp_dim"]
                key = table(f"vit.mlp(E={_sig(E)},M={_sig(M)},N={n})", "vit.mlp", [E, M], {})
                terms.append(TermDef(block, key, [E.name, M.name], block))
        key = table(f"vit.out(E={_sig(E)},L={self.num_layers},N={n})", "vit.out", [E], {})
        terms.append(TermDef("embeddings+final_norm+classifier", key, [E.name], None))
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

    def build_cell(self, table: MeasuredTable, widths: tuple[int, ...]):
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
            module = MDPViTForImageClassification(self._config(e, self.num_layers, skip_all))
            x = torch.randn(B, self.base.get("num_channels", 3), *self.image_size)
        else:
            raise ValueError(f"unknown ViT table kind {table.kind!r}")
        dtype = self.settings.torch_dtype
        return module.to(device=self.settings.device, dtype=dtype).eval(), x.to(self.settings.device, dtype)

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
        return MDPViTForImageClassification(self._config(c.hidden_size, self.num_layers, per_layer))

    def example_input(self):
        return torch.randn(self.settings.batch_size, self.base.get("num_channels", 3), *self.image_size)


def structure_from_config(config) -> tuple[dict[str, int], set[str]]:
    """(widths per dimension name, removed blocks) of an ``mdp_vit`` config, in the adapter's names."""
    widths, removed = {"embed": int(config.hidden_size)}, set()
    for i in range(config.num_hidden_layers):
        lc = config.per_layer_config[i]
        skip = set(getattr(lc, "skip", None) or [])
        if "attention" in skip:
            removed.add(f"layers.{i}.attention")
        else:
            widths[f"layers.{i}.heads"] = int(lc.num_attention_heads)
            widths[f"layers.{i}.qk_dim"] = int(lc.qk_head_dim)
            widths[f"layers.{i}.v_dim"] = int(lc.v_head_dim)
        if "mlp" in skip:
            removed.add(f"layers.{i}.mlp")
        else:
            widths[f"layers.{i}.mlp_dim"] = int(lc.intermediate_size)
    return widths, removed
