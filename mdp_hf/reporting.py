"""What a pruning run decided, as tables and a plot: kept units per layer, latency breakdown."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .adapters import PruningChoice, PruningSpace, find_family


def kept_dims(space: PruningSpace, choice: PruningChoice) -> list[dict]:
    """One row per dimension: name, kind, block, size, kept units (0 when its block was removed)."""
    removed = set(choice.removed_blocks)
    rows = []
    for name, dim in space.dimensions.items():
        kept = 0 if dim.block in removed else len(choice.kept_indices(space, name))
        rows.append({"dimension": name, "kind": dim.kind, "block": dim.block, "size": dim.size, "kept": kept})
    return rows


def kept_dims_markdown(space: PruningSpace, choice: PruningChoice) -> str:
    return kept_dims_table(kept_dims(space, choice), choice.removed_blocks)


def kept_dims_table(rows: list[dict], removed_blocks: list[str]) -> str:
    """Markdown table of :func:`kept_dims` rows (as a report stores them) and the removed blocks."""
    lines = ["| dimension | kind | kept / size |", "|---|---|---|"]
    for row in rows:
        kept = "removed" if row["kept"] == 0 else f"{row['kept']} / {row['size']}"
        lines.append(f"| {row['dimension']} | {row['kind']} | {kept} |")
    removed = ", ".join(removed_blocks) or "none"
    return "\n".join(lines) + f"\n\nRemoved blocks: {removed}"


def choice_indices(space: PruningSpace, choice: PruningChoice) -> dict[str, int]:
    """Index into each dimension's widths() of the kept width (what latency tables are indexed by)."""
    out = {}
    for name, dim in space.dimensions.items():
        widths = dim.widths()
        kept = len(choice.kept_indices(space, name))
        out[name] = widths.index(kept) if kept in widths else int(np.searchsorted(widths, kept))
    return out


def latency_breakdown(space: PruningSpace, choice: PruningChoice, latency_terms) -> dict[str, dict[str, float]]:
    """Predicted ms per group of terms (per layer/block, and 'outside blocks'), dense vs pruned."""
    indices = choice_indices(space, choice)
    removed = set(choice.removed_blocks)
    family = find_family(space.model_type)
    layer_of = family.adapter.layer_blocks(space) if family is not None else {}  # ViT: sub-blocks -> their layer
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"dense": 0.0, "pruned": 0.0})
    for term in latency_terms:
        table = np.asarray(term.table)
        group = layer_of.get(term.block, term.block) if term.block else "outside blocks"
        out[group]["dense"] += float(table[(-1,) * len(term.dims)])
        if term.block not in removed:
            out[group]["pruned"] += float(table[tuple(indices[d] for d in term.dims)])
    return dict(out)


def plot_report(path, space: PruningSpace, choice: PruningChoice, latency_terms, title: str = "") -> str:
    """PNG: kept fraction per dimension (grouped by kind) and predicted latency per layer, dense vs pruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = kept_dims(space, choice)
    breakdown = latency_breakdown(space, choice, latency_terms)
    fig, (ax_dims, ax_lat) = plt.subplots(2, 1, figsize=(max(8, 0.28 * len(rows)), 8))
    kinds = sorted({r["kind"] for r in rows})
    colors = {kind: plt.cm.tab10(i % 10) for i, kind in enumerate(kinds)}
    ax_dims.bar(range(len(rows)), [r["kept"] / r["size"] for r in rows], color=[colors[r["kind"]] for r in rows])
    ax_dims.set_xticks(range(len(rows)), [r["dimension"] for r in rows], rotation=90, fontsize=6)
    ax_dims.set_ylabel("kept fraction")
    ax_dims.set_ylim(0, 1.05)
    ax_dims.legend(
        handles=[plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in kinds], labels=kinds, fontsize=7, ncol=len(kinds)
    )
    ax_dims.set_title(title or "kept units per dimension (0 = block removed)")
    groups = list(breakdown)
    x = np.arange(len(groups))
    ax_lat.bar(x - 0.2, [breakdown[g]["dense"] for g in groups], 0.4, label="dense")
    ax_lat.bar(x + 0.2, [breakdown[g]["pruned"] for g in groups], 0.4, label="pruned")
    ax_lat.set_xticks(x, groups, rotation=90, fontsize=6)
    ax_lat.set_ylabel("predicted latency (ms)")
    dense_total = sum(v["dense"] for v in breakdown.values())
    pruned_total = sum(v["pruned"] for v in breakdown.values())
    ax_lat.set_title(f"latency breakdown: {dense_total:.3g} ms -> {pruned_total:.3g} ms (predicted)")
    ax_lat.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
