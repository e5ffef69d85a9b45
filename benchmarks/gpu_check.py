"""GPU check (issue 8): latency tables, MDP solves and sliced-model timings on a real accelerator.

One command, at most ``--time-budget-s`` (default 480 s) end to end. For a DeiT-Base-shaped ViT
(DeiTForImageClassification from its config, random weights, 224x224) and a ResNet-50-shaped ResNet
(ResNetForImageClassification from its config), in fp16, at batch 64 and then 256:

1. importance: first-order Taylor scores from 2 batches of random images (once per model, on the host,
   fp32: this check measures latency, not accuracy);
2. probe: time a few cells of every latency table and the dense model, then pick the finest sub-grid level
   whose estimated build time fits this phase's share of the remaining time;
3. build the latency table on the device at the paper's group sizes (DeiT-B: E 16, heads 1, QK 2, V 2,
   MLP 32; ResNet-50: inner channels 32, residual widths 64) with the library's protocol (CUDA events,
   interleaved chunks, median of repeats), a few off-grid cells for the interpolation error, and the dense
   model end to end for calibration;
4. solve MDP at 70 / 50 / 30 % of the dense latency with the table model (MDP) and with the HALP-style
   linear model, slice each choice into a physically smaller model;
5. measure the dense and the six sliced models end to end, interleaved (CUDA events).

Results: ``OUTPUT_DIR/gpu_check.json`` and ``OUTPUT_DIR/gpu_check.md`` (rewritten after every phase, so a
run cut short still leaves what it finished), the progress log ``OUTPUT_DIR/gpu_check.log`` and the tables
``OUTPUT_DIR/table_<model>_b<batch>.json`` (7 files for the full run).
Phases run batch 64 for both models first; a phase that does not fit the time left is skipped and says
so. A phase that fails is reported with its traceback and the next one runs.

    bash benchmarks/gpu_check.sh OUT                   # = python benchmarks/gpu_check.py OUT --device cuda
    python benchmarks/gpu_check.py OUT --device cpu --tiny      # tiny models on the CPU: what CI runs

Needs only torch, transformers, numpy, safetensors, huggingface_hub, accelerate, tqdm, pyyaml
(imported by mdp_hf), not pyomo / highspy / datasets / evaluate: the default solver backend is the
pure-numpy chain DP. See docs/gpu.md.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # the time budget counts from here (imports included)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mdp_hf  # noqa: E402
from mdp_hf import build_space, gate_model, get_adapter, slice_model  # noqa: E402
from mdp_hf.importance import ImportanceAccumulator  # noqa: E402
from mdp_hf.latency import (  # noqa: E402
    LinearLatencyModel,
    TableLatencyModel,
    TimingSettings,
    build_table,
    interpolation_report,
    measure_latencies,
)
from mdp_hf.latency import profiler as _profiler  # noqa: E402
from mdp_hf.latency import timing as _timing  # noqa: E402
from mdp_hf.latency.profiler import subgrid_indices  # noqa: E402
from mdp_hf.masks import build_problem, choice_from_solution, kept_fraction_by_kind  # noqa: E402
from mdp_hf.solver import InfeasibleBudgetError, solve  # noqa: E402

SCHEMA = "mdp_hf.gpu_check/1"
FRACTIONS = (0.7, 0.5, 0.3)
LATENCY_MODELS = ("table", "linear")
RELATIVE_PHASE_COST = {"small": 1.0, "large": 1.4}  # share of the remaining time: the larger batch costs more


# ----------------------------------------------------------------------------------------------------------
# models, group sizes and sub-grid levels
# ----------------------------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    name: str  # short id used in file names
    title: str
    family: str  # "vit" | "resnet"
    config: dict
    image_size: int
    groups: dict
    # sub-grid levels, finest first: (strides per dimension kind or None for the full grid, core_full).
    # core_full=False also sub-samples the ViT attention-core table along QK and V (the library measures
    # its full QK x V grid); only the coarsest ViT level does that.
    levels: list = field(default_factory=list)

    def build(self, seed: int = 0):
        from transformers import DeiTConfig, DeiTForImageClassification, ResNetConfig, ResNetForImageClassification

        torch.manual_seed(seed)
        if self.family == "vit":
            return DeiTForImageClassification(DeiTConfig(**self.config)).eval()
        return ResNetForImageClassification(ResNetConfig(**self.config)).eval()


VIT_GROUPS = {"embed": 16, "heads": 1, "qk": 2, "v": 2, "mlp": 32}  # the paper's DeiT-B groups
RESNET_GROUPS = {"channels": 32, "residual": 64}  # inside the paper's 2-128 range for ResNet-50


def model_specs(tiny: bool) -> dict[str, ModelSpec]:
    if tiny:
        return {
            "deit": ModelSpec(
                "deit-tiny",
                "tiny DeiT-shaped ViT (E 64, 8 layers, 4 heads, MLP 128, 32x32, patch 8)",
                "vit",
                dict(
                    hidden_size=64,
                    num_hidden_layers=8,
                    num_attention_heads=4,
                    intermediate_size=128,
                    image_size=32,
                    patch_size=8,
                    num_labels=10,
                ),
                32,
                {"embed": 16, "heads": 1, "qk": 4, "v": 4, "mlp": 32},
                [
                    ({"embed": 2, "heads": 2, "qk": 2, "v": 2, "mlp": 2}, True),
                    ({"embed": 3, "heads": 3, "qk": 3, "v": 3, "mlp": 3}, False),
                ],
            ),
            "resnet": ModelSpec(
                "resnet-tiny",
                "tiny bottleneck ResNet (stem 16, widths 64-512, depths 3-3-3-3, 32x32)",
                "resnet",
                dict(
                    embedding_size=16,
                    hidden_sizes=[64, 128, 256, 512],
                    depths=[3, 3, 3, 3],
                    layer_type="bottleneck",
                    num_labels=10,
                ),
                32,
                {"channels": 16, "residual": 64},
                [({"channels": 2, "residual": 2}, True), ({"channels": 3, "residual": 3}, True)],
            ),
        }
    return {
        "deit": ModelSpec(
            "deit-base",
            "DeiT-Base-shaped ViT (E 768, 12 layers, 12 heads, MLP 3072, 224x224, patch 16)",
            "vit",
            dict(
                hidden_size=768,
                num_hidden_layers=12,
                num_attention_heads=12,
                intermediate_size=3072,
                image_size=224,
                patch_size=16,
                num_labels=1000,
            ),
            224,
            dict(VIT_GROUPS),
            [
                ({"embed": 4, "heads": 2, "qk": 4, "v": 4, "mlp": 4}, True),
                ({"embed": 8, "heads": 4, "qk": 8, "v": 8, "mlp": 8}, True),
                ({"embed": 12, "heads": 6, "qk": 16, "v": 16, "mlp": 16}, True),
                ({"embed": 24, "heads": 11, "qk": 16, "v": 16, "mlp": 24}, True),
                ({"embed": 24, "heads": 11, "qk": 8, "v": 8, "mlp": 24}, False),
            ],
        ),
        "resnet": ModelSpec(
            "resnet-50",
            "ResNet-50-shaped ResNet (bottleneck, depths 3-4-6-3, widths 256-2048, 224x224)",
            "resnet",
            dict(
                embedding_size=64,
                hidden_sizes=[256, 512, 1024, 2048],
                depths=[3, 4, 6, 3],
                layer_type="bottleneck",
                num_labels=1000,
            ),
            224,
            dict(RESNET_GROUPS),
            [
                (None, True),
                ({"channels": 2, "residual": 2}, True),
                ({"channels": 4, "residual": 4}, True),
                ({"channels": 8, "residual": 8}, True),
            ],
        ),
    }


def stride_of(subgrid, kind: str) -> int:
    if subgrid is None:
        return 1
    if isinstance(subgrid, int):
        return max(1, subgrid)
    return max(1, int(subgrid.get(kind, subgrid.get("default", 1))))


def subgrid_sizes(tables, subgrid, core_full: bool = True) -> dict[str, int]:
    """Cells build_table will measure per table at this sub-grid (same rule as the profiler)."""
    out = {}
    for t in tables:
        full = set(t.params.get("full_axes", [])) if core_full else set()
        tail = set(t.params.get("tail_axes", []))
        n = 1
        for a, (kind, axis) in enumerate(zip(t.axis_names, t.axes)):
            n *= len(subgrid_indices(len(axis), 1 if a in full else stride_of(subgrid, kind), a in tail))
        out[t.key] = n
    return out


# ----------------------------------------------------------------------------------------------------------
# run context: cell hooks (device placement, deadline), CUDA-event fallback
# ----------------------------------------------------------------------------------------------------------
class OutOfTime(RuntimeError):
    """A table build ran past its deadline (raised between cells; the saved partial table is kept)."""


class Context:
    def __init__(self, args, report):
        self.args = args
        self.report = report
        self.deadline = _T0 + args.time_budget_s
        self.build_deadline: float | None = None
        self.cells_on_device = not args.cells_on_host
        self.core_full = True

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def note(self, text: str) -> None:
        self.report["notes"].append(text)
        log(f"note: {text}")

    def check_deadline(self) -> None:
        if self.build_deadline is not None and time.perf_counter() > self.build_deadline:
            raise OutOfTime("the table build ran past its deadline")


def _wrap_blocks(base, ctx: Context):
    """The family's profiling class with: cells built directly on the device (the library builds modules
    and random inputs on the host and copies them: at batch 256 the host randn alone costs 0.4-3 s per
    cell), a deadline check between cells, and optional sub-sampling of the ViT attention-core table."""

    def on_device(self):
        return ctx.cells_on_device and torch.device(self.settings.device).type != "cpu"

    class Blocks(base):
        def __init__(self, model, space, settings):
            with _no_init():  # ViTCells slices the model only to read the deployed config: skip weight init
                super().__init__(model, space, settings)

        def plan(self):
            tables, terms = super().plan()
            if not ctx.core_full:
                for t in tables:
                    t.params.pop("full_axes", None)
            return tables, terms

        def build_cell(self, table, widths):
            ctx.check_deadline()
            if on_device(self):
                try:
                    with torch.device(self.settings.device):
                        return super().build_cell(table, widths)
                except Exception as error:  # noqa: BLE001  (fall back to the library's own path)
                    ctx.cells_on_device = False
                    ctx.note(f"building cells directly on the device failed ({error!r}); building them on the host")
            return super().build_cell(table, widths)

        def dense_model(self):
            if on_device(self):
                try:
                    with torch.device(self.settings.device):
                        return super().dense_model()
                except Exception as error:  # noqa: BLE001
                    ctx.note(f"building the dense model on the device failed ({error!r}); building it on the host")
            return super().dense_model()

    Blocks.__name__ = Blocks.__qualname__ = f"GpuCheck{base.__name__}"
    return Blocks


_LIBRARY_FAMILY_CELLS = _profiler.family_cells


def install_hooks(ctx: Context):
    """Every family's latency cells wrapped by _wrap_blocks (the profiler looks family_cells up per call)."""
    wrapped = {}

    def family_cells(model, space, settings):
        cells_cls = mdp_hf.get_family(space.model_type).latency_cells
        if cells_cls not in wrapped:
            wrapped[cells_cls] = _wrap_blocks(cells_cls, ctx)
        return wrapped[cells_cls](model, space, settings)

    _profiler.family_cells = family_cells


def remove_hooks():
    _profiler.family_cells = _LIBRARY_FAMILY_CELLS


_LIBRARY_TIME_INTERLEAVED = _timing.time_interleaved


def wallclock_time_interleaved(calls, device="cpu", warmup=3, repeats=15, statistic="median"):
    """Fallback for ``mdp_hf.latency.timing.time_interleaved`` (same protocol and signature): every call is
    bracketed by ``synchronize`` + ``time.perf_counter`` instead of CUDA events."""
    dev = torch.device(device)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    samples: list[list[float]] = [[] for _ in calls]
    with torch.inference_mode():
        for call in calls:
            for _ in range(warmup):
                call()
        sync()
        for _ in range(repeats):
            for i, call in enumerate(calls):
                sync()
                t0 = time.perf_counter()
                call()
                sync()
                samples[i].append((time.perf_counter() - t0) * 1e3)
    out = []
    for s in samples:
        med, low = statistics.median(s), min(s)
        out.append(
            _timing.Measurement(ms=med if statistic == "median" else low, median_ms=med, min_ms=low, samples_ms=s)
        )
    return out


def use_timing(method: str) -> None:
    fn = wallclock_time_interleaved if method == "wallclock" else _LIBRARY_TIME_INTERLEAVED
    _timing.time_interleaved = fn  # used by measure_latencies
    _profiler.time_interleaved = fn  # imported by name into the profiler


def cuda_preflight(ctx: Context) -> dict:
    """CUDA facts, and a check that the library's CUDA-event timing runs and agrees with a synchronised
    wall clock on a large matmul; on failure, switch to the wall-clock fallback (reported)."""
    dev = torch.device(ctx.args.device)
    props = torch.cuda.get_device_properties(dev)
    info = {
        "gpu_name": torch.cuda.get_device_name(dev),
        "capability": list(torch.cuda.get_device_capability(dev)),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except Exception as error:  # noqa: BLE001
        info["nvidia_smi"] = f"unavailable ({error.__class__.__name__})"
    a = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    call = lambda: a @ a  # noqa: E731, F821 (ruff reads the later `del a` as before the call)
    method = ctx.args.timing
    if method in ("auto", "events"):
        try:
            events_ms = _LIBRARY_TIME_INTERLEAVED([call], ctx.args.device, 3, 10, "median")[0].ms
            wall_ms = wallclock_time_interleaved([call], ctx.args.device, 3, 10, "median")[0].ms
            ratio = events_ms / wall_ms
            info["timing_check"] = {
                "matmul_8192_fp16_events_ms": round(events_ms, 4),
                "wallclock_ms": round(wall_ms, 4),
                "ratio": round(ratio, 3),
                "tflops_events": round(2 * 8192**3 / events_ms / 1e9, 1),
            }
            if not 0.5 < ratio < 1.5:
                ctx.note(f"CUDA-event and wall-clock timings of an 8192^3 fp16 matmul disagree (ratio {ratio:.2f})")
            method = "events"
        except Exception as error:  # noqa: BLE001
            info["timing_check"] = {"error": traceback.format_exc(limit=3)}
            if ctx.args.timing == "events":
                raise
            ctx.note(f"the library's CUDA-event timing failed ({error!r}); using synchronize + perf_counter instead")
            method = "wallclock"
    use_timing(method)
    info["timing_method"] = "CUDA events (library)" if method == "events" else "synchronize + perf_counter (fallback)"
    del a
    torch.cuda.empty_cache()
    return info


# ----------------------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------------------
_LOG = {"path": None}


def log(text: str) -> None:
    line = f"[{time.perf_counter() - _T0:7.1f} s] {text}"
    print(line, flush=True)
    if _LOG["path"] is not None:
        with open(_LOG["path"], "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def _present(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def environment(args) -> dict:
    import transformers

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "mdp_hf": mdp_hf.__version__,
        "cpu": _timing.device_name("cpu"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "optional_packages_present": {p: _present(p) for p in ("pyomo", "highspy")},
    }
    try:
        env["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    return env


def _fmt(value, spec=".2f", missing="–"):
    return missing if value is None else format(value, spec)


def markdown(report: dict) -> str:
    env, cuda = report["environment"], report.get("cuda") or {}
    mode = (
        "CPU tiny mode (tiny models: a smoke test of the pipeline, not GPU figures)"
        if report["tiny"]
        else "full models"
    )
    lines = [
        f"# MDP GPU check — {mode}",
        "",
        f"- date (UTC): {report['date']}; device: **{cuda.get('gpu_name') or env['cpu']}** ({report['device']}); "
        f"dtype {report['dtype']}; batch sizes {', '.join(map(str, report['batch_sizes']))}",
        f"- torch {env['torch']} (CUDA {env['torch_cuda']}, cuDNN {cuda.get('cudnn', '–')}), transformers "
        f"{env['transformers']}, Python {env['python']}, mdp_hf {env['mdp_hf']} ({env.get('git_commit') or 'no git'})",
        f"- timing: {report['timing_method']}; table cells: warm-up {report['cell_timing']['warmup']}, "
        f"{report['cell_timing']['statistic']} of {report['cell_timing']['repeats']}; end to end: warm-up "
        f"{report['e2e_timing']['warmup']}, {report['e2e_timing']['statistic']} of {report['e2e_timing']['repeats']}, "
        "dense and sliced models interleaved",
        f"- total {report['elapsed_s']:.1f} s of a {report['time_budget_s']:.0f} s budget "
        f"({'finished' if report['finished'] else 'running / cut short'})",
    ]
    if cuda.get("timing_check"):
        lines.append(f"- timing check (8192^3 fp16 matmul): {cuda['timing_check']}")
    if cuda.get("nvidia_smi"):
        lines.append(f"- nvidia-smi: {cuda['nvidia_smi']}")
    for name, imp in report["importance"].items():
        lines.append(
            f"- importance {name}: {imp.get('batches')} random batches of {imp.get('batch_size')} in "
            f"{_fmt(imp.get('seconds'), '.1f')} s ({imp.get('status')})"
        )
    lines += [
        "",
        "Budgets are fractions of the dense latency predicted by the calibrated table (its end-to-end "
        "reference). error = (predicted − measured) / measured; speedup = measured dense / measured pruned "
        "(same deployed code path, same interleaved run).",
        "",
    ]
    header = (
        "| model | batch | budget | latency model | budget ms | predicted ms | measured ms | error % | "
        "measured/dense | speedup | solver s | status |"
    )
    rows = [header, "|" + "---|" * 12]
    for phase in report["phases"]:
        for r in phase.get("results", []):
            rows.append(
                f"| {phase['model']} | {phase['batch_size']} | {100 * r['budget_fraction']:.0f}% | {r['latency_model']} | "
                f"{_fmt(r.get('budget_ms'), '.3f')} | {_fmt(r.get('predicted_ms'), '.3f')} | {_fmt(r.get('measured_ms'), '.3f')} | "
                f"{_fmt(r.get('error_pct'), '+.1f')} | {_fmt(r.get('measured_fraction'), '.3f')} | {_fmt(r.get('speedup'), '.2f')}x | "
                f"{_fmt(r.get('solver_time_s'), '.3f')} | {r['status']} |"
            )
    lines += rows + ["", "## Phases", ""]
    for phase in report["phases"]:
        head = f"### {phase['model']}, batch {phase['batch_size']}: {phase['status']}"
        lines.append(head)
        if phase.get("reason"):
            lines.append(f"- {phase['reason']}")
        t = phase.get("table")
        if t:
            lines.append(
                f"- groups {t['groups']}; sub-grid level {t['level']} strides {t['subgrid']}"
                f"{'' if t['core_full'] else ' (attention core sub-sampled too)'}"
            )
            if t.get("cells_measured") is not None:
                lines.append(
                    f"- table: {t['cells_measured']} cells measured of {t['cells_full_grid']} "
                    f"({100 * t['cells_measured'] / max(t['cells_full_grid'], 1):.1f}%), build {t['build_s']:.1f} s "
                    f"(estimated {t['estimated_s']:.1f} s); interpolation error at {t['interpolation'].get('cells', 0)} "
                    f"off-grid cells: mean {_fmt(t['interpolation'].get('mean_abs_pct'), '.1f')}%, max "
                    f"{_fmt(t['interpolation'].get('max_abs_pct'), '.1f')}%"
                )
                lines.append(
                    f"- dense: table reference {_fmt(t.get('dense_reference_ms'), '.3f')} ms, calibration factor "
                    f"{_fmt(t.get('calibration_factor'), '.3f')}; measured with the sliced models "
                    f"{_fmt(phase.get('dense_measured_ms'), '.3f')} ms (HF model "
                    f"{_fmt(phase.get('hf_dense_measured_ms'), '.3f')} ms)"
                )
        if phase.get("elapsed_s") is not None:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in phase.get("timings_s", {}).items())
            lines.append(f"- elapsed {phase['elapsed_s']:.1f} s ({parts})")
        if phase.get("error"):
            lines += ["", "```", phase["error"].rstrip(), "```"]
        lines.append("")
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> None:
    report["elapsed_s"] = round(time.perf_counter() - _T0, 2)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(report), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# the work
# ----------------------------------------------------------------------------------------------------------
def importance_scores(model, space, image_size: int, batches: int, batch_size: int) -> dict[str, np.ndarray]:
    """Taylor scores of every unit from ``batches`` random batches (host, fp32; latency is what is checked)."""
    gates = gate_model(model, space)
    adapter = get_adapter(model)
    scores = ImportanceAccumulator(
        {name: dim.size for name, dim in space.dimensions.items()}, adapter.default_score_kind
    )
    num_labels = model.config.num_labels
    generator = torch.Generator().manual_seed(0)
    try:
        model.train()
        for _ in range(batches):
            pixels = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
            labels = torch.randint(0, num_labels, (batch_size,), generator=generator)
            model.zero_grad(set_to_none=True)
            model(pixel_values=pixels, labels=labels).loss.backward()
            scores.add(adapter.taylor_scores(model, space, gates))
        model.zero_grad(set_to_none=True)
        return {name: value.numpy() for name, value in scores.commit().items()}
    finally:
        gates.remove()
        model.eval()


def _no_init():
    """transformers' ``no_init_weights`` (skips the random initialisation that slicing overwrites anyway)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        return contextlib.nullcontext()
    return no_init_weights()


def check_fast_slicing(ctx: Context, spec: ModelSpec, model, space) -> dict:
    """Slicing builds the pruned model with a full random initialisation and then copies every kept weight
    over it (DeiT-B: ~5 of ~9 s on a 2-core host are initialisation). Slice once with and once without the
    initialisation; use the fast path only if both give identical logits (every parameter is copied)."""
    choice = space.full_choice()
    t0 = time.perf_counter()
    reference = slice_model(model, space, choice)
    slow = time.perf_counter() - t0
    t0 = time.perf_counter()
    with _no_init():
        fast_model = slice_model(model, space, choice)
    fast = time.perf_counter() - t0
    x = torch.randn(1, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        same = bool(torch.equal(reference.eval()(x).logits, fast_model.eval()(x).logits))
    if not same:
        ctx.note(f"{spec.name}: slicing without weight initialisation changes the logits; using the normal (slow) path")
    return {
        "slice_s": fast if same else slow,
        "slice_normal_s": round(slow, 2),
        "slice_no_init_s": round(fast, 2),
        "slice_fast": same,
    }


def sliced(prepared: dict, choice):
    if prepared.get("slice_fast"):
        with _no_init():
            return slice_model(prepared["model"], prepared["space"], choice)
    return slice_model(prepared["model"], prepared["space"], choice)


def probe(ctx: Context, model, space, settings: TimingSettings) -> dict:
    """Wall time per cell (build, FLOP count, warm-up, repeats) of a few cells of every table, and the dense
    model's forward time: the basis of the sub-grid choice."""
    blocks = _profiler.family_cells(model, space, settings)
    tables, _ = _profiler._planned(blocks)
    count = getattr(_profiler, "_count", None)
    rng = random.Random(0)
    device = torch.device(settings.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def cell_cost(t, cell) -> float:
        start = time.perf_counter()
        module, x = blocks.build_cell(t, t.widths_at(cell))
        args = x if isinstance(x, tuple) else (x,)
        if count is not None:
            with torch.inference_mode():
                count(module, args)
        _timing.time_interleaved(
            [lambda: module(*args)], settings.device, settings.warmup, settings.repeats, settings.statistic
        )
        sync()
        return time.perf_counter() - start

    threads = settings.threads if device.type == "cpu" else None
    with _timing.thread_count(threads):
        first = tables[0]
        cell_cost(first, tuple(n - 1 for n in first.shape))  # warm-up: library / kernel initialisation
        per_table = {}
        for t in tables:
            cells = {tuple(n - 1 for n in t.shape), tuple(0 for _ in t.shape), tuple(rng.randrange(n) for n in t.shape)}
            per_table[t.key] = statistics.mean(cell_cost(t, c) for c in sorted(cells))
        start = time.perf_counter()
        dense = blocks.dense_model().to(device=settings.device, dtype=settings.torch_dtype).eval()
        build_s = time.perf_counter() - start
        pixels = blocks.example_input().to(device=settings.device, dtype=settings.torch_dtype)
        dense_ms = _timing.time_interleaved([lambda: dense(pixels)], settings.device, 1, 3, "median")[0].ms  # noqa: F821 (both are bound in the branch above whenever this runs)
    del dense, pixels
    return {"tables": tables, "per_cell_s": per_table, "dense_ms": dense_ms, "dense_build_s": build_s}


def table_estimate(p: dict, subgrid, core_full: bool, settings: TimingSettings, validate: int) -> float:
    sizes = subgrid_sizes(p["tables"], subgrid, core_full)
    cells = sum(sizes[k] * p["per_cell_s"][k] for k in sizes)
    validation = validate * sum(p["per_cell_s"].values())
    calibration = p["dense_build_s"] + (settings.warmup + max(settings.repeats, 20)) * p["dense_ms"] / 1e3
    return 1.1 * (cells + validation) + calibration


def run_phase(
    ctx: Context, spec: ModelSpec, prepared: dict, batch: int, allot_s: float, phase: dict, out: Path
) -> None:
    args = ctx.args
    model, space, scores = prepared["model"], prepared["space"], prepared["scores"]
    cell = TimingSettings(
        device=args.device,
        batch_size=batch,
        image_size=spec.image_size,
        dtype=args.dtype,
        threads=args.threads,
        attn_implementation="sdpa",
        warmup=args.cell_warmup,
        repeats=args.cell_repeats,
        statistic=args.statistic,
    )
    e2e = TimingSettings(**{**cell.to_dict(), "warmup": args.e2e_warmup, "repeats": args.e2e_repeats})
    timings = phase["timings_s"]
    phase_start = time.perf_counter()

    if ctx.left() - args.reserve_s < args.min_phase_s:
        phase["status"] = "skipped"
        phase["reason"] = (
            f"skipped for time: {max(ctx.left(), 0):.0f} s left, at least {args.min_phase_s + args.reserve_s:.0f} s needed"
        )
        return

    # 1. probe and choose the sub-grid level ------------------------------------------------------------
    t0 = time.perf_counter()
    ctx.build_deadline, ctx.core_full = None, True
    p = probe(ctx, model, space, cell)
    timings["probe"] = time.perf_counter() - t0
    n_models = 2 + len(FRACTIONS) * len(LATENCY_MODELS)
    measure_est = 1.3 * n_models * (e2e.warmup + e2e.repeats + 1) * p["dense_ms"] / 1e3 + 2 * p["dense_build_s"]
    rest_est = measure_est + len(FRACTIONS) * len(LATENCY_MODELS) * (prepared["slice_s"] + args.solver_allowance_s)
    table_budget = allot_s - timings["probe"] - rest_est
    estimates = [table_estimate(p, sg, core, cell, args.validate) for sg, core in spec.levels]
    levels = range(len(spec.levels))
    if args.level is not None:
        level = min(args.level, len(spec.levels) - 1)
    else:
        fitting = [i for i in levels if estimates[i] <= table_budget]
        level = fitting[0] if fitting else len(spec.levels) - 1
    hard_left = ctx.left() - rest_est - args.reserve_s
    if args.level is None and estimates[level] > hard_left:
        phase["status"] = "skipped"
        phase["reason"] = (
            f"skipped for time: the coarsest table is estimated at {estimates[level]:.0f} s plus "
            f"{rest_est:.0f} s for solving and measuring, but only {ctx.left():.0f} s are left"
        )
        phase["estimates_s"] = [round(e, 1) for e in estimates]
        return
    if args.level is None and estimates[level] > table_budget:
        ctx.note(
            f"{spec.name} b{batch}: even the coarsest sub-grid ({estimates[level]:.0f} s estimated) exceeds "
            f"this phase's share ({table_budget:.0f} s); running it anyway: {ctx.left():.0f} s are left"
        )
    subgrid, core_full = spec.levels[level]
    sizes = subgrid_sizes(p["tables"], subgrid, core_full)
    full_cells = sum(int(np.prod(t.shape)) for t in p["tables"])
    phase["table"] = {
        "groups": spec.groups,
        "level": level,
        "subgrid": subgrid or "full grid",
        "core_full": core_full,
        "estimated_s": estimates[level],
        "estimates_s": [round(e, 1) for e in estimates],
        "table_budget_s": round(table_budget, 1),
        "cells_planned": int(sum(sizes.values())),
        "cells_full_grid": full_cells,
        "probe_per_cell_ms": {k: round(1e3 * v, 2) for k, v in p["per_cell_s"].items()},
    }
    log(
        f"{spec.name} b{batch}: level {level} ({sum(sizes.values())} cells of {full_cells}), estimated "
        f"{estimates[level]:.0f} s for a {table_budget:.0f} s share; dense ~{p['dense_ms']:.2f} ms"
    )

    # 2. build the table ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    ctx.core_full = core_full
    ctx.build_deadline = t0 + min(
        max(1.5 * estimates[level], table_budget), max(ctx.left() - rest_est - args.reserve_s, 1.0)
    )
    path = out / f"table_{spec.name}_b{batch}.json"
    try:
        table = build_table(
            model,
            path,
            space=space,
            settings=cell,
            subgrid=subgrid,
            validate=args.validate,
            recheck=args.recheck,
            chunk_size=args.chunk_size,
            progress=False,
            overwrite=True,
        )
    except OutOfTime:
        timings["table"] = time.perf_counter() - t0
        phase["status"] = "aborted"
        phase["reason"] = (
            f"the table build passed its deadline after {timings['table']:.0f} s (estimated "
            f"{estimates[level]:.0f} s); the partial table is in {path.name}"
        )
        return
    finally:
        ctx.build_deadline, ctx.core_full = None, True
    timings["table"] = time.perf_counter() - t0
    table_model = TableLatencyModel(table, space)
    models = {"table": table_model, "linear": LinearLatencyModel(table, space)}
    dense_pred = table_model.dense_ms()
    phase["table"].update(
        {
            "path": path.name,
            "cells_measured": int(table.num_measured),
            "build_s": round(timings["table"], 2),
            "build_seconds_metadata": table.metadata.get("build_seconds"),
            "interpolation": interpolation_report(table),
            "dense_reference_ms": table.reference.get("dense_measured_ms"),
            "dense_reference_spread": table.reference.get("dense_spread"),
            "calibration_factor": table_model.calibration_factor,
            "dense_predicted_ms": dense_pred,
            "rechecked_cells": table.metadata.get("rechecked_cells", 0),
        }
    )
    log(
        f"{spec.name} b{batch}: table built in {timings['table']:.1f} s ({table.num_measured} cells); dense "
        f"{dense_pred:.3f} ms (calibration {table_model.calibration_factor:.3f})"
    )

    # 3. solve and slice ---------------------------------------------------------------------------------
    timings["solve"], timings["slice"] = 0.0, 0.0
    results, pruned_models = phase["results"], []
    for name in LATENCY_MODELS:
        lm = models[name]
        terms = lm.solver_terms(space)
        for fraction in FRACTIONS:
            budget = fraction * dense_pred
            row = {"budget_fraction": fraction, "latency_model": name, "budget_ms": budget, "status": "ok"}
            results.append(row)
            try:
                t0 = time.perf_counter()
                problem = build_problem(space, scores, terms, budget)
                solution = solve(problem, args.solver_backend, args.solver_time_limit_s)
                timings["solve"] += time.perf_counter() - t0
                choice = choice_from_solution(space, scores, solution)
                row.update(
                    {
                        "predicted_ms": float(solution.latency_ms),
                        "model_predict_ms": lm.predict((space, choice)),
                        "table_model_predicted_ms": table_model.predict((space, choice)),
                        "solver_time_s": float(solution.solve_time_s),
                        "solver_status": solution.status,
                        "solver_backend": solution.backend,
                        "solver_gap": float(solution.gap),
                        "within_budget_predicted": bool(solution.latency_ms <= budget * (1 + 1e-9)),
                        "removed_blocks": len(choice.removed_blocks),
                        "kept_fraction": {k: round(v, 4) for k, v in kept_fraction_by_kind(space, choice).items()},
                    }
                )
                t0 = time.perf_counter()
                pruned = sliced(prepared, choice)
                timings["slice"] += time.perf_counter() - t0
                row["params_m"] = sum(q.numel() for q in pruned.parameters()) / 1e6
                if solution.status != "optimal":
                    row["status"] = f"solver {solution.status}"
                pruned_models.append((row, pruned))
            except InfeasibleBudgetError as error:
                row.update({"status": "infeasible", "min_latency_ms": getattr(error, "min_latency_ms", None)})
            except Exception:  # noqa: BLE001
                row.update({"status": "error", "error": traceback.format_exc(limit=6)})
                log(f"{spec.name} b{batch} {name} {fraction:.0%}: error\n{row['error']}")

    # 4. measure dense and sliced models, interleaved ---------------------------------------------------
    t0 = time.perf_counter()
    device, dtype = torch.device(args.device), cell.torch_dtype
    dense = sliced(prepared, space.full_choice())
    hf_dense = copy.deepcopy(model)
    candidates = [("hf_dense", hf_dense), ("dense", dense)] + [(row, m) for row, m in pruned_models]
    pixels = torch.randn(batch, 3, spec.image_size, spec.image_size, device=device).to(dtype)
    timed = []
    for key, m in candidates:
        m.to(device=device, dtype=dtype).eval()
        with torch.inference_mode():
            logits = m(pixels).logits
        ok = tuple(logits.shape) == (batch, model.config.num_labels)
        finite = bool(torch.isfinite(logits).all())
        if isinstance(key, dict):
            key.update({"output_shape_ok": ok, "output_finite": finite})
        elif not ok:
            raise AssertionError(f"{key} model gives logits of shape {tuple(logits.shape)}")
        timed.append(m)
    try:
        measured = measure_latencies(timed, e2e, inputs=pixels)
    except Exception as error:  # noqa: BLE001
        if device.type != "cuda" or _timing.time_interleaved is wallclock_time_interleaved:
            raise
        ctx.note(
            f"{spec.name} b{batch}: timing with CUDA events failed ({error!r}); retrying with the wall-clock fallback"
        )
        use_timing("wallclock")
        ctx.report["timing_method"] = "synchronize + perf_counter (fallback after a CUDA-event failure)"
        measured = measure_latencies(timed, e2e, inputs=pixels)
    timings["measure"] = time.perf_counter() - t0
    hf_ms, dense_ms = measured[0].ms, measured[1].ms
    phase.update(
        {"hf_dense_measured_ms": hf_ms, "dense_measured_ms": dense_ms, "dense_measured_spread": measured[1].spread}
    )
    for (row, _), m in zip(pruned_models, measured[2:]):
        row.update(
            {
                "measured_ms": m.ms,
                "measured_spread": m.spread,
                "error_pct": 100 * (row["predicted_ms"] - m.ms) / m.ms,
                "measured_fraction": m.ms / dense_ms,
                "speedup": dense_ms / m.ms,
                "within_budget_measured": m.ms <= row["budget_ms"],
            }
        )
    del candidates, timed, pruned_models, dense, hf_dense, pixels
    phase["status"] = "ok" if all(r["status"] == "ok" for r in results) else "partial"
    if any(r["status"] == "error" for r in results):
        phase["status"] = "error"
    phase["elapsed_s"] = time.perf_counter() - phase_start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dir")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models (seconds on a CPU): the CI smoke test")
    parser.add_argument("--time-budget-s", type=float, default=480.0, help="whole run, imports included")
    parser.add_argument("--models", default="deit,resnet", help="comma-separated subset of deit,resnet")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (default 64,256; tiny: 2,8)")
    parser.add_argument("--dtype", default=None, help="float16 (default on CUDA) / float32 (default on CPU) / bfloat16")
    parser.add_argument(
        "--level", type=int, default=None, help="force this sub-grid level (0 = finest) for every phase"
    )
    parser.add_argument(
        "--timing",
        choices=["auto", "events", "wallclock"],
        default="auto",
        help="CUDA timing: the library's CUDA events (auto falls back to wall clock if they fail)",
    )
    parser.add_argument(
        "--cells-on-host",
        action="store_true",
        help="build table cells on the host and copy them (the library's own path; slow at batch 256)",
    )
    parser.add_argument("--validate", type=int, default=None, help="off-grid cells per table (interpolation error)")
    parser.add_argument(
        "--recheck",
        type=float,
        default=None,
        help="outlier re-timing tolerance (default: off on CUDA, the library's 0.15 on CPU)",
    )
    parser.add_argument("--statistic", choices=["median", "min"], default="median")
    parser.add_argument("--solver-backend", default="auto")
    parser.add_argument("--solver-time-limit-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)

    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    batch_sizes = (
        [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else ([2, 8] if args.tiny else [64, 256])
    )
    args.threads = None if cuda else 1
    args.validate = args.validate if args.validate is not None else (4 if args.tiny else 12)
    args.recheck = args.recheck if args.recheck is not None else (None if cuda else 0.15)
    args.chunk_size = 64 if args.tiny or not cuda else 32  # at batch 256 a chunk's inputs live on the GPU together
    args.cell_warmup, args.cell_repeats = (1, 5) if args.tiny else (3, 10)
    args.e2e_warmup, args.e2e_repeats = (3, 15) if args.tiny else (5, 30)
    args.solver_allowance_s = 0.2 if args.tiny else 1.0
    args.reserve_s = 2.0 if args.tiny else 8.0
    args.min_phase_s = 2.0 if args.tiny else 20.0
    args.importance_batches, args.importance_batch_size = 2, 4

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _LOG["path"] = out / "gpu_check.log"
    _LOG["path"].write_text("", encoding="utf-8")
    threads_before = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # everything on one thread: on a busy 2-core host more threads thrash (100x slower)
    try:
        return _run(args, cuda, batch_sizes, out, parser)
    finally:
        torch.set_num_threads(threads_before)
        _LOG["path"] = None


def _run(args, cuda: bool, batch_sizes: list[int], out: Path, parser) -> int:
    specs = model_specs(args.tiny)
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(specs))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(specs)}")
    report = {
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tiny": args.tiny,
        "device": args.device,
        "dtype": args.dtype,
        "batch_sizes": batch_sizes,
        "budget_fractions": list(FRACTIONS),
        "latency_models": list(LATENCY_MODELS),
        "time_budget_s": args.time_budget_s,
        "finished": False,
        "argv": args.argv,
        "environment": environment(args),
        "cuda": None,
        "timing_method": "perf_counter (CPU)",
        "cell_timing": {
            "warmup": args.cell_warmup,
            "repeats": args.cell_repeats,
            "statistic": args.statistic,
            "recheck": args.recheck,
            "chunk_size": args.chunk_size,
            "validate_per_table": args.validate,
            "threads": args.threads,
            "cells_built_on_device": cuda and not args.cells_on_host,
        },
        "e2e_timing": {"warmup": args.e2e_warmup, "repeats": args.e2e_repeats, "statistic": args.statistic},
        "models": {
            k: {
                "name": s.name,
                "title": s.title,
                "groups": s.groups,
                "config": s.config,
                "levels": [{"subgrid": sg or "full grid", "core_full": c} for sg, c in s.levels],
            }
            for k, s in specs.items()
            if k in wanted
        },
        "importance": {},
        "phases": [],
        "notes": [],
    }
    ctx = Context(args, report)
    log(
        f"gpu_check: device {args.device}, {args.dtype}, batches {batch_sizes}, models {wanted}, budget {args.time_budget_s:.0f} s"
    )
    write_report(out, report)
    if cuda:
        if not torch.cuda.is_available():
            ctx.note(
                f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}): nothing was measured"
            )
            write_report(out, report)
            print(markdown(report))
            return 2
        try:
            report["cuda"] = cuda_preflight(ctx)
            report["timing_method"] = report["cuda"]["timing_method"]
            log(
                f"GPU {report['cuda']['gpu_name']}, CUDA {report['cuda']['cuda_runtime']}; timing: {report['timing_method']}"
            )
        except Exception:  # noqa: BLE001
            report["cuda"] = {"error": traceback.format_exc(limit=6)}
            ctx.note("the CUDA pre-flight failed; see cuda.error")
            write_report(out, report)
            print(markdown(report))
            return 2
    install_hooks(ctx)
    try:
        # models, spaces, importance (once per model) ----------------------------------------------------
        prepared = {}
        for key in wanted:
            spec = specs[key]
            t0 = time.perf_counter()
            imp = report["importance"][spec.name] = {
                "batches": args.importance_batches,
                "batch_size": args.importance_batch_size,
            }
            try:
                model = spec.build()
                space = build_space(model, group_sizes=spec.groups)
                scores = importance_scores(
                    model, space, spec.image_size, args.importance_batches, args.importance_batch_size
                )
                prepared[key] = {"model": model, "space": space, "scores": scores}
                prepared[key].update(check_fast_slicing(ctx, spec, model, space))
                imp.update(
                    {
                        "status": "ok",
                        "seconds": round(time.perf_counter() - t0, 2),
                        "dimensions": len(space.dimensions),
                        "blocks": len(space.blocks),
                        "slicing": {k: v for k, v in prepared[key].items() if k.startswith("slice")},
                    }
                )
            except Exception:  # noqa: BLE001
                imp.update({"status": "error", "error": traceback.format_exc(limit=6)})
                log(f"{spec.name}: model / importance failed\n{imp['error']}")
            log(f"{spec.name}: model, space and importance in {time.perf_counter() - t0:.1f} s")
        write_report(out, report)

        # phases: the small batch for every model first --------------------------------------------------
        plan = [(key, b, "small" if i == 0 else "large") for i, b in enumerate(batch_sizes) for key in wanted]
        for i, (key, batch, size) in enumerate(plan):
            spec = specs[key]
            phase = {"model": spec.name, "batch_size": batch, "status": "running", "timings_s": {}, "results": []}
            report["phases"].append(phase)
            weights = [RELATIVE_PHASE_COST[s] for *_, s in plan[i:]]
            allot = (ctx.left() - args.reserve_s) * weights[0] / sum(weights)
            start = time.perf_counter()
            log(f"phase {i + 1}/{len(plan)}: {spec.name} batch {batch}; share {allot:.0f} s of {ctx.left():.0f} s left")
            try:
                if key not in prepared:
                    phase.update(
                        {"status": "error", "reason": "the model could not be built / scored (see importance)"}
                    )
                else:
                    run_phase(ctx, spec, prepared[key], batch, allot, phase, out)
            except Exception:  # noqa: BLE001
                phase.update({"status": "error", "error": traceback.format_exc(limit=8)})
                log(f"{spec.name} b{batch}: error\n{phase['error']}")
            finally:
                phase["elapsed_s"] = time.perf_counter() - start
                phase["timings_s"] = {k: round(v, 2) for k, v in phase["timings_s"].items()}
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            log(
                f"phase {i + 1}/{len(plan)}: {spec.name} b{batch} {phase['status']} in {phase['elapsed_s']:.1f} s "
                f"({', '.join(f'{k} {v:.1f}' for k, v in phase['timings_s'].items())})"
                + (f": {phase['reason']}" if phase.get("reason") else "")
            )
            write_report(out, report)
    finally:
        remove_hooks()
        use_timing("events")
    report["finished"] = True
    write_report(out, report)
    print(markdown(report))
    failed = [p for p in report["phases"] if p["status"] == "error"]
    failed += [v for v in report["importance"].values() if v.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
