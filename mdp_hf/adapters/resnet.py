"""ResNet-family adapter: transformers' ResNet (basic and bottleneck layers) and mdp_resnet.

Dimensions: the output channels of every inner conv of a layer (conv1 / conv2 of a bottleneck, conv1
of a basic layer), and one residual width per group of coupled tensors: every conv that adds into a
stage's residual stream (each layer's last conv, the stage's projection shortcut) shares it, and an
identity shortcut couples a stage to its producer (the stem, or the previous stage). Blocks: each
layer's residual branch; removing it keeps a projection shortcut (``out = relu(shortcut(x))``), so
the stem and the projections sit outside every block and are never removed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.initialization import no_init_weights

from ..modeling import MDPResNetConfig, MDPResNetForImageClassification, MDPResNetModel
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


class ResNetAdapter(ModelAdapter):
    model_types = ("resnet", "mdp_resnet")
    default_group_sizes = {"channels": 8, "residual": 8}
    default_score_kind = "abs"

    @staticmethod
    def _parts(model):
        base = getattr(model, "resnet", None)
        if base is not None:
            linear = model.classifier[1] if isinstance(model.classifier[1], nn.Linear) else None
            return base, "resnet", linear
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
        return PruningSpace(model.config.model_type, {**residual_dims, **dims}, blocks, aliases)

    def install_gates(self, model, space: PruningSpace) -> GateSet:
        base, _, _ = self._parts(model)
        gates = GateSet(space, device=next(model.parameters()).device)
        stem_name, stage_names = self._residual_names(base)

        def gate_output(norm, get_gate):
            # Gate right after BatchNorm: its gradient is the BN Taylor score |gamma dL/dgamma + beta dL/dbeta|.
            def hook(module, args, output):
                return output * get_gate(output.dtype).view(1, -1, 1, 1)

            gates.add_hook(norm.register_forward_hook(hook))

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

        put_conv_layer(f"{bp}embedder.embedder", base.embedder.embedder, kept[stem_name], None)
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
            if linear is None:
                raise PruningSpaceError("ResNet classifiers without a linear head (num_labels=0) are not supported")
        pruned.load_state_dict(state, strict=True)
        return pruned.to(next(model.parameters()).dtype).eval()

    # importance ----------------------------------------------------------------------------------------
    # Official (NVlabs/MDP resnet50+ablation/prune/pruning.py, calc_importance / update_neuron_metric_mdp): a
    # channel's score is |gamma dL/dgamma + beta dL/dbeta| of the BatchNorm after its conv; a residual width's
    # members (the BNs writing into it: each branch's last conv, the projection shortcuts, the stem) are summed
    # before |.|, and that combined score is split among the members in proportion to each member's own |.|.
    scores_from_gates = False
    stem_dimensions = ("stem",)

    def _members(self, base) -> dict[str, list[tuple[str | None, nn.BatchNorm2d]]]:
        """Per dimension: (block or None, BatchNorm) of every layer whose output channels are the dimension's."""
        stem_name, stage_names = self._residual_names(base)
        members = {stem_name: [(None, base.embedder.embedder.normalization)]}
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

    @staticmethod
    def _bn_taylor(norm) -> torch.Tensor:
        total = torch.zeros(norm.num_features, dtype=torch.float64, device=norm.weight.device)
        for param in (norm.weight, norm.bias):
            if param is not None and param.grad is not None:
                total += (param.detach() * param.grad).double()
        return total.cpu()

    @torch.no_grad()
    def taylor_scores(self, model, space: PruningSpace, gates: GateSet) -> dict[str, torch.Tensor]:
        base, _, _ = self._parts(model)
        members = self._members(base)
        return {name: sum(self._bn_taylor(norm) for _, norm in members[name]) for name in space.dimensions}

    @torch.no_grad()
    def score_shares(
        self, model, space: PruningSpace, gates: GateSet
    ) -> dict[str, list[tuple[str | None, torch.Tensor]]]:
        base, _, _ = self._parts(model)
        return {
            name: [(block, self._bn_taylor(norm)) for block, norm in layers]
            for name, layers in self._members(base).items()
            if len(layers) > 1 and space.dimensions[name].block is None
        }

    @torch.no_grad()
    def unit_magnitudes(self, model, space: PruningSpace) -> dict[str, torch.Tensor]:
        base, _, _ = self._parts(model)
        stem_name, stage_names = self._residual_names(base)
        out = {name: torch.zeros(dim.size, dtype=torch.float64) for name, dim in space.dimensions.items()}

        def add(name, conv):  # squared L2 norm of each output filter
            out[name] += conv.weight.detach().double().square().flatten(1).sum(1).cpu()

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
