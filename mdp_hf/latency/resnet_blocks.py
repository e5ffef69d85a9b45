"""ResNet profiling knowledge: which convs to time and how to build one of given widths.

(Family knowledge that could move into ``mdp_hf/adapters/resnet.py`` later; kept here, keyed by
``space.model_type`` in ``resnet``, ``mdp_resnet``.)

Cells time the deployed modules of ``modeling_mdp_resnet`` at the input resolution each conv sees in
the model (recorded with forward hooks at the table's image size). One table per distinct conv shape
(kind, kernel, stride, input resolution, width grids); identical convs share it.

- ``resnet.conv`` [own out channels, producer channels]: an inner conv + BN + activation of a layer
  (conv1's producer is the stage input residual width, conv2's is conv1);
- ``resnet.conv_add`` [stage residual, previous inner conv]: the last conv + BN, plus the residual add;
- ``resnet.shortcut`` [stage residual, stage input residual]: a projection shortcut (conv 1x1 + BN),
  outside every block (a removed layer keeps it);
- ``resnet.relu`` [stage residual]: the activation after the add (paid even when the branch is removed);
- ``resnet.stem`` [stem]: conv 7x7 + BN + ReLU + max-pool;
- ``resnet.head`` [last residual]: global average pool + flatten + linear classifier.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..modeling import MDPResNetConfig
from ..modeling.modeling_mdp_resnet import MDPResNetConvLayer, MDPResNetEmbeddings, MDPResNetShortCut
from .table import MeasuredTable, TermDef

MODEL_TYPES = ("resnet", "mdp_resnet")


def _sig(dim) -> str:
    return f"{dim.size}/{dim.group_size}/{dim.min_keep}"


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


class ResNetBlocks:
    def __init__(self, model, space, settings):
        from ..adapters import get_adapter

        self.space, self.settings = space, settings
        self.adapter = get_adapter(model)
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

        modules = [self.base.embedder, self.base.encoder]
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
        }

    # plan --------------------------------------------------------------------------------------------
    def plan(self) -> tuple[list[MeasuredTable], list[TermDef]]:
        dims = self.space.dimensions
        tables: dict[str, MeasuredTable] = {}
        terms: list[TermDef] = []
        stem_name, stage_names = self.adapter._residual_names(self.base)

        def table(kind, axis_dims, params):
            spec = ",".join(f"{k}={v}" for k, v in params.items())
            key = f"{kind}({spec},dims={'x'.join(_sig(d) for d in axis_dims)})"
            if key not in tables:
                tables[key] = MeasuredTable(
                    key, kind, [d.kind for d in axis_dims], [d.widths() for d in axis_dims], params
                )
            return key

        def hw(shape):
            return f"{shape[2]}x{shape[3]}"

        stem_in, stem_out = self.shapes[id(self.base.embedder)]
        key = table("resnet.stem", [dims[stem_name]], {"in": hw(stem_in)})
        terms.append(TermDef("stem", key, [stem_name], None))
        producer = stem_name
        for s, j, flat, layer in self.adapter._layers(self.base):
            residual = stage_names[s]
            block = f"stages.{s}.layers.{j}"
            layer_in, layer_out = self.shapes[id(layer)]
            if self.adapter._has_projection(layer):
                conv = layer.shortcut.convolution
                params = {"k": conv.kernel_size[0], "s": conv.stride[0], "in": hw(layer_in)}
                if residual == producer:  # cannot happen with transformers' ResNet; keep a 1-D diagonal table
                    key = table("resnet.shortcut_tied", [dims[residual]], params)
                    terms.append(TermDef(f"{block}.shortcut", key, [residual], None))
                else:
                    key = table("resnet.shortcut", [dims[residual], dims[producer]], params)
                    terms.append(TermDef(f"{block}.shortcut", key, [residual, producer], None, input_axes=[1]))
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
                    terms.append(TermDef(f"{block}.conv{k}", key, [own, previous], block, input_axes=[1]))
                    previous = own
            key = table("resnet.relu", [dims[residual]], {"at": hw(layer_out), "act": self.act})
            terms.append(TermDef(f"{block}.activation", key, [residual], None))
            producer = residual
        _, encoder_out = self.shapes[id(self.base.encoder)]
        key = table("resnet.head", [dims[producer]], {"at": hw(encoder_out), "labels": self.num_labels})
        terms.append(TermDef("pool+classifier", key, [producer], None))
        return list(tables.values()), terms

    # cells -------------------------------------------------------------------------------------------
    def build_cell(self, table: MeasuredTable, widths: tuple[int, ...]):
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
                with torch.no_grad():
                    residual = module(x, 0)
                args = (x, torch.randn_like(residual))
                return self._place(module, args)
            else:
                module = MDPResNetShortCut(cin, cout, p["s"])
            return self._place(module, (x,))
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


def _dense_from(blocks: ResNetBlocks):
    from ..modeling import MDPResNetForImageClassification

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
    mdp_config = MDPResNetConfig(
        num_channels=config.num_channels,
        embedding_size=base.embedder.embedder.convolution.out_channels,
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


def structure_from_config(config) -> tuple[dict[str, int], set[str]]:
    """(widths per dimension name, removed blocks) of an ``mdp_resnet`` config, in the adapter's names
    (an identity shortcut couples a stage's residual width to its producer's dimension)."""
    widths, removed = {"stem": int(config.embedding_size)}, set()
    producer, flat = "stem", 0
    removed_layers = set(config.removed_layers or [])
    for s, (width, depth) in enumerate(zip(config.hidden_sizes, config.depths)):
        residual = f"stages.{s}.residual" if config.layer_has_projection[flat] else producer
        widths[residual] = int(width)
        for j in range(depth):
            block = f"stages.{s}.layers.{j}"
            if flat in removed_layers:
                removed.add(block)
            else:
                for k, inner in enumerate(config.layer_inner_widths[flat], start=1):
                    widths[f"{block}.conv{k}"] = int(inner)
            flat += 1
        producer = residual
    return widths, removed
