"""Training cost of a pruning run: what one optimizer step costs in each phase, against plain Trainer.

For a DeiT-shaped ViT (width 192, 6 layers, 64x64 inputs, as measured in issue #14) and a ResNet-50-shaped
ResNet (64x64 inputs), batch 16, CPU, 1 thread, at 70 / 50 / 30 % budgets:

- ``dense``: plain ``transformers.Trainer`` on the dense model (timed first, and again last as ``dense_again``);
- ``scoring``: ``MDPTrainer`` while importance scores accumulate (before the pruning step);
- ``sliced``: ``MDPTrainer`` fine-tuning after the pruning step on the sliced model (``slice_after_pruning=True``,
  the default);
- ``distilled``: the same with the dense model as KL teacher (``DistillationSettings(teacher="dense")``); the
  teacher's own forward time per step is reported separately (``teacher s``);
- ``pruned``: plain ``Trainer`` on the pruned model that the ``sliced`` run saved;
- ``masked``: ``MDPTrainer`` fine-tuning with ``slice_after_pruning=False`` (dense-shaped, pruned units masked).

Every phase of one family and budget runs in one fresh process, one after another, so that each ratio is to a
dense step timed in the same process (``x dense``: to the mean of ``dense`` and ``dense_again``, which brackets
any drift; ``x pruned``: to ``pruned``); steps in separate processes differed by up to 20 % on this machine.
Reported: the median wall time of the measured optimizer steps (after ``--warmup`` steps; the pruning step
itself is never measured) and the peak resident memory during them (Linux: the high-water mark is reset when
the measured steps begin, after freed heap is returned with malloc_trim, so it includes what earlier phases of
the process still hold; on CUDA: torch's peak allocated memory). The latency model is a synthetic table (cost = product
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


PHASES = ("dense", "scoring", "sliced", "distilled", "pruned", "masked", "dense_again")


def make_args(out: str, max_steps: int, batch: int):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
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


def time_phase(mode: str, spec: dict, table, folder: str) -> dict:
    """Train one configuration for warmup + steps measured optimizer steps; its median step time and peak memory."""
    import torch
    from transformers import Trainer, TrainerCallback

    family, tiny, warmup, steps, batch = spec["family"], spec["tiny"], spec["warmup"], spec["steps"], spec["batch_size"]
    sliced_modes = ("sliced", "distilled", "masked")
    # the measured steps: (first, last] in optimizer-step numbers; MDP runs prune at step `prune_at`
    prune_at = warmup + steps + 1 if mode == "scoring" else 1
    first = warmup + (1 if mode in sliced_modes else 0)
    last = first + steps
    max_steps = max(last, prune_at if mode in ("scoring", *sliced_modes) else 0)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.peak = [], None
            self.loss = None  # MDPLoss of a distilled run: its teacher time at the first measured step
            self.teacher_at_first = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first:
                reset_peak_memory()
                if self.loss is not None:
                    self.teacher_at_first = self.loss.teacher_seconds
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - self.start
            if first < state.global_step <= last:
                self.times.append(elapsed)
            if state.global_step == last:
                self.peak = peak_memory_mb()

    args = make_args(tempfile.mkdtemp(prefix=f"training_cost_{mode}_"), max_steps, batch)
    data = RandomImages(batch * max_steps, image_size(tiny))
    timer = StepTimer()
    teacher_s = None
    if mode in ("dense", "dense_again", "pruned"):
        if mode == "pruned":
            from mdp_hf.hub import load_pruned_model

            model = load_pruned_model(folder)
        else:
            model = build_model(family, tiny)
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer])
        trainer.train()
    else:
        from mdp_hf import PrunableConfig
        from mdp_hf.latency import TableLatencyModel
        from mdp_hf.losses import DistillationSettings
        from mdp_hf.trainer import MDPTrainer

        config = PrunableConfig(
            budget_fraction=spec["budget"],
            group_sizes=group_sizes(family, tiny),
            accumulation_steps=prune_at,
            verify_latency=False,
            slice_after_pruning=mode != "masked",
        )
        trainer = MDPTrainer(
            model=build_model(family, tiny),
            args=args,
            prunable_config=config,
            latency_model=TableLatencyModel(table),
            distillation=DistillationSettings(teacher="dense", kl_weight=1.0) if mode == "distilled" else None,
            train_dataset=data,
            callbacks=[timer],
        )
        timer.loss = trainer.mdp_loss
        trainer.train()
        if mode == "distilled":  # the teacher's forward time over the measured steps only
            teacher_s = (trainer.mdp_loss.teacher_seconds - timer.teacher_at_first) / steps
        if mode == "sliced":
            trainer.save_model(folder)
    model = trainer.model
    row = {
        "mode": mode,
        "step_s": statistics.median(timer.times),
        "step_times_s": timer.times,
        "peak_memory_mb": timer.peak,
        # the model the measured steps ran on (scoring: the dense model, sliced only at the step after them)
        "params": sum(p.numel() for p in model.parameters()) if mode != "scoring" else None,
        "sliced_during_training": bool(getattr(trainer, "_sliced", False)) if mode in sliced_modes else None,
        "teacher_forward_s_per_step": teacher_s,
    }
    del trainer, model
    import gc

    gc.collect()
    return row


def worker(spec: dict) -> dict:
    """Every phase of one family at one budget in this (fresh) process, so that each ratio is to a dense step
    timed in the same process (timed first and last: the ratio is to their mean)."""
    import torch

    torch.set_num_threads(spec["threads"])
    from mdp_hf import build_space
    from mdp_hf.latency import build_table

    model = build_model(spec["family"], spec["tiny"])
    table = build_table(
        model,
        space=build_space(model, group_sizes=group_sizes(spec["family"], spec["tiny"])),
        timer=lambda _table, widths: float(torch.tensor(widths, dtype=torch.float64).prod()),
        repeats=1,
        warmup=0,
        progress=False,
        image_size=image_size(spec["tiny"]),
    )
    dense_params = sum(p.numel() for p in model.parameters())
    del model
    with tempfile.TemporaryDirectory() as folder:
        rows = {mode: time_phase(mode, spec, table, folder) for mode in PHASES}
    rows["scoring"]["params"] = dense_params
    return {"family": spec["family"], "budget": spec["budget"], "dense_params": dense_params, "phases": rows}


def run(spec: dict) -> dict:
    process = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])},
    )
    if process.returncode != 0:
        raise RuntimeError(f"{spec['family']} at budget {spec['budget']} failed:\n{process.stderr[-4000:]}")
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
    for family in families:
        print(f"\n{NAMES[family]}{' (tiny)' if options.tiny else ''}")
        print(
            f"{'budget':>6} {'mode':>11} {'step s':>9} {'x dense':>8} {'x pruned':>8} {'peak MB':>8} {'params':>10}"
            f" {'teacher s':>9}"
        )
        for budget in options.budgets:
            result = run({**common, "family": family, "budget": budget})
            results.append(result)
            rows = result["phases"]
            dense_s = (rows["dense"]["step_s"] + rows["dense_again"]["step_s"]) / 2
            for mode, row in rows.items():
                peak = f"{row['peak_memory_mb']:.0f}" if row["peak_memory_mb"] is not None else "-"
                teacher = row["teacher_forward_s_per_step"]
                print(
                    f"{budget:>6} {mode:>11} {row['step_s']:>9.4g} {row['step_s'] / dense_s:>8.3f} "
                    f"{row['step_s'] / rows['pruned']['step_s']:>8.3f} {peak:>8} {row['params']:>10}"
                    f" {'' if teacher is None else f'{teacher:.4g}':>9}"
                )
    if options.out:
        machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()}
        if hasattr(os, "getloadavg"):
            machine["load_average"] = os.getloadavg()
        Path(options.out).write_text(json.dumps({"machine": machine, "settings": common, "results": results}, indent=1))


if __name__ == "__main__":
    main()
