"""Saving and loading pruned models: safetensors + config + modeling files, atomically; Hub upload.

A pruned model is saved with transformers' own ``save_pretrained`` (safetensors, never pickle); the
pruned-model classes are registered for their Auto classes, so their source files and ``auto_map`` are
written beside the weights and ``trust_remote_code=True`` loads them without mdp_hf installed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
from transformers.utils import cached_file

from .adapters import get_adapter, registered_families

PUSH_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "_*", "runs/**", "*.pt", "*.pth", "*.pkl", "*.bin"]


class CheckpointError(ValueError):
    """A saved pruned model is unreadable or its weights do not match its config."""


def save_pruned_model(
    model,
    save_directory: str | os.PathLike,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = True,
    image_processor=None,
) -> Path:
    """Write ``model`` (an mdp_* model) into ``save_directory``, all files or none.

    ``image_processor`` (an HF image processor) is saved with it so ``pipeline`` works; without one, a
    model pruned from timm gets one built from the timm preprocessing its config records.

    Everything is written to a temporary sibling folder first and each file is then renamed into
    place, so an error half-way (disk full, bad model) never leaves a half-written or mixed checkpoint
    behind. Other files in the folder (checkpoints, latency tables, logs) are left alone.
    ``extra_files`` maps file names to text (pruning_config.json, README.md, reports).
    """
    target = Path(save_directory)
    if (target / "model.safetensors").exists() and not overwrite:
        raise FileExistsError(f"{target} already holds a model; pass overwrite=True or choose another directory")
    formats = {f.pruned_classes[0].model_type: f.pruned_classes[0] for f in registered_families() if f.pruned_classes}
    if not isinstance(model.config, tuple(formats.values())):
        raise ValueError(
            f"save_pruned_model expects a sliced model ({' / '.join(formats)}), got model_type "
            f"{model.config.model_type!r}; call mdp_hf.slice_model(model, space, choice) first"
        )
    expected = get_adapter(model).expected_num_parameters(model.config)
    actual = sum(p.numel() for p in model.parameters())
    if expected != actual:
        raise ValueError(f"refusing to save: the model has {actual} parameters but its config implies {expected}")
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(staging)  # safetensors + config.json + modeling files + auto_map
        image_processor = image_processor or image_processor_from_preprocessing(model.config)
        if image_processor is not None:
            image_processor.save_pretrained(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        _check_saved(staging)
        for stale in target.glob("*_mdp_*.py"):  # modeling files of a previously saved other family
            stale.unlink()
        for path in staging.iterdir():
            os.replace(path, target / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}


def image_processor_from_preprocessing(config):
    """An HF image processor reproducing timm's eval transform (resize the short side to size / crop_pct,
    centre crop, normalise) from ``config.preprocessing`` (recorded when a timm model is sliced); None if the
    config records none. ``ConvNextImageProcessor`` is transformers' processor with exactly that crop_pct rule."""
    pre = getattr(config, "preprocessing", None)
    if not pre:
        return None
    from transformers import ConvNextImageProcessor

    size = int(pre["input_size"][-1])
    interpolation = pre.get("interpolation", "bicubic")
    if interpolation not in _RESAMPLE:
        raise ValueError(f"config.preprocessing: unknown interpolation {interpolation!r}; one of {sorted(_RESAMPLE)}")
    return ConvNextImageProcessor(
        size={"shortest_edge": size},
        crop_pct=float(pre.get("crop_pct") or 1.0),
        resample=_RESAMPLE[interpolation],
        image_mean=list(pre["mean"]),
        image_std=list(pre["std"]),
    )


def _check_saved(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    missing = [name for name in ("model.safetensors",) if not (folder / name).exists()]
    if missing or "auto_map" not in config:
        raise RuntimeError(f"save_pretrained did not write {missing or 'auto_map'} in {folder}")


def _check_shapes_against_config(path_or_repo_id, config, auto_cls, kwargs) -> None:
    """Compare the safetensors header with the shapes config.json implies, before any weight is read."""
    weights_file = cached_file(
        path_or_repo_id,
        "model.safetensors",
        **{k: v for k, v in kwargs.items() if k in ("revision", "token", "cache_dir")},
    )
    with torch.device("meta"):
        skeleton = auto_cls.from_config(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    with safe_open(weights_file, framework="pt") as handle:
        stored = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    mismatched = [
        f"{n}: file {stored[n]} vs config {expected[n]}" for n in expected if n in stored and stored[n] != expected[n]
    ]
    missing = sorted(set(expected) - set(stored))
    if mismatched or missing:
        raise CheckpointError(
            f"weights in {path_or_repo_id} do not match its config.json: "
            + "; ".join(mismatched[:3] + [f"missing {m}" for m in missing[:3]])
            + f" ({len(mismatched)} mismatched, {len(missing)} missing). The checkpoint is inconsistent — "
            "re-export it from the pruning run rather than editing config.json by hand."
        )


def load_pruned_model(path_or_repo_id: str | os.PathLike, **kwargs):
    """Load a pruned model (local folder or Hub id) and check that its weights match its structure.

    Raises CheckpointError with the reason when the file is corrupt or shapes disagree with config.json, and
    FileNotFoundError when a local path does not exist (it is not looked up on the Hub).
    """
    from .paths import check_local_path

    check_local_path(path_or_repo_id, "pruned model folder")
    try:
        config = AutoConfig.from_pretrained(path_or_repo_id, **kwargs)
    except OSError as error:
        raise CheckpointError(f"cannot load pruned model from {path_or_repo_id}: {error}") from error
    except ValueError as error:  # e.g. a config.json edited after the save (structure fingerprint)
        raise CheckpointError(f"{path_or_repo_id}: {error}") from error
    try:
        auto_cls = (
            AutoModelForImageClassification
            if config.architectures and "ForImageClassification" in config.architectures[0]
            else AutoModel
        )
        _check_shapes_against_config(path_or_repo_id, config, auto_cls, kwargs)
        model, info = auto_cls.from_pretrained(path_or_repo_id, config=config, output_loading_info=True, **kwargs)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"cannot load pruned model from {path_or_repo_id}: {error}") from error
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(
            f"weights in {path_or_repo_id} do not match its config.json ({problems}); the checkpoint is "
            "inconsistent — re-export it from the pruning run rather than editing config.json by hand"
        )
    expected = get_adapter(model).expected_num_parameters(model.config)
    actual = sum(p.numel() for p in model.parameters())
    if expected != actual:
        raise CheckpointError(f"{path_or_repo_id}: {actual} parameters loaded but config.json implies {expected}")
    return model.eval()


def _preprocessing_line(pre: dict | None) -> str:
    if not pre:
        return "Preprocessing: the source model's own image processor (saved with the model when the run had one)."
    return (
        f"Preprocessing (the source's pretrained config, saved as `preprocessor_config.json`): input size "
        f"{list(pre.get('input_size', []))}, mean {list(pre.get('mean', []))}, std {list(pre.get('std', []))}, "
        f"{pre.get('interpolation', 'bicubic')} interpolation, crop_pct {pre.get('crop_pct')}."
    )


def render_model_card(report: dict, kept_table: str, repo_or_path: str) -> str:
    """The README.md of a pruned model, from the template shipped in mdp_hf.hub_cards."""
    from importlib.resources import files
    from string import Template

    template = Template(files("mdp_hf.hub_cards").joinpath("pruned_model.md").read_text(encoding="utf-8"))

    def fmt(value, digits=4):
        if value is None:
            return "n/a"
        return f"{value:.{digits}g}" if isinstance(value, float) else str(value)

    solver = report.get("solver", {})
    fields = {
        "title": f"{report['base_model']} pruned to {fmt(report['budget_ms'])} ms with MDP",
        "base_model": report["base_model"],
        "latency_model": report.get("latency_model", "table"),
        "device_name": report.get("device_name") or report["device"],
        "kept_table": kept_table,
        "repo_or_path": repo_or_path,
        "solver_backend": solver.get("backend", "n/a"),
        "solver_status": solver.get("status", "n/a"),
        "solver_gap": fmt(solver.get("gap")),
        "solver_time_s": fmt(solver.get("solve_time_s"), 3),
        "dense_predicted_ms": fmt(report.get("dense_predicted_latency_ms")),
        "preprocessing": _preprocessing_line(report.get("preprocessing")),
    }
    for key in (
        "dense_latency_ms",
        "pruned_latency_ms",
        "predicted_latency_ms",
        "budget_ms",
        "dense_params",
        "pruned_params",
        "dense_accuracy",
        "pruned_accuracy",
        "device",
        "batch_size",
        "image_size",
        "dtype",
        "num_threads",
    ):
        fields[key] = fmt(report.get(key))
    return template.substitute(fields)


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "MDP pruned model",
) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` (a saved pruned model) as one commit; returns its URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} is not a saved pruned model (config.json / model.safetensors missing)")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    # A run's output folder also holds Trainer checkpoints (full-size weights, pickled optimizer/RNG state)
    # and logs: only the pruned model's own files go up.
    commit = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, commit_message=commit_message, ignore_patterns=PUSH_IGNORE_PATTERNS
    )
    return str(getattr(commit, "commit_url", commit))
