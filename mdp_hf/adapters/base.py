"""The pruning space of a model, a choice within it, training-time gates, and the adapter interface.

Everything here is family-agnostic; the family files (vit.py, resnet.py) say which dimensions a
model has, where to gate them and how to slice them.
"""

from __future__ import annotations

import fnmatch
import json
import warnings
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field

import torch


class PruningSpaceError(ValueError):
    """A choice, group size or minimum does not fit the model's pruning space."""


@dataclass
class Dimension:
    """A prunable width: ``size`` units, pruned in groups of ``group_size``, never below ``min_keep``.

    ``block`` is the removable block the dimension lives in (None: outside every block, e.g. ViT's
    embedding width or a ResNet stage's residual width). ``shared_by`` lists the blocks whose cost or
    function depends on the dimension although it is not theirs (a hub such as the embedding width).
    ``coupled`` names every parameter whose shape follows the dimension.
    """

    name: str
    kind: str
    size: int
    group_size: int = 1
    min_keep: int = 1
    block: str | None = None
    shared_by: list[str] = field(default_factory=list)
    coupled: list[str] = field(default_factory=list)

    def widths(self) -> list[int]:
        """Unit counts the solver may choose: multiples of the group size from ``min_keep`` up, plus ``size``."""
        group = max(1, min(self.group_size, self.size))
        widths = {k for k in range(group, self.size + 1, group) if k >= self.min_keep}
        widths.add(self.size)
        return sorted(widths)


@dataclass
class Block:
    """A residual branch that can be removed as a whole (identity on the residual stream)."""

    name: str
    kind: str
    dims: list[str] = field(default_factory=list)
    removable: bool = True


@dataclass
class PruningSpace:
    """Everything that can be pruned in one model; inspectable with ``print(space.describe())``."""

    model_type: str
    dimensions: dict[str, Dimension]
    blocks: dict[str, Block]
    # names a user might give for a coupled part -> the dimension that owns it (for clear errors)
    aliases: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [
            f"pruning space of a {self.model_type} model: {len(self.dimensions)} dimensions, {len(self.blocks)} blocks"
        ]
        lines.append(
            f"{'dimension':<34} {'kind':<9} {'size':>5} {'group':>5} {'min':>4} {'choices':>7}  block / coupling"
        )
        for dim in self.dimensions.values():
            where = dim.block or (f"global, shared by {len(dim.shared_by)} blocks" if dim.shared_by else "-")
            lines.append(
                f"{dim.name:<34} {dim.kind:<9} {dim.size:>5} {dim.group_size:>5} {dim.min_keep:>4} "
                f"{len(dim.widths()):>7}  {where}; {len(dim.coupled)} params"
            )
        for block in self.blocks.values():
            lines.append(f"block {block.name:<28} {block.kind:<9} dims: {', '.join(block.dims) or '-'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "dimensions": [asdict(d) for d in self.dimensions.values()],
            "blocks": [asdict(b) for b in self.blocks.values()],
        }

    def full_choice(self) -> PruningChoice:
        return PruningChoice(kept={name: list(range(d.size)) for name, d in self.dimensions.items()})


@dataclass
class PruningChoice:
    """Kept unit indices per dimension (a missing dimension keeps everything) and removed blocks."""

    kept: dict[str, list[int]] = field(default_factory=dict)
    removed_blocks: list[str] = field(default_factory=list)

    def kept_indices(self, space: PruningSpace, name: str) -> list[int]:
        if name in self.kept:
            return sorted(int(i) for i in self.kept[name])
        return list(range(space.dimensions[name].size))

    def validate(self, space: PruningSpace) -> None:
        """Raise PruningSpaceError naming the offending dimension/block and how to fix it."""
        for name, indices in self.kept.items():
            if name not in space.dimensions:
                if name in space.aliases:
                    raise PruningSpaceError(
                        f"'{name}' is coupled into dimension '{space.aliases[name]}'; give kept indices for "
                        f"'{space.aliases[name]}' instead so every coupled layer keeps the same units."
                    )
                raise PruningSpaceError(
                    f"unknown dimension '{name}'; this {space.model_type} model has: {', '.join(space.dimensions)}"
                )
            dim = space.dimensions[name]
            values = [int(i) for i in indices]
            if len(set(values)) != len(values):
                raise PruningSpaceError(f"dimension '{name}': kept indices contain duplicates")
            bad = [i for i in values if not 0 <= i < dim.size]
            if bad:
                raise PruningSpaceError(f"dimension '{name}': kept indices {bad[:5]} are out of range [0, {dim.size})")
            if len(values) < max(1, dim.min_keep):
                raise PruningSpaceError(
                    f"dimension '{name}' keeps {len(values)} units but its minimum is {max(1, dim.min_keep)}; "
                    "a width never reaches zero — remove the block that contains it instead."
                )
        for name in self.removed_blocks:
            if name not in space.blocks:
                raise PruningSpaceError(
                    f"unknown block '{name}'; this {space.model_type} model has: {', '.join(space.blocks) or 'none'}"
                )
            if not space.blocks[name].removable:
                raise PruningSpaceError(f"block '{name}' cannot be removed")

    def to_json(self) -> str:
        return json.dumps({"kept": self.kept, "removed_blocks": sorted(self.removed_blocks)})

    @classmethod
    def from_json(cls, text: str) -> PruningChoice:
        data = json.loads(text)
        return cls(
            kept={k: list(v) for k, v in data.get("kept", {}).items()}, removed_blocks=data.get("removed_blocks", [])
        )


class GateSet:
    """Multiplicative masks on activations, one per dimension unit and per block, applied by hooks.

    Parameter shapes never change, so optimizer state, DDP buckets and checkpoints stay valid. The
    gates are plain tensors with ``requires_grad`` (not module parameters): the optimizer never sees,
    steps or decays them, and after a backward ``gate.grad`` holds the first-order Taylor score of each
    unit (dL/dg at g=1 equals the sum over the unit's activations of a * dL/da).
    """

    def __init__(self, space: PruningSpace, device: torch.device | str = "cpu"):
        self.space = space
        self.dims = {
            name: torch.ones(dim.size, device=device, requires_grad=True) for name, dim in space.dimensions.items()
        }
        self.blocks = {name: torch.ones((), device=device, requires_grad=True) for name in space.blocks}
        self._handles: list = []

    # gate values -----------------------------------------------------------------------------
    def dim(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.dims[name].to(dtype)

    def block(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.blocks[name].to(dtype)

    def binary_mask(self, name: str) -> torch.Tensor:
        """Which units are kept (statistics such as LayerNorm's must ignore pruned units)."""
        return (self.dims[name].detach() != 0).to(self.dims[name].dtype)

    @torch.no_grad()
    def apply_choice(self, choice: PruningChoice) -> None:
        """Set gates to 1 for kept units / blocks and 0 for pruned ones."""
        choice.validate(self.space)
        for name, gate in self.dims.items():
            gate.zero_()
            gate[choice.kept_indices(self.space, name)] = 1.0
        removed = set(choice.removed_blocks)
        for name, gate in self.blocks.items():
            gate.fill_(0.0 if name in removed else 1.0)

    @torch.no_grad()
    def reset(self) -> None:
        for gate in list(self.dims.values()) + list(self.blocks.values()):
            gate.fill_(1.0)

    def freeze(self) -> None:
        """Stop computing gate gradients (after the last pruning step: the gates are fixed masks)."""
        for gate in list(self.dims.values()) + list(self.blocks.values()):
            gate.requires_grad_(False)
            gate.grad = None

    def zero_grad(self) -> None:
        for gate in list(self.dims.values()) + list(self.blocks.values()):
            gate.grad = None

    # hooks --------------------------------------------------------------------------------------
    def add_hook(self, handle) -> None:
        self._handles.append(handle)

    def remove(self) -> None:
        """Detach every hook: the model computes exactly as before gating."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> GateSet:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def has_classifier(config) -> bool:
    """Whether a pruned model's config describes a model with its classification head(s)."""
    return bool(config.architectures) and config.architectures[0].endswith("ForImageClassification")


class ModelAdapter(ABC):
    """Model-family knowledge: what can be pruned, where to gate it, how to score and slice it.

    Subclasses implement the abstract methods; the others have defaults that fit most families.
    """

    #: default group size per dimension kind
    default_group_sizes: dict[str, int] = {}
    #: how a gate gradient becomes a score: "square" (paper, ViT) or "abs" (paper, CNN BN-Taylor)
    default_score_kind: str = "square"

    @abstractmethod
    def build_space(
        self, model, group_sizes: dict[str, int] | None = None, min_keep: dict[str, int] | None = None
    ) -> PruningSpace:
        raise NotImplementedError

    @abstractmethod
    def install_gates(self, model, space: PruningSpace) -> GateSet:
        raise NotImplementedError

    @abstractmethod
    def slice(self, model, space: PruningSpace, choice: PruningChoice):
        """Return a new, physically smaller model (a pruned-model class) computing what the gated model computes."""
        raise NotImplementedError

    def taylor_scores(self, model, space: PruningSpace, gates: GateSet) -> dict[str, torch.Tensor]:
        """This step's signed first-order Taylor score per unit of every dimension (CPU float64), read after a
        backward. Default: the gates' gradients, dL/dg = sum over the unit's activations of a * dL/da.
        Families whose official score links other tensors override it (ViT: w * dL/dw of linked weights)."""
        return {
            name: gate.grad.detach().double().cpu()
            if gate.grad is not None
            else torch.zeros(gate.numel(), dtype=torch.float64)
            for name, gate in gates.dims.items()
        }

    #: whether :meth:`taylor_scores` reads gate gradients (False: the gates are plain masks, no autograd cost)
    scores_from_gates: bool = True

    def score_shares(
        self, model, space: PruningSpace, gates: GateSet
    ) -> dict[str, list[tuple[str | None, torch.Tensor]]]:
        """Per shared dimension, this step's signed score of each member layer, with the block it belongs to
        (None: outside every block), for splitting a shared width's importance among the blocks that own it.
        Always the same members in the same order. Default: none (shared widths are not charged to blocks)."""
        return {}

    @abstractmethod
    def unit_magnitudes(self, model, space: PruningSpace) -> dict[str, torch.Tensor]:
        """Magnitude baseline: per unit of every dimension, the squared L2 norm of the weights that
        produce it (summed over coupled layers). Not used by MDP's default Taylor importance."""
        raise NotImplementedError

    @abstractmethod
    def expected_num_parameters(self, config) -> int:
        """Parameter count implied by a pruned model's config (checks that weights match the structure)."""
        raise NotImplementedError

    # shared helpers --------------------------------------------------------------------------------
    def layer_blocks(self, space: PruningSpace) -> dict[str, str]:
        """Blocks that share one keep bit at ``block_granularity="layer"`` (block -> layer name). Default: none."""
        return {}

    #: dimensions that keep their full width unless the user asks to prune them (CNN stems, as officially)
    stem_dimensions: tuple[str, ...] = ()

    def default_image_processor(self, config):
        """The image processor a saved pruned model gets when the run gives none (so ``pipeline`` loads it), or None.
        Default: none (timm exports build theirs from ``config.preprocessing``)."""
        return None

    def _group_and_min(self, name: str, kind: str, size: int, group_sizes, min_keep) -> tuple[int, int]:
        """(group size, minimum) of one dimension, clamped to its size; :func:`check_group_sizes_fit` (run by
        ``build_space``) refuses or reports the values a user gave that do not fit."""
        group = group_size_for(name, kind, group_sizes, self.default_group_sizes.get(kind, 1))
        if group < 1:
            raise PruningSpaceError(f"group size for '{name}' must be >= 1, got {group}")
        group = min(group, size)
        minimum = (min_keep or {}).get(kind, group)
        return group, max(1, min(minimum, size))


def group_size_key(name: str, kind: str, group_sizes: dict | None) -> str | None:
    """Which ``group_sizes`` key sets a dimension's group size: its exact name, else the longest matching glob,
    else its kind; None when none does (the family default applies)."""
    group_sizes = group_sizes or {}
    if name in group_sizes:
        return name
    globs = [key for key in group_sizes if any(c in key for c in "*?[") and fnmatch.fnmatchcase(name, key)]
    if globs:
        return max(globs, key=len)
    return kind if kind in group_sizes else None


def group_size_for(name: str, kind: str, group_sizes: dict | None, default: int) -> int:
    """A dimension's group size: its exact name, else the longest matching glob, else its kind, else ``default``."""
    key = group_size_key(name, kind, group_sizes)
    return group_sizes[key] if key is not None else default


def check_group_sizes_fit(space: PruningSpace, group_sizes: dict | None, min_keep: dict | None, keep_full=()) -> None:
    """A group size or minimum the user gave that is larger than a dimension makes it unprunable (one group is
    the whole dimension). An error naming the dimension, its size and the value when the key names the dimension
    itself, or when the value is larger than every dimension it applies to (nothing of it could be pruned); a
    warning naming the dimensions when it only misses some smaller ones (e.g. a stage's group size on a narrower
    first stage). Dimensions in ``keep_full`` (a family's stem, kept whole unless prune_stem) are not warned about."""
    applies: dict[tuple[str, str], list[tuple[str, int]]] = {}  # (mapping, key) -> dimensions it sets
    for name, dim in space.dimensions.items():
        key = group_size_key(name, dim.kind, group_sizes)
        if key is not None:
            applies.setdefault(("group_sizes", key), []).append((name, dim.size))
        if dim.kind in (min_keep or {}):
            applies.setdefault(("min_keep", dim.kind), []).append((name, dim.size))
    for (mapping, key), dims in applies.items():
        value = (group_sizes if mapping == "group_sizes" else min_keep)[key]
        small = [(name, size) for name, size in dims if value > size]
        if not small:
            continue
        label = f"{mapping}[{key!r}] = {value}"
        shown = ", ".join(f"'{n}' ({size} units)" for n, size in small[:4]) + (" ..." if len(small) > 4 else "")
        if len(small) == len(dims):
            raise PruningSpaceError(
                f"{label} is larger than {'dimension' if len(dims) == 1 else 'every dimension it applies to'} "
                f"{shown}: {'one group' if mapping == 'group_sizes' else 'the minimum'} would be the whole dimension, "
                "so it could never be pruned. Give a value "
                f"<= {min(size for _, size in small)}, or leave that kind out of PrunableConfig.prune to keep it whole"
            )
        reported = [(n, size) for n, size in small if n not in keep_full]
        if reported:
            name, size = reported[0]
            warnings.warn(
                f"{label} is larger than {len(reported)} of the {len(dims)} dimensions it applies to "
                f"({', '.join(f'{n!r} ({s} units)' for n, s in reported[:4])}{' ...' if len(reported) > 4 else ''}): "
                f"they keep their full width. Give them a group size of their own by name, e.g. "
                f"group_sizes={{..., {name!r}: {max(1, size // 4)}}}",
                stacklevel=3,
            )


def check_group_size_keys(space: PruningSpace, group_sizes: dict | None) -> None:
    """Every group-size key must name a kind, a dimension or a glob matching one; else a clear error."""
    from .registry import registered_kinds

    kinds = {dim.kind for dim in space.dimensions.values()}
    for key in group_sizes or {}:
        # a kind of another family is not an error: one group-size mapping may serve several families
        if key in kinds or key in registered_kinds() or key in space.dimensions:
            continue
        if any(fnmatch.fnmatchcase(name, key) for name in space.dimensions):
            continue
        sample = ", ".join(list(space.dimensions)[:8])
        raise PruningSpaceError(
            f"group_sizes key {key!r} matches no dimension of this {space.model_type} model; keys are kinds "
            f"({', '.join(sorted(kinds))}), dimension names or globs over them (dimensions: {sample}, ...; "
            "print(build_space(model).describe()) lists them all)"
        )


@dataclass
class TimingGrid:
    """One grid of cells to time: ``axes[k]`` lists the widths of axis k (a dimension's ``widths()``),
    ``axis_kinds[k]`` its dimension kind. Identical blocks share a grid (same ``key``). ``params`` are what
    :meth:`LatencyCells.build_cell` needs beyond the widths; the profiler also reads ``full_axes`` (never
    sub-sampled) and ``tail_axes`` (the width below dense is always measured) from it."""

    key: str
    kind: str
    axis_kinds: list[str]
    axes: list[list[int]]
    params: dict = field(default_factory=dict)


@dataclass
class TimingTerm:
    """One additive latency term: grid ``grid`` read at the widths of dimensions ``dims`` (one per axis), paid
    while ``block`` is kept (None: always). ``transform`` (``"half_anchor"``, ``"interaction"``) and
    ``input_axes`` are explained in mdp_hf.latency.table.TermDef."""

    name: str
    grid: str
    dims: list[str]
    block: str | None = None
    transform: str | None = None
    input_axes: list[int] = field(default_factory=list)


def dim_signature(dim: Dimension) -> str:
    """What a grid axis depends on: size, group size, minimum (identical blocks share a grid)."""
    return f"{dim.size}/{dim.group_size}/{dim.min_keep}"


class GridCatalog:
    """The grids of a plan, keyed by kind, parameters and axes, so identical blocks share one:
    ``key = grid(kind, axis_dims, params)``; ``grid.all()`` lists them for :meth:`LatencyCells.plan`."""

    def __init__(self):
        self._grids: dict[str, TimingGrid] = {}

    def __call__(self, kind: str, axis_dims: list[Dimension], params: dict) -> str:
        spec = ",".join(f"{k}={v}" for k, v in params.items())
        key = f"{kind}({spec},dims={'x'.join(dim_signature(d) for d in axis_dims)})"
        if key not in self._grids:
            self._grids[key] = TimingGrid(
                key, kind, [d.kind for d in axis_dims], [d.widths() for d in axis_dims], params
            )
        return key

    def all(self) -> list[TimingGrid]:
        return list(self._grids.values())


class BatchNormTaylorScores:
    """The official CNN importance (NVlabs/MDP resnet50+ablation/prune/pruning.py, calc_importance /
    update_neuron_metric_mdp) for families whose pruned convs are followed by BatchNorms: a channel's score is
    gamma dL/dgamma + beta dL/dbeta of its BatchNorm (|.| taken by the accumulator, ``default_score_kind``); a
    shared width's members (every BN writing into it) are summed, and split among them by :meth:`score_shares`.

    Mix in before :class:`ModelAdapter` and implement :meth:`bn_members`."""

    scores_from_gates = False
    default_score_kind = "abs"

    def bn_members(self, model) -> dict[str, list[tuple[str | None, torch.nn.Module]]]:
        """Per dimension: (block or None, BatchNorm) of every layer whose output channels are the dimension's,
        always in the same order."""
        raise NotImplementedError

    @staticmethod
    def bn_taylor(norm) -> torch.Tensor:
        total = torch.zeros(norm.num_features, dtype=torch.float64, device=norm.weight.device)
        for param in (norm.weight, norm.bias):
            if param is not None and param.grad is not None:
                total += (param.detach() * param.grad).double()
        return total.cpu()

    @torch.no_grad()
    def taylor_scores(self, model, space: PruningSpace, gates: GateSet) -> dict[str, torch.Tensor]:
        members = self.bn_members(model)
        return {name: sum(self.bn_taylor(norm) for _, norm in members[name]) for name in space.dimensions}

    @torch.no_grad()
    def score_shares(
        self, model, space: PruningSpace, gates: GateSet
    ) -> dict[str, list[tuple[str | None, torch.Tensor]]]:
        return {
            name: [(block, self.bn_taylor(norm)) for block, norm in layers]
            for name, layers in self.bn_members(model).items()
            if len(layers) > 1 and space.dimensions[name].block is None
        }


class LatencyCells(ABC):
    """How a family's blocks are timed for a latency lookup table (mdp_hf.latency knows no family).

    ``plan()`` names the grids and the terms that read them; ``build_cell(grid, widths)`` returns the
    deployed module of one cell and its example input. Cells should time the pruned format's own modules,
    so a table predicts what ``slice_model`` produces.
    """

    #: whether ``TimingSettings.attn_implementation`` changes the timed code (recorded in table metadata)
    uses_attention: bool = False

    def __init__(self, model, space: PruningSpace, settings):
        self.model, self.space, self.settings = model, space, settings

    #: input image size (height, width) the cells are timed at; set by ``__init__``
    image_size: list[int]

    @abstractmethod
    def model_shapes(self) -> dict:
        """The model's shape facts a table must match (recorded in its metadata)."""

    @abstractmethod
    def plan(self) -> tuple[list[TimingGrid], list[TimingTerm]]:
        """The grids to measure and the additive terms that read them."""

    @abstractmethod
    def build_cell(self, grid, widths: tuple[int, ...]):
        """(module on the settings' device and dtype, example input or tuple of inputs) for one cell of
        ``grid`` (anything with the grid's ``kind``, ``key`` and ``params``)."""

    @abstractmethod
    def dense_model(self):
        """The dense deployed model at the settings' image size (random weights: timing only)."""

    @abstractmethod
    def example_input(self):
        """An input batch for :meth:`dense_model`."""

    def place(self, module, *inputs):
        """``module`` in eval mode and its inputs on the settings' device and dtype."""
        dtype, device = self.settings.torch_dtype, self.settings.device
        module = module.to(device=device, dtype=dtype).eval()
        inputs = tuple(x.to(device=device, dtype=dtype) for x in inputs)
        return module, inputs[0] if len(inputs) == 1 else inputs
