"""Training cost of a pruning run: what one optimizer step costs in each phase, against plain Trainer.

For a DeiT-shaped ViT (width 192, 6 layers, 64x64 inputs, as measured in issue #14) and a ResNet-50-shaped
ResNet (64x64 inputs), batch 16, CPU, 1 thread, at 70 / 50 / 30 % budgets:

- ``dense``: plain ``transformers.Trainer`` on the dense model;
- ``scoring``: ``MDPTrainer`` while importance scores accumulate (before the pruning step);
- ``sliced``: ``MDPTrainer`` fine-tuning after the pruning step on the sliced model (``slice_after_pruning=True``,
  the default);
- ``masked``: the same with ``slice_after_pruning=False`` (the dense-shaped model, pruned units masked);
- ``pruned``: plain ``Trainer`` on the pruned model that the ``sliced`` run saved.

Each configuration runs in a fresh process. Reported: the median wall time of the measured optimizer steps
(after ``--warmup`` steps; the pruning step itself is never measured) and the peak resident memory during
them (Linux: the high-water mark is reset when the measured steps begin, after freed heap is returned with
malloc_trim; on CUDA: torch's peak allocated memory). The latency model is a synthetic table (cost = product
of a cell's widths, FLOP-like), so the pruned structure does not depend on this machine's timing; the latency
stage is benchmarked in benchmarks/latency_model.py.

    python benchmarks/training_cost.py                        # both shapes, all budgets (run nothing else meanwhile)
    python benchmarks/training_cost.py --family vit --budgets 0.5 --steps 10
    python benchmarks/training_cost.py --tiny --steps 2 --warmup 1   # a quick check that everything runs

Run nothing else meanwhile: every figure is a timing.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("dense", "scoring", "sliced", "masked", "pruned")
NAMES = {"vit": "DeiT-shaped ViT (transformers DeiT)", "resnet": "ResNet-50-shaped ResNet (transformers)"}


def build_model(family: str, tiny: bool):
    import torch

    torch.manual_seed(0)
    if family == "vit":
        from transformers import DeiTConfig, DeiTForImageClassification

        shape = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768)
        if tiny:
            shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        return DeiTForImageClassification(
            DeiTConfig(**shape, image_size=image_size(tiny), patch_size=8, num_labels=100)
        )
    from transformers import ResNetConfig, ResNetForImageClassification

    shape = dict(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3])
    if tiny:
        shape = dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1])
    return ResNetForImageClassification(ResNetConfig(**shape, layer_type="bottleneck", num_labels=100))


def image_size(tiny: bool) -> int:
    return 32 if tiny else 64


def group_sizes(family: str, tiny: bool) -> dict:
    if family == "vit":
        return {"embed": 8 if tiny else 16, "heads": 1, "qk": 2, "v": 2, "mlp": 16 if tiny else 32}
    return {"channels": 8 if tiny else 16, "residual": 8 if tiny else 32}


class RandomImages:
    def __init__(self, n: int, size: int, labels: int = 100):
        import torch

        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, size, size, generator=g)
        self.y = torch.randint(0, labels, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # give freed heap back first, so the high-water mark starts at what is really held
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Linux: reset the peak resident set size (VmHWM) to the current one
    except OSError:
        pass


def peak_memory_mb() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worker(spec: dict) -> dict:
    """One configuration in this (fresh) process; returns its step times and peak memory."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(spec["threads"])
    mode, family, tiny = spec["mode"], spec["family"], spec["tiny"]
    warmup, steps = spec["warmup"], spec["steps"]
    # the measured steps: (first, last] in optimizer-step numbers; MDP runs prune at step `prune_at`
    prune_at = {"scoring": warmup + steps + 1, "sliced": 1, "masked": 1}.get(mode)
    first = warmup + (1 if mode in ("sliced", "masked") else 0)
    last = first + steps
    max_steps = max(last, prune_at or 0)
    batch = spec["batch_size"]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.peak = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first:
                reset_peak_memory()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - self.start
            if first < state.global_step <= last:
                self.times.append(elapsed)
            if state.global_step == last:
                self.peak = peak_memory_mb()

    out = tempfile.mkdtemp(prefix=f"training_cost_{mode}_")
    args = TrainingArguments(
        output_dir=out,
        max_steps=max_steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-4,
        weight_decay=0.05,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    data = RandomImages(batch * max_steps, image_size(tiny))
    timer = StepTimer()
    if mode == "pruned":
        from mdp_hf.hub import load_pruned_model

        model = load_pruned_model(spec["pruned_folder"])
    else:
        model = build_model(family, tiny)
    dense_params = sum(p.numel() for p in build_model(family, tiny).parameters())
    if mode in ("dense", "pruned"):
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    else:
        from mdp_hf import PrunableConfig, build_space
        from mdp_hf.latency import TableLatencyModel, build_table
        from mdp_hf.trainer import MDPTrainer

        groups = group_sizes(family, tiny)
        space = build_space(model, group_sizes=groups)
        table = build_table(
            model,
            space=space,
            timer=lambda _table, widths: float(torch.tensor(widths, dtype=torch.float64).prod()),
            repeats=1,
            warmup=0,
            progress=False,
            image_size=image_size(tiny),
        )
        config = PrunableConfig(
            budget_fraction=spec["budget"],
            group_sizes=groups,
            accumulation_steps=prune_at,
            verify_latency=False,
            slice_after_pruning=mode != "masked",
        )
        trainer = MDPTrainer(
            model=model,
            args=args,
            prunable_config=config,
            latency_model=TableLatencyModel(table),
            train_dataset=data,
            callbacks=[timer],
        )
    trainer.train()
    trained = trainer.model
    result = {
        **{k: spec[k] for k in ("mode", "family", "budget")},
        "step_s": statistics.median(timer.times),
        "step_times_s": timer.times,
        "peak_memory_mb": timer.peak,
        # the model the measured steps ran on (scoring: the dense model, sliced only at the step after them)
        "params": dense_params if mode == "scoring" else sum(p.numel() for p in trained.parameters()),
        "dense_params": dense_params,
    }
    if mode == "sliced":
        trainer.save_model(spec["pruned_folder"])
        result["sliced_during_training"] = bool(trainer._sliced)
    return result


def run(spec: dict) -> dict:
    process = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])},
    )
    if process.returncode != 0:
        raise RuntimeError(
            f"{spec['mode']} ({spec['family']}, budget {spec['budget']}) failed:\n{process.stderr[-4000:]}"
        )
    return json.loads(process.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["vit", "resnet", "all"], default="all")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps before them")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: check that it runs, not a measurement")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker is not None:
        print(json.dumps(worker(json.loads(options.worker))))
        return

    families = ["vit", "resnet"] if options.family == "all" else [options.family]
    common = dict(
        steps=options.steps,
        warmup=options.warmup,
        batch_size=options.batch_size,
        threads=options.threads,
        tiny=options.tiny,
    )
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for family in families:
            dense = run({**common, "mode": "dense", "family": family, "budget": None})
            results.append(dense)
            print(f"\n{NAMES[family]}{' (tiny)' if options.tiny else ''}: dense step {dense['step_s']:.4g} s")
            print(
                f"{'budget':>6} {'mode':>8} {'step s':>9} {'x dense':>8} {'x pruned':>8} {'peak MB':>8} {'params':>10}"
            )
            for budget in options.budgets:
                folder = os.path.join(scratch, f"{family}_{budget}")
                rows = {}
                for mode in ("scoring", "sliced", "masked", "pruned"):
                    rows[mode] = run(
                        {**common, "mode": mode, "family": family, "budget": budget, "pruned_folder": folder}
                    )
                    results.append(rows[mode])
                for mode, row in rows.items():
                    peak = f"{row['peak_memory_mb']:.0f}" if row["peak_memory_mb"] is not None else "-"
                    print(
                        f"{budget:>6} {mode:>8} {row['step_s']:>9.4g} {row['step_s'] / dense['step_s']:>8.3f} "
                        f"{row['step_s'] / rows['pruned']['step_s']:>8.3f} {peak:>8} {row['params']:>10}"
                    )
    if options.out:
        machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()}
        if hasattr(os, "getloadavg"):
            machine["load_average"] = os.getloadavg()
        Path(options.out).write_text(json.dumps({"machine": machine, "settings": common, "results": results}, indent=1))


if __name__ == "__main__":
    main()
