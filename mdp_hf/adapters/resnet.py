"""ResNet-family adapter: transformers' ResNet (basic and bottleneck layers) and mdp_resnet.

Dimensions: the output channels of every inner conv of a layer (conv1 / conv2 of a bottleneck, conv1
of a basic layer), and one residual width per group of coupled tensors: every conv that adds into a
stage's residual stream (each layer's last conv, the stage's projection shortcut) shares it, and an
identity shortcut couples a stage to its producer (the stem, or the previous stage). Blocks: each
layer's residual branch; removing it keeps a projection shortcut (``out = relu(shortcut(x))``), so
the stem and the projections sit outside every block and are never removed. A deep stem (three 3x3
convs, mdp_resnet's ``stem_inner_widths``, e.g. from timm's ResNet-C/D) adds the widths of its first two
convs, ``stem.conv1`` and ``stem.conv2``; the third outputs ``stem``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.initialization import no_init_weights

from ..modeling.configuration_mdp_resnet import MDPResNetConfig
from ..modeling.modeling_mdp_resnet import (
    MDPResNetConvLayer,
    MDPResNetEmbeddings,
    MDPResNetForImageClassification,
    MDPResNetModel,
    MDPResNetShortCut,
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


class ResNetAdapter(BatchNormTaylorScores, ModelAdapter):
    default_group_sizes = {"channels": 8, "residual": 8}

    @staticmethod
    def _parts(model):
        if hasattr(model, "out_features") and hasattr(model, "stage_names"):  # transformers' *Backbone classes
            raise PruningSpaceError(
                f"{type(model).__name__} returns multi-scale feature maps for a detector, which mdp_hf cannot "
                "prune yet (the detector's neck reads fixed stage widths); prune ResNetModel or "
                "ResNetForImageClassification instead"
            )
        base = getattr(model, "resnet", None)
        if base is not None:
            if not isinstance(model.classifier[1], nn.Linear):
                raise PruningSpaceError(
                    f"{type(model).__name__} has no linear head (num_labels=0); load it as ResNetModel (the "
                    "headless model, supported) or give it num_labels"
                )
            return base, "resnet", model.classifier[1]
        if hasattr(model, "embedder") and hasattr(model, "encoder"):
            return model, None, None
        raise PruningSpaceError(f"{type(model).__name__} does not have the ResNet layout (embedder + encoder)")

    @staticmethod
    def _layers(base):
        """(stage, index in stage, flat index, layer module) for every layer."""
        flat = 0
        for s, stage in enumerate(base.encoder.stages):
            for j, layer in enumerate(stage.layers):
                yield s, j, flat, layer
                flat += 1

    @staticmethod
    def _stem_convs(base) -> list:
        """The conv layers of a deep stem before the one that outputs the stem width (none for a 7x7 stem)."""
        stem = getattr(base.embedder, "stem", None)
        return list(stem) if stem is not None else []

    @staticmethod
    def _has_projection(layer) -> bool:
        return not isinstance(layer.shortcut, nn.Identity)

    @staticmethod
    def _stage_width(stage) -> int | None:
        """Residual width of a stage from any conv writing into it; None when every branch was removed
        and the shortcuts are identities (then the width is its producer's, which shares the name)."""
        for layer in stage.layers:
            if not isinstance(layer.shortcut, nn.Identity):
                return layer.shortcut.convolution.out_channels
            if layer.layer is not None:
                return layer.layer[-1].convolution.out_channels
        return None

    def _residual_names(self, base) -> tuple[str, list[str]]:
        """Dimension name of the stem output and of each stage's residual width (identity shortcuts couple)."""
        names = ["stem"]  # producer name per stage input
        stage_names = []
        for s, stage in enumerate(base.encoder.stages):
            producer = names[-1]
            stage_names.append(producer if not self._has_projection(stage.layers[0]) else f"stages.{s}.residual")
            names.append(stage_names[-1])
        return names[0], stage_names

    def build_space(self, model, group_sizes=None, min_keep=None) -> PruningSpace:
        base, prefix, linear = self._parts(model)
        p = f"{prefix}." if prefix else ""
        dims, blocks, aliases = {}, {}, {}

        def add_dim(name, kind, size, block=None, coupled=()):
            group, minimum = self._group_and_min(name, kind, size, group_sizes, min_keep)
            dims[name] = Dimension(name, kind, size, group, minimum, block, coupled=list(coupled))

        stem_name, stage_names = self._residual_names(base)
        stem_channels = base.embedder.embedder.convolution.out_channels
        coupled: dict[str, list[str]] = {stem_name: [f"{p}embedder.embedder"]}
        stem_convs = self._stem_convs(base)
        for k, conv in enumerate(stem_convs, start=1):
            add_dim(f"stem.conv{k}", "channels", conv.convolution.out_channels, None, [f"{p}embedder.stem.{k - 1}"])
        if stem_convs:
            aliases[f"stem.conv{len(stem_convs) + 1}"] = stem_name
        for s, j, flat, layer in self._layers(base):
            lp = f"{p}encoder.stages.{s}.layers.{j}"
            if self._has_projection(layer):
                coupled.setdefault(stage_names[s], []).append(f"{lp}.shortcut")
                aliases[f"stages.{s}.layers.{j}.shortcut"] = stage_names[s]
            if layer.layer is None:
                continue
            block = f"stages.{s}.layers.{j}"
            convs = list(layer.layer)
            inner = []
            for k, conv in enumerate(convs[:-1], start=1):
                name = f"{block}.conv{k}"
                add_dim(name, "channels", conv.convolution.out_channels, block, [f"{lp}.layer.{k - 1}"])
                inner.append(name)
            coupled.setdefault(stage_names[s], []).append(f"{lp}.layer.{len(convs) - 1}")
            aliases[f"{block}.conv{len(convs)}"] = stage_names[s]
            blocks[block] = Block(block, "residual", inner)
        if linear is not None:
            coupled.setdefault(stage_names[-1], []).append("classifier.1 (in)")
        # residual widths first (in network order), then inner dims
        residual_dims = {}
        for name, size in [(stem_name, stem_channels)] + [
            (name, self._stage_width(stage)) for name, stage in zip(stage_names, base.encoder.stages)
        ]:
            if name not in residual_dims:
                group, minimum = self._group_and_min(name, "residual", size, group_sizes, min_keep)
                residual_dims[name] = Dimension(
                    name, "residual", size, group, minimum, None, coupled=coupled.get(name, [])
                )
        # a residual width is shared by every block that reads it (first conv) or writes into it (last conv)
        producer = stem_name
        for s, j, flat, layer in self._layers(base):
            block = f"stages.{s}.layers.{j}"
            if block in blocks:
                for name in dict.fromkeys((producer, stage_names[s])):
                    residual_dims[name].shared_by.append(block)
            producer = stage_names[s]
        if linear is None:  # a headless model's output is its last residual width: what its consumer reads
            last = residual_dims[stage_names[-1]]
            last.min_keep = last.size
        return PruningSpace(model.config.model_type, {**residual_dims, **dims}, blocks, aliases)

    def install_gates(self, model, space: PruningSpace) -> GateSet:
        base, _, _ = self._parts(model)
        gates = GateSet(space, device=next(model.parameters()).device)
        stem_name, stage_names = self._residual_names(base)

        def gate_output(norm, get_gate):
            # Gate right after BatchNorm: its gradient is the BN Taylor score |gamma dL/dgamma + beta dL/dbeta|.
            def hook(module, args, output):
                return output * get_gate(output.dtype).view(1, -1, 1, 1)

            gates.on_output(norm, hook)

        for k, conv in enumerate(self._stem_convs(base), start=1):
            gate_output(conv.normalization, lambda dtype, n=f"stem.conv{k}": gates.dim(n, dtype))
        gate_output(base.embedder.embedder.normalization, lambda dtype: gates.dim(stem_name, dtype))
        for s, j, flat, layer in self._layers(base):
            residual = stage_names[s]
            if self._has_projection(layer):
                gate_output(layer.shortcut.normalization, lambda dtype, r=residual: gates.dim(r, dtype))
            if layer.layer is None:
                continue
            block = f"stages.{s}.layers.{j}"
            convs = list(layer.layer)
            for k, conv in enumerate(convs[:-1], start=1):
                gate_output(conv.normalization, lambda dtype, n=f"{block}.conv{k}": gates.dim(n, dtype))
            gate_output(
                convs[-1].normalization,
                lambda dtype, r=residual, b=block: gates.dim(r, dtype) * gates.block(b, dtype),
            )
        return gates

    def slice(self, model, space: PruningSpace, choice: PruningChoice):
        choice.validate(space)
        base, prefix, linear = self._parts(model)
        stem_name, stage_names = self._residual_names(base)
        kept = {name: torch.tensor(choice.kept_indices(space, name)) for name in space.dimensions}
        removed_now = set(choice.removed_blocks)
        state: dict[str, torch.Tensor] = {}
        bp = "resnet."

        def put_conv_layer(name, conv_layer, out_idx, in_idx):
            weight = conv_layer.convolution.weight[out_idx]
            if in_idx is not None:
                weight = weight[:, in_idx]
            state[f"{name}.convolution.weight"] = weight.detach().clone()
            norm = conv_layer.normalization
            for attr in ("weight", "bias", "running_mean", "running_var"):
                state[f"{name}.normalization.{attr}"] = getattr(norm, attr)[out_idx].detach().clone()
            state[f"{name}.normalization.num_batches_tracked"] = norm.num_batches_tracked.detach().clone()

        stem_convs, previous = self._stem_convs(base), None
        for k, conv in enumerate(stem_convs, start=1):
            put_conv_layer(f"{bp}embedder.stem.{k - 1}", conv, kept[f"stem.conv{k}"], previous)
            previous = kept[f"stem.conv{k}"]
        put_conv_layer(f"{bp}embedder.embedder", base.embedder.embedder, kept[stem_name], previous)
        inner_widths, has_projection, removed_layers = [], [], []
        producer = stem_name
        for s, j, flat, layer in self._layers(base):
            residual = stage_names[s]
            lp = f"{bp}encoder.stages.{s}.layers.{j}"
            has_projection.append(self._has_projection(layer))
            if has_projection[-1]:
                put_conv_layer(f"{lp}.shortcut", layer.shortcut, kept[residual], kept[producer])
            block = f"stages.{s}.layers.{j}"
            convs = list(layer.layer) if layer.layer is not None else []
            if not convs or block in removed_now:
                removed_layers.append(flat)
                # a removed branch keeps its (unused) widths in the config so the layer list stays aligned
                inner_widths.append([1] * (2 if base.config.layer_type == "bottleneck" else 1))
            else:
                widths, previous = [], kept[producer]
                for k, conv in enumerate(convs[:-1], start=1):
                    idx = kept[f"{block}.conv{k}"]
                    put_conv_layer(f"{lp}.layer.{k - 1}", conv, idx, previous)
                    widths.append(len(idx))
                    previous = idx
                put_conv_layer(f"{lp}.layer.{len(convs) - 1}", convs[-1], kept[residual], previous)
                inner_widths.append(widths)
            producer = residual
        if linear is not None:
            state["classifier.1.weight"] = linear.weight[:, kept[stage_names[-1]]].detach().clone()
            state["classifier.1.bias"] = linear.bias.detach().clone()

        source = model.config
        if source.model_type == "mdp_resnet":
            base_info = (source.base_model_type, source.base_model_name_or_path, source.base_config)
        else:
            base_info = (source.model_type, source.name_or_path or None, source.to_dict())
        config = MDPResNetConfig(
            num_channels=source.num_channels,
            embedding_size=len(kept[stem_name]),
            hidden_sizes=[len(kept[name]) for name in stage_names],
            depths=[len(stage.layers) for stage in base.encoder.stages],
            layer_type=source.layer_type,
            hidden_act=source.hidden_act,
            downsample_in_first_stage=source.downsample_in_first_stage,
            downsample_in_bottleneck=getattr(source, "downsample_in_bottleneck", False),
            layer_inner_widths=inner_widths,
            layer_has_projection=has_projection,
            removed_layers=removed_layers,
            stem_inner_widths=[len(kept[f"stem.conv{k}"]) for k in range(1, len(stem_convs) + 1)] or None,
            avg_down=bool(getattr(source, "avg_down", False)),
            preprocessing=getattr(source, "preprocessing", None),
            base_model_type=base_info[0],
            base_model_name_or_path=base_info[1],
            base_config=base_info[2],
            id2label=source.id2label,
            label2id=source.label2id,
            architectures=["MDPResNetForImageClassification" if prefix else "MDPResNetModel"],
        )
        with no_init_weights():  # every parameter and buffer is overwritten below (strict load)
            if prefix is None:
                state = {k.removeprefix(bp): v for k, v in state.items()}
                pruned = MDPResNetModel(config)
            else:
                pruned = MDPResNetForImageClassification(config)
        pruned.load_state_dict(state, strict=True)
        return pruned.to(next(model.parameters()).dtype).eval()

    # importance ----------------------------------------------------------------------------------------
    # Official (NVlabs/MDP resnet50+ablation/prune/pruning.py, calc_importance / update_neuron_metric_mdp): a
    # channel's score is |gamma dL/dgamma + beta dL/dbeta| of the BatchNorm after its conv; a residual width's
    # members (the BNs writing into it: each branch's last conv, the projection shortcuts, the stem) are summed
    # before |.|, and that combined score is split among the members in proportion to each member's own |.|.
    stem_dimensions = ("stem", "stem.conv1", "stem.conv2")

    def _members(self, base) -> dict[str, list[tuple[str | None, nn.BatchNorm2d]]]:
        """Per dimension: (block or None, BatchNorm) of every layer whose output channels are the dimension's."""
        stem_name, stage_names = self._residual_names(base)
        members = {f"stem.conv{k}": [(None, c.normalization)] for k, c in enumerate(self._stem_convs(base), start=1)}
        members[stem_name] = [(None, base.embedder.embedder.normalization)]
        for s, j, flat, layer in self._layers(base):
            if self._has_projection(layer):
                members.setdefault(stage_names[s], []).append((None, layer.shortcut.normalization))
            if layer.layer is None:
                continue
            block = f"stages.{s}.layers.{j}"
            convs = list(layer.layer)
            for k, conv in enumerate(convs[:-1], start=1):
                members[f"{block}.conv{k}"] = [(block, conv.normalization)]
            members.setdefault(stage_names[s], []).append((block, convs[-1].normalization))
        return members

    def bn_members(self, model):
        return self._members(self._parts(model)[0])

    @torch.no_grad()
    def unit_magnitudes(self, model, space: PruningSpace) -> dict[str, torch.Tensor]:
        base, _, _ = self._parts(model)
        stem_name, stage_names = self._residual_names(base)
        out = {name: torch.zeros(dim.size, dtype=torch.float64) for name, dim in space.dimensions.items()}

        def add(name, conv):  # squared L2 norm of each output filter
            out[name] += conv.weight.detach().double().square().flatten(1).sum(1).cpu()

        for k, conv in enumerate(self._stem_convs(base), start=1):
            add(f"stem.conv{k}", conv.convolution)
        add(stem_name, base.embedder.embedder.convolution)
        for s, j, flat, layer in self._layers(base):
            if self._has_projection(layer):
                add(stage_names[s], layer.shortcut.convolution)
            if layer.layer is None:
                continue
            convs = list(layer.layer)
            for k, conv in enumerate(convs[:-1], start=1):
                add(f"stages.{s}.layers.{j}.conv{k}", conv.convolution)
            add(stage_names[s], convs[-1].convolution)
        return out

    def expected_num_parameters(self, config: MDPResNetConfig) -> int:
        def conv_bn(cin, cout, k):
            return cin * cout * k * k + 2 * cout

        inner = config.stem_inner_widths
        if inner:  # deep stem: three 3x3 convs
            total = (
                conv_bn(config.num_channels, inner[0], 3)
                + conv_bn(inner[0], inner[1], 3)
                + conv_bn(inner[1], config.embedding_size, 3)
            )
        else:
            total = conv_bn(config.num_channels, config.embedding_size, 7)
        removed = set(config.removed_layers)
        cin, flat = config.embedding_size, 0
        for width, depth in zip(config.hidden_sizes, config.depths):
            for _ in range(depth):
                if config.layer_has_projection[flat]:
                    total += conv_bn(cin, width, 1)
                if flat not in removed:
                    inner = config.layer_inner_widths[flat]
                    if config.layer_type == "bottleneck":
                        total += (
                            conv_bn(cin, inner[0], 1) + conv_bn(inner[0], inner[1], 3) + conv_bn(inner[1], width, 1)
                        )
                    else:
                        total += conv_bn(cin, inner[0], 3) + conv_bn(inner[0], width, 3)
                cin, flat = width, flat + 1
        if has_classifier(config) and config.num_labels > 0:
            total += cin * config.num_labels + config.num_labels
        return total


# latency cells ---------------------------------------------------------------------------------------
"""Cells time the deployed modules of ``modeling_mdp_resnet`` at the input resolution each conv sees in
the model (recorded with forward hooks at the table's image size). One table per distinct conv shape
(kind, kernel, stride, input resolution, width grids); identical convs share it.

- ``resnet.conv`` [own out channels, producer channels]: an inner conv + BN + activation of a layer
  (conv1's producer is the stage input residual width, conv2's is conv1);
- ``resnet.conv_add`` [stage residual, previous inner conv]: the last conv + BN, plus the residual add;
- ``resnet.shortcut`` [stage residual, stage input residual]: a projection shortcut (conv 1x1 + BN; with
  ``pool=avg`` the ResNet-D average pool before it), outside every block (a removed layer keeps it);
- ``resnet.relu`` [stage residual]: the activation after the add (paid even when the branch is removed);
- ``resnet.stem`` [stem]: conv 7x7 + BN + ReLU + max-pool; a deep stem is instead ``resnet.stem_conv``
  [stem.conv1] (first 3x3 conv + BN + activation, fixed input channels), ``resnet.conv`` [stem.conv2,
  stem.conv1] and [stem, stem.conv2], and ``resnet.maxpool`` [stem];
- ``resnet.head`` [last residual]: global average pool + flatten + linear classifier.
"""


class _ConvAdd(nn.Module):
    """Last conv of a residual branch + BN, then the residual add (as MDPResNetLayer computes it)."""

    def __init__(self, cin, cout, kernel, stride):
        super().__init__()
        self.conv = MDPResNetConvLayer(cin, cout, kernel_size=kernel, stride=stride, activation=None)

    def forward(self, hidden_states, residual):
        return self.conv(hidden_states) + residual


class _Head(nn.Module):
    """Pool + classifier exactly as MDPResNetModel.pooler and MDPResNetForImageClassification.classifier."""

    def __init__(self, width, num_labels):
        super().__init__()
        self.pooler = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width, num_labels) if num_labels > 0 else nn.Identity())

    def forward(self, hidden_states):
        return self.classifier(self.pooler(hidden_states))


class _Act(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = ACT2FN[act]

    def forward(self, hidden_states):
        return self.act(hidden_states)


class ResNetCells(LatencyCells):
    def __init__(self, model, space, settings):
        super().__init__(model, space, settings)
        self.adapter = ResNetAdapter()
        self.base, _, self.linear = self.adapter._parts(model)
        self.config = model.config
        self.act = model.config.hidden_act
        size = settings.image_size or getattr(model.config, "image_size", None) or 224
        self.image_size = list(size) if isinstance(size, (list, tuple)) else [size, size]
        self.num_channels = model.config.num_channels
        self.num_labels = self.linear.out_features if self.linear is not None else 0
        self._record_shapes(model)

    def _record_shapes(self, model) -> None:
        """Input / output shapes of every conv layer, layer and the encoder at the table's image size."""
        shapes: dict[int, tuple] = {}
        handles = []

        def hook(module, args, output):
            out = output if torch.is_tensor(output) else output[0]
            shapes[id(module)] = (tuple(args[0].shape), tuple(out.shape))

        modules = [self.base.embedder, self.base.encoder, self.base.embedder.embedder]
        modules += self.adapter._stem_convs(self.base)
        for _, _, _, layer in self.adapter._layers(self.base):
            modules.append(layer)
            modules += list(layer.layer) if layer.layer is not None else []
            if self.adapter._has_projection(layer):
                modules.append(layer.shortcut)
        for module in modules:
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
        return {
            "family": "resnet",
            "layer_type": self.config.layer_type,
            "depths": list(self.config.depths),
            "image_size": self.image_size,
            "num_labels": self.num_labels,
            "hidden_act": self.act,
            "downsample_in_bottleneck": bool(getattr(self.config, "downsample_in_bottleneck", False)),
            # ResNet-C/D options, recorded only when set (tables of transformers' ResNet keep their metadata)
            **({"deep_stem": True} if getattr(self.config, "stem_inner_widths", None) else {}),
            **({"avg_down": True} if getattr(self.config, "avg_down", False) else {}),
        }

    # plan --------------------------------------------------------------------------------------------
    def plan(self) -> tuple[list[TimingGrid], list[TimingTerm]]:
        dims = self.space.dimensions
        terms: list[TimingTerm] = []
        stem_name, stage_names = self.adapter._residual_names(self.base)

        table = GridCatalog()  # identical blocks share a grid

        def hw(shape):
            return f"{shape[2]}x{shape[3]}"

        stem_in, stem_out = self.shapes[id(self.base.embedder)]
        stem_convs = self.adapter._stem_convs(self.base)
        if not stem_convs:
            key = table("resnet.stem", [dims[stem_name]], {"in": hw(stem_in)})
            terms.append(TimingTerm("stem", key, [stem_name], None))
        else:  # deep stem: each conv on its own (the first reads the fixed input channels), then the pool
            previous = None
            for k, conv_layer in enumerate(stem_convs + [self.base.embedder.embedder], start=1):
                own = f"stem.conv{k}" if k <= len(stem_convs) else stem_name
                conv = conv_layer.convolution
                conv_in, conv_out = self.shapes[id(conv_layer)]
                params = {"k": conv.kernel_size[0], "s": conv.stride[0], "in": hw(conv_in), "act": self.act}
                if previous is None:
                    key = table("resnet.stem_conv", [dims[own]], {**params, "cin": conv.in_channels})
                    terms.append(TimingTerm(f"stem.conv{k}", key, [own], None))
                else:
                    key = table("resnet.conv", [dims[own], dims[previous]], params)
                    terms.append(TimingTerm(f"stem.conv{k}", key, [own, previous], None, input_axes=[1]))
                previous = own
            key = table("resnet.maxpool", [dims[stem_name]], {"in": hw(conv_out)})
            terms.append(TimingTerm("stem.pool", key, [stem_name], None))
        producer = stem_name
        for s, j, flat, layer in self.adapter._layers(self.base):
            residual = stage_names[s]
            block = f"stages.{s}.layers.{j}"
            layer_in, layer_out = self.shapes[id(layer)]
            if self.adapter._has_projection(layer):
                conv, pool = layer.shortcut.convolution, getattr(layer.shortcut, "pool", None)
                params = {"k": conv.kernel_size[0], "s": conv.stride[0], "in": hw(layer_in)}
                if isinstance(pool, nn.AvgPool2d):  # ResNet-D: the pool strides, the conv does not
                    params.update(s=pool.stride, pool="avg")
                if residual == producer:  # cannot happen with transformers' ResNet; keep a 1-D diagonal table
                    key = table("resnet.shortcut_tied", [dims[residual]], params)
                    terms.append(TimingTerm(f"{block}.shortcut", key, [residual], None))
                else:
                    key = table("resnet.shortcut", [dims[residual], dims[producer]], params)
                    terms.append(TimingTerm(f"{block}.shortcut", key, [residual, producer], None, input_axes=[1]))
            if block in self.space.blocks and layer.layer is not None:
                convs = list(layer.layer)
                previous = producer
                for k, conv_layer in enumerate(convs, start=1):
                    conv = conv_layer.convolution
                    conv_in, _ = self.shapes[id(conv_layer)]
                    params = {"k": conv.kernel_size[0], "s": conv.stride[0], "in": hw(conv_in)}
                    if k < len(convs):
                        own, kind = f"{block}.conv{k}", "resnet.conv"
                        params["act"] = self.act
                    else:
                        own, kind = residual, "resnet.conv_add"
                    key = table(kind, [dims[own], dims[previous]], params)
                    terms.append(TimingTerm(f"{block}.conv{k}", key, [own, previous], block, input_axes=[1]))
                    previous = own
            key = table("resnet.relu", [dims[residual]], {"at": hw(layer_out), "act": self.act})
            terms.append(TimingTerm(f"{block}.activation", key, [residual], None))
            producer = residual
        _, encoder_out = self.shapes[id(self.base.encoder)]
        key = table("resnet.head", [dims[producer]], {"at": hw(encoder_out), "labels": self.num_labels})
        terms.append(TimingTerm("pool+classifier", key, [producer], None))
        return table.all(), terms

    # cells -------------------------------------------------------------------------------------------
    def build_cell(self, table, widths: tuple[int, ...]):
        B, p = self.settings.batch_size, table.params

        def res(text):
            return [int(v) for v in text.split("x")]

        if table.kind in ("resnet.conv", "resnet.conv_add", "resnet.shortcut", "resnet.shortcut_tied"):
            cout, cin = (widths[0], widths[0]) if table.kind == "resnet.shortcut_tied" else widths
            x = torch.randn(B, cin, *res(p["in"]))
            if table.kind == "resnet.conv":
                module = MDPResNetConvLayer(cin, cout, kernel_size=p["k"], stride=p["s"], activation=p["act"])
            elif table.kind == "resnet.conv_add":
                module = _ConvAdd(cin, cout, p["k"], p["s"])
                with torch.no_grad():  # eval: BN in training mode refuses a 1x1 map at batch 1 (last stage)
                    residual = module.eval()(x, 0)
                args = (x, torch.randn_like(residual))
                return self._place(module, args)
            else:
                module = MDPResNetShortCut(cin, cout, p["s"], avg_down=p.get("pool") == "avg")
            return self._place(module, (x,))
        if table.kind == "resnet.stem_conv":
            module = MDPResNetConvLayer(p["cin"], widths[0], kernel_size=p["k"], stride=p["s"], activation=p["act"])
            return self._place(module, (torch.randn(B, p["cin"], *res(p["in"])),))
        if table.kind == "resnet.maxpool":
            module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)  # as MDPResNetEmbeddings.pooler
            return self._place(module, (torch.randn(B, widths[0], *res(p["in"])),))
        if table.kind == "resnet.relu":
            return self._place(_Act(p["act"]), (torch.randn(B, widths[0], *res(p["at"])),))
        if table.kind == "resnet.stem":
            config = MDPResNetConfig(num_channels=self.num_channels, embedding_size=widths[0], hidden_act=self.act)
            return self._place(MDPResNetEmbeddings(config), (torch.randn(B, self.num_channels, *res(p["in"])),))
        if table.kind == "resnet.head":
            return self._place(_Head(widths[0], p["labels"]), (torch.randn(B, widths[0], *res(p["at"])),))
        raise ValueError(f"unknown ResNet table kind {table.kind!r}")

    def _place(self, module, args):
        dtype, device = self.settings.torch_dtype, self.settings.device
        module = module.to(device=device, dtype=dtype).eval()
        with torch.no_grad():  # realistic BN statistics (never exactly identity)
            for m in module.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_var.uniform_(0.5, 1.5)
        return module, tuple(a.to(device=device, dtype=dtype) for a in args)

    def dense_model(self):
        """The dense deployed model (mdp_resnet) with the same structure; random weights (timing only)."""
        return _dense_from(self)

    def example_input(self):
        return torch.randn(self.settings.batch_size, self.num_channels, *self.image_size)


def _dense_from(blocks: ResNetCells):
    base, config = blocks.base, blocks.config
    inner, projection, removed = [], [], []
    for s, j, flat, layer in blocks.adapter._layers(base):
        projection.append(blocks.adapter._has_projection(layer))
        if layer.layer is None:
            removed.append(flat)
            inner.append([1] * (2 if config.layer_type == "bottleneck" else 1))
        else:
            inner.append([c.convolution.out_channels for c in list(layer.layer)[:-1]])
    hidden = []
    for stage in base.encoder.stages:
        first = stage.layers[0]
        hidden.append(
            first.layer[-1].convolution.out_channels
            if first.layer is not None
            else first.shortcut.convolution.out_channels
        )
    stem_convs = blocks.adapter._stem_convs(base)
    mdp_config = MDPResNetConfig(
        num_channels=config.num_channels,
        embedding_size=base.embedder.embedder.convolution.out_channels,
        stem_inner_widths=[c.convolution.out_channels for c in stem_convs] or None,
        avg_down=bool(getattr(config, "avg_down", False)),
        hidden_sizes=hidden,
        depths=[len(s.layers) for s in base.encoder.stages],
        layer_type=config.layer_type,
        hidden_act=config.hidden_act,
        downsample_in_first_stage=config.downsample_in_first_stage,
        downsample_in_bottleneck=getattr(config, "downsample_in_bottleneck", False),
        layer_inner_widths=inner,
        layer_has_projection=projection,
        removed_layers=removed,
        num_labels=blocks.num_labels or 2,
    )
    return MDPResNetForImageClassification(mdp_config)


# registration ----------------------------------------------------------------------------------------
def _resnet(embedding_size, hidden_sizes, depths, layer_type, num_labels, headless=False):
    """A builder of a randomly initialised transformers ResNet (imported only when called)."""

    def build():
        from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel

        config = ResNetConfig(
            embedding_size=embedding_size,
            hidden_sizes=hidden_sizes,
            depths=depths,
            layer_type=layer_type,
            num_labels=num_labels,
        )
        return ResNetModel(config) if headless else ResNetForImageClassification(config)

    return build


register_family(
    ModelFamily(
        name="resnet",
        adapter=ResNetAdapter(),
        kinds=("channels", "residual"),
        model_types=("resnet", "mdp_resnet"),
        pruned_classes=(MDPResNetConfig, MDPResNetModel, MDPResNetForImageClassification),
        latency_cells=ResNetCells,
        test_models={
            "resnet_bottleneck": _resnet(8, [16, 24, 32], [2, 2, 1], "bottleneck", 5),
            # stage 0 has an identity shortcut: stem and stage-0 widths are coupled
            "resnet_basic": _resnet(8, [8, 16], [2, 2], "basic", 5),
            "resnet_base_model": _resnet(8, [16, 24], [1, 2], "bottleneck", 5, headless=True),  # no head
        },
        presets={
            "tiny-resnet": _resnet(8, [16, 24, 32], [2, 2, 1], "bottleneck", 5),
            "resnet18": _resnet(64, [64, 128, 256, 512], [2, 2, 2, 2], "basic", 1000),
            "resnet50": _resnet(64, [256, 512, 1024, 2048], [3, 4, 6, 3], "bottleneck", 1000),
        },
    )
)
