"""timm ResNet adapter: ``timm.models.resnet.ResNet`` pruned into the resnet family's format ``mdp_resnet``.

A timm ResNet is read through a view in transformers' ResNet layout (``resnet.embedder.embedder``,
``resnet.encoder.stages[s].layers[j].layer[k]`` / ``.shortcut``, each a conv and the BatchNorm after it,
``classifier[1]``) whose members are timm's own modules. The resnet family's code then builds the space,
installs the gates (forward hooks on timm's BatchNorms), computes the official BN-Taylor scores and slices,
so dimension names, coupling and importance are the resnet family's by construction:

- ``conv1``/``bn1`` (7x7 stem) or ``conv1.0/1``, ``conv1.3/4``, ``conv1.6``/``bn1`` (deep stems of
  ResNet-C/D/S/T: ``stem.conv1``, ``stem.conv2``, then ``stem``);
- ``layer{s+1}.{j}``: ``conv1/bn1``, ``conv2/bn2`` (stride on the 3x3 conv, as mdp_resnet's
  ``downsample_in_bottleneck=False``), ``conv3/bn3``; ``downsample`` = (conv, bn) or (avg-pool, conv, bn)
  for ``avg_down=True`` (mdp_resnet's ``avg_down``);
- ``global_pool`` (average) + ``fc``.

What mdp_resnet cannot express is refused in ``build_space`` (attention / SE layers, anti-aliasing,
grouped convs, dilation, DropBlock, other norms or activations, other pools). Dropout before the classifier
and stochastic depth are accepted: both are the identity at inference, and the pruned model has neither.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from torch import nn

from .base import PruningSpaceError
from .registry import ModelFamily, register_family
from .resnet import ResNetAdapter, ResNetCells

# activation classes mdp_resnet's ``hidden_act`` (transformers' ACT2FN) computes identically
_ACTIVATIONS = {nn.ReLU: "relu", nn.SiLU: "silu", nn.ReLU6: "relu6", nn.Mish: "mish"}


class _ConvNorm:
    """A conv and the BatchNorm after it, named as transformers' ResNetConvLayer names them."""

    def __init__(self, convolution: nn.Conv2d, normalization: nn.BatchNorm2d, timm_name: str):
        self.convolution, self.normalization, self.timm_name = convolution, normalization, timm_name


def _refuse(what: str, fix: str):
    raise PruningSpaceError(f"timm ResNet: {what}, which the pruned format mdp_resnet cannot express; {fix}")


def _check_conv(conv, where: str, kernel: int, stride: int | None = None) -> None:
    if not isinstance(conv, nn.Conv2d):
        _refuse(f"{where} is a {type(conv).__name__}, not an nn.Conv2d", "use a model built with plain convolutions")
    if conv.groups != 1:
        _refuse(f"{where} is a grouped conv (cardinality > 1, ResNeXt)", "prune a model with cardinality=1")
    if conv.dilation != (1, 1):
        _refuse(f"{where} is dilated (output_stride < 32)", "build the model with output_stride=32")
    if conv.bias is not None:
        _refuse(f"{where} has a bias", "use a model whose convs are followed by BatchNorm without bias")
    if conv.kernel_size != (kernel, kernel) or conv.padding != (kernel // 2, kernel // 2):
        _refuse(
            f"{where} has kernel {conv.kernel_size} / padding {conv.padding} (expected {kernel}x{kernel}, "
            f"padding {kernel // 2}; down_kernel_size != 1?)",
            "use timm's standard ResNet convs (down_kernel_size=1)",
        )
    if stride is not None and conv.stride != (stride, stride):
        _refuse(
            f"{where} has stride {conv.stride} instead of {stride} (output_stride < 32?)",
            "use timm's standard ResNet strides (output_stride=32)",
        )


def _check_norm(norm, where: str) -> None:
    if type(norm) is not nn.BatchNorm2d or not norm.affine or not norm.track_running_stats:
        _refuse(
            f"{where} is {type(norm).__name__} (norm_layer)", "use norm_layer=nn.BatchNorm2d (affine, running stats)"
        )
    if norm.eps != 1e-5:
        _refuse(f"{where} has eps={norm.eps} (mdp_resnet's BatchNorm uses 1e-5)", "use the default eps")


def _act_name(act, where: str) -> str:
    for cls, name in _ACTIVATIONS.items():
        if type(act) is cls:
            return name
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    _refuse(
        f"the activation {type(act).__name__} at {where} (act_layer)",
        f"use one of {', '.join(sorted({*_ACTIVATIONS.values(), 'gelu'}))}",
    )


def _architecture(model) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _json_safe(value):
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _preprocessing(model) -> dict | None:
    """mean, std, input_size, interpolation and crop_pct from the timm model's ``pretrained_cfg`` (None without)."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg:
        return None
    keys = ("mean", "std", "input_size", "interpolation", "crop_pct")
    return {key: _json_safe(cfg.get(key)) for key in keys if cfg.get(key) is not None} or None


def timm_resnet_view(model) -> SimpleNamespace:
    """``model`` (a timm ResNet) in transformers' ResNet layout, sharing its modules; refuses what
    mdp_resnet cannot express with a message naming the timm option."""
    from timm.models.resnet import BasicBlock, Bottleneck

    # head ----------------------------------------------------------------------------------------
    fc, pool = getattr(model, "fc", None), getattr(model, "global_pool", None)
    if not isinstance(fc, nn.Linear):
        _refuse(
            f"a classifier fc of type {type(fc).__name__} (num_classes=0 or a conv head)",
            "keep a linear classifier (num_classes > 0)",
        )
    if getattr(pool, "pool_type", None) != "avg" or not getattr(pool, "flatten", None) or pool.feat_mult() != 1:
        _refuse(f"global_pool={getattr(pool, 'pool_type', pool)!r}", "use global_pool='avg'")

    # stem ----------------------------------------------------------------------------------------
    act = _act_name(model.act1, "act1")
    _check_norm(model.bn1, "bn1")
    stem_inner = None
    if isinstance(model.conv1, nn.Sequential):  # deep stem: conv, bn, act, conv, bn, act, conv
        parts = list(model.conv1)
        layout = [nn.Conv2d, nn.BatchNorm2d, nn.Module, nn.Conv2d, nn.BatchNorm2d, nn.Module, nn.Conv2d]
        if len(parts) != 7 or not all(isinstance(m, t) for m, t in zip(parts, layout)):
            _refuse("a stem conv1 that is not timm's deep stem (conv, bn, act) x 2 + conv", "use stem_type='deep'")
        for i, stride in ((0, 2), (3, 1), (6, 1)):
            _check_conv(parts[i], f"conv1.{i}", 3, stride)
        for i in (1, 4):
            _check_norm(parts[i], f"conv1.{i}")
        for i in (2, 5):
            if _act_name(parts[i], f"conv1.{i}") != act:
                _refuse(f"conv1.{i} uses another activation than act1", "use one act_layer for the whole model")
        stem_inner = [_ConvNorm(parts[0], parts[1], "conv1.0"), _ConvNorm(parts[3], parts[4], "conv1.3")]
        embedder = _ConvNorm(parts[6], model.bn1, "conv1.6")
    else:
        _check_conv(model.conv1, "conv1", 7, 2)
        embedder = _ConvNorm(model.conv1, model.bn1, "conv1")
    maxpool = model.maxpool
    if not (
        type(maxpool) is nn.MaxPool2d
        and (maxpool.kernel_size, maxpool.stride, maxpool.padding, maxpool.dilation) in ((3, 2, 1, 1),)
        and not maxpool.ceil_mode
    ):
        _refuse(f"the stem pool {maxpool!r} (replace_stem_pool or aa_layer)", "use the default 3x3 stride-2 max-pool")

    # stages --------------------------------------------------------------------------------------
    stages, block_types, avg_down = [], set(), set()
    for s in range(4):
        stage = getattr(model, f"layer{s + 1}", None)
        if not isinstance(stage, nn.Sequential) or len(stage) == 0:
            _refuse(f"stage layer{s + 1} is missing or empty (prune_intermediate_layers?)", "use a complete model")
        layers = []
        for j, block in enumerate(stage):
            where = f"layer{s + 1}.{j}"
            if type(block) not in (BasicBlock, Bottleneck):
                _refuse(f"{where} is a {type(block).__name__}", "use timm's BasicBlock or Bottleneck blocks")
            block_types.add(type(block))
            if block.se is not None:
                _refuse(
                    f"the attention layer {type(block.se).__name__} of {where} (attn_layer, SE/ECA)",
                    "use a plain ResNet",
                )
            if not isinstance(block.aa, nn.Identity):
                _refuse(f"anti-aliasing at {where} (aa_layer)", "use aa_layer=None")
            if not isinstance(block.drop_block, nn.Identity):
                _refuse(f"DropBlock at {where} (drop_block_rate > 0)", "use drop_block_rate=0")
            stride = 2 if (s > 0 and j == 0) else 1
            bottleneck = isinstance(block, Bottleneck)
            names = ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2")
            kernels = (1, 3, 1) if bottleneck else (3, 3)
            strided = "conv2" if bottleneck else "conv1"
            convs = []
            for k, (name, kernel) in enumerate(zip(names, kernels), start=1):
                conv, norm = getattr(block, name), getattr(block, f"bn{k}")
                _check_conv(conv, f"{where}.{name}", kernel, stride if name == strided else 1)
                _check_norm(norm, f"{where}.bn{k}")
                convs.append(_ConvNorm(conv, norm, f"{where}.{name}"))
            for k in range(1, len(names) + 1):
                if _act_name(getattr(block, f"act{k}"), f"{where}.act{k}") != act:
                    _refuse(
                        f"{where}.act{k} uses another activation than act1", "use one act_layer for the whole model"
                    )
            shortcut = nn.Identity()
            if block.downsample is not None:
                parts = list(block.downsample) if isinstance(block.downsample, nn.Sequential) else []
                if len(parts) == 3:  # avg-down: pool, conv, bn
                    pool, parts = parts[0], parts[1:]
                    is_avg = (
                        type(pool) is nn.AvgPool2d
                        and pool.kernel_size == 2
                        and pool.stride == stride
                        and pool.ceil_mode
                        and not pool.count_include_pad
                    )
                    if not (is_avg or (stride == 1 and isinstance(pool, nn.Identity))):
                        _refuse(
                            f"the downsample pool {pool!r} of {where}", "use avg_down=True or False as timm builds it"
                        )
                    avg_down.add(True)
                    conv_stride = 1
                elif len(parts) == 2:
                    avg_down.add(False)
                    conv_stride = stride
                else:
                    _refuse(f"the downsample of {where} is not (conv, bn) or (avg-pool, conv, bn)", "use timm's own")
                _check_conv(parts[0], f"{where}.downsample conv", 1, conv_stride)
                _check_norm(parts[1], f"{where}.downsample norm")
                shortcut = _ConvNorm(parts[0], parts[1], f"{where}.downsample")
            elif stride != 1 or block.conv1.in_channels != convs[-1].convolution.out_channels:
                _refuse(f"{where} changes shape without a downsample", "use a model built by timm")
            layers.append(SimpleNamespace(layer=convs, shortcut=shortcut))
        stages.append(SimpleNamespace(layers=layers))
    if len(block_types) != 1:
        _refuse("a mix of BasicBlock and Bottleneck stages", "use one block type for all stages")
    if len(avg_down) > 1:
        _refuse("a mix of avg-pool and strided-conv downsamples", "use one avg_down setting for all stages")
    if not isinstance(model.drop_rate, (int, float)) or math.isnan(model.drop_rate):
        _refuse(f"drop_rate={model.drop_rate!r}", "use a float drop_rate")

    num_labels = fc.out_features
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names") or []
    labels = {i: names[i] if len(names) == num_labels else f"LABEL_{i}" for i in range(num_labels)}
    config = SimpleNamespace(
        model_type="timm_resnet",
        name_or_path=None,
        num_channels=embedder.convolution.in_channels if stem_inner is None else stem_inner[0].convolution.in_channels,
        layer_type="bottleneck" if Bottleneck in block_types else "basic",
        hidden_act=act,
        downsample_in_first_stage=False,
        downsample_in_bottleneck=False,  # timm strides the 3x3 conv
        avg_down=avg_down == {True},
        preprocessing=_preprocessing(model),
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
        to_dict=lambda: {},
    )
    base = SimpleNamespace(
        embedder=SimpleNamespace(embedder=embedder, stem=stem_inner),
        encoder=SimpleNamespace(stages=stages),
        config=config,
    )
    return SimpleNamespace(resnet=base, classifier=(None, fc), config=config, parameters=model.parameters)


def _timm_names(view) -> dict[str, str]:
    """transformers-layout module path (as the resnet family's ``coupled`` lists write it) -> timm name."""
    base = view.resnet
    names = {"resnet.embedder.embedder": base.embedder.embedder.timm_name, "classifier.1 (in)": "fc (in)"}
    for k, conv in enumerate(base.embedder.stem or []):
        names[f"resnet.embedder.stem.{k}"] = conv.timm_name
    for s, stage in enumerate(base.encoder.stages):
        for j, layer in enumerate(stage.layers):
            prefix = f"resnet.encoder.stages.{s}.layers.{j}"
            for k, conv in enumerate(layer.layer):
                names[f"{prefix}.layer.{k}"] = conv.timm_name
            if isinstance(layer.shortcut, _ConvNorm):
                names[f"{prefix}.shortcut"] = layer.shortcut.timm_name
    return names


class TimmResNetAdapter(ResNetAdapter):
    """The resnet family's adapter applied to a timm ResNet through :func:`timm_resnet_view`; slices into
    ``mdp_resnet`` and records the timm source (``base_model_type="timm:<architecture>"``)."""

    def build_space(self, model, group_sizes=None, min_keep=None):
        view = timm_resnet_view(model)
        space = super().build_space(view, group_sizes, min_keep)
        names = _timm_names(view)  # coupled parameters by their timm names
        for dim in space.dimensions.values():
            dim.coupled = [names.get(name, name) for name in dim.coupled]
        return space

    def install_gates(self, model, space):
        return super().install_gates(timm_resnet_view(model), space)

    def slice(self, model, space, choice):
        pruned = super().slice(timm_resnet_view(model), space, choice)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        pruned.config.base_model_type = f"timm:{_architecture(model)}"
        pruned.config.base_model_name_or_path = cfg.get("hf_hub_id") or None
        pruned.config.base_config = {"library": "timm", "architecture": _architecture(model), **_json_safe(cfg)}
        return pruned

    def taylor_scores(self, model, space, gates):
        return super().taylor_scores(timm_resnet_view(model), space, gates)

    def score_shares(self, model, space, gates):
        return super().score_shares(timm_resnet_view(model), space, gates)

    def unit_magnitudes(self, model, space):
        return super().unit_magnitudes(timm_resnet_view(model), space)


class TimmResNetCells(ResNetCells):
    """The resnet family's cells, read from the timm model sliced dense into mdp_resnet (same dimension
    names; the cells time mdp_resnet's modules, which are what a pruned timm ResNet deploys as)."""

    def __init__(self, model, space, settings):
        self.source = model
        dense = TimmResNetAdapter().slice(model, space, space.full_choice())
        super().__init__(dense, space, settings)


# registration ----------------------------------------------------------------------------------------
def _timm_resnet(block: str, layers, num_classes=5, **kwargs):
    """A builder of a randomly initialised timm ResNet from its constructor (timm imported only when called)."""

    def build():
        from timm.models.resnet import BasicBlock, Bottleneck, ResNet

        cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        return ResNet(block=cls, layers=list(layers), num_classes=num_classes, **kwargs)

    return build


def _timm_model(name: str):
    """A builder of ``timm.create_model(name, pretrained=False)`` (random weights, timm's pretrained_cfg)."""

    def build():
        import timm

        return timm.create_model(name, pretrained=False)

    return build


register_family(
    ModelFamily(
        name="timm_resnet",
        adapter=TimmResNetAdapter(),
        kinds=("channels", "residual"),
        module_classes=("timm.models.resnet.ResNet",),
        pruned_classes=(),  # exports into the resnet family's mdp_resnet
        latency_cells=TimmResNetCells,
        test_models={
            # 7x7 stem (always 64 wide in timm) and a projection in stage 0
            "timm_resnet_basic": _timm_resnet("basic", [2, 1, 1, 1], channels=(8, 16, 16, 24)),
            "timm_resnet_bottleneck": _timm_resnet("bottleneck", [2, 1, 1, 1], channels=(4, 8, 8, 12)),
            # ResNet-D: deep stem (4, 4 -> 8) and avg-down; stage 0 has an identity shortcut, so it is coupled to
            # the stem; base_width=128 doubles the inner widths
            "timm_resnet_d": _timm_resnet(
                "bottleneck",
                [2, 1, 1, 1],
                channels=(2, 4, 6, 8),
                stem_width=4,
                stem_type="deep",
                avg_down=True,
                base_width=128,
            ),
        },
        presets={
            "timm-resnet18": _timm_model("resnet18"),
            "timm-resnet50": _timm_model("resnet50"),
            "timm-resnet50d": _timm_model("resnet50d"),
        },
    )
)
