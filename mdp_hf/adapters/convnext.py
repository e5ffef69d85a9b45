"""ConvNeXt-family adapter: transformers' ConvNeXt (``ConvNextForImageClassification``, ``ConvNextModel``) and
mdp_convnext.

Dimensions: one residual width per stage (``stages.{s}.residual``: the stem conv's output for stage 0, the
downsampling conv's output otherwise; every layer's depthwise conv, LayerNorm, pwconv1 input, pwconv2 output
and layer scale; the next stage's downsampling LayerNorm and conv input; the final LayerNorm and classifier
input for the last stage), and per layer the MLP hidden width (``stages.{s}.layers.{j}.mlp``: pwconv1
outputs / pwconv2 inputs). Blocks: every layer (its residual branch; removing it leaves the identity).
Stage 0's residual width is the stem's output: it is pruned like any residual width (it is not a CNN
"stem dimension" held at full width, as ViT's patch-embedding width is not).

Every LayerNorm normalises over a residual width, so in the gated model its statistics are taken over the
kept channels only (``GateSet.binary_mask``), exactly as the sliced LayerNorm computes them.

Importance: the official MDP code (NVlabs/MDP) has pruning engines for DeiT and ResNet-50 only; there is
no ConvNeXt engine to follow. ConvNeXt has no BatchNorm, so ResNet's BN-Taylor score
(|gamma dL/dgamma + beta dL/dbeta|) does not apply; its layers are LayerNorm + MLP like a ViT MLP
sub-block. We use the default gate-gradient Taylor score (``ModelAdapter.taylor_scores``: dL/dg, the sum
over a unit's activations of a * dL/da, the first-order estimate of the loss change when the unit is
removed), summed over every place a residual gate multiplies the stream, and squared per step
(``default_score_kind="square"``, the paper's choice for ViT).

Unsupported (refused in ``build_space`` with the option named): ConvNextBackbone (per-stage feature-map
norms), layers with ConvNeXt V2's GRN, a non-depthwise or non-7x7 layer conv, a downsampling layer other
than 2x2 stride 2, layer scale on only some layers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.initialization import no_init_weights

from ..modeling.configuration_mdp_convnext import MDPConvNextConfig
from ..modeling.modeling_mdp_convnext import (
    MDPConvNextEmbeddings,
    MDPConvNextForImageClassification,
    MDPConvNextLayer,
    MDPConvNextModel,
    downsampling_layer,
)
from .base import (
    Block,
    Dimension,
    GateSet,
    GridCatalog,
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


def _residual(stage: int) -> str:
    return f"stages.{stage}.residual"


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


class ConvNextAdapter(ModelAdapter):
    default_group_sizes = {"residual": 8, "mlp": 32}
    default_score_kind = "square"

    # model access -----------------------------------------------------------------------------------
    @staticmethod
    def _parts(model):
        """(base model, its attribute name in the wrapper or None, classifier module or None)."""
        if hasattr(model, "hidden_states_norms"):
            raise PruningSpaceError(
                f"{type(model).__name__} (a ConvNeXt backbone with per-stage feature-map LayerNorms) is not supported: "
                "the mdp_convnext format has no out_features norms. Prune ConvNextForImageClassification or "
                "ConvNextModel and load the pruned weights into your detection / segmentation head instead."
            )
        base = getattr(model, "convnext", None)
        if base is not None and hasattr(base, "encoder"):
            classifier = getattr(model, "classifier", None)
            if not isinstance(classifier, (nn.Linear, nn.Identity)):
                raise PruningSpaceError(
                    f"{type(model).__name__}.classifier is a {type(classifier).__name__}; only a single nn.Linear "
                    "(or nn.Identity for num_labels=0) on the pooled features is supported"
                )
            return base, "convnext", classifier
        if hasattr(model, "embeddings") and hasattr(model, "encoder") and hasattr(model, "layernorm"):
            return model, None, None
        raise PruningSpaceError(f"{type(model).__name__} does not have the ConvNeXt layout (embeddings + encoder)")

    @staticmethod
    def _layers(base):
        """(stage, index in stage, flat index, layer module or None if removed) for every layer."""
        flat = 0
        for s, stage in enumerate(base.encoder.stages):
            for j, layer in enumerate(stage.layers):
                yield s, j, flat, (None if isinstance(layer, nn.Identity) else layer)
                flat += 1

    @staticmethod
    def _stage_widths(base) -> list[int]:
        widths = [base.embeddings.patch_embeddings.out_channels]
        for stage in list(base.encoder.stages)[1:]:
            widths.append(stage.downsampling_layer[1].out_channels)
        return widths

    def _check_supported(self, base) -> None:
        """Refuse architecture options the mdp_convnext format cannot express (never slice them wrongly)."""

        def refuse(what: str):
            raise PruningSpaceError(f"unsupported ConvNeXt variant: {what}; mdp_convnext cannot represent it")

        stem = base.embeddings.patch_embeddings
        if stem.kernel_size != stem.stride or stem.padding != (0, 0) or stem.groups != 1:
            refuse(f"stem conv with kernel {stem.kernel_size}, stride {stem.stride}, padding {stem.padding}")
        convs = [stem] + [
            stage.downsampling_layer[1] for stage in list(base.encoder.stages)[1:] if stage.downsampling_layer
        ]
        convs += [layer.dwconv for *_, layer in self._layers(base) if layer is not None]
        if any(conv.bias is None for conv in convs):
            refuse("convolutions without bias")
        for s, stage in enumerate(base.encoder.stages):
            down = list(stage.downsampling_layer)
            if s == 0 and down:
                refuse("a downsampling layer in stage 0 (its width would differ from the stem's)")
            if s > 0:
                if len(down) != 2 or not isinstance(down[1], nn.Conv2d):
                    refuse(f"stage {s} without the LayerNorm + conv downsampling layer")
                conv = down[1]
                if conv.kernel_size != (2, 2) or conv.stride != (2, 2) or conv.padding != (0, 0) or conv.groups != 1:
                    refuse(f"stage {s} downsampling conv with kernel {conv.kernel_size}, stride {conv.stride}")
        scales = set()
        for s, j, flat, layer in self._layers(base):
            name = f"stages.{s}.layers.{j}"
            if layer is None:
                continue
            if hasattr(layer, "grn"):
                refuse(f"{name} has a global response normalisation (GRN, ConvNeXt V2)")
            dw = layer.dwconv
            if dw.groups != dw.in_channels or dw.out_channels != dw.in_channels:
                refuse(f"{name}.dwconv is not depthwise (groups={dw.groups}, channels={dw.in_channels})")
            if dw.kernel_size != (7, 7) or dw.padding != (3, 3) or dw.stride != (1, 1) or dw.dilation != (1, 1):
                refuse(f"{name}.dwconv with kernel {dw.kernel_size}, padding {dw.padding}, stride {dw.stride}")
            if getattr(layer.layernorm, "data_format", "channels_last") != "channels_last":
                refuse(f"{name}.layernorm in channels_first format")
            if layer.pwconv1.bias is None or layer.pwconv2.bias is None:
                refuse(f"{name} pointwise layers without bias")
            scales.add(layer.layer_scale_parameter is not None)
        if len(scales) > 1:
            refuse("layer scale (layer_scale_parameter) on only some layers")

    @staticmethod
    def _has_layer_scale(base) -> bool:
        return any(
            layer is not None and layer.layer_scale_parameter is not None for *_, layer in ConvNextAdapter._layers(base)
        )

    # pruning space ----------------------------------------------------------------------------------
    def build_space(self, model, group_sizes=None, min_keep=None) -> PruningSpace:
        base, prefix, classifier = self._parts(model)
        self._check_supported(base)
        p = f"{prefix}." if prefix else ""
        widths = self._stage_widths(base)
        residual, mlps, blocks, aliases = {}, {}, {}, {}
        coupled = {_residual(s): [] for s in range(len(widths))}
        coupled[_residual(0)] += [f"{p}embeddings.patch_embeddings", f"{p}embeddings.layernorm"]
        aliases.update({"stem": _residual(0), "embeddings": _residual(0), "patch_embeddings": _residual(0)})
        for s in range(1, len(widths)):
            sp = f"{p}encoder.stages.{s}.downsampling_layer"
            coupled[_residual(s - 1)].append(f"{sp}.0 (LayerNorm) + {sp}.1 (in)")
            coupled[_residual(s)].append(f"{sp}.1 (out)")
            aliases[f"stages.{s}.downsampling_layer"] = _residual(s)
        for s, j, flat, layer in self._layers(base):
            if layer is None:
                continue
            block, lp = f"stages.{s}.layers.{j}", f"{p}encoder.stages.{s}.layers.{j}"
            name = f"{block}.mlp"
            group, minimum = self._group_and_min(name, "mlp", layer.pwconv1.out_features, group_sizes, min_keep)
            mlps[name] = Dimension(
                name,
                "mlp",
                layer.pwconv1.out_features,
                group,
                minimum,
                block,
                coupled=[f"{lp}.pwconv1 (out)", f"{lp}.pwconv2 (in)"],
            )
            blocks[block] = Block(block, "residual", [name])
            coupled[_residual(s)] += [
                f"{lp}.dwconv",
                f"{lp}.layernorm",
                f"{lp}.pwconv1 (in)",
                f"{lp}.pwconv2 (out)",
            ] + ([f"{lp}.layer_scale_parameter"] if layer.layer_scale_parameter is not None else [])
            for part in ("dwconv", "layernorm", "pwconv2", "layer_scale_parameter"):
                aliases[f"{block}.{part}"] = _residual(s)
            for part in ("pwconv1", "act"):
                aliases[f"{block}.{part}"] = name
        last = _residual(len(widths) - 1)
        coupled[last].append(f"{p}layernorm")
        aliases["layernorm"] = last
        if isinstance(classifier, nn.Linear):
            coupled[last].append("classifier (in)")
            aliases["classifier"] = last
        for s, size in enumerate(widths):
            name = _residual(s)
            group, minimum = self._group_and_min(name, "residual", size, group_sizes, min_keep)
            shared = [b for b in blocks if b.startswith(f"stages.{s}.")]
            residual[name] = Dimension(name, "residual", size, group, minimum, None, shared, coupled[name])
        return PruningSpace(model.config.model_type, {**residual, **mlps}, blocks, aliases)

    # gates ------------------------------------------------------------------------------------------
    def install_gates(self, model, space: PruningSpace) -> GateSet:
        base, _, _ = self._parts(model)
        gates = GateSet(space, device=next(model.parameters()).device)

        def shaped(vector, ndim, axis):
            shape = [1] * ndim
            shape[axis] = -1
            return vector.view(shape)

        def masked_norm(name):
            """LayerNorm over the kept units of residual width ``name`` only, its output gated."""

            def hook(module, args, output):
                x = args[0]
                axis = 1 if getattr(module, "data_format", "channels_last") == "channels_first" else x.ndim - 1
                mask = shaped(gates.binary_mask(name).to(x.dtype), x.ndim, axis)
                count = mask.sum()
                mean = (x * mask).sum(axis, keepdim=True) / count
                var = (((x - mean) * mask) ** 2).sum(axis, keepdim=True) / count
                normed = (x - mean) / torch.sqrt(var + module.eps)
                normed = normed * shaped(module.weight, x.ndim, axis) + shaped(module.bias, x.ndim, axis)
                return normed * shaped(gates.dim(name, x.dtype), x.ndim, axis)

            return hook

        def scale_output(get_gate, axis):
            def hook(module, args, output):
                return output * shaped(get_gate(output.dtype), output.ndim, axis % output.ndim)

            return hook

        gates.on_output(base.embeddings.layernorm, masked_norm(_residual(0)))
        for s, stage in enumerate(base.encoder.stages):
            if s > 0:
                norm, conv = stage.downsampling_layer
                gates.on_output(norm, masked_norm(_residual(s - 1)))
                gates.on_output(conv, scale_output(lambda dtype, r=_residual(s): gates.dim(r, dtype), 1))
        for s, j, flat, layer in self._layers(base):
            block = f"stages.{s}.layers.{j}"
            if layer is None or block not in space.blocks:
                continue
            gates.on_output(layer.layernorm, masked_norm(_residual(s)))

            def gate_hidden(module, args, name=f"{block}.mlp"):
                # on pwconv2's input (after the activation), so gating is exact whatever act(0) is
                return (args[0] * gates.dim(name, args[0].dtype),) + tuple(args[1:])

            gates.on_input(layer.pwconv2, gate_hidden)
            gates.on_output(
                layer.pwconv2,
                scale_output(lambda dtype, r=_residual(s), b=block: gates.dim(r, dtype) * gates.block(b, dtype), -1),
            )
        gates.on_output(base.layernorm, masked_norm(_residual(len(base.encoder.stages) - 1)))
        return gates

    # surgery ----------------------------------------------------------------------------------------
    def slice(self, model, space: PruningSpace, choice: PruningChoice):
        choice.validate(space)
        base, prefix, classifier = self._parts(model)
        self._check_supported(base)
        num_stages = len(base.encoder.stages)
        kept = {name: torch.tensor(choice.kept_indices(space, name)) for name in space.dimensions}
        residual = [kept[_residual(s)] for s in range(num_stages)]
        removed_now = set(choice.removed_blocks)
        state: dict[str, torch.Tensor] = {}
        bp = "convnext."

        def put(name, tensor):
            state[name] = tensor.detach().clone().contiguous()

        def put_norm(name, norm, idx):
            put(f"{name}.weight", norm.weight[idx])
            put(f"{name}.bias", norm.bias[idx])

        def put_weight(name, module, rows, cols=None):
            weight = module.weight[rows]
            put(f"{name}.weight", weight if cols is None else weight[:, cols])
            put(f"{name}.bias", module.bias[rows])

        put_weight(f"{bp}embeddings.patch_embeddings", base.embeddings.patch_embeddings, residual[0])
        put_norm(f"{bp}embeddings.layernorm", base.embeddings.layernorm, residual[0])
        for s, stage in enumerate(base.encoder.stages):
            if s > 0:
                sp = f"{bp}encoder.stages.{s}.downsampling_layer"
                put_norm(f"{sp}.0", stage.downsampling_layer[0], residual[s - 1])
                put_weight(f"{sp}.1", stage.downsampling_layer[1], residual[s], residual[s - 1])
        mlp_widths, removed_layers = [], []
        for s, j, flat, layer in self._layers(base):
            block = f"stages.{s}.layers.{j}"
            if layer is None or block in removed_now:
                removed_layers.append(flat)
                mlp_widths.append(0)
                continue
            lp, R, M = f"{bp}encoder.stages.{s}.layers.{j}", residual[s], kept[f"{block}.mlp"]
            put_weight(f"{lp}.dwconv", layer.dwconv, R)
            put_norm(f"{lp}.layernorm", layer.layernorm, R)
            put_weight(f"{lp}.pwconv1", layer.pwconv1, M, R)
            put_weight(f"{lp}.pwconv2", layer.pwconv2, R, M)
            if layer.layer_scale_parameter is not None:
                put(f"{lp}.layer_scale_parameter", layer.layer_scale_parameter[R])
            mlp_widths.append(len(M))
        put_norm(f"{bp}layernorm", base.layernorm, residual[-1])
        if isinstance(classifier, nn.Linear):
            put("classifier.weight", classifier.weight[:, residual[-1]])
            put("classifier.bias", classifier.bias)

        config = self._pruned_config(
            model, base, classifier, [len(k) for k in residual], mlp_widths, removed_layers, prefix is not None
        )
        with no_init_weights():  # every parameter is overwritten below (strict load): skip the random init
            if prefix is None:
                state = {k.removeprefix(bp): v for k, v in state.items()}
                pruned = MDPConvNextModel(config)
            else:
                pruned = MDPConvNextForImageClassification(config)
        pruned.load_state_dict(state, strict=True)
        return pruned.to(next(model.parameters()).dtype).eval()

    def _pruned_config(
        self, model, base, classifier, widths, mlp_widths, removed_layers, with_head
    ) -> MDPConvNextConfig:
        source = model.config
        if source.model_type == "mdp_convnext":
            base_info = (source.base_model_type, source.base_model_name_or_path, source.base_config)
        else:
            base_info = (source.model_type, source.name_or_path or None, source.to_dict())
        has_scale = self._has_layer_scale(base)
        scale_value = float(getattr(source, "layer_scale_init_value", 1e-6) or 0.0)
        if has_scale and scale_value <= 0:
            scale_value = 1e-6  # parameters exist: the format needs a positive value to build them
        stem = base.embeddings.patch_embeddings
        labels = {"id2label": source.id2label, "label2id": source.label2id}
        heads = classifier.out_features if isinstance(classifier, nn.Linear) else 0
        if with_head and heads != len(source.id2label or {}):
            labels = {"num_labels": heads}
        return MDPConvNextConfig(
            num_channels=stem.in_channels,
            patch_size=list(stem.kernel_size),
            hidden_sizes=widths,
            depths=[len(stage.layers) for stage in base.encoder.stages],
            layer_mlp_widths=mlp_widths,
            removed_layers=removed_layers,
            hidden_act=source.hidden_act,
            initializer_range=source.initializer_range,
            layer_norm_eps=base.layernorm.eps,
            layer_scale_init_value=scale_value if has_scale else 0.0,
            drop_path_rate=float(getattr(source, "drop_path_rate", 0.0) or 0.0),
            image_size=getattr(source, "image_size", 224),
            base_model_type=base_info[0],
            base_model_name_or_path=base_info[1],
            base_config=base_info[2],
            architectures=["MDPConvNextForImageClassification" if with_head else "MDPConvNextModel"],
            **labels,
        )

    # importance ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def unit_magnitudes(self, model, space: PruningSpace) -> dict[str, torch.Tensor]:
        base, _, _ = self._parts(model)
        out = {name: torch.zeros(dim.size, dtype=torch.float64) for name, dim in space.dimensions.items()}

        def rows(weight):  # squared L2 norm per output unit
            return weight.detach().double().square().flatten(1).sum(1).cpu()

        # writers into each residual width: the stem / downsampling conv and every layer's pwconv2
        out[_residual(0)] += rows(base.embeddings.patch_embeddings.weight)
        for s, stage in enumerate(base.encoder.stages):
            if s > 0:
                out[_residual(s)] += rows(stage.downsampling_layer[1].weight)
        for s, j, flat, layer in self._layers(base):
            if layer is None:
                continue
            out[_residual(s)] += rows(layer.pwconv2.weight)
            name = f"stages.{s}.layers.{j}.mlp"
            if name in out:
                out[name] += rows(layer.pwconv1.weight) + rows(layer.pwconv2.weight.t())
        return out

    def expected_num_parameters(self, config: MDPConvNextConfig) -> int:
        ph, pw = _pair(config.patch_size)
        widths = config.hidden_sizes
        total = config.num_channels * widths[0] * ph * pw + widths[0] + 2 * widths[0]  # stem conv + LayerNorm
        removed, flat = set(config.removed_layers), 0
        scale = 1 if config.layer_scale_init_value > 0 else 0
        for s, (width, depth) in enumerate(zip(widths, config.depths)):
            if s > 0:
                total += 2 * widths[s - 1] + widths[s - 1] * width * 4 + width  # LayerNorm + 2x2 conv
            for _ in range(depth):
                if flat not in removed:
                    M = config.layer_mlp_widths[flat]
                    total += width * 49 + width + 2 * width + (width * M + M) + (M * width + width) + scale * width
                flat += 1
        total += 2 * widths[-1]  # final LayerNorm
        if has_classifier(config) and config.num_labels > 0:
            total += widths[-1] * config.num_labels + config.num_labels
        return total


# latency cells ---------------------------------------------------------------------------------------
"""Cells time the deployed modules of ``modeling_mdp_convnext`` at the resolution each one sees in the model
(computed from the convs' kernels and strides at the table's image size). Identical cells share a grid.

- ``convnext.stem`` [stage-0 residual]: patchify conv + channels-first LayerNorm;
- ``convnext.downsample`` [stage residual, previous stage residual]: LayerNorm + 2x2 stride-2 conv, outside
  every block (input axis: the previous residual);
- ``convnext.layer`` [stage residual, layer MLP]: a whole MDPConvNextLayer (depthwise conv, LayerNorm, MLP,
  layer scale, residual add), paid while the layer is kept;
- ``convnext.head`` [last residual]: global average pool + final LayerNorm + classifier.
"""


def _conv_out(size: tuple[int, int], conv: nn.Conv2d) -> tuple[int, int]:
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(size, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    )


class _Head(nn.Module):
    """Pool + final LayerNorm + classifier exactly as MDPConvNextModel / MDPConvNextForImageClassification."""

    def __init__(self, width, eps, num_labels):
        super().__init__()
        self.layernorm = nn.LayerNorm(width, eps=eps)
        self.classifier = nn.Linear(width, num_labels) if num_labels > 0 else nn.Identity()

    def forward(self, features):
        return self.classifier(self.layernorm(features.mean([-2, -1])))


class ConvNextCells(LatencyCells):
    def __init__(self, model, space, settings):
        super().__init__(model, space, settings)
        self.adapter = ConvNextAdapter()
        self.base, _, self.classifier = self.adapter._parts(model)
        self.config = model.config
        size = settings.image_size or getattr(model.config, "image_size", None) or 224
        self.image_size = list(_pair(size))
        stem = self.base.embeddings.patch_embeddings
        self.num_channels = stem.in_channels
        self.patch_size = list(stem.kernel_size)
        self.num_labels = self.classifier.out_features if isinstance(self.classifier, nn.Linear) else 0
        self.act = model.config.hidden_act
        self.layer_scale = self.adapter._has_layer_scale(self.base)
        self.eps = self.base.layernorm.eps
        # resolution seen by each stage's layers (after its downsampling), and by its downsampling layer
        self.stage_in, self.stage_res = [], []
        res = _conv_out(tuple(self.image_size), stem)
        for s, stage in enumerate(self.base.encoder.stages):
            self.stage_in.append(res)
            if s > 0:
                res = _conv_out(res, stage.downsampling_layer[1])
            self.stage_res.append(res)

    def model_shapes(self) -> dict:
        return {
            "family": "convnext",
            "depths": [len(stage.layers) for stage in self.base.encoder.stages],
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_labels": self.num_labels,
            "hidden_act": self.act,
            "layer_scale": self.layer_scale,
        }

    def plan(self) -> tuple[list[TimingGrid], list[TimingTerm]]:
        dims = self.space.dimensions
        terms: list[TimingTerm] = []

        grid = GridCatalog()  # identical blocks share a grid

        def hw(res):
            return f"{res[0]}x{res[1]}"

        first = dims[_residual(0)]
        key = grid("convnext.stem", [first], {"in": hw(self.image_size), "patch": hw(self.patch_size)})
        terms.append(TimingTerm("stem", key, [first.name], None))
        for s in range(len(self.stage_res)):
            if s > 0:
                out, inp = dims[_residual(s)], dims[_residual(s - 1)]
                key = grid("convnext.downsample", [out, inp], {"in": hw(self.stage_in[s])})
                terms.append(TimingTerm(f"stages.{s}.downsampling", key, [out.name, inp.name], None, input_axes=[1]))
        for s, j, flat, layer in self.adapter._layers(self.base):
            block = f"stages.{s}.layers.{j}"
            if layer is None or block not in self.space.blocks:
                continue
            R, M = dims[_residual(s)], dims[f"{block}.mlp"]
            params = {"at": hw(self.stage_res[s]), "act": self.act, "scale": int(self.layer_scale)}
            key = grid("convnext.layer", [R, M], params)
            terms.append(TimingTerm(block, key, [R.name, M.name], block))
        last = dims[_residual(len(self.stage_res) - 1)]
        key = grid("convnext.head", [last], {"at": hw(self.stage_res[-1]), "labels": self.num_labels})
        terms.append(TimingTerm("pool+norm+classifier", key, [last.name], None))
        return grid.all(), terms

    def build_cell(self, grid, widths: tuple[int, ...]):
        B, p = self.settings.batch_size, grid.params

        def res(text):
            return [int(v) for v in text.split("x")]

        if grid.kind == "convnext.stem":
            module = MDPConvNextEmbeddings(self.num_channels, widths[0], res(p["patch"]))
            return self._place(module, torch.randn(B, self.num_channels, *res(p["in"])))
        if grid.kind == "convnext.downsample":
            out, inp = widths
            return self._place(downsampling_layer(inp, out), torch.randn(B, inp, *res(p["in"])))
        if grid.kind == "convnext.layer":
            width, mlp = widths
            module = MDPConvNextLayer(width, mlp, p["act"], 1e-6 if p["scale"] else 0.0)
            return self._place(module, torch.randn(B, width, *res(p["at"])))
        if grid.kind == "convnext.head":
            module = _Head(widths[0], self.eps, p["labels"])
            return self._place(module, torch.randn(B, widths[0], *res(p["at"])))
        raise ValueError(f"unknown ConvNeXt grid kind {grid.kind!r}")

    def _place(self, module, x):
        with torch.no_grad():  # realistic LayerNorm parameters (never exactly identity)
            for m in module.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
        return self.place(module, x)

    def dense_model(self):
        """The dense deployed model (mdp_convnext) with the same structure; random weights (timing only)."""
        widths = self.adapter._stage_widths(self.base)
        mlp, removed = [], []
        for s, j, flat, layer in self.adapter._layers(self.base):
            mlp.append(0 if layer is None else layer.pwconv1.out_features)
            if layer is None:
                removed.append(flat)
        config = MDPConvNextConfig(
            num_channels=self.num_channels,
            patch_size=self.patch_size,
            hidden_sizes=widths,
            depths=[len(stage.layers) for stage in self.base.encoder.stages],
            layer_mlp_widths=mlp,
            removed_layers=removed,
            hidden_act=self.act,
            layer_norm_eps=self.eps,
            layer_scale_init_value=1e-6 if self.layer_scale else 0.0,
            num_labels=self.num_labels,
        )
        return MDPConvNextForImageClassification(config)

    def example_input(self):
        return torch.randn(self.settings.batch_size, self.num_channels, *self.image_size)


# registration ----------------------------------------------------------------------------------------
def _convnext(hidden_sizes, depths, num_labels, image_size=224, random_layer_scale=False, **kwargs):
    """A builder of a randomly initialised transformers ConvNeXt (imported only when called)."""

    def build():
        from transformers import ConvNextConfig, ConvNextForImageClassification

        config = ConvNextConfig(
            hidden_sizes=hidden_sizes, depths=depths, num_labels=num_labels, image_size=image_size, **kwargs
        )
        model = ConvNextForImageClassification(config)
        if random_layer_scale:  # tiny test variants: the default 1e-6 would hide every residual branch
            with torch.no_grad():
                for module in model.modules():
                    if getattr(module, "layer_scale_parameter", None) is not None:
                        module.layer_scale_parameter.uniform_(0.5, 1.5)
        return model

    return build


register_family(
    ModelFamily(
        name="convnext",
        adapter=ConvNextAdapter(),
        kinds=("residual", "mlp"),
        model_types=("convnext", "mdp_convnext"),
        pruned_classes=(MDPConvNextConfig, MDPConvNextModel, MDPConvNextForImageClassification),
        latency_cells=ConvNextCells,
        test_models={
            # 32x32: stem /4 -> 8x8, then 4x4, 2x2, 1x1
            "convnext": _convnext([8, 16, 24, 32], [1, 2, 1, 1], 5, image_size=32, random_layer_scale=True),
            "convnext_no_layer_scale": _convnext(
                [8, 16, 24, 32], [1, 2, 1, 1], 5, image_size=32, layer_scale_init_value=0.0
            ),
        },
        presets={
            "convnext-tiny": _convnext([96, 192, 384, 768], [3, 3, 9, 3], 1000),  # facebook/convnext-tiny-224
            "convnext-small": _convnext([96, 192, 384, 768], [3, 3, 27, 3], 1000),  # facebook/convnext-small-224
        },
    )
)
