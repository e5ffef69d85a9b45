"""Evidence v2 (issue 15): accuracy at equal *measured* latency, MDP against every alternative a user would pick.

Deeper models than the first study (a 12-layer narrow DeiT, a ResNet with 4 bottlenecks per stage) so that
removing blocks is a real option, budgets down to 20 % of dense, every pruned model fine-tuned with the same
distillation and the same number of training steps after the same dense checkpoint.

Stages (resumable: finished entries in each results.json are skipped when run again):

    python benchmarks/pareto.py --stage dense --family deit        # dense training (validation curve per epoch)
    python benchmarks/pareto.py --stage table --family both        # ALONE: latency tables + the small-dense grid
    python benchmarks/pareto.py --stage run --family deit --seed 0 --finetune_steps 200
    python benchmarks/pareto.py --stage measure                    # ALONE: every saved model, interleaved
    python benchmarks/pareto.py --stage report                     # docs/pareto_v2.md data, tables, plots

benchmarks/pareto_study.sh runs the whole study in that order (the `run` stages on two workers).

Methods (per family, seed and budget; one result folder per seed and fine-tuning length: s<seed>_n<steps>/):
  mdp            faithful MDP: official scores and the official schedule while the masked model trains with KL to
                 the dense model (DeiT: 5 monotone steps to exponentially shrinking budgets; ResNet: one step at
                 the end of the scoring window), widths + blocks, table model, landing on the measured budget
                 (PrunableConfig.verify_latency)
  mdp_stem       (ResNet) the same with the stem pruned too: the official code keeps it at full width, and here
                 it is over a third of the dense latency, so without it no budget below ~40 % is reachable
  widths_table   the same without blocks                                       (MDP without blocks)
  blocks_linear  the same with the linear (HALP) latency model                  (MDP with the linear model)
  halp           widths only, linear model, 5 iterative steps re-linearised at every step (HALP)
  uniform        every dimension at one fraction of its width (top-scoring units kept), fraction bisected on the
                 measured latency
  torch_pruning  Torch-Pruning 1.6 global Taylor pruning (its ViT recipe: head dims), ratio bisected on the
                 measured latency
  small_dense    a smaller dense architecture from a small grid, the one whose measured latency is closest
                 below the budget, trained from scratch for the dense training's steps + the pruned models' steps

Every pruned model gets SCORE_STEPS + finetune_steps training steps after the dense checkpoint: the MDP family
spends SCORE_STEPS of them pruning (masked), the one-shot methods fine-tune for all of them.
``--smoke`` runs a tiny version end to end in a scratch folder (tests/test_pareto.py).
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mdp_hf import PruningChoice, build_space, slice_model  # noqa: E402
from mdp_hf.config import PrunableConfig  # noqa: E402
from mdp_hf.hub import load_pruned_model, save_pruned_model  # noqa: E402
from mdp_hf.latency import (  # noqa: E402
    LatencyTable,
    LinearLatencyModel,
    TableLatencyModel,
    TimingSettings,
    build_table,
    measure_latencies,
)
from mdp_hf.losses import DistillationSettings, MDPLoss  # noqa: E402
from mdp_hf.masks import kept_fraction_by_kind, ranked_units  # noqa: E402
from mdp_hf.pruning import PruningSession, accumulate_importance  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BUDGETS = (0.5, 0.3, 0.2)
METHODS = ("mdp", "mdp_stem", "widths_table", "blocks_linear", "halp", "uniform", "torch_pruning", "small_dense")
MDP_FAMILY = ("mdp", "mdp_stem", "widths_table", "blocks_linear", "halp")
MEAN, STD = 0.2860, 0.3530
BATCH, VALIDATION = 128, 5000
SCORE_STEPS, PRUNING_STEPS = 100, 5
KL_WEIGHT = 1e3  # the official 1e5 is a KL averaged over 1000 classes; at 10 classes the same per-example weight

FAMILIES = {
    "deit": dict(
        model=dict(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=12,
            num_attention_heads=4,
            intermediate_size=128,
            num_channels=1,
            num_labels=10,
        ),
        widths=["embed", "heads", "qk", "v", "mlp"],
        group_sizes={"embed": 8, "heads": 1, "qk": 2, "v": 2, "mlp": 16},
        subgrid={"embed": 2, "qk": 2, "v": 2, "mlp": 2},
        latency_batch=128,
        dense_epochs=10,
        dense_lr=1e-3,
        schedule="iterative",  # the official DeiT engine: monotone steps to exponentially shrinking budgets
        # depth x width (heads of 16, MLP ratio 2, as the dense model)
        small_grid=[dict(num_hidden_layers=d, hidden_size=h) for d in (12, 8, 6, 4, 3, 2) for h in (64, 48, 32)],
    ),
    "resnet": dict(
        model=dict(
            num_channels=1,
            embedding_size=32,
            hidden_sizes=[64, 128, 256],
            depths=[4, 4, 4],
            layer_type="bottleneck",
            num_labels=10,
        ),
        widths=["channels", "residual"],
        group_sizes={"channels": 8, "residual": 16},
        subgrid=2,
        latency_batch=128,
        dense_epochs=10,
        dense_lr=2e-3,
        stem=True,  # mdp_stem: MDP with the stem pruned too (the official code keeps it whole)
        schedule="one_shot",  # the official ResNet code: scores over the window, one pruning step at its end
        small_grid=[
            dict(depths=[d] * 3, hidden_sizes=[w, 2 * w, 4 * w], embedding_size=w // 2)
            for d in (4, 3, 2, 1)
            for w in (64, 48, 32, 24, 16, 12, 8)
        ],
    ),
}
SMOKE = {
    "deit": dict(
        model=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_channels=1,
            num_labels=10,
        ),
        group_sizes={"embed": 8, "heads": 1, "qk": 4, "v": 4, "mlp": 16},
        subgrid=None,
        latency_batch=2,
        small_grid=[dict(num_hidden_layers=d, hidden_size=h) for d in (2, 1) for h in (32, 16)],
    ),
    "resnet": dict(
        model=dict(
            num_channels=1,
            embedding_size=8,
            hidden_sizes=[16, 32],
            depths=[1, 1],
            layer_type="bottleneck",
            num_labels=10,
        ),
        group_sizes={"channels": 4, "residual": 8},
        subgrid=None,
        latency_batch=2,
        small_grid=[dict(hidden_sizes=[w, 2 * w], embedding_size=w // 2) for w in (16, 8)],
    ),
}


def family_config(family: str, smoke: bool) -> dict:
    cfg = dict(FAMILIES[family])
    if smoke:
        cfg.update(SMOKE[family], dense_epochs=1)
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# data, models, training
def load_data(smoke: bool):
    """Fashion-MNIST, 28x28 padded to 32x32: train (55k), validation (the last 5k of a fixed permutation of the
    training set, for the dense model's convergence curve) and the 10k test split (every reported top-1)."""
    from mdp_hf.data import load_fashion_mnist_arrays

    out = {}
    for split in ("train", "test"):
        images, labels = load_fashion_mnist_arrays(split)
        if smoke:
            images, labels = images[:512], labels[:512]
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
        x = torch.nn.functional.pad(x, (2, 2, 2, 2)).sub_(MEAN).div_(STD).unsqueeze(1)  # [N, 1, 32, 32]
        out[split] = (x, torch.from_numpy(labels).long())
    x, y = out["train"]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    held = 64 if smoke else VALIDATION
    out["train"], out["validation"] = (x[order[:-held]], y[order[:-held]]), (x[order[-held:]], y[order[-held:]])
    return out


def batches(data, batch_size: int, seed: int, flip: bool = True):
    """Endless shuffled training batches (random horizontal flip), deterministic in ``seed``."""
    x, y = data
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=gen)
        for begin in range(0, len(x) - batch_size + 1, batch_size):
            idx = order[begin : begin + batch_size]
            xb = x[idx]
            if flip:
                mask = torch.rand(len(idx), generator=gen) < 0.5
                xb = torch.where(mask[:, None, None, None], xb.flip(-1), xb)
            yield xb, y[idx]


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def train(model, it, steps: int, lr: float, loss_fn=None, after_backward=None, after_step=None, log=None, tag=""):
    """``steps`` AdamW steps (cosine with 5 % warm-up, weight decay 0.05, clip 5) on ``it``'s batches. ``loss_fn``:
    an MDPLoss (distillation) or None (cross-entropy); the hooks see the 1-based step. Returns seconds."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    start, running = time.time(), 0.0
    for step in range(1, steps + 1):
        xb, yb = next(it)
        if loss_fn is not None:
            loss = loss_fn(model, {"pixel_values": xb, "labels": yb})[0]
        else:
            loss = torch.nn.functional.cross_entropy(logits_of(model(pixel_values=xb)), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward:
            after_backward(step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        if after_step:
            after_step(step)
        running += loss.item()
        if log and step % 200 == 0:
            log(f"  [{tag}] step {step}/{steps} loss {running / 200:.4f} ({time.time() - start:.0f}s)")
            running = 0.0
    model.eval()
    return time.time() - start


@torch.inference_mode()
def evaluate(model, data, batch_size: int = 500) -> float:
    model.eval()
    x, y = data
    correct = 0
    for begin in range(0, len(x), batch_size):
        logits = logits_of(model(pixel_values=x[begin : begin + batch_size]))
        correct += (logits.argmax(-1) == y[begin : begin + batch_size]).sum().item()
    return correct / len(x)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def new_model(family: str, model_kwargs: dict):
    from transformers import DeiTConfig, DeiTForImageClassification, ResNetConfig, ResNetForImageClassification

    if family == "deit":
        return DeiTForImageClassification(DeiTConfig(**model_kwargs))
    return ResNetForImageClassification(ResNetConfig(**model_kwargs))


def small_model_kwargs(family: str, cfg: dict, candidate: dict) -> dict:
    kwargs = {**cfg["model"], **candidate}
    if family == "deit":  # heads of 16 and an MLP ratio of 2, as the dense model
        kwargs.update(
            num_attention_heads=max(1, kwargs["hidden_size"] // 16), intermediate_size=2 * kwargs["hidden_size"]
        )
    return kwargs


def load_dense(family: str, folder: str):
    from transformers import DeiTForImageClassification, ResNetForImageClassification

    cls = DeiTForImageClassification if family == "deit" else ResNetForImageClassification
    return cls.from_pretrained(folder).eval()


# ----------------------------------------------------------------------------------------------------------------
# results file
class Results:
    def __init__(self, path: str):
        self.path = path
        self.data = json.load(open(path)) if os.path.isfile(path) else {}

    def __contains__(self, key):
        return key in self.data

    def __getitem__(self, key):
        return self.data[key]

    def put(self, key, value):
        """Store one entry. Two workers may share a results file (different keys): under a lock, the file is read
        again and only this key changes."""
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.isfile(self.path):
                self.data = {**json.load(open(self.path)), key: value}
            else:
                self.data[key] = value
            tmp = self.path + ".tmp"
            with open(tmp, "w") as handle:
                json.dump(self.data, handle, indent=1, sort_keys=True)
            os.replace(tmp, self.path)


def smoke_timer(table, widths) -> float:
    """--smoke's latency table: a cell costs the product of its widths (its FLOPs, up to a factor). Measured, a
    smoke-sized model's cells are per-call overheads and noise, so which budgets were feasible depended on the
    machine's load; with this every method runs at every budget. The saved models are still timed for real."""
    return 1e-4 * float(np.prod(widths)) + 1e-3


def settings_for(cfg, repeats: int) -> TimingSettings:
    return TimingSettings(device="cpu", batch_size=cfg["latency_batch"], image_size=32, threads=1, repeats=repeats)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


def make_log(tag):
    return lambda msg: print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# stages: dense model, latency table (+ the small-dense grid's latencies)
def shared_dir(args, family):
    return os.path.join(args.out, "shared", family)


def stage_dense(family: str, args):
    cfg = family_config(family, args.smoke)
    out = shared_dir(args, family)
    res = Results(os.path.join(out, "results.json"))
    if "dense" in res:
        return
    torch.set_num_threads(1)
    log = make_log(f"{family} dense")
    data = load_data(args.smoke)
    torch.manual_seed(0)
    model = new_model(family, cfg["model"])
    steps_per_epoch = len(data["train"][0]) // BATCH
    steps = cfg["dense_epochs"] * steps_per_epoch
    curve = []

    def after_step(step):  # the validation curve that says whether the dense model has converged
        if step % steps_per_epoch == 0:
            curve.append(evaluate(model, data["validation"]))
            model.train()
            log(f"epoch {len(curve)}: validation top-1 {curve[-1]:.4f}")

    log(f"{cfg['dense_epochs']} epochs x {steps_per_epoch} steps, {uptime()}")
    seconds = train(model, batches(data["train"], BATCH, 0), steps, cfg["dense_lr"], after_step=after_step)
    model.save_pretrained(os.path.join(out, "dense"))
    res.put(
        "dense",
        {
            "accuracy": evaluate(model, data["test"]),
            "validation_curve": curve,
            "params": n_params(model),
            "train_s": seconds,
            "epochs": cfg["dense_epochs"],
            "steps": steps,
        },
    )
    log(f"test top-1 {res['dense']['accuracy']:.4f} ({seconds:.0f}s)")


def stage_table(family: str, args):
    """Run alone: the latency table of the dense model, and the measured latency of every small-dense candidate
    (untrained: weights do not change the time) interleaved with the dense model."""
    cfg = family_config(family, args.smoke)
    out = shared_dir(args, family)
    res = Results(os.path.join(out, "results.json"))
    torch.set_num_threads(1)
    dense = load_dense(family, os.path.join(out, "dense"))
    log = make_log(f"{family} table")
    if "table" not in res:
        t0, up = time.time(), uptime()
        build_table(
            dense,
            os.path.join(out, "latency_table.json"),
            space=build_space(dense, cfg["group_sizes"]),
            settings=settings_for(cfg, 5 if args.smoke else 15),
            subgrid=cfg["subgrid"],
            progress=False,
            timer=smoke_timer if args.smoke else None,
        )
        res.put("table", {"build_s": time.time() - t0, "uptime": up})
        log(f"built in {time.time() - t0:.0f}s ({up})")
    if "small_grid" not in res:
        candidates = [small_model_kwargs(family, cfg, c) for c in cfg["small_grid"]]
        models = [dense] + [new_model(family, c).eval() for c in candidates]
        passes = [measure_latencies(models, settings_for(cfg, 5 if args.smoke else 30)) for _ in range(2)]
        grid = [
            {
                "model": c,
                "params": n_params(m),
                "measured_fraction": float(np.mean([p[i].min_ms / p[0].min_ms for p in passes])),
            }
            for i, (c, m) in enumerate(zip(candidates, models[1:]), start=1)
        ]
        res.put("small_grid", {"uptime": uptime(), "candidates": grid})
        for g in grid:
            log(f"small-dense candidate {g['model']}: {g['measured_fraction']:.3f} of dense, {g['params']:,} params")


def pick_small(grid: list[dict], frac: float) -> dict:
    """The candidate whose measured latency is closest below the budget (ties: more parameters)."""
    under = [g for g in grid if g["measured_fraction"] <= frac]
    if not under:
        raise ValueError(f"small_dense: no grid architecture measures <= {frac:.0%} of dense")
    return max(under, key=lambda g: (g["measured_fraction"], g["params"]))


# ----------------------------------------------------------------------------------------------------------------
# methods
def mdp_variant(method: str, cfg: dict):
    prune = list(cfg["widths"]) + (["blocks"] if method in ("mdp", "mdp_stem", "blocks_linear") else [])
    latency = "linear" if method in ("blocks_linear", "halp") else "table"
    return prune, latency


def committed_scores(state) -> dict[str, np.ndarray]:
    return {k: (v / max(1, state["count"])).numpy() for k, v in state["sums"].items()}


def uniform_choice(space, scores, factor: float) -> PruningChoice:
    kept = {}
    for name, dim in space.dimensions.items():
        widths = dim.widths()
        width = max([w for w in widths if w <= factor * dim.size + 1e-9], default=widths[0])
        kept[name] = sorted(int(i) for i in ranked_units(scores[name])[:width])
    return PruningChoice(kept, [])


def bisect_measured(make, fraction_of, frac, name, log, steps=8, lo=0.0, hi=1.0, smaller_is_higher=False):
    """Bisect a one-parameter family of models on *measured* latency / dense to the least pruning that measures
    <= frac. ``make(x)`` builds the model, ``fraction_of(model)`` times it against the dense model; pruning grows
    with x if ``smaller_is_higher`` (Torch-Pruning's ratio), else shrinks with x (uniform's kept fraction)."""
    best, trace = None, []
    for _ in range(steps):
        mid = (lo + hi) / 2
        cand = make(mid)
        ratio = fraction_of(cand)
        trace.append((round(mid, 4), round(ratio, 4)))
        log(f"  {name} {mid:.4f}: measured {ratio:.3f} of dense")
        fits = ratio <= frac
        if fits:  # each later fit is less pruned than the earlier ones (the bisection moves towards less)
            best = (cand, mid, ratio)
        if fits == smaller_is_higher:
            hi = mid
        else:
            lo = mid
    if best is None:
        raise ValueError(f"{name}: no setting reached {frac:.0%} of dense latency (trace {trace})")
    return best[0], {"setting": best[1], "search_measured_fraction": best[2], "trace": trace}


def measured_fraction(dense, settings):
    """model -> its measured latency / the dense model's, timed interleaved with the table's protocol."""

    def fraction_of(model):
        d, c = measure_latencies([dense, model], settings)
        return c.ms / d.ms

    return fraction_of


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def tp_prune(dense, ratio: float, importance_batches, example):
    import torch_pruning as tp

    model = copy.deepcopy(dense)
    wrapped = _Logits(model)
    ignored = [model.classifier[-1] if isinstance(model.classifier, torch.nn.Sequential) else model.classifier]
    attentions = [layer.attention for layer in model.deit.layers] if hasattr(model, "deit") else []
    # HF attention reshapes q/k/v by head_dim: tell Torch-Pruning the head count (its documented ViT recipe),
    # prune head dims (same count in q, k, v of a head), then update the modules' head_dim attribute
    num_heads = {lin: att.num_attention_heads for att in attentions for lin in (att.q_proj, att.k_proj, att.v_proj)}
    pruner = tp.pruner.MetaPruner(
        wrapped,
        example,
        importance=tp.importance.GroupTaylorImportance(),
        global_pruning=True,
        pruning_ratio=ratio,
        max_pruning_ratio=0.9,
        ignored_layers=ignored,
        num_heads=num_heads,
        prune_num_heads=False,
        prune_head_dims=True,
    )
    if ratio > 0:
        model.train()
        model.zero_grad()
        for xb, yb in importance_batches:
            torch.nn.functional.cross_entropy(wrapped(xb), yb).backward()
        pruner.step()
        model.zero_grad(set_to_none=True)
        for att in attentions:  # scaling stays the trained one (1/sqrt of the original head_dim)
            att.head_dim = att.q_proj.out_features // att.num_attention_heads
    return model.eval()


def distillation(dense):
    return MDPLoss.from_settings(DistillationSettings(teacher="dense", kl_weight=KL_WEIGHT), dense, phase="finetuning")


def run_mdp_family(method, dense, cfg, frac, table_models, it, loss_fn, args, log):
    """Faithful MDP (or one of its ablations): SCORE_STEPS of masked training with KL to the dense model while the
    official scores accumulate and the family's schedule prunes (iterative: PRUNING_STEPS monotone steps to
    exponentially shrinking budgets; one-shot: one step at the end); the last step lands on the measured budget.
    Returns the sliced model and what was chosen."""
    prune, latency = mdp_variant(method, cfg)
    score_steps = 10 if args.smoke else SCORE_STEPS
    # HALP is iterative in its own code (re-linearised at every step); the MDP variants follow the family's
    # official schedule
    iterative = cfg["schedule"] == "iterative" or method == "halp"
    interval = score_steps // PRUNING_STEPS if iterative else score_steps
    pc = PrunableConfig(
        budget_fraction=frac,
        prune=prune,
        group_sizes=cfg["group_sizes"],
        latency_model=latency,
        schedule="iterative" if iterative else "one_shot",
        num_pruning_steps=PRUNING_STEPS if iterative else 1,
        accumulation_steps=interval,
        pruning_interval=interval,
        prune_stem=method == "mdp_stem",
        verify_latency=not args.smoke,  # the smoke's table is not a device's
        verify_latency_max_seconds=10.0,
    )
    model = copy.deepcopy(dense).train()
    session = PruningSession(model, pc, table_models[latency])
    prune_at, steps = set(pc.pruning_steps()), []

    def after_step(step):
        if step in prune_at:
            result = session.prune_step()
            steps.append(result)
            loss_fn.phase = "pruning"  # the official KL weight is 0 before the first pruning step
            log(
                f"  {method} step {len(steps)}: budget {result.budget_ms:.3f} ms, predicted {result.predicted_latency_ms:.3f}"
            )

    loss_fn.phase = "warmup"
    try:
        score_s = train(model, it, score_steps, args.finetune_lr, loss_fn, lambda s: session.accumulate(), after_step)
        pruned = session.export()
    finally:
        session.gates.remove()
    loss_fn.phase = "finetuning"  # the sliced model is fine-tuned at the fine-tuning temperature
    last = steps[-1]
    info = dict(
        predicted_ms=last.predicted_latency_ms,
        budget_ms=last.budget_ms,
        table_predicted_ms=table_models["table"].predict((session.space, last.choice)),
        removed_blocks=last.choice.removed_blocks,
        kept_fraction=last.kept_fraction,
        latency_check=getattr(last, "latency_check", None),
        score_s=score_s,
    )
    return pruned, info


def run_family(family: str, args):
    cfg = family_config(family, args.smoke)
    shared = shared_dir(args, family)
    shared_res = Results(os.path.join(shared, "results.json"))
    ft_steps = 5 if args.smoke else args.finetune_steps
    score_steps = 10 if args.smoke else SCORE_STEPS
    out = os.path.join(args.out, f"s{args.seed}_n{ft_steps}", family)
    res = Results(os.path.join(out, "results.json"))
    torch.set_num_threads(1)
    log = make_log(f"{family} s{args.seed} n{ft_steps}")
    data = load_data(args.smoke)
    dense = load_dense(family, os.path.join(shared, "dense"))
    space = build_space(dense, cfg["group_sizes"])
    table = LatencyTable.load(os.path.join(shared, "latency_table.json"))
    table_models = {"table": TableLatencyModel(table, space), "linear": LinearLatencyModel(table, space)}
    settings = settings_for(cfg, 5 if args.smoke else 15)
    if "setup" not in res:
        res.put(
            "setup", {"seed": args.seed, "finetune_steps": ft_steps, "score_steps": score_steps, "uptime": uptime()}
        )

    # importance of the dense model for the one-shot methods (uniform's unit ranking, Torch-Pruning's Taylor)
    n_imp = 4 if args.smoke else args.importance_batches
    imp_it = batches(data["train"], 64 if args.smoke else BATCH, args.seed + 1000, flip=False)
    imp_batches = [next(imp_it) for _ in range(n_imp)]
    scores_path = os.path.join(out, "scores.pt")
    if not os.path.isfile(scores_path):
        work = copy.deepcopy(dense)
        session = PruningSession(
            work, PrunableConfig(budget_fraction=1.0, group_sizes=cfg["group_sizes"]), table_models["table"]
        )
        accumulate_importance(session, work, imp_batches, n_imp)
        torch.save(session.scores.state_dict(), scores_path)
        session.gates.remove()
    scores = committed_scores(torch.load(scores_path))
    example = torch.randn(1, 1, 32, 32)

    for frac in args.budgets:
        for method in args.methods or METHODS:
            key = f"{method}@{frac}"
            if key in res or (method == "mdp_stem" and "stem" not in cfg):
                continue
            folder = os.path.join(out, key.replace("@", "_"))
            entry = {"method": method, "budget_fraction": frac, "finetune_steps": ft_steps, "seed": args.seed}
            t0 = time.time()
            it = batches(data["train"], BATCH, 100 + args.seed)  # the same batches, in the same order, per method
            loss_fn = distillation(dense)
            try:
                if method in MDP_FAMILY:
                    pruned, info = run_mdp_family(method, dense, cfg, frac, table_models, it, loss_fn, args, log)
                    train_steps = ft_steps
                elif method == "uniform":
                    pruned, info = bisect_measured(
                        lambda f: slice_model(dense, space, uniform_choice(space, scores, f)),
                        measured_fraction(dense, settings),
                        frac,
                        "uniform",
                        log,
                    )
                    choice = uniform_choice(space, scores, info["setting"])
                    info.update(
                        kept_fraction=kept_fraction_by_kind(space, choice),
                        predicted_ms=table_models["table"].predict((space, choice)),
                    )
                    train_steps = score_steps + ft_steps
                elif method == "torch_pruning":
                    pruned, info = bisect_measured(
                        lambda r: tp_prune(dense, r, imp_batches[: args.tp_batches], example),
                        measured_fraction(dense, settings),
                        frac,
                        "torch_pruning",
                        log,
                        hi=0.95,
                        smaller_is_higher=True,
                    )
                    train_steps = score_steps + ft_steps
                elif method == "small_dense":
                    pick = pick_small(shared_res["small_grid"]["candidates"], frac)
                    torch.manual_seed(args.seed)
                    pruned = new_model(family, pick["model"])
                    train_steps = shared_res["dense"]["steps"] + score_steps + ft_steps
                    info = {"small_model": pick["model"], "grid_measured_fraction": pick["measured_fraction"]}
                    loss_fn = None  # from scratch, cross-entropy, the dense model's learning rate
                else:
                    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
            except Exception as error:  # infeasible budget or a method that cannot run: recorded, not hidden
                log(f"{key}: FAILED {type(error).__name__}: {error}")
                res.put(key, {**entry, "status": "failed", "error": f"{type(error).__name__}: {error}"[:500]})
                continue
            entry.update(info, prune_s=time.time() - t0, params=n_params(pruned), train_steps=train_steps)
            entry["accuracy_before_ft"] = evaluate(pruned, data["test"])
            lr = cfg["dense_lr"] if method == "small_dense" else args.finetune_lr
            if method == "small_dense":
                it = batches(data["train"], BATCH, args.seed)
            entry["finetune_s"] = train(pruned, it, train_steps, lr, loss_fn)
            entry["accuracy"] = evaluate(pruned, data["test"])
            if method == "torch_pruning":
                os.makedirs(folder, exist_ok=True)
                torch.save(
                    pruned, os.path.join(folder, "model.pt")
                )  # an nn.Module edited in place: pickled (benchmark only)
            elif method == "small_dense":
                pruned.save_pretrained(folder)
            else:
                save_pruned_model(pruned, folder)
            entry.update(status="ok", folder=os.path.relpath(folder, out), total_s=time.time() - t0)
            res.put(key, entry)
            log(
                f"{key}: params {entry['params']:,}, top-1 {entry['accuracy_before_ft']:.4f} -> {entry['accuracy']:.4f} "
                f"({entry['total_s']:.0f}s)"
            )


# ----------------------------------------------------------------------------------------------------------------
# measurement (run alone) and report
def roots_of(args, family):
    """{(seed, finetune_steps): results} for every s<seed>_n<steps>/<family>/results.json under --out."""
    found = {}
    for path in sorted(glob.glob(os.path.join(args.out, "s*_n*", family, "results.json"))):
        match = re.fullmatch(r"s(\d+)_n(\d+)", os.path.basename(os.path.dirname(os.path.dirname(path))))
        if match:
            found[(int(match[1]), int(match[2]))] = Results(path)
    return found


def load_saved(res, key):
    folder = os.path.join(os.path.dirname(res.path), res[key]["folder"])
    if res[key]["method"] == "torch_pruning":
        return torch.load(os.path.join(folder, "model.pt"), weights_only=False)
    if res[key]["method"] == "small_dense":
        return load_dense(os.path.basename(os.path.dirname(res.path)), folder)
    return load_pruned_model(folder)


def measure(args):
    """Per family, one process: the dense model and every saved model of every seed, interleaved, two passes."""
    torch.set_num_threads(1)
    for family in args.families:
        cfg = family_config(family, args.smoke)
        roots = roots_of(args, family)
        entries = [
            (res, k)
            for res in roots.values()
            for k, v in res.data.items()
            if isinstance(v, dict) and v.get("status") == "ok"
        ]
        if not entries:
            continue
        models = [load_dense(family, os.path.join(shared_dir(args, family), "dense"))]
        models += [load_saved(res, k) for res, k in entries]
        up = uptime()
        print(f"[{family}] timing {len(models)} models, {up}", flush=True)
        repeats = 5 if args.smoke else args.repeats
        passes = [measure_latencies(models, settings_for(cfg, repeats)) for _ in range(1 if args.smoke else 2)]
        Results(os.path.join(shared_dir(args, family), "results.json")).put(
            "measurement",
            {
                "uptime_before": up,
                "uptime_after": uptime(),
                "repeats": repeats,
                "passes": len(passes),
                "models": len(models),
                "dense_min_ms": [p[0].min_ms for p in passes],
                "dense_spread": [p[0].spread for p in passes],
            },
        )
        for i, (res, key) in enumerate(entries, start=1):
            entry = dict(res[key])
            entry["measured_ms"] = float(np.mean([p[i].min_ms for p in passes]))
            entry["measured_fraction_passes"] = [p[i].min_ms / p[0].min_ms for p in passes]
            entry["measured_fraction"] = float(np.mean(entry["measured_fraction_passes"]))
            res.put(key, entry)
        print(f"[{family}] dense {[round(p[0].min_ms, 3) for p in passes]} ms (min of {repeats}, per pass)", flush=True)


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), (max(values) - min(values)) / 2


def _fmt(mean, half, digits=4):
    return "–" if mean is None else f"{mean:.{digits}f} ± {half:.{digits}f}"


def report(args):
    """Markdown tables (per family: every method x budget over the seeds; MDP minus the best alternative; the
    ranking at N and 2N steps) into <out>/report.md, and plots into --docs."""
    lines = []
    for family in args.families:
        shared = Results(os.path.join(shared_dir(args, family), "results.json"))
        roots = roots_of(args, family)
        if "dense" not in shared or not roots:
            continue
        n_main = args.finetune_steps if not args.smoke else 5
        seeds = sorted(seed for seed, n in roots if n == n_main)
        main_runs = {seed: roots[(seed, n_main)] for seed in seeds}
        dense = shared["dense"]
        meas = shared.data.get("measurement", {})
        curve = ", ".join(f"{v:.4f}" for v in dense["validation_curve"])
        lines += [
            f"\n### {family}\n",
            f"Dense: test top-1 **{dense['accuracy']:.4f}**, {dense['params']:,} parameters, {dense['epochs']} epochs "
            f"({dense['train_s'] / 60:.1f} min); validation top-1 per epoch: {curve}. Measured "
            f"{', '.join(f'{v:.3f}' for v in meas.get('dense_min_ms', []))} ms per pass (batch "
            f"{FAMILIES[family]['latency_batch']}, 1 thread, min of {meas.get('repeats', 'n/a')}; "
            f"{meas.get('models', 'n/a')} models interleaved). Fine-tuning N = {n_main} steps; seeds {seeds}.\n",
            "| budget | method | measured / dense (mean, range) | params (s0) | removed blocks (s0) | top-1 per seed | "
            "top-1 mean ± half-range | dense minus mean | notes |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        summary, plot = [], {}
        for frac in args.budgets:
            stats = {}
            for method in args.methods or METHODS:
                entries = [main_runs[s].data.get(f"{method}@{frac}") for s in seeds]
                ok = [e for e in entries if e and e.get("status") == "ok"]
                if not ok:
                    failed = next((e for e in entries if e), None)
                    if failed:
                        lines.append(
                            f"| {frac:.0%} | {method} | – | – | – | – | – | – | {failed.get('error', 'failed')[:150]} |"
                        )
                    continue
                accs = [e["accuracy"] if e and e.get("status") == "ok" else None for e in entries]
                fracs = [e.get("measured_fraction") for e in ok if e.get("measured_fraction") is not None]
                mean, half = _stats(accs)
                over = bool(fracs) and float(np.mean(fracs)) > frac * 1.05
                stats[method] = dict(
                    mean=mean, half=half, n=len(ok), over=over, frac=float(np.mean(fracs)) if fracs else None
                )
                e0 = ok[0]
                notes = []
                if over:
                    notes.append("**over budget**")
                failed_seeds = [s for s, e in zip(seeds, entries) if e and e.get("status") != "ok"]
                if failed_seeds:
                    notes.append(f"seed(s) {failed_seeds} failed")
                if len(ok) + len(failed_seeds) < len(seeds):
                    notes.append(f"run for seed(s) {[s for s, e in zip(seeds, entries) if e]} only")
                if "small_model" in e0:
                    notes.append(
                        ", ".join(
                            f"{k} {v}"
                            for k, v in e0["small_model"].items()
                            if k in ("num_hidden_layers", "hidden_size", "depths", "hidden_sizes")
                        )
                    )
                if "setting" in e0:
                    notes.append(f"{'ratio' if method == 'torch_pruning' else 'kept fraction'} {e0['setting']:.3f}")
                frac_cell = "n/a" if not fracs else f"{np.mean(fracs):.3f} ({min(fracs):.3f}–{max(fracs):.3f})"
                lines.append(
                    f"| {frac:.0%} | {method} | {frac_cell} | {e0['params']:,} | {len(e0.get('removed_blocks') or [])} | "
                    f"{' / '.join('–' if a is None else f'{a:.4f}' for a in accs)} | {_fmt(mean, half)} | "
                    f"{dense['accuracy'] - mean:+.4f} | {'; '.join(notes)} |"
                )
                if fracs:
                    plot.setdefault(method, []).append((float(np.mean(fracs)), mean, half))
            leads = [
                m
                for m in ("mdp", "mdp_stem")
                if m in (args.methods or METHODS) and (m != "mdp_stem" or "stem" in FAMILIES[family])
            ]
            # against every alternative, and against the best other *pruning* method (small_dense trains anew)
            for pool in ("all", "pruning"):
                alts = {
                    m: s
                    for m, s in stats.items()
                    if m not in ("mdp", "mdp_stem") and not s["over"] and (pool == "all" or m != "small_dense")
                }
                best = max(alts, key=lambda m: alts[m]["mean"]) if alts else None
                for lead in leads:
                    summary.append((frac, lead, stats.get(lead), best, alts.get(best), stats))
        lines += [
            "",
            f"**{family}: MDP minus the best alternative within budget** (a difference is called real when it "
            "exceeds the sum of the two half-ranges over seeds)",
            "",
            "| budget | MDP (top-1) | best alternative | its top-1 | MDP minus it | verdict | every method within the seeds' spread of dense? |",
            "|---|---|---|---|---|---|---|",
        ]
        for frac, lead, mdp, best, alt, stats in summary:
            if mdp is None and alt is None:
                lines.append(
                    f"| {frac:.0%} | {lead}: failed (see above) | none reached the budget | – | – | no method | – |"
                )
                continue
            if mdp is None:
                lines.append(
                    f"| {frac:.0%} | {lead}: failed (see above) | {best or '–'} | {_fmt(alt['mean'], alt['half']) if alt else '–'} | – | **MDP loses** (no model) | – |"
                )
                continue
            if alt is None:
                lines.append(
                    f"| {frac:.0%} | {lead}: {_fmt(mdp['mean'], mdp['half'])} | none reached the budget | – | – | only MDP | – |"
                )
                continue
            diff, noise = mdp["mean"] - alt["mean"], mdp["half"] + alt["half"]
            verdict = "tie" if abs(diff) <= noise else ("**MDP wins**" if diff > 0 else "**MDP loses**")
            widest = max(s["half"] for s in stats.values())
            saturated = all(dense["accuracy"] - s["mean"] <= max(widest, 1e-4) for s in stats.values())
            lines.append(
                f"| {frac:.0%} | {lead}: {_fmt(mdp['mean'], mdp['half'])} | {best} | {_fmt(alt['mean'], alt['half'])} | "
                f"{diff:+.4f} (spread {noise:.4f}) | {verdict} | {'yes: says nothing' if saturated else 'no'} |"
            )
        lines += _ranking_lines(family, roots, n_main, args)
        if plot and not args.smoke:
            _plot_pareto(family, plot, dense["accuracy"], args)
            _plot_choices(family, main_runs, seeds, args)
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "report.md"), "w") as handle:
        handle.write(text + "\n")


def _ranking_lines(family, roots, n_main, args):
    """Seed by seed where a 2N run exists: the methods' order by top-1 at N and at 2N steps."""
    lines = []
    for (seed, n), res_long in sorted(roots.items()):
        if n == n_main or (seed, n_main) not in roots:
            continue
        res_short = roots[(seed, n_main)]
        lines += [
            "",
            f"**{family}, seed {seed}: ranking after N = {n_main} and {n} fine-tuning steps**",
            "",
            f"| budget | order at {n_main} | order at {n} | top-1 at {n_main} → {n} |",
            "|---|---|---|---|",
        ]
        for frac in args.budgets:
            pairs = []
            for method in args.methods or METHODS:
                a, b = res_short.data.get(f"{method}@{frac}"), res_long.data.get(f"{method}@{frac}")
                if a and b and a.get("status") == b.get("status") == "ok":
                    pairs.append((method, a["accuracy"], b["accuracy"]))
            if not pairs:
                continue
            order = lambda i: " > ".join(m for m, *_ in sorted(pairs, key=lambda p: -p[i]))  # noqa: E731
            changes = ", ".join(f"{m} {x:.4f}→{y:.4f}" for m, x, y in pairs)
            lines.append(f"| {frac:.0%} | {order(1)} | {order(2)} | {changes} |")
    return lines


def _plot_pareto(family, plot, dense_acc, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    markers = dict(zip(METHODS, "o^svDxP"))
    for method, points in plot.items():
        points = sorted(points)
        ax.errorbar(
            [p[0] for p in points],
            [p[1] for p in points],
            yerr=[p[2] for p in points],
            marker=markers.get(method, "o"),
            capsize=3,
            label=method,
        )
    ax.scatter([1.0], [dense_acc], color="black", marker="*", s=120, label="dense", zorder=5)
    for b in args.budgets:
        ax.axvline(b, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("measured latency / dense (CPU, 1 thread, batch 128)")
    ax.set_ylabel("top-1, Fashion-MNIST test (mean; bar = half-range of seeds)")
    ax.set_title(f"{family}: accuracy vs measured latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.docs, f"pareto_v2_{family}.png"), dpi=110)
    plt.close(fig)


def _plot_choices(family, runs, seeds, args):
    """What each method kept (seed 0): per budget, the kept fraction of every kind, and the blocks removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = runs[seeds[0]]
    methods = [m for m in (args.methods or METHODS) if m in MDP_FAMILY or m == "uniform"]
    fig, axes = plt.subplots(1, len(args.budgets), figsize=(4.2 * len(args.budgets), 3.8), sharey=True, squeeze=False)
    for ax, frac in zip(axes[0], args.budgets):
        entries = {m: res.data.get(f"{m}@{frac}") for m in methods}
        entries = {m: e for m, e in entries.items() if e and e.get("status") == "ok" and e.get("kept_fraction")}
        kinds = sorted({k for e in entries.values() for k in e["kept_fraction"]})
        width = 0.8 / max(1, len(entries))
        for j, (method, e) in enumerate(entries.items()):
            blocks = len(e.get("removed_blocks") or [])
            ax.bar(
                [i + j * width for i in range(len(kinds))],
                [e["kept_fraction"].get(k, 0) for k in kinds],
                width,
                label=f"{method} ({blocks} blocks removed)",
            )
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(kinds))], kinds)
        ax.set_title(f"{family}, budget {frac:.0%}")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("kept fraction (seed 0)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.docs, f"pareto_v2_choices_{family}.png"), dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["deit", "resnet", "both"], default="both")
    parser.add_argument("--stage", choices=["dense", "table", "run", "measure", "report", "all"], default="all")
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "pareto_v2"))
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--budgets", type=float, nargs="*", default=list(BUDGETS), help="fractions of dense latency")
    parser.add_argument("--seed", type=int, default=0, help="importance batches, training order, small-dense init")
    parser.add_argument("--importance_batches", type=int, default=40)
    parser.add_argument("--tp_batches", type=int, default=10, help="of the importance batches, for Torch-Pruning")
    parser.add_argument("--finetune_steps", type=int, default=200, help="N: steps after pruning (batch 128)")
    parser.add_argument("--finetune_lr", type=float, default=5e-4)
    parser.add_argument("--repeats", type=int, default=40, help="measure: timed repeats per model and pass")
    parser.add_argument("--docs", default=os.path.join(ROOT, "docs"), help="report: where the plots go")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    args.families = ["deit", "resnet"] if args.family == "both" else [args.family]
    stages = ["dense", "table", "run", "measure", "report"] if args.stage == "all" else [args.stage]
    per_family = {"dense": stage_dense, "table": stage_table, "run": run_family}
    for stage in stages:
        if stage in per_family:
            for family in args.families:
                per_family[stage](family, args)
        elif stage == "measure":
            measure(args)
        else:
            report(args)


if __name__ == "__main__":
    main()
