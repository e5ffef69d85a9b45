"""Why MDP's DeiT structures fail in the evidence-v2 study (docs/pareto.md): the table model's breakdown of the
saved 30 % and 50 % DeiT models, with the sum of the attention interaction terms (qk_x_v) per structure.

    python benchmarks/pareto_breakdown.py      # after benchmarks/pareto_study.sh; writes <OUT>/interaction_terms.json
"""

from __future__ import annotations

import importlib.util
import json
import os

import torch

from mdp_hf import build_space
from mdp_hf.hub import load_pruned_model
from mdp_hf.latency import LatencyTable, TableLatencyModel

OUT = os.environ.get("OUT", "outputs/pareto_v2")
ENTRIES = ("mdp_0.3", "widths_table_0.3", "halp_0.3", "blocks_linear_0.3", "mdp_0.5", "halp_0.5")


def main():
    torch.set_num_threads(1)
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("pareto_bench", os.path.join(here, "pareto.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dense = bench.load_dense("deit", os.path.join(OUT, "shared", "deit", "dense"))
    space = build_space(dense, bench.family_config("deit", False)["group_sizes"])
    model = TableLatencyModel(LatencyTable.load(os.path.join(OUT, "shared", "deit", "latency_table.json")), space)
    out = {}
    for seed in (0, 1, 2):
        for entry in ENTRIES:
            folder = os.path.join(OUT, f"s{seed}_n200", "deit", entry)
            if not os.path.isdir(folder):  # the method failed at that budget and seed
                continue
            pruned = load_pruned_model(folder)
            terms = model.breakdown(pruned)
            out[f"s{seed} {entry}"] = {
                "predicted_ms": sum(v for _, v in terms),
                "interaction_ms": sum(v for name, v in terms if name.endswith("qk_x_v")),
                "hidden_size": pruned.config.hidden_size,
            }
            print(f"s{seed} {entry}", out[f"s{seed} {entry}"], flush=True)
    with open(os.path.join(OUT, "interaction_terms.json"), "w") as handle:
        json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
