"""MobileNetV2 adapter: transformers' MobileNetV2 (classification or headless) and mdp_mobilenet_v2.

Dimensions:
- ``stem`` (channels): the stem's first 3x3 conv output (and its depthwise conv's channels when the first
  layer is the expansion); ``stem.expansion`` (channels): the stem's 1x1 expansion when
  ``first_layer_is_expansion=False``. Both keep their full width unless ``PrunableConfig.prune_stem``.
- ``layers.{i}.expansion`` (channels): layer i's 1x1 expansion output = its depthwise conv's channels = its
  1x1 reduction's input.
- ``stages.{s}.residual`` (residual): the width of stage s, i.e. of every reduce-conv output that is summed
  together (stage 0: the stem's reduce conv; stage s > 0: the reduce conv of the s-th layer without a
  residual connection, and the reduce convs of the residual layers after it), read by the next layer's
  expansion (or the final conv).
- ``final_conv`` (channels): the 1x1 conv before pooling (1280 in transformers), read by the classifier.

Blocks: every layer with a residual connection (``layers.{i}``); removing one leaves the identity on its
stage width. Layers without a residual connection change the width or resolution and are never removed.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.initialization import no_init_weights

from ..modeling.configuration_mdp_mobilenet_v2 import MDPMobileNetV2Config
from ..modeling.modeling_mdp_mobilenet_v2 import (
    MDPMobileNetV2ConvLayer,
    MDPMobileNetV2ForImageClassification,
    MDPMobileNetV2Model,
)
from .base import (
    BatchNormTaylorScores,
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


class _Layer:
    """One inverted residual layer as the adapter sees it (``module`` is None when it was removed)."""

    def __init__(self, index, module, use_residual, stride, dilation, stage):
        self.index, self.module, self.use_residual = index, module, use_residual
        self.stride, self.dilation, self.stage = stride, dilation, stage
        self.block = f"layers.{index}" if use_residual else None
        self.expansion = f"layers.{index}.expansion"
        self.reads = _stage(stage)  # residual layers read and write their stage; others read the previous one
        self.writes = _stage(stage)
        if not use_residual:
            self.reads = _stage(stage - 1)


def _stage(s: int) -> str:
    return f"stages.{s}.residual"


class MobileNetV2Adapter(BatchNormTaylorScores, ModelAdapter):
    default_group_sizes = {"channels": 8, "residual": 8}
    stem_dimensions = ("stem", "stem.expansion")

    # structure ---------------------------------------------------------------------------------------
    @staticmethod
    def _parts(model):
        """(base model, prefix of its parameters, classifier Linear or None)."""
        if hasattr(model, "segmentation_head"):
            raise PruningSpaceError(
                f"{type(model).__name__} (semantic segmentation) is not supported: its DeepLabV3 head reads the "
                "backbone at a fixed width that mdp_mobilenet_v2 cannot express; prune MobileNetV2ForImageClassification "
                "or MobileNetV2Model"
            )
        base = getattr(model, "mobilenet_v2", None)
        if base is not None:
            linear = model.classifier if isinstance(model.classifier, nn.Linear) else None
            return base, "mobilenet_v2", linear
        if all(hasattr(model, attr) for attr in ("conv_stem", "layer", "conv_1x1")):
            return model, None, None
        raise PruningSpaceError(
            f"{type(model).__name__} does not have the MobileNetV2 layout (conv_stem, layer, conv_1x1)"
        )

    @staticmethod
    def _layers(base) -> list[_Layer]:
        config = base.config
        pruned = config.model_type == "mdp_mobilenet_v2"
        layers, stage = [], 0
        for i, module in enumerate(base.layer):
            if pruned:
                use_residual, stride, dilation = (
                    config.layer_use_residual[i],
                    config.layer_strides[i],
                    config.layer_dilations[i],
                )
            else:
                conv = module.conv_3x3.convolution
                use_residual, stride, dilation = module.use_residual, conv.stride[0], conv.dilation[0]
            stage += 0 if use_residual else 1
            present = not isinstance(module, nn.Identity)
            layers.append(_Layer(i, module if present else None, bool(use_residual), stride, dilation, stage))
        return layers

    @staticmethod
    def _stem_names(base) -> tuple[str, str]:
        """(first conv's dimension, depthwise conv's dimension) of the stem."""
        return "stem", ("stem.expansion" if base.conv_stem.expand_1x1 is not None else "stem")

    @staticmethod
    def _check_supported(base) -> None:
        act = base.config.hidden_act
        if not isinstance(act, str) or act not in ACT2FN:
            raise PruningSpaceError(
                f"MobileNetV2 hidden_act={act!r} is not supported: mdp_mobilenet_v2 names its activation (a key of "
                "transformers.activations.ACT2FN such as 'relu6'); set config.hidden_act to such a name"
            )
        if ACT2FN[act](torch.zeros(1)).abs().item() != 0:
            raise PruningSpaceError(
                f"MobileNetV2 hidden_act={act!r} is not supported: gates zero a pruned channel before the "
                "activation, which must then stay zero (act(0) == 0, as relu6 / relu / gelu / silu)"
            )

    def build_space(self, model, group_sizes=None, min_keep=None) -> PruningSpace:
        base, prefix, linear = self._parts(model)
        self._check_supported(base)
        p = f"{prefix}." if prefix else ""
        stem = base.conv_stem
        dims, blocks, aliases = {}, {}, {}

        def add_dim(name, kind, size, block=None, coupled=()):
            group, minimum = self._group_and_min(name, kind, size, group_sizes, min_keep)
            dims[name] = Dimension(name, kind, size, group, minimum, block, coupled=list(coupled))

        first, depthwise = self._stem_names(base)
        add_dim(first, "channels", stem.first_conv.convolution.out_channels, None, [f"{p}conv_stem.first_conv"])
        if stem.expand_1x1 is not None:
            add_dim("stem.expansion", "channels", stem.expand_1x1.convolution.out_channels, None)
            dims["stem.expansion"].coupled.append(f"{p}conv_stem.expand_1x1")
        dims[depthwise].coupled += [f"{p}conv_stem.conv_3x3", f"{p}conv_stem.reduce_1x1 (in)"]
        aliases["stem.depthwise"] = depthwise

        layers = self._layers(base)
        num_stages = 1 + sum(not layer.use_residual for layer in layers)
        stage_coupled = {_stage(0): [f"{p}conv_stem.reduce_1x1"]}
        stage_size = {_stage(0): stem.reduce_1x1.convolution.out_channels}
        aliases["stem.reduce"] = _stage(0)
        for layer in layers:
            lp = f"{p}layer.{layer.index}"
            if layer.module is None:
                continue
            module = layer.module
            stage_size.setdefault(layer.writes, module.reduce_1x1.convolution.out_channels)
            stage_coupled.setdefault(layer.reads, []).append(f"{lp}.expand_1x1 (in)")
            stage_coupled.setdefault(layer.writes, []).append(f"{lp}.reduce_1x1")
            aliases[f"layers.{layer.index}.reduce"] = layer.writes
            aliases[f"layers.{layer.index}.depthwise"] = layer.expansion
            add_dim(
                layer.expansion,
                "channels",
                module.expand_1x1.convolution.out_channels,
                layer.block,
                [f"{lp}.expand_1x1", f"{lp}.conv_3x3", f"{lp}.reduce_1x1 (in)"],
            )
            if layer.block is not None:
                blocks[layer.block] = Block(layer.block, "residual", [layer.expansion])
        last = _stage(num_stages - 1)
        stage_coupled.setdefault(last, []).append(f"{p}conv_1x1 (in)")
        stage_size.setdefault(last, base.conv_1x1.convolution.in_channels)
        residual_dims = {}
        for s in range(num_stages):
            name = _stage(s)
            if name not in stage_size:  # only reachable through layers that are always present
                raise PruningSpaceError(f"cannot read the width of {name}: no conv writes into it")
            group, minimum = self._group_and_min(name, "residual", stage_size[name], group_sizes, min_keep)
            residual_dims[name] = Dimension(
                name, "residual", stage_size[name], group, minimum, None, coupled=stage_coupled.get(name, [])
            )
        for layer in layers:
            if layer.block in blocks:
                residual_dims[layer.writes].shared_by.append(layer.block)
        add_dim("final_conv", "channels", base.conv_1x1.convolution.out_channels, None, [f"{p}conv_1x1"])
        if linear is not None:
            dims["final_conv"].coupled.append("classifier (in)")
        ordered = {name: dims[name] for name in ("stem", "stem.expansion") if name in dims}
        ordered.update(residual_dims)
        ordered.update({name: dim for name, dim in dims.items() if name not in ordered})
        return PruningSpace(model.config.model_type, ordered, blocks, aliases)

    # gates ----------------------------------------------------------------------------------------------
    def install_gates(self, model, space: PruningSpace) -> GateSet:
        base, _, _ = self._parts(model)
        gates = GateSet(space, device=next(model.parameters()).device)
        stem = base.conv_stem
        first, depthwise = self._stem_names(base)

        def gate_output(conv_layer, get_gate):
            # right after BatchNorm (before the activation, which keeps zeros at zero: checked in build_space)
            def hook(module, args, output):
                return output * get_gate(output.dtype).view(1, -1, 1, 1)

            gates.on_output(conv_layer.normalization, hook)

        def dim(name):
            return lambda dtype: gates.dim(name, dtype)

        gate_output(stem.first_conv, dim(first))
        if stem.expand_1x1 is not None:
            gate_output(stem.expand_1x1, dim(depthwise))
        gate_output(stem.conv_3x3, dim(depthwise))  # a zero input channel leaves BN's shift: gate again
        gate_output(stem.reduce_1x1, dim(_stage(0)))
        for layer in self._layers(base):
            if layer.module is None:
                continue
            gate_output(layer.module.expand_1x1, dim(layer.expansion))
            gate_output(layer.module.conv_3x3, dim(layer.expansion))
            if layer.block is None:
                gate_output(layer.module.reduce_1x1, dim(layer.writes))
            else:
                gate_output(
                    layer.module.reduce_1x1,
                    lambda dtype, r=layer.writes, b=layer.block: gates.dim(r, dtype) * gates.block(b, dtype),
                )
        gate_output(base.conv_1x1, dim("final_conv"))
        return gates

    # slicing --------------------------------------------------------------------------------------------
    def slice(self, model, space: PruningSpace, choice: PruningChoice):
        choice.validate(space)
        base, prefix, linear = self._parts(model)
        self._check_supported(base)
        kept = {name: torch.tensor(choice.kept_indices(space, name)) for name in space.dimensions}
        removed_now = set(choice.removed_blocks)
        state: dict[str, torch.Tensor] = {}
        bp = "mobilenet_v2."
        stem = base.conv_stem
        first, depthwise = self._stem_names(base)

        def put(name, conv_layer, out_idx, in_idx=None):
            weight = conv_layer.convolution.weight[out_idx]
            if in_idx is not None:
                weight = weight[:, in_idx]
            state[f"{name}.convolution.weight"] = weight.detach().clone()
            norm = conv_layer.normalization
            for attr in ("weight", "bias", "running_mean", "running_var"):
                state[f"{name}.normalization.{attr}"] = getattr(norm, attr)[out_idx].detach().clone()
            state[f"{name}.normalization.num_batches_tracked"] = norm.num_batches_tracked.detach().clone()

        put(f"{bp}conv_stem.first_conv", stem.first_conv, kept[first])
        if stem.expand_1x1 is not None:
            put(f"{bp}conv_stem.expand_1x1", stem.expand_1x1, kept[depthwise], kept[first])
        put(f"{bp}conv_stem.conv_3x3", stem.conv_3x3, kept[depthwise])  # depthwise: one input channel per group
        put(f"{bp}conv_stem.reduce_1x1", stem.reduce_1x1, kept[_stage(0)], kept[depthwise])
        layers = self._layers(base)
        expansion_widths, removed_layers = [], []
        for layer in layers:
            if layer.module is None or layer.block in removed_now:
                removed_layers.append(layer.index)
                expansion_widths.append(0)  # a removed layer has no expansion; the list stays aligned
                continue
            lp, module, idx = f"{bp}layer.{layer.index}", layer.module, kept[layer.expansion]
            put(f"{lp}.expand_1x1", module.expand_1x1, idx, kept[layer.reads])
            put(f"{lp}.conv_3x3", module.conv_3x3, idx)
            put(f"{lp}.reduce_1x1", module.reduce_1x1, kept[layer.writes], idx)
            expansion_widths.append(len(idx))
        num_stages = 1 + sum(not layer.use_residual for layer in layers)
        put(f"{bp}conv_1x1", base.conv_1x1, kept["final_conv"], kept[_stage(num_stages - 1)])
        if linear is not None:
            state["classifier.weight"] = linear.weight[:, kept["final_conv"]].detach().clone()
            state["classifier.bias"] = linear.bias.detach().clone()

        source = model.config
        if source.model_type == "mdp_mobilenet_v2":
            base_info = (source.base_model_type, source.base_model_name_or_path, source.base_config)
        else:
            base_info = (source.model_type, source.name_or_path or None, source.to_dict())
        classify = prefix is not None
        config = MDPMobileNetV2Config(
            num_channels=source.num_channels,
            image_size=source.image_size,
            stem_channels=len(kept[first]),
            stem_expand_channels=len(kept[depthwise]) if stem.expand_1x1 is not None else None,
            stage_widths=[len(kept[_stage(s)]) for s in range(num_stages)],
            expansion_widths=expansion_widths,
            layer_use_residual=[layer.use_residual for layer in layers],
            layer_strides=[layer.stride for layer in layers],
            layer_dilations=[layer.dilation for layer in layers],
            removed_layers=removed_layers,
            final_channels=len(kept["final_conv"]),
            hidden_act=source.hidden_act,
            tf_padding=source.tf_padding,
            layer_norm_eps=base.conv_1x1.normalization.eps,
            classifier_dropout_prob=source.classifier_dropout_prob,
            initializer_range=source.initializer_range,
            add_pooling_layer=base.pooler is not None,
            base_model_type=base_info[0],
            base_model_name_or_path=base_info[1],
            base_config=base_info[2],
            id2label=source.id2label,
            label2id=source.label2id,
            architectures=["MDPMobileNetV2ForImageClassification" if classify else "MDPMobileNetV2Model"],
        )
        with no_init_weights():  # every parameter and buffer is overwritten below (strict load)
            if classify:
                pruned = MDPMobileNetV2ForImageClassification(config)
            else:
                state = {k.removeprefix(bp): v for k, v in state.items()}
                pruned = MDPMobileNetV2Model(config)
        pruned.load_state_dict(state, strict=True)
        return pruned.to(next(model.parameters()).dtype).eval()

    # importance -----------------------------------------------------------------------------------------
    # The paper's CNN importance (NVlabs/MDP, resnet50: calc_importance / update_neuron_metric_mdp), as for
    # ResNet: a channel's score is |gamma dL/dgamma + beta dL/dbeta| of the BatchNorm after the conv that
    # produces it (the expansion conv for an expansion width, the first conv for the stem, the final conv);
    # a residual width's members (every reduce conv writing into the stage) are summed before |.|, and the
    # combined score is split among them in proportion to each member's own |.| (score_shares).
    def _members(self, base) -> dict[str, list[tuple[str | None, nn.BatchNorm2d]]]:
        """Per dimension: (block or None, BatchNorm) of every conv whose output channels are the dimension's."""
        stem = base.conv_stem
        members = {"stem": [(None, stem.first_conv.normalization)]}
        if stem.expand_1x1 is not None:
            members["stem.expansion"] = [(None, stem.expand_1x1.normalization)]
        members[_stage(0)] = [(None, stem.reduce_1x1.normalization)]
        for layer in self._layers(base):
            if layer.module is None:
                continue
            members[layer.expansion] = [(layer.block, layer.module.expand_1x1.normalization)]
            members.setdefault(layer.writes, []).append((layer.block, layer.module.reduce_1x1.normalization))
        members["final_conv"] = [(None, base.conv_1x1.normalization)]
        return members

    def bn_members(self, model):
        return self._members(self._parts(model)[0])

    @torch.no_grad()
    def unit_magnitudes(self, model, space: PruningSpace) -> dict[str, torch.Tensor]:
        base, _, _ = self._parts(model)
        stem = base.conv_stem
        first, depthwise = self._stem_names(base)
        out = {name: torch.zeros(dim.size, dtype=torch.float64) for name, dim in space.dimensions.items()}

        def add(name, conv_layer):  # squared L2 norm of each output filter
            out[name] += conv_layer.convolution.weight.detach().double().square().flatten(1).sum(1).cpu()

        add(first, stem.first_conv)
        if stem.expand_1x1 is not None:
            add(depthwise, stem.expand_1x1)
        add(depthwise, stem.conv_3x3)
        add(_stage(0), stem.reduce_1x1)
        for layer in self._layers(base):
            if layer.module is None:
                continue
            add(layer.expansion, layer.module.expand_1x1)
            add(layer.expansion, layer.module.conv_3x3)
            add(layer.writes, layer.module.reduce_1x1)
        add("final_conv", base.conv_1x1)
        return out

    def expected_num_parameters(self, config: MDPMobileNetV2Config) -> int:
        def conv_bn(cin, cout, k=1):
            return cin * cout * k * k + 2 * cout

        def depthwise(width):
            return width * 9 + 2 * width

        stem, expand = config.stem_channels, config.stem_expand_channels
        total = conv_bn(config.num_channels, stem, 3)
        if expand is not None:
            total += conv_bn(stem, expand, 1)
        width = expand if expand is not None else stem
        total += depthwise(width) + conv_bn(width, config.stage_widths[0])
        removed, stage = set(config.removed_layers), 0
        for i, use_residual in enumerate(config.layer_use_residual):
            cin = config.stage_widths[stage]
            stage += 0 if use_residual else 1
            if i not in removed:
                e = config.expansion_widths[i]
                total += conv_bn(cin, e) + depthwise(e) + conv_bn(e, config.stage_widths[stage])
        total += conv_bn(config.stage_widths[-1], config.final_channels)
        if has_classifier(config) and config.num_labels > 0:
            total += config.final_channels * config.num_labels + config.num_labels
        return total


# latency cells ---------------------------------------------------------------------------------------
"""Cells time the deployed modules of ``modeling_mdp_mobilenet_v2`` at the input resolution each conv sees in
the model (recorded with forward hooks at the table's image size). One grid per distinct conv shape (kind,
stride, dilation, input resolution, width grids); identical convs share it.

- ``mnv2.first_conv`` [stem]: the stem's 3x3 stride-2 conv + BN + activation on the image;
- ``mnv2.pointwise`` [out, in]: a 1x1 conv + BN (+ activation for an expansion or the final conv);
  expansions read a stage width, reduce convs of layers without a residual connection write one;
- ``mnv2.depthwise`` [width]: a depthwise 3x3 conv + BN + activation (TF padding included);
- ``mnv2.pointwise_add`` [stage, expansion]: the reduce conv of a residual layer + BN, plus the residual add;
- ``mnv2.head`` [final_conv]: global average pool + flatten + dropout + linear classifier.
Terms of a residual layer are paid while its block is kept; every other term is always paid.
"""


class _PointwiseAdd(nn.Module):
    """Reduce conv + BN, then the residual add (as MDPMobileNetV2InvertedResidual computes it)."""

    def __init__(self, config, cin, cout):
        super().__init__()
        self.conv = MDPMobileNetV2ConvLayer(config, cin, cout, 1, activation=False)

    def forward(self, hidden_states, residual):
        return residual + self.conv(hidden_states)


class _Head(nn.Module):
    """Pool + flatten + dropout + classifier exactly as MDPMobileNetV2Model / ...ForImageClassification."""

    def __init__(self, width, num_labels, dropout):
        super().__init__()
        self.pooler = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout, inplace=True)
        self.classifier = nn.Linear(width, num_labels) if num_labels > 0 else nn.Identity()

    def forward(self, hidden_states):
        return self.classifier(self.dropout(torch.flatten(self.pooler(hidden_states), start_dim=1)))


class MobileNetV2Cells(LatencyCells):
    def __init__(self, model, space, settings):
        super().__init__(model, space, settings)
        self.adapter = MobileNetV2Adapter()
        self.base, self.prefix, self.linear = self.adapter._parts(model)
        config = model.config
        size = settings.image_size or getattr(config, "image_size", None) or 224
        self.image_size = list(size) if isinstance(size, (list, tuple)) else [size, size]
        self.num_channels = config.num_channels
        self.num_labels = self.linear.out_features if self.linear is not None else 0
        self.conv_config = SimpleNamespace(
            tf_padding=config.tf_padding,
            layer_norm_eps=self.base.conv_1x1.normalization.eps,
            hidden_act=config.hidden_act,
        )
        self.dropout = getattr(config, "classifier_dropout_prob", 0.0)
        self._record_shapes(model)

    def _record_shapes(self, model) -> None:
        """Input shape of every conv layer, and the final conv's output, at the table's image size."""
        shapes: dict[int, tuple] = {}
        handles = []

        def hook(module, args, output):
            shapes[id(module)] = (tuple(args[0].shape), tuple(output.shape))

        for module in self.base.modules():
            if hasattr(module, "convolution") and hasattr(module, "normalization"):
                handles.append(module.register_forward_hook(hook))
        try:
            param = next(model.parameters())
            x = torch.zeros(1, self.num_channels, *self.image_size, dtype=param.dtype, device=param.device)
            with torch.inference_mode():
                model(x)
        finally:
            for handle in handles:
                handle.remove()
        self.shapes = shapes

    def model_shapes(self) -> dict:
        layers = self.adapter._layers(self.base)
        return {
            "family": "mobilenet_v2",
            "image_size": self.image_size,
            "num_labels": self.num_labels,
            "hidden_act": self.conv_config.hidden_act,
            "tf_padding": bool(self.conv_config.tf_padding),
            "stem_expansion": self.base.conv_stem.expand_1x1 is not None,
            "layer_use_residual": [layer.use_residual for layer in layers],
            "layer_strides": [layer.stride for layer in layers],
            "layer_dilations": [layer.dilation for layer in layers],
            "pooling": self.base.pooler is not None,
        }

    # plan ----------------------------------------------------------------------------------------------
    def plan(self) -> tuple[list[TimingGrid], list[TimingTerm]]:
        dims = self.space.dimensions
        terms: list[TimingTerm] = []

        grid = GridCatalog()  # identical blocks share a grid

        def at(conv_layer):
            shape = self.shapes[id(conv_layer)][0]
            return f"{shape[2]}x{shape[3]}"

        def pointwise(name, conv_layer, out_dim, in_dim, block, act=True, add=False):
            kind = "mnv2.pointwise_add" if add else "mnv2.pointwise"
            params = {"in": at(conv_layer)} if add else {"in": at(conv_layer), "act": act}
            key = grid(kind, [dims[out_dim], dims[in_dim]], params)
            terms.append(TimingTerm(name, key, [out_dim, in_dim], block, input_axes=[1]))

        def depthwise_conv(name, conv_layer, dim, block):
            conv = conv_layer.convolution
            params = {"in": at(conv_layer), "s": conv.stride[0], "d": conv.dilation[0]}
            terms.append(TimingTerm(name, grid("mnv2.depthwise", [dims[dim]], params), [dim], block))

        stem = self.base.conv_stem
        first, depth = self.adapter._stem_names(self.base)
        key = grid("mnv2.first_conv", [dims[first]], {"in": at(stem.first_conv), "cin": self.num_channels})
        terms.append(TimingTerm("stem.first_conv", key, [first], None))
        if stem.expand_1x1 is not None:
            pointwise("stem.expand", stem.expand_1x1, depth, first, None)
        depthwise_conv("stem.depthwise", stem.conv_3x3, depth, None)
        pointwise("stem.reduce", stem.reduce_1x1, _stage(0), depth, None, act=False)
        last = _stage(0)
        for layer in self.adapter._layers(self.base):
            last = layer.writes
            if layer.module is None:
                continue
            module, name, e = layer.module, f"layers.{layer.index}", layer.expansion
            pointwise(f"{name}.expand", module.expand_1x1, e, layer.reads, layer.block)
            depthwise_conv(f"{name}.depthwise", module.conv_3x3, e, layer.block)
            add = layer.block is not None
            pointwise(f"{name}.reduce", module.reduce_1x1, layer.writes, e, layer.block, act=False, add=add)
        pointwise("final_conv", self.base.conv_1x1, "final_conv", last, None)
        if self.base.pooler is not None:
            _, out = self.shapes[id(self.base.conv_1x1)]
            params = {"at": f"{out[2]}x{out[3]}", "labels": self.num_labels}
            terms.append(TimingTerm("pool+classifier", grid("mnv2.head", [dims["final_conv"]], params), ["final_conv"]))
        return grid.all(), terms

    # cells ---------------------------------------------------------------------------------------------
    def build_cell(self, table, widths: tuple[int, ...]):
        B, p, c = self.settings.batch_size, table.params, self.conv_config

        def res(text):
            return [int(v) for v in text.split("x")]

        if table.kind == "mnv2.first_conv":
            module = MDPMobileNetV2ConvLayer(c, p["cin"], widths[0], 3, stride=2)
            return self._place(module, (torch.randn(B, p["cin"], *res(p["in"])),))
        if table.kind == "mnv2.pointwise":
            cout, cin = widths
            module = MDPMobileNetV2ConvLayer(c, cin, cout, 1, activation=p["act"])
            return self._place(module, (torch.randn(B, cin, *res(p["in"])),))
        if table.kind == "mnv2.pointwise_add":
            cout, cin = widths
            x = torch.randn(B, cin, *res(p["in"]))
            return self._place(_PointwiseAdd(c, cin, cout), (x, torch.randn(B, cout, *res(p["in"]))))
        if table.kind == "mnv2.depthwise":
            (width,) = widths
            module = MDPMobileNetV2ConvLayer(c, width, width, 3, stride=p["s"], groups=width, dilation=p["d"])
            return self._place(module, (torch.randn(B, width, *res(p["in"])),))
        if table.kind == "mnv2.head":
            module = _Head(widths[0], p["labels"], self.dropout)
            return self._place(module, (torch.randn(B, widths[0], *res(p["at"])),))
        raise ValueError(f"unknown MobileNetV2 grid kind {table.kind!r}")

    def _place(self, module, args):
        dtype, device = self.settings.torch_dtype, self.settings.device
        module = module.to(device=device, dtype=dtype).eval()
        with torch.no_grad():  # realistic BN statistics (never exactly identity)
            for m in module.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_var.uniform_(0.5, 1.5)
        return module, tuple(a.to(device=device, dtype=dtype) for a in args)

    def dense_model(self):
        """The dense deployed model (mdp_mobilenet_v2) with this model's structure and weights."""
        return self.adapter.slice(self.model, self.space, self.space.full_choice())

    def example_input(self):
        return torch.randn(self.settings.batch_size, self.num_channels, *self.image_size)


# registration ----------------------------------------------------------------------------------------
def _mobilenet_v2(signal_init: bool = False, **config_kwargs):
    """A builder of a randomly initialised transformers MobileNetV2ForImageClassification (imported when called).

    ``signal_init``: conv weights drawn with std 2 / sqrt(fan_in) and the classifier with 1 / sqrt(fan_in)
    instead of transformers' std 0.02, with which a tiny model's output does not depend on its input (the
    BatchNorm shifts dominate), so pruning mistakes in tests would not show."""

    def build():
        from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

        model = MobileNetV2ForImageClassification(MobileNetV2Config(**config_kwargs))
        if signal_init:
            with torch.no_grad():
                for module in model.modules():
                    if isinstance(module, (nn.Conv2d, nn.Linear)):
                        fan_in = module.weight[0].numel()
                        gain = 2.0 if isinstance(module, nn.Conv2d) else 1.0
                        module.weight.normal_(0.0, gain / fan_in**0.5)
        return model

    return build


# tiny: 16 layers as transformers builds them, widths of 4..16 channels (final conv 64), 32x32 input
_TINY = dict(
    depth_multiplier=0.05,
    depth_divisible_by=2,
    min_depth=4,
    expand_ratio=2.0,
    finegrained_output=False,
    image_size=32,
    num_labels=5,
)

register_family(
    ModelFamily(
        name="mobilenet_v2",
        adapter=MobileNetV2Adapter(),
        kinds=("channels", "residual"),
        model_types=("mobilenet_v2", "mdp_mobilenet_v2"),
        pruned_classes=(MDPMobileNetV2Config, MDPMobileNetV2Model, MDPMobileNetV2ForImageClassification),
        latency_cells=MobileNetV2Cells,
        test_models={
            "mobilenet_v2": _mobilenet_v2(signal_init=True, **_TINY),
            # symmetric padding, a stem with its own 1x1 expansion, dilated depthwise convs after stride 8
            "mobilenet_v2_no_tf_padding": _mobilenet_v2(
                signal_init=True, **_TINY, tf_padding=False, first_layer_is_expansion=False, output_stride=8
            ),
        },
        presets={
            "tiny-mobilenet-v2": _mobilenet_v2(signal_init=True, **_TINY),
            "mobilenet-v2-1.0": _mobilenet_v2(num_labels=1001),
            "mobilenet-v2-1.4": _mobilenet_v2(depth_multiplier=1.4, num_labels=1001),
        },
    )
)
