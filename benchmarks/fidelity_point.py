"""One Pareto point, before vs after the fidelity work (issue 20): DeiT on Fashion-MNIST at 50 % of dense latency.

Arms (same dense checkpoint, same latency table, same training steps and learning rates, seeds 0 and 1):
  before        mdp_hf as it was (commit fc9201b, run from a git worktree): gate-gradient scores (heads from the
                V side), shared widths split equally among blocks, one-shot after the scoring window
  faithful      this mdp_hf: the official ViT scores (linked w*dL/dw, per-kind divisors), embedding never charged
                to blocks, the monotone iterative schedule (exponential targets) over the same window
  faithful_kd   faithful + the official DeiT loss: KL to the frozen dense model (weight 1e3 at 10 classes, the
                per-example weight of the official 1e5 over 1000 classes), T = 3 while pruning, T = 20 after

Every arm trains SCORE_STEPS steps (batch ARM_BATCH) with masks (scores accumulate, pruning steps happen), then fine-tunes the
sliced model FINETUNE_STEPS steps; the same AdamW and cosine schedule. Then one quiet interleaved timing pass
of the dense model and every pruned model (1 thread, min of 30+ repeats, two passes), and test accuracy.

    python benchmarks/fidelity_point.py            # all stages, resumable (results in outputs/fidelity_point)
    python benchmarks/fidelity_point.py --stage measure
    python benchmarks/fidelity_point.py --stage report
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
BEFORE_COMMIT = "fc9201b"
ARMS = ("before", "faithful", "faithful_kd")
SEEDS = (0, 1)
MODEL = dict(
    image_size=32,
    patch_size=4,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=256,
    num_channels=1,
    num_labels=10,
)
GROUPS = {"embed": 16, "heads": 1, "qk": 2, "v": 2, "mlp": 32}  # the paper's DeiT-B groups
SUBGRID = {"embed": 2, "qk": 4, "v": 4, "mlp": 2}
LATENCY_BATCH = 8
BUDGET = 0.5
DENSE_EPOCHS, DENSE_LR = 3, 1e-3
SCORE_STEPS, PRUNING_STEPS, FINETUNE_STEPS, LR, BATCH, ARM_BATCH = 200, 5, 300, 3e-4, 128, 64
MEAN, STD = 0.2860, 0.3530


def load_data():
    import numpy as np
    import torch

    from mdp_hf.data import load_fashion_mnist_arrays

    out = {}
    for split in ("train", "test"):
        images, labels = load_fashion_mnist_arrays(split)
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
        out[split] = (
            torch.nn.functional.pad(x, (2, 2, 2, 2)).sub_(MEAN).div_(STD).unsqueeze(1),
            torch.from_numpy(labels),
        )
    return out


def batches(data, seed, batch=BATCH):
    import torch

    x, y = data
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=gen)
        for begin in range(0, len(x) - batch + 1, batch):
            idx = order[begin : begin + batch]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            yield torch.where(flip[:, None, None, None], x[idx].flip(-1), x[idx]), y[idx]


def optimizer_for(model, steps, lr):
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    return opt, sched


def train_steps(model, it, steps, loss_fn=None, after_backward=None, after_step=None) -> float:
    """``steps`` AdamW steps (cosine, warm-up) on ``it``'s batches; the hooks see the 1-based step. Returns seconds."""
    opt, sched = optimizer_for(model, steps, LR)
    start = time.time()
    for step in range(1, steps + 1):
        xb, yb = next(it)
        inputs = {"pixel_values": xb, "labels": yb}
        loss = loss_fn(model, inputs)[0] if loss_fn else model(**inputs).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward:
            after_backward(step)
        opt.step()
        sched.step()
        if after_step:
            after_step(step)
    return time.time() - start


def evaluate(model, data):
    import torch

    model.eval()
    x, y = data
    correct = 0
    with torch.inference_mode():
        for begin in range(0, len(x), 500):
            correct += (
                (model(pixel_values=x[begin : begin + 500]).logits.argmax(-1) == y[begin : begin + 500]).sum().item()
            )
    return correct / len(x)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------------------------------------------------
def stage_dense(out):
    import torch
    from transformers import DeiTConfig, DeiTForImageClassification

    if os.path.isfile(os.path.join(out, "dense", "model.safetensors")):
        return
    torch.manual_seed(0)
    torch.set_num_threads(2)
    data = load_data()
    model = DeiTForImageClassification(DeiTConfig(**MODEL))
    steps = DENSE_EPOCHS * (len(data["train"][0]) // BATCH)
    opt, sched = optimizer_for(model, steps, DENSE_LR)
    it, start = batches(data["train"], 0), time.time()
    model.train()
    for step in range(steps):
        xb, yb = next(it)
        loss = model(pixel_values=xb, labels=yb).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            print(f"dense step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
    model.save_pretrained(os.path.join(out, "dense"))
    json.dump(
        {"accuracy": evaluate(model, data["test"]), "steps": steps, "train_s": time.time() - start},
        open(os.path.join(out, "dense.json"), "w"),
    )


def stage_table(out):
    """Built once by the *old* code (its table format is a subset of today's, so both arms read it)."""
    from transformers import DeiTForImageClassification

    from mdp_hf import build_space
    from mdp_hf.latency import TimingSettings, build_table

    path = os.path.join(out, "latency_table.json")
    if os.path.isfile(path):
        return
    dense = DeiTForImageClassification.from_pretrained(os.path.join(out, "dense")).eval()
    settings = TimingSettings(device="cpu", batch_size=LATENCY_BATCH, image_size=32, threads=1, repeats=15)
    print(f"table build, {uptime()}", flush=True)
    build_table(dense, path, space=build_space(dense, GROUPS), settings=settings, subgrid=SUBGRID, progress=False)


def stage_arm(out, arm, seed):
    import torch
    from transformers import DeiTForImageClassification

    from mdp_hf.config import PrunableConfig
    from mdp_hf.hub import save_pruned_model
    from mdp_hf.latency import LatencyTable, TableLatencyModel
    from mdp_hf.pruning import PruningSession

    folder = os.path.join(out, f"{arm}_s{seed}")
    if os.path.isfile(os.path.join(folder, "result.json")):
        return
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    data = load_data()
    model = DeiTForImageClassification.from_pretrained(os.path.join(out, "dense")).train()
    table = LatencyTable.load(os.path.join(out, "latency_table.json"))
    if arm == "before":
        cfg = PrunableConfig(budget_fraction=BUDGET, group_sizes=GROUPS, accumulation_steps=SCORE_STEPS)
        prune_at = [SCORE_STEPS]
    else:
        interval = SCORE_STEPS // PRUNING_STEPS
        cfg = PrunableConfig(
            budget_fraction=BUDGET,
            group_sizes=GROUPS,
            schedule="iterative",
            num_pruning_steps=PRUNING_STEPS,
            accumulation_steps=interval,
            pruning_interval=interval,
        )
        prune_at = cfg.pruning_steps()
    loss_fn = None
    if arm == "faithful_kd":
        from mdp_hf.losses import DistillationSettings, MDPLoss

        loss_fn = MDPLoss.from_settings(DistillationSettings(teacher="dense", kl_weight=1e3), model, phase="warmup")
    session = PruningSession(model, cfg, TableLatencyModel(table, None))
    it = batches(data["train"], 100 + seed, ARM_BATCH)
    steps = []

    def after_backward(step):  # this step's scores, read before the optimizer moves the weights
        session.accumulate()

    def after_step(step):
        if step in prune_at:
            result = session.prune_step()
            steps.append(
                {
                    "step": step,
                    "budget_ms": result.budget_ms,
                    "predicted_ms": result.predicted_latency_ms,
                    "removed_blocks": result.choice.removed_blocks,
                    "kept_fraction": result.kept_fraction,
                }
            )
            if loss_fn:
                loss_fn.phase = "pruning"

    score_s = train_steps(model, it, SCORE_STEPS, loss_fn, after_backward, after_step)
    pruned = session.export()
    session.gates.remove()
    accuracy_before_ft = evaluate(pruned, data["test"])
    if loss_fn:  # fine-tune the sliced model (teacher: the dense model, fine-tuning temperature)
        loss_fn.phase = "finetuning"
    finetune_s = train_steps(pruned.train(), it, FINETUNE_STEPS, loss_fn)
    save_pruned_model(pruned, folder)
    result = {
        "arm": arm,
        "seed": seed,
        "pruning_steps": steps,
        "accuracy_before_ft": accuracy_before_ft,
        "accuracy": evaluate(pruned, data["test"]),
        "params": sum(p.numel() for p in pruned.parameters()),
        "score_s": score_s,
        "finetune_s": finetune_s,
        "budget_ms": steps[-1]["budget_ms"],
        "predicted_ms": steps[-1]["predicted_ms"],
    }
    json.dump(result, open(os.path.join(folder, "result.json"), "w"), indent=1)
    print(
        f"{arm} seed {seed}: top-1 {accuracy_before_ft:.4f} -> {result['accuracy']:.4f}, predicted {result['predicted_ms']:.3f} ms "
        f"(budget {result['budget_ms']:.3f}), removed {steps[-1]['removed_blocks']}",
        flush=True,
    )


def stage_measure(out, repeats):
    import torch
    from transformers import DeiTForImageClassification

    from mdp_hf.hub import load_pruned_model
    from mdp_hf.latency import TimingSettings, measure_latencies

    torch.set_num_threads(1)
    names = [f"{arm}_s{seed}" for arm in ARMS for seed in SEEDS]
    models = [DeiTForImageClassification.from_pretrained(os.path.join(out, "dense")).eval()]
    models += [load_pruned_model(os.path.join(out, name)) for name in names]
    settings = TimingSettings(device="cpu", batch_size=LATENCY_BATCH, image_size=32, threads=1, repeats=repeats)
    before = uptime()
    passes = [measure_latencies(models, settings) for _ in range(2)]
    timing = {
        "uptime_before": before,
        "uptime_after": uptime(),
        "repeats": repeats,
        "dense_min_ms": [p[0].min_ms for p in passes],
        "dense_spread": [p[0].spread for p in passes],
        "models": {
            name: {
                "min_ms": [p[i].min_ms for p in passes],
                "fraction": [p[i].min_ms / p[0].min_ms for p in passes],
                "spread": [p[i].spread for p in passes],
            }
            for i, name in enumerate(names, start=1)
        },
    }
    json.dump(timing, open(os.path.join(out, "timing.json"), "w"), indent=1)


def stage_report(out):
    import platform

    dense = json.load(open(os.path.join(out, "dense.json")))
    timing = json.load(open(os.path.join(out, "timing.json")))
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; timing {timing['uptime_before']} / "
        f"{timing['uptime_after']}; dense top-1 {dense['accuracy']:.4f}; dense {', '.join(f'{v:.3f}' for v in timing['dense_min_ms'])} ms "
        f"(batch {LATENCY_BATCH}, 1 thread, min of {timing['repeats']}, two interleaved passes).",
        "",
        "| arm | seed | measured / dense | predicted / budget | removed blocks | top-1 before FT | top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for arm in ARMS:
        for seed in SEEDS:
            name = f"{arm}_s{seed}"
            r = json.load(open(os.path.join(out, name, "result.json")))
            frac = sum(timing["models"][name]["fraction"]) / 2
            summary.setdefault(arm, []).append((r["accuracy"], frac))
            lines.append(
                f"| {arm} | {seed} | {frac:.3f} | {r['predicted_ms'] / r['budget_ms']:.3f} | {len(r['pruning_steps'][-1]['removed_blocks'])} "
                f"({', '.join(r['pruning_steps'][-1]['removed_blocks']) or '-'}) | {r['accuracy_before_ft']:.4f} | {r['accuracy']:.4f} |"
            )
    lines += ["", "| arm | mean top-1 (± half range) | mean measured / dense |", "|---|---|---|"]
    for arm, rows in summary.items():
        accs = [a for a, _ in rows]
        lines.append(
            f"| {arm} | {sum(accs) / len(accs):.4f} ± {(max(accs) - min(accs)) / 2:.4f} | {sum(f for _, f in rows) / len(rows):.3f} |"
        )
    text = "\n".join(lines)
    print(text)
    open(os.path.join(out, "report.md"), "w").write(text + "\n")


# ---------------------------------------------------------------------------------------------------------
def run_stage(stage, out, code_root, *extra):
    """Run one stage in a fresh process importing mdp_hf from ``code_root`` (the old worktree or this one)."""
    env = {**os.environ, "PYTHONPATH": code_root, "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--out", out, *extra]
    subprocess.run(cmd, check=True, env=env, cwd=code_root)


def old_worktree() -> str:
    path = os.path.join(ROOT, "outputs", "mdp_hf_before")
    if not os.path.isdir(path):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, BEFORE_COMMIT], check=True)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="all", choices=["all", "dense", "table", "arm", "measure", "report"])
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "fidelity_point"))
    parser.add_argument("--arm", choices=ARMS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.stage == "all":
        old = old_worktree()
        run_stage("dense", args.out, ROOT)
        run_stage("table", args.out, old)
        for seed in SEEDS:
            for arm in ARMS:
                run_stage("arm", args.out, old if arm == "before" else ROOT, "--arm", arm, "--seed", str(seed))
        run_stage("measure", args.out, ROOT, "--repeats", str(args.repeats))
        run_stage("report", args.out, ROOT)
        return
    import mdp_hf

    print(f"[{args.stage}] mdp_hf from {os.path.dirname(mdp_hf.__file__)}", flush=True)
    {
        "dense": lambda: stage_dense(args.out),
        "table": lambda: stage_table(args.out),
        "arm": lambda: stage_arm(args.out, args.arm, args.seed),
        "measure": lambda: stage_measure(args.out, args.repeats),
        "report": lambda: stage_report(args.out),
    }[args.stage]()


if __name__ == "__main__":
    main()
