"""Accuracy vs measured latency of MDP and the alternatives on Fashion-MNIST (issue 7).

One command, resumable (every finished step is stored under --out and skipped when run again):

    python benchmarks/pareto.py --family deit   # dense train -> table -> scores -> prune x fine-tune x eval
    python benchmarks/pareto.py --family resnet  # (the two can run side by side, one CPU thread each)
    python benchmarks/pareto.py --stage measure  # one quiet interleaved timing pass of every saved model
    python benchmarks/pareto.py --stage report   # table + plots + docs/pareto.md data

Methods (same dense checkpoint, same importance data, same fine-tuning budget):
  mdp            all width kinds + blocks, table latency model (MDP)
  widths_table   all width kinds, no blocks, table model            (paper ablation)
  blocks_linear  all width kinds + blocks, linear (HALP-style) model (paper ablation)
  halp           all width kinds, no blocks, linear model            (HALP)
  uniform        every dimension scaled by one factor (top-scoring units kept); factor bisected until the
                 TABLE-PREDICTED latency meets the budget
  torch_pruning  Torch-Pruning global Taylor pruning, ratio bisected until the MEASURED latency meets the
                 budget (DeiT: num_heads given, head_dim updated after pruning)
Budgets: 70 / 50 / 30 % of the dense model's latency (measured; the table models are calibrated to it).

``--smoke`` runs a tiny version end to end in a scratch folder (tests/test_pareto.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mdp_hf import PruningChoice, build_space, slice_model  # noqa: E402
from mdp_hf.config import PrunableConfig  # noqa: E402
from mdp_hf.hub import load_pruned_model, save_pruned_model  # noqa: E402
from mdp_hf.latency import (
    LatencyTable,
    LinearLatencyModel,
    TableLatencyModel,
    TimingSettings,
    build_table,  # noqa: E402
    measure_latencies,
)
from mdp_hf.masks import kept_fraction_by_kind, ranked_units  # noqa: E402
from mdp_hf.pruning import PruningSession, accumulate_importance  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BUDGETS = (0.7, 0.5, 0.3)
METHODS = ("mdp", "widths_table", "blocks_linear", "halp", "uniform", "torch_pruning")
MEAN, STD = 0.2860, 0.3530

FAMILIES = {
    "deit": dict(
        model=dict(
            image_size=32,
            patch_size=4,
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=256,
            num_channels=1,
            num_labels=10,
        ),
        widths=["embed", "heads", "qk", "v", "mlp"],
        group_sizes={"embed": 16, "heads": 1, "qk": 2, "v": 2, "mlp": 32},
        subgrid={"embed": 2, "qk": 4, "v": 4, "mlp": 2},
        latency_batch=8,
        dense_epochs=3,
        dense_lr=1e-3,
    ),
    "resnet": dict(
        model=dict(
            num_channels=1,
            embedding_size=32,
            hidden_sizes=[64, 128, 256],
            depths=[2, 2, 2],
            layer_type="bottleneck",
            num_labels=10,
        ),
        widths=["channels", "residual"],
        group_sizes={"channels": 8, "residual": 16},
        subgrid=2,
        latency_batch=32,
        dense_epochs=4,
        dense_lr=2e-3,
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
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# data, models, training
def load_data(smoke: bool):
    from mdp_hf.data import load_fashion_mnist_arrays

    out = {}
    for split in ("train", "test"):
        images, labels = load_fashion_mnist_arrays(split)
        if smoke:
            images, labels = images[:512], labels[:512]
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
        x = torch.nn.functional.pad(x, (2, 2, 2, 2)).sub_(MEAN).div_(STD).unsqueeze(1)  # [N, 1, 32, 32]
        out[split] = (x, torch.from_numpy(labels))
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


def train(model, data, steps: int, lr: float, seed: int, batch_size: int = 128, log_every: int = 100, tag: str = ""):
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    it = batches(data, batch_size, seed)
    start, running = time.time(), 0.0
    for step in range(steps):
        xb, yb = next(it)
        loss = loss_fn(logits_of(model(pixel_values=xb)), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % log_every == 0:
            print(
                f"  [{tag}] step {step + 1}/{steps} loss {running / log_every:.4f} ({time.time() - start:.0f}s)",
                flush=True,
            )
            running = 0.0
    model.eval()
    return time.time() - start


@torch.inference_mode()
def evaluate(model, data, batch_size: int = 500) -> float:
    model.eval()
    x, y = data
    correct = 0
    for begin in range(0, len(x), batch_size):
        correct += (
            (logits_of(model(pixel_values=x[begin : begin + batch_size])).argmax(-1) == y[begin : begin + batch_size])
            .sum()
            .item()
        )
    return correct / len(x)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def new_model(family: str, cfg: dict):
    from transformers import DeiTConfig, DeiTForImageClassification, ResNetConfig, ResNetForImageClassification

    if family == "deit":
        return DeiTForImageClassification(DeiTConfig(**cfg["model"]))
    return ResNetForImageClassification(ResNetConfig(**cfg["model"]))


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
        self.data[key] = value
        tmp = self.path + ".tmp"
        with open(tmp, "w") as handle:
            json.dump(self.data, handle, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def smoke_timer(table, widths) -> float:
    """--smoke's latency table: a cell costs the product of its widths (its FLOPs, up to a factor). Measured, a
    smoke-sized model's cells are per-call overheads and noise (at hidden 32, batch 2, on a shared CPU, smaller
    widths timed slower), so which budgets were feasible depended on the machine's load; with this every method
    runs at every budget. The saved models are still timed for real (--stage measure)."""
    return 1e-4 * float(np.prod(widths)) + 1e-3


def settings_for(cfg, repeats: int, statistic: str = "min") -> TimingSettings:
    return TimingSettings(
        device="cpu", batch_size=cfg["latency_batch"], image_size=32, threads=1, repeats=repeats, statistic=statistic
    )


# ----------------------------------------------------------------------------------------------------------------
# methods
def mdp_variant(method: str, cfg: dict):
    prune = list(cfg["widths"]) + (["blocks"] if method in ("mdp", "blocks_linear") else [])
    latency = "linear" if method in ("blocks_linear", "halp") else "table"
    return prune, latency


def committed_scores(state) -> dict[str, np.ndarray]:
    return {k: (v / max(1, state["count"])).numpy() for k, v in state["sums"].items()}


def uniform_choice(space, scores, factor: float) -> PruningChoice:
    kept = {}
    for name, dim in space.dimensions.items():
        widths = dim.widths()
        target = factor * dim.size
        width = max([w for w in widths if w <= target + 1e-9], default=widths[0])
        kept[name] = sorted(int(i) for i in ranked_units(scores[name])[:width])
    return PruningChoice(kept, [])


def prune_uniform(dense, space, scores, table_model, budget_ms):
    lo, hi = 0.0, 1.0
    if table_model.predict((space, uniform_choice(space, scores, 0.0))) > budget_ms:
        raise ValueError("uniform: budget below the smallest uniform model")
    for _ in range(30):  # predicted latency is a step function of the factor: bisect to the largest feasible factor
        mid = (lo + hi) / 2
        if table_model.predict((space, uniform_choice(space, scores, mid))) <= budget_ms:
            lo = mid
        else:
            hi = mid
    choice = uniform_choice(space, scores, lo)
    return slice_model(dense, space, choice), choice, table_model.predict((space, choice)), {"factor": lo}


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
    imp = tp.importance.GroupTaylorImportance()
    attentions = [layer.attention for layer in model.deit.layers] if hasattr(model, "deit") else []
    # HF attention reshapes q/k/v by head_dim: tell Torch-Pruning the head count (its documented ViT recipe),
    # prune head dims (same count in q, k, v of a head), then update the modules' head_dim attribute
    num_heads = {lin: att.num_attention_heads for att in attentions for lin in (att.q_proj, att.k_proj, att.v_proj)}
    pruner = tp.pruner.MetaPruner(
        wrapped,
        example,
        importance=imp,
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


def prune_torch_pruning(dense, importance_batches, settings, frac, log):
    """Bisect Torch-Pruning's global ratio until measured latency / dense measured latency <= frac."""
    example = torch.randn(1, 1, 32, 32)
    lo, hi, best = 0.0, 0.95, None
    trace = []
    for _ in range(8):
        mid = (lo + hi) / 2
        cand = tp_prune(dense, mid, importance_batches, example)
        d, c = measure_latencies([dense, cand], settings)
        ratio = c.ms / d.ms
        trace.append((round(mid, 4), round(ratio, 4)))
        log(f"  torch_pruning ratio {mid:.4f}: measured {ratio:.3f} of dense")
        if ratio <= frac:
            hi, best = mid, (cand, mid, ratio)
        else:
            lo = mid
    if best is None:
        raise ValueError(f"torch_pruning: no ratio <= 0.95 reached {frac:.0%} of dense latency (trace {trace})")
    return best[0], {"ratio": best[1], "search_measured_fraction": best[2], "trace": trace}


# ----------------------------------------------------------------------------------------------------------------
def run_family(family: str, args):
    cfg = dict(FAMILIES[family])
    if args.smoke:
        cfg.update(SMOKE[family])
    out = os.path.join(args.out, family)
    os.makedirs(out, exist_ok=True)
    res = Results(os.path.join(out, "results.json"))
    torch.set_num_threads(1)
    log = lambda msg: print(f"[{family} {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    data = load_data(args.smoke)
    steps_per_epoch = len(data["train"][0]) // 128

    # 1. dense model -----------------------------------------------------------------------------------------
    dense_dir = os.path.join(out, "dense")
    if "dense" not in res:
        torch.manual_seed(args.seed)
        model = new_model(family, cfg)
        epochs = 1 if args.smoke else cfg["dense_epochs"]
        log(f"dense training: {epochs} epochs x {steps_per_epoch} steps")
        seconds = train(
            model, data["train"], epochs * steps_per_epoch, cfg["dense_lr"], args.seed, tag=f"{family} dense"
        )
        model.save_pretrained(dense_dir)
        res.put(
            "dense",
            {
                "accuracy": evaluate(model, data["test"]),
                "params": n_params(model),
                "train_s": seconds,
                "epochs": epochs,
            },
        )
    dense = load_dense(family, dense_dir)
    log(f"dense: top-1 {res['dense']['accuracy']:.4f}, {res['dense']['params']:,} params")

    # 2. latency table (one quiet-as-possible build; calibrated to the dense model measured end to end) ---------
    space = build_space(dense, cfg["group_sizes"])
    table_path = os.path.join(out, "latency_table.json")
    if "table" not in res:
        t0 = time.time()
        table = build_table(
            dense,
            table_path,
            space=space,
            settings=settings_for(cfg, 5 if args.smoke else 15),
            subgrid=cfg["subgrid"],
            progress=False,
            timer=smoke_timer if args.smoke else None,
        )
        res.put("table", {"build_s": time.time() - t0, "reference": table.reference, "uptime": _uptime()})
    table = LatencyTable.load(table_path)
    models = {"table": TableLatencyModel(table, space), "linear": LinearLatencyModel(table, space)}
    log(
        f"table: dense predicted {models['table'].predict(dense):.3f} ms (calibrated), "
        f"linear {models['linear'].predict(dense):.3f} ms"
    )

    # 3. importance: accumulated once, reused by every method -------------------------------------------------
    n_imp = 4 if args.smoke else args.importance_batches
    imp_batches = []
    it = batches(data["train"], 64 if args.smoke else 128, args.seed + 1000, flip=False)
    for _ in range(n_imp):
        imp_batches.append(next(it))
    scores_path = os.path.join(out, "scores.pt")
    if not os.path.isfile(scores_path):
        work = copy.deepcopy(dense)
        session = PruningSession(
            work, PrunableConfig(budget_fraction=1.0, group_sizes=cfg["group_sizes"]), models["table"]
        )
        accumulate_importance(session, work, imp_batches, n_imp)
        torch.save(session.scores.state_dict(), scores_path)
        session.gates.remove()
    score_state = torch.load(scores_path)
    scores = committed_scores(score_state)

    # 4. prune x fine-tune x evaluate -----------------------------------------------------------------------
    ft_steps = 5 if args.smoke else args.finetune_steps
    methods = list(args.methods or METHODS)
    for frac in args.budgets:
        for method in methods:
            key = f"{method}@{frac}"
            if key in res:
                continue
            folder = os.path.join(out, key.replace("@", "_"))
            entry = {"method": method, "budget_fraction": frac, "finetune_steps": ft_steps}
            t0 = time.time()
            try:
                if method == "torch_pruning":
                    pruned, info = prune_torch_pruning(
                        dense, imp_batches[: args.tp_batches], settings_for(cfg, 5 if args.smoke else 15), frac, log
                    )
                    entry.update(info, predicted_ms=None)
                elif method == "uniform":
                    budget = frac * models["table"].dense_ms()
                    pruned, choice, predicted, info = prune_uniform(dense, space, scores, models["table"], budget)
                    entry.update(
                        info,
                        predicted_ms=predicted,
                        budget_ms=budget,
                        kept_fraction=kept_fraction_by_kind(space, choice),
                    )
                else:
                    prune, latency = mdp_variant(method, cfg)
                    pc = PrunableConfig(
                        budget_fraction=frac, prune=prune, group_sizes=cfg["group_sizes"], latency_model=latency
                    )
                    work = copy.deepcopy(dense)
                    session = PruningSession(work, pc, models[latency])
                    try:
                        session.scores.load_state_dict(score_state)
                        step = session.prune_step()
                        pruned = session.export()
                    finally:
                        session.gates.remove()
                    entry.update(
                        predicted_ms=step.predicted_latency_ms,
                        budget_ms=step.budget_ms,
                        table_predicted_ms=models["table"].predict((space, step.choice)),
                        solver_status=step.status,
                        solver_s=step.solve_time_s,
                        removed_blocks=step.choice.removed_blocks,
                        kept_fraction=step.kept_fraction,
                    )
            except Exception as error:  # infeasible budget or a method that cannot run: recorded, not hidden
                log(f"{key}: FAILED {type(error).__name__}: {error}")
                res.put(key, {**entry, "status": "failed", "error": f"{type(error).__name__}: {error}"[:500]})
                continue
            entry["prune_s"] = time.time() - t0
            entry["params"] = n_params(pruned)
            entry["accuracy_before_ft"] = evaluate(pruned, data["test"])
            entry["finetune_s"] = train(
                pruned, data["train"], ft_steps, args.finetune_lr, args.seed + 1, log_every=10**9
            )
            entry["accuracy"] = evaluate(pruned, data["test"])
            if method == "torch_pruning":
                os.makedirs(folder, exist_ok=True)
                torch.save(
                    pruned, os.path.join(folder, "model.pt")
                )  # a plain nn.Module edited in place: pickled (benchmark only)
            else:
                save_pruned_model(pruned, folder)
            entry.update(status="ok", folder=os.path.relpath(folder, out))
            res.put(key, entry)
            log(
                f"{key}: predicted {entry.get('predicted_ms') or float('nan'):.3f} ms, params {entry['params']:,}, "
                f"top-1 {entry['accuracy_before_ft']:.4f} -> {entry['accuracy']:.4f} ({time.time() - t0:.0f}s)"
            )


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


# ----------------------------------------------------------------------------------------------------------------
def measure(args):
    """One interleaved timing pass per family: the dense model and every saved pruned model, twice."""
    torch.set_num_threads(1)
    for family in args.families:
        cfg = dict(FAMILIES[family])
        if args.smoke:
            cfg.update(SMOKE[family])
        out = os.path.join(args.out, family)
        res = Results(os.path.join(out, "results.json"))
        keys = [k for k, v in res.data.items() if isinstance(v, dict) and v.get("status") == "ok"]
        models = [load_dense(family, os.path.join(out, "dense"))]
        for key in keys:
            folder = os.path.join(out, res[key]["folder"])
            if res[key]["method"] == "torch_pruning":
                models.append(torch.load(os.path.join(folder, "model.pt"), weights_only=False))
            else:
                models.append(load_pruned_model(folder))
        up = _uptime()
        print(f"[{family}] timing {len(models)} models, {up}", flush=True)
        passes = []
        for _ in range(2 if not args.smoke else 1):
            passes.append(measure_latencies(models, settings_for(cfg, 5 if args.smoke else args.repeats)))
        dense_min = [p[0].min_ms for p in passes]
        summary = {
            "uptime": up,
            "repeats": args.repeats,
            "passes": len(passes),
            "batch_size": cfg["latency_batch"],
            "dense_min_ms": dense_min,
            "dense_median_ms": [p[0].median_ms for p in passes],
            "dense_spread": [p[0].spread for p in passes],
        }
        res.put("measurement", summary)
        for i, key in enumerate(keys, start=1):
            entry = dict(res[key])
            entry["measured_ms_passes"] = [p[i].min_ms for p in passes]
            entry["measured_ms"] = float(np.mean(entry["measured_ms_passes"]))
            entry["measured_fraction_passes"] = [p[i].min_ms / p[0].min_ms for p in passes]
            entry["measured_fraction"] = float(np.mean(entry["measured_fraction_passes"]))
            entry["median_fraction"] = float(np.mean([p[i].median_ms / p[0].median_ms for p in passes]))
            entry["spread"] = float(np.mean([p[i].spread for p in passes]))
            res.put(key, entry)
        print(f"[{family}] dense {dense_min} ms (min of {args.repeats}, per pass)", flush=True)


# ----------------------------------------------------------------------------------------------------------------
def report(args):
    """Markdown table per family (seed columns for every --out root) and one plot per family."""
    roots = [args.out] + list(args.seed_outs or [])
    lines = []
    for family in args.families:
        runs = [Results(os.path.join(root, family, "results.json")) for root in roots]
        runs = [r for r in runs if "dense" in r]
        if not runs:
            continue
        res = runs[0]
        dense = res["dense"]
        meas = res.data.get("measurement", {})
        dense_ms = float(np.mean(meas["dense_min_ms"])) if meas else None
        ft = sorted(
            {
                e.get("finetune_steps")
                for r in runs
                for e in r.data.values()
                if isinstance(e, dict) and "finetune_steps" in e
            }
        )
        lines.append(f"\n### {family}\n")
        lines.append(
            f"Dense: top-1 **{dense['accuracy']:.4f}** ({dense['epochs']} epochs from scratch), {dense['params']:,} parameters, "
            f"measured {'n/a' if dense_ms is None else f'{dense_ms:.3f} ms'} (batch {FAMILIES[family]['latency_batch']}, 32x32, "
            f"1 thread, min of {meas.get('repeats', 'n/a')} repeats, mean of {meas.get('passes', 'n/a')} interleaved passes: "
            f"{', '.join(f'{v:.3f}' for v in meas.get('dense_min_ms', []))} ms). Fine-tuning: {ft} steps of batch 128. "
            f"Seeds: {len(runs)}.\n"
        )
        seed_cols = " | ".join(f"top-1 s{i}" for i in range(len(runs)))
        lines.append(
            f"| method | budget | predicted (ms) | measured (ms) | measured / dense | params | top-1 before FT | {seed_cols} | mean top-1 | notes |"
        )
        lines.append("|" + "---|" * (9 + len(runs)))
        plot, spread = {}, {}
        for frac in BUDGETS:
            for method in METHODS:
                key = f"{method}@{frac}"
                entries = [r.data.get(key) for r in runs]
                e = entries[0]
                if e is None:
                    continue
                if e.get("status") != "ok":
                    err = e.get("error", "failed")
                    short = err.split(". At that minimum")[0] if "Infeasible" in err else err[:140]
                    lines.append(
                        f"| {method} | {frac:.0%} | – | – | – | – | – |" + " – |" * len(runs) + f" – | {short} |"
                    )
                    continue
                pred = "–" if e.get("predicted_ms") is None else f"{e['predicted_ms']:.3f}"
                mfrac, mms = e.get("measured_fraction"), e.get("measured_ms")
                notes = []
                if e.get("removed_blocks"):
                    notes.append(f"{len(e['removed_blocks'])} blocks removed")
                if "factor" in e:
                    notes.append(f"factor {e['factor']:.3f}")
                if "ratio" in e:
                    notes.append(f"TP ratio {e['ratio']:.3f} (search saw {e['search_measured_fraction']:.3f})")
                if mfrac is not None and mfrac > frac * 1.05:
                    notes.append("**over budget**")
                if mfrac is not None:
                    p = e["measured_fraction_passes"]
                    notes.append(f"passes {'/'.join(f'{v:.3f}' for v in p)}")
                accs = [x["accuracy"] if x and x.get("status") == "ok" else None for x in entries]
                for i, x in enumerate(entries[1:], start=1):
                    if x and x.get("status") == "ok" and x.get("measured_fraction") is not None:
                        notes.append(f"s{i}: {x['measured_fraction']:.3f} of dense, {x['params']:,} params")
                valid = [a for a in accs if a is not None]
                mean = float(np.mean(valid)) if valid else None
                acc_cells = " | ".join("–" if a is None else f"{a:.4f}" for a in accs)
                lines.append(
                    f"| {method} | {frac:.0%} | {pred} | {'n/a' if mms is None else f'{mms:.3f}'} | "
                    f"{'n/a' if mfrac is None else f'{mfrac:.3f}'} | {e['params']:,} | {e['accuracy_before_ft']:.4f} | "
                    f"{acc_cells} | {'–' if mean is None else f'{mean:.4f}'} | {'; '.join(notes)} |"
                )
                if mfrac is not None and mean is not None:
                    plot.setdefault(method, []).append((mfrac, mean))
                    spread.setdefault(method, []).append((mfrac, min(valid), max(valid)))
        if plot and not args.smoke:
            _plot(family, plot, spread, dense["accuracy"], os.path.join(ROOT, "docs", f"pareto_{family}.png"))
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "table.md"), "w") as handle:
        handle.write(text + "\n")


def _plot(family, plot, spread, dense_acc, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = dict(zip(METHODS, "o^svDx"))
    for method, points in plot.items():
        points = sorted(points)
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker=markers.get(method, "o"), label=method)
        for x, lo, hi in spread.get(method, []):
            if hi > lo:
                ax.plot([x, x], [lo, hi], color=line.get_color(), lw=1, alpha=0.6)
    ax.scatter([1.0], [dense_acc], color="black", marker="*", s=120, label="dense", zorder=5)
    for b in BUDGETS:
        ax.axvline(b, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("measured latency / dense measured latency (CPU, 1 thread)")
    ax.set_ylabel("top-1, Fashion-MNIST test (mean of seeds; bar = range)")
    ax.set_title(f"{family}: accuracy vs measured latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["deit", "resnet", "both"], default="both")
    parser.add_argument("--stage", choices=["run", "measure", "report", "all"], default="run")
    parser.add_argument("--out", default=os.path.join(ROOT, "outputs", "pareto"))
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument(
        "--budgets", type=float, nargs="*", default=list(BUDGETS), help="fractions of dense latency, in run order"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--importance_batches", type=int, default=40)
    parser.add_argument(
        "--tp_batches", type=int, default=10, help="of the same importance batches, for Torch-Pruning's Taylor"
    )
    parser.add_argument("--finetune_steps", type=int, default=150)
    parser.add_argument("--finetune_lr", type=float, default=5e-4)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--seed_outs", nargs="*", default=None, help="report: more --out roots (other seeds)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    args.families = ["deit", "resnet"] if args.family == "both" else [args.family]
    if args.stage in ("run", "all"):
        for family in args.families:
            run_family(family, args)
    if args.stage in ("measure", "all"):
        measure(args)
    if args.stage in ("report", "all"):
        report(args)


if __name__ == "__main__":
    main()
