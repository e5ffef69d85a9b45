"""Latency-model benchmark: predicted vs measured latency of randomly pruned, physically sliced models.

For a DeiT-Small-shaped ViT and a ResNet-50-shaped ResNet (random weights) on this machine:
1. build the latency table (sub-grid + interpolation; build time reported; a few off-grid cells are
   also measured to report the interpolation error);
2. draw 30 random pruned structures spread from ~20% to 100% of the dense latency (widths of every
   dimension and removed blocks), slice the model for each;
3. time every sliced model twice (two interleaved passes, same protocol as the table: 1 thread,
   warm-up, median of repeats) -> run-to-run noise; measured latency = mean of the two passes;
4. report mean / max absolute % error of the table model (calibrated and raw), the HALP-style linear
   model and the FLOPs proxy.

    python benchmarks/latency_model.py                 # both models (~15 min on 2 cores)
    python benchmarks/latency_model.py --family vit --quick
    python benchmarks/latency_model.py --family detectors   # the whole detector at its resolution (issue #13)

The detectors: the detector recipe's tiny YOLOS at 64x64, a YOLOS-Ti-shaped YOLOS at 256x432 and a
DETR-ResNet-50-shaped DETR at 320x320; their tables hold the backbone/encoder cells plus the rest of the detector
(input projection over the last residual width, the transformer and heads as a constant; for YOLOS the
embeddings and heads over the embedding width), so the prediction is the whole detector's latency.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mdp_hf  # noqa: E402
from mdp_hf.latency import (  # noqa: E402
    FlopsLatencyModel,
    LinearLatencyModel,
    TableLatencyModel,
    TimingSettings,
    build_table,
    interpolation_report,
    measure_latencies,
)


def deit_small():
    from transformers import DeiTConfig, DeiTForImageClassification

    torch.manual_seed(0)
    config = DeiTConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=224,
        patch_size=16,
        num_labels=1000,
    )
    return DeiTForImageClassification(config).eval()


def resnet50():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=64,
        hidden_sizes=[256, 512, 1024, 2048],
        depths=[3, 4, 6, 3],
        layer_type="bottleneck",
        num_labels=1000,
    )
    return ResNetForImageClassification(config).eval()


SETUPS = {
    # paper's DeiT-B groups (E 16, H 1, QK 2, V 2, MLP 32); sub-grid strides in choice indices per kind
    "vit": dict(
        build=deit_small,
        groups={"embed": 16, "heads": 1, "qk": 2, "v": 2, "mlp": 32},
        subgrid={"embed": 2, "heads": 1, "qk": 4, "v": 4, "mlp": 2},
    ),
    "resnet": dict(build=resnet50, groups={"channels": 16, "residual": 32}, subgrid={"channels": 2, "residual": 4}),
    # the same DeiT-S shape as timm builds it (fused qkv, LayerNorm eps 1e-6), through the timm_vit family
    "timm_deit": dict(
        build=lambda: preset("timm-deit-small"),
        groups={"embed": 16, "heads": 1, "qk": 2, "v": 2, "mlp": 32},
        subgrid={"embed": 2, "heads": 1, "qk": 4, "v": 4, "mlp": 2},
    ),
    "mobilenet_v2": dict(
        build=lambda: preset("mobilenet-v2-1.0"),
        groups={"channels": 16, "residual": 8},
        subgrid={"channels": 2, "residual": 2},
    ),
    # detectors (issue #13): the budget is the whole detector at its deployment resolution
    "yolos_recipe": dict(
        build=lambda: recipe_yolos(),
        groups={"embed": 16, "heads": 1, "qk": 8, "v": 8, "mlp": 32},  # the recipe's
        subgrid={"embed": 1, "heads": 1, "qk": 1, "v": 1, "mlp": 1},
        image_size=[64, 64],
    ),
    "yolos_tiny": dict(
        # hustvl/yolos-tiny's shape (DeiT-Ti, 100 detection tokens) at half its 512x864 resolution
        build=lambda: yolos(
            [256, 432],
            hidden_size=192,
            num_hidden_layers=12,
            num_attention_heads=3,
            intermediate_size=768,
            num_detection_tokens=100,
            use_mid_position_embeddings=False,
            num_labels=91,
        ),
        groups={"embed": 16, "heads": 1, "qk": 8, "v": 8, "mlp": 32},
        subgrid={"embed": 2, "heads": 1, "qk": 2, "v": 2, "mlp": 2},
        image_size=[256, 432],
    ),
    "detr_resnet50": dict(
        build=lambda: preset("detr-resnet50"),  # facebook/detr-resnet-50's shape
        groups={"channels": 16, "residual": 32},
        subgrid={"channels": 2, "residual": 4},
        image_size=[320, 320],
    ),
}
DETECTORS = ["yolos_recipe", "yolos_tiny", "detr_resnet50"]
NAMES = {
    "vit": "DeiT-Small-shaped ViT (transformers)",
    "resnet": "ResNet-50-shaped ResNet (transformers)",
    "timm_deit": "timm deit_small_patch16_224",
    "mobilenet_v2": "MobileNetV2 1.0 (transformers)",
    "yolos_recipe": "the detector recipe's tiny YOLOS (transformers)",
    "yolos_tiny": "YOLOS-Ti-shaped detector (transformers)",
    "detr_resnet50": "DETR-ResNet-50-shaped detector (transformers)",
}


def yolos(image_size, **shape):
    """A YOLOS detector built for its deployment resolution (position embeddings at that size: none interpolated)."""
    from transformers import YolosConfig, YolosForObjectDetection

    torch.manual_seed(0)
    return YolosForObjectDetection(YolosConfig(image_size=list(image_size), **shape)).eval()


def recipe_yolos():
    """The tiny YOLOS that recipes/prune_detector.py trains and prunes by default (64x64)."""
    from transformers import YolosForObjectDetection

    from recipes.prune_detector import TINY_YOLOS

    torch.manual_seed(0)
    return YolosForObjectDetection(copy.deepcopy(TINY_YOLOS)).eval()


def preset(name: str):
    """A registered family preset (random weights)."""
    from mdp_hf.latency.cli import presets

    torch.manual_seed(0)
    return presets()[name]().eval()


def random_structures(space, model: TableLatencyModel, count: int, rng: random.Random, candidates: int = 3000):
    """Random choices whose predicted latency spreads evenly from ~20% to 100% of dense."""
    dense = model.dense_ms()
    pool = []
    removable = [b for b, blk in space.blocks.items() if blk.removable]
    for _ in range(candidates):
        level = rng.uniform(0.25, 1.0)
        kept = {}
        for name, dim in space.dimensions.items():
            widths = dim.widths()
            frac = min(1.0, max(0.0, rng.gauss(level, 0.2)))
            kept[name] = list(range(widths[min(len(widths) - 1, int(round(frac * (len(widths) - 1))))]))
        p_remove = rng.uniform(0.0, 0.35) * (1.0 - level)
        removed = [b for b in removable if rng.random() < p_remove]
        choice = mdp_hf.PruningChoice(kept, removed)
        pool.append((model.predict((space, choice)) / dense, choice))
    pool.append((1.0, space.full_choice()))
    chosen = []
    for target in np.linspace(0.2, 1.0, count):
        best = min(range(len(pool)), key=lambda i: abs(pool[i][0] - target))
        chosen.append(pool.pop(best)[1])
    return chosen


def attention_decomposition_error(model, space, settings, rng, samples=16):
    """Decomposition error alone: time attention-only layers with QK and V both pruned *and*, interleaved in
    the same run, the seven cells the decomposition combines; compare (no interpolation involved)."""
    from mdp_hf.latency.profiler import family_cells
    from mdp_hf.latency.timing import thread_count, time_interleaved
    from mdp_hf.modeling.modeling_mdp_vit import MDPViTLayer

    blocks = family_cells(model, space, settings)
    dims = space.dimensions
    H, E, Q, V = (dims[n].widths() for n in ("layers.0.heads", "embed", "layers.0.qk_dim", "layers.0.v_dim"))
    e0, q_dense, v_dense = E[0], Q[-1], V[-1]
    configs, cases = {}, []
    for _ in range(samples):
        h, e, q, v = rng.choice(H), rng.choice(E[1:]), rng.choice(Q[:-1]), rng.choice(V[:-1])
        cases.append((h, e, q, v))
        for key in [
            (h, e, q, v),
            (h, e, q, v_dense),
            (h, e, q_dense, v),
            (h, e, q_dense, v_dense),
            (h, e0, q, v),
            (h, e0, q, v_dense),
            (h, e0, q_dense, v),
            (h, e0, q_dense, v_dense),
        ]:
            configs.setdefault(key, None)
    keys = list(configs)
    calls = []
    for h, e, q, v in keys:
        cfg = {"num_attention_heads": h, "qk_head_dim": q, "v_head_dim": v, "skip": ["mlp"]}
        layer = MDPViTLayer(blocks._config(e, 1, {0: cfg}), 0).eval()
        x = torch.randn(settings.batch_size, blocks.tokens, e)
        calls.append(lambda m=layer, x=x: m(x))
    with thread_count(settings.threads):
        timed = time_interleaved(calls, "cpu", settings.warmup, settings.repeats, settings.statistic)
    A = {k: m.ms for k, m in zip(keys, timed)}
    errors, plain = [], []
    for h, e, q, v in cases:
        additive = A[h, e, q, v_dense] + A[h, e, q_dense, v] - A[h, e, q_dense, v_dense]
        full = additive + A[h, e0, q, v] - A[h, e0, q, v_dense] - A[h, e0, q_dense, v] + A[h, e0, q_dense, v_dense]
        errors.append(abs(full - A[h, e, q, v]) / A[h, e, q, v])
        plain.append(abs(additive - A[h, e, q, v]) / A[h, e, q, v])
    return (
        100 * float(np.mean(errors)),
        100 * float(np.max(errors)),
        100 * float(np.mean(plain)),
        100 * float(np.max(plain)),
    )


def run(family: str, args) -> dict:
    setup = SETUPS[family]
    model = setup["build"]()
    space = mdp_hf.build_space(model, group_sizes=setup["groups"])
    image_size = setup.get("image_size", [224, 224])
    settings = TimingSettings(
        device="cpu",
        image_size=setup.get("image_size"),
        batch_size=args.batch_size,
        threads=args.threads,
        warmup=args.warmup,
        repeats=args.repeats,
        statistic=args.statistic,
    )
    subgrid = setup["subgrid"] if not args.quick else {k: v * 2 for k, v in setup["subgrid"].items()}
    subgrid = {**subgrid, **(args.subgrid or {})}
    out = Path(args.output_dir) / f"{family}_table.json"
    t0 = time.perf_counter()
    table = build_table(
        model,
        out,
        space=space,
        settings=settings,
        subgrid=subgrid,
        validate=args.validate,
        progress=not args.no_progress,
        overwrite=True,
    )
    build_s = time.perf_counter() - t0
    interp = interpolation_report(table)
    rng = random.Random(args.seed)
    models = {
        "table (default)": TableLatencyModel(table, space),
        "table, raw cells": TableLatencyModel(table, space, calibration="none"),
        "table, offset calib.": TableLatencyModel(table, space, calibration="offset"),
        "linear (HALP)": LinearLatencyModel(table, space),
        "FLOPs proxy": FlopsLatencyModel(table, space),
    }
    choices = random_structures(space, models["table (default)"], args.structures, rng)
    sliced = [mdp_hf.slice_model(model, space, c) for c in choices]
    pixels = torch.randn(args.batch_size, 3, *image_size)
    t1 = time.perf_counter()
    pass_a = measure_latencies(sliced, settings, inputs=pixels)
    pass_b = measure_latencies(sliced, settings, inputs=pixels)
    measure_s = time.perf_counter() - t1
    measured = [(a.ms + b.ms) / 2 for a, b in zip(pass_a, pass_b)]
    noise = [abs(a.ms - b.ms) / m for a, b, m in zip(pass_a, pass_b, measured)]
    dense_measured = measured[-1]
    rows = {}
    for name, lm in models.items():
        predicted = [lm.predict((space, c)) for c in choices]
        errors = [abs(p - m) / m for p, m in zip(predicted, measured)]
        rows[name] = (100 * float(np.mean(errors)), 100 * float(np.max(errors)))
    attn = attention_decomposition_error(model, space, settings, rng) if family in ("vit", "timm_deit") else None
    per = [
        (len(c.removed_blocks), m / dense_measured, models["table (default)"].predict((space, c)) / dense_measured)
        for c, m in zip(choices, measured)
    ]
    return dict(
        family=family,
        cells=table.num_measured,
        total_cells=int(sum(np.prod(t.shape) for t in table.tables.values())),
        tables=len(table.tables),
        build_s=build_s,
        measure_s=measure_s,
        interp=interp,
        rows=rows,
        noise=noise,
        dense_ms=dense_measured,
        calibration=models["table (default)"].calibration_factor,
        attn=attn,
        spread=(min(p[1] for p in per), max(p[1] for p in per)),
        removed=sum(1 for p in per if p[0]),
        subgrid=subgrid,
        groups=setup["groups"],
        terms=len(table.terms),
        image_size=image_size,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--family",
        choices=[*SETUPS, "both", "detectors", "all"],
        default="both",
        help="both: vit + resnet; detectors: " + ", ".join(DETECTORS),
    )
    parser.add_argument("--structures", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--statistic",
        choices=["median", "min"],
        default="min",
        help="statistic of the repeats, for table cells and end-to-end timings alike",
    )
    parser.add_argument("--validate", type=int, default=8, help="off-sub-grid cells per table (interpolation check)")
    parser.add_argument("--quick", action="store_true", help="coarser sub-grid (twice the strides)")
    parser.add_argument(
        "--subgrid",
        type=lambda text: {kind: int(stride) for kind, stride in (item.split("=") for item in text.split(","))},
        default=None,
        help="sub-grid strides per dimension kind over the setup's, e.g. channels=1,residual=2 (1: every choice)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="/tmp/mdp_latency_benchmark")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average "
        f"{os.getloadavg()[0]:.2f}; torch {torch.__version__}; threads {args.threads}; batch {args.batch_size}; "
        f"repeats {args.repeats} ({args.statistic}), warm-up {args.warmup}"
    )
    families = {"both": ["vit", "resnet"], "detectors": DETECTORS, "all": list(SETUPS)}.get(args.family, [args.family])
    results = [run(f, args) for f in families]
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    for r in results:
        name = NAMES[r["family"]]
        print(
            f"\n## {name}: batch {args.batch_size}, {args.threads} thread(s), {'x'.join(map(str, r['image_size']))}, fp32, random weights"
        )
        print(f"groups {r['groups']}; sub-grid strides {r['subgrid']}")
        print(
            f"table: {r['tables']} grids, {r['terms']} terms, {r['cells']} cells measured of {r['total_cells']} "
            f"({100 * r['cells'] / r['total_cells']:.1f}%); build {r['build_s']:.0f} s (incl. validation cells and the dense reference)"
        )
        if r["interp"].get("cells"):
            print(
                f"interpolation error at {r['interp']['cells']} off-grid cells: mean {r['interp']['mean_abs_pct']:.1f}%, "
                f"max {r['interp']['max_abs_pct']:.1f}%"
            )
        if r["attn"]:
            print(
                f"attention decomposition alone (QK and V both pruned, cells timed in the same run): T_qk+T_vo+T_core "
                f"mean {r['attn'][0]:.1f}% / max {r['attn'][1]:.1f}%; without T_core: mean {r['attn'][2]:.1f}% / max {r['attn'][3]:.1f}%"
            )
        print(
            f"dense measured {r['dense_ms']:.2f} ms; calibration factor (measured/sum of cells at dense) {r['calibration']:.3f}"
        )
        print(
            f"{len(r['noise'])} structures, measured latency {100 * r['spread'][0]:.0f}%–{100 * r['spread'][1]:.0f}% of dense, "
            f"{r['removed']} with removed blocks; timing both passes took {r['measure_s']:.0f} s"
        )
        print(
            f"run-to-run noise (same structure, two passes): mean {100 * statistics.mean(r['noise']):.1f}%, "
            f"max {100 * max(r['noise']):.1f}%"
        )
        print(f"| {'latency model':<20} | mean abs % err | max abs % err |")
        print(f"|{'-' * 22}|{'-' * 16}|{'-' * 15}|")
        for model_name, (mean, worst) in r["rows"].items():
            print(f"| {model_name:<20} | {mean:14.1f} | {worst:13.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
