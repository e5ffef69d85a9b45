"""Saving and loading pruned models: safetensors + config + modeling files, atomically; Hub upload.

A pruned model is saved with transformers' own ``save_pretrained`` (safetensors, never pickle); the
pruned-model classes are registered for their Auto classes, so their source files and ``auto_map`` are
written beside the weights and ``trust_remote_code=True`` loads them without mdp_hf installed. The model card is
a ``huggingface_hub.ModelCard`` (metadata from ``ModelCardData``, the MDP figures as its body); uploads create the
repo and branch they need and never send checkpoints or pickles.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig
from transformers.utils import cached_file

from .adapters import TASK_AUTO_CLASSES, auto_class_for_config, get_adapter, registered_families

PUSH_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "_*", "runs/**", "*.pt", "*.pth", "*.pkl", "*.bin"]


class CheckpointError(ValueError):
    """A saved pruned model is unreadable or its weights do not match its config."""


def save_pruned_model(
    model,
    save_directory: str | os.PathLike,
    extra_files: dict[str, str | bytes | os.PathLike | Callable[[Path], object]] | None = None,
    overwrite: bool = True,
    image_processor=None,
) -> Path:
    """Write ``model`` (an mdp_* model) into ``save_directory``, all files or none.

    ``image_processor`` (an HF image processor) is saved with it so ``pipeline`` works; without one, a
    model pruned from timm gets one built from the timm preprocessing its config records.
    ``extra_files`` maps file names to their content: text, bytes, a file to copy, or a function that
    writes the file at the path it is given (a plot, a latency table).

    All-or-nothing: the whole new model folder is staged in a hidden sibling folder, the user's other files
    (checkpoints, logs, notes) are carried over into it as hard links, and the two folders are swapped with
    one atomic exchange. At every moment the folder holds the complete old model or the complete new one, never new
    weights beside an old config. A folder that held a model loses that model's own files (weights, config,
    modeling files, card, report, pruning config, latency table, plot; see :data:`MODEL_FILE_PATTERNS`);
    every other file stays. A save killed half-way leaves a staging folder that the next save of the same
    folder cleans up (carrying back any user file it held).
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
    # every Auto class of the format, not only the saved class's: AutoModel loads the base model of a classifier
    model.config.auto_map = {**(getattr(model.config, "auto_map", None) or {}), **_auto_map(model)}
    folder = target.resolve()  # a symlinked folder is saved where it points
    recover_interrupted_saves(folder)
    folder.mkdir(parents=True, exist_ok=True)
    in_place = not _can_swap(folder)
    prefix, where = (_STAGING_IN_PLACE, folder) if in_place else (_staging_prefix(folder), folder.parent)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    try:
        model.save_pretrained(staging)  # safetensors + config.json + modeling files + auto_map
        image_processor = (
            image_processor
            or image_processor_from_preprocessing(model.config)
            or get_adapter(model).default_image_processor(model.config)
        )
        if image_processor is not None:
            image_processor.save_pretrained(staging)
        for name, content in (extra_files or {}).items():
            _write_extra(staging / name, content)
        _check_saved(staging)
    except BaseException:
        _remove_tree(staging)
        raise
    if in_place:
        _replace_in_place(staging, folder)
    else:
        _swap_in(staging, folder)
    return target


# The files a pruned-model save writes (save_pretrained, image processor, the trainer's card/report/config,
# latency table, plot): replaced or removed when a new model is saved over an old one; any other file stays.
MODEL_FILE_PATTERNS = (
    "config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "*_mdp_*.py",  # configuration_mdp_vit.py, modeling_mdp_resnet.py, ...
    "preprocessor_config.json",
    "README.md",
    "pruning_report.json",
    "pruning_report.png",
    "pruning_config.json",
    "latency_table.json",
)
_SAVE_MARKER = ".mdp-save.json"  # inside a staging folder: the new model's entries, so a recovery knows the rest
_STAGING_IN_PLACE = ".mdp-save-"  # staging inside the folder, where it cannot be swapped (a mount point)
_RENAME_EXCHANGE = 2  # linux renameat2 flag


def _staging_prefix(folder: Path) -> str:
    return f".{folder.name}.mdp-save-"


def _old_prefix(folder: Path) -> str:  # the old model between two renames, where no atomic exchange exists
    return f".{folder.name}.mdp-old-"


def _is_model_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_FILE_PATTERNS)


def _holds_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _write_extra(path: Path, content) -> None:
    if callable(content):
        content(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        shutil.copyfile(os.fspath(content), path)
    if not path.is_file():
        raise RuntimeError(f"extra file {path.name!r} was not written")


def _can_swap(folder: Path) -> bool:
    """Whether a sibling staging folder can replace ``folder`` by renames (same filesystem, writable parent)."""
    if os.path.ismount(folder) or folder.parent == folder:
        return False
    return os.access(folder.parent, os.W_OK | os.X_OK) and folder.stat().st_dev == folder.parent.stat().st_dev


# the steps that move or remove saved files (tests/test_reliability.py stops a save at each of them)
def _move(source: Path, destination: Path) -> None:
    os.replace(source, destination)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _exchange_dirs(first: Path, second: Path) -> None:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); OSError where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(first))


def _write_marker(staging: Path, folder: Path, replace_model: bool) -> dict:
    marker = {
        "target": str(folder),
        "model_files": sorted(p.name for p in staging.iterdir()),
        "replace_model": replace_model,
    }
    tmp = staging / f"{_SAVE_MARKER}.tmp"
    tmp.write_text(json.dumps(marker), encoding="utf-8")
    os.replace(tmp, staging / _SAVE_MARKER)
    return marker


def _read_marker(staging: Path) -> dict | None:
    try:
        return json.loads((staging / _SAVE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def _swap_in(staging: Path, folder: Path) -> None:
    """Carry the user's files into ``staging`` (the new model), then exchange it with ``folder`` atomically."""
    replace_model = _holds_model(folder)
    try:
        was_cwd = Path.cwd() == folder
    except FileNotFoundError:
        was_cwd = False
    carried: list[str] = []
    try:
        new_names = set(_write_marker(staging, folder, replace_model)["model_files"])
        os.chmod(staging, folder.stat().st_mode & 0o7777)  # mkdtemp makes it private; keep the folder's mode
        for entry in sorted(folder.iterdir()):
            name = entry.name
            if name in new_names or name == _SAVE_MARKER or (replace_model and _is_model_file(name)):
                continue  # replaced by the new model, or the old model's own file: stays behind, removed below
            _carry(entry, staging / name)
            carried.append(name)
        swapped = True
        try:
            _exchange_dirs(staging, folder)
        except OSError as error:
            if error.errno in _NO_EXCHANGE:
                _swap_by_renames(staging, folder)
            elif error.errno == errno.EBUSY:  # a mount point cannot be renamed: files are replaced one by one
                _carry_back(staging, folder, carried)
                carried, swapped = [], False
            else:
                raise
    except BaseException:
        _carry_back(staging, folder, carried)  # an error (not a kill): the user's files go back where they were
        _remove_tree(staging)
        raise
    if not swapped:
        _finish_in_place(staging, folder)
        return
    # staging now holds the old model's own files; the marker came over with the new model
    _remove_tree(staging)
    (folder / _SAVE_MARKER).unlink(missing_ok=True)
    if was_cwd:  # the process sat in the old folder, now removed
        os.chdir(folder)


def _carry(source: Path, destination: Path) -> None:
    """A user's file or folder into the new model's folder as hard links, so it never leaves the old one (a
    kill at any point finds it in place); moved instead where the filesystem has no hard links."""
    try:
        if source.is_symlink():
            os.symlink(os.readlink(source), destination)
        elif source.is_dir():
            shutil.copytree(source, destination, symlinks=True, copy_function=os.link)
        else:
            os.link(source, destination)
    except OSError:
        if destination.is_dir() and not destination.is_symlink():
            _remove_tree(destination)
        elif os.path.lexists(destination):
            destination.unlink()
        _move(source, destination)


def _carry_back(staging: Path, folder: Path, names: list[str]) -> None:
    for name in names:
        if (staging / name).exists() and not (folder / name).exists():
            _move(staging / name, folder / name)


def _swap_by_renames(staging: Path, folder: Path) -> None:
    """Where no atomic exchange exists: the old folder aside, the new one in. A kill between the two renames
    leaves no folder, which the next save restores (the staged folder is complete and carries a marker)."""
    old = Path(tempfile.mkdtemp(prefix=_old_prefix(folder), dir=folder.parent))
    os.rmdir(old)
    _move(folder, old)
    try:
        _move(staging, folder)
    except BaseException:
        if not folder.exists():
            _move(old, folder)
        raise
    _remove_tree(old)


def _replace_in_place(staging: Path, folder: Path) -> None:
    """For a folder that cannot be swapped (a mount point): config.json goes first and comes back last, so a
    kill in between leaves a folder that refuses to load (no config.json) rather than a mixed model; the next
    save finishes the replacement from the staged copy."""
    _write_marker(staging, folder, _holds_model(folder))
    _finish_in_place(staging, folder)


def _finish_in_place(staging: Path, folder: Path) -> None:
    marker = _read_marker(staging)
    new_names = set(marker["model_files"]) - {_SAVE_MARKER}
    (folder / "config.json").unlink(missing_ok=True)
    if marker["replace_model"]:
        for entry in folder.iterdir():
            if entry.name not in new_names and _is_model_file(entry.name) and entry.is_file():
                entry.unlink()
    for name in sorted(new_names - {"config.json"}) + ["config.json"]:
        if (staging / name).exists():
            _move(staging / name, folder / name)
    _remove_tree(staging)


def recover_interrupted_saves(save_directory: str | os.PathLike) -> None:
    """Clean up after killed saves of ``save_directory``: user files a staging folder still holds go back, a
    folder left missing between two renames is restored, a replacement in place is finished, staging folders
    are removed. Every save calls it first; safe whenever no save of this folder is running."""
    folder = Path(save_directory).resolve()
    parent = folder.parent
    if not parent.is_dir():
        return
    (folder / _SAVE_MARKER).unlink(missing_ok=True)  # an exchange that completed; only the marker was left
    for staging in sorted(parent.glob(_staging_prefix(folder) + "*")):
        if not staging.is_dir():
            continue
        marker = _read_marker(staging)
        if marker is not None and not folder.exists():  # killed between the two renames: the new model is whole
            _move(staging, folder)
            (folder / _SAVE_MARKER).unlink(missing_ok=True)
            continue
        if marker is not None:  # killed while carrying the user's files into the new model: they go back
            names = [p.name for p in staging.iterdir() if p.name not in marker["model_files"] + [_SAVE_MARKER]]
            _carry_back(staging, folder, names)
            if marker["replace_model"] and not (folder / "config.json").exists():
                _finish_in_place(staging, folder)  # killed while replacing files one by one (a mount point)
                continue
        _remove_tree(staging)
    for old in sorted(parent.glob(_old_prefix(folder) + "*")):
        if old.is_dir() and not folder.exists():
            _move(old, folder)
        else:
            _remove_tree(old)
    # staging folders of earlier mdp_hf versions (mkdtemp ".<name>.XXXXXXXX"), which held model files only
    legacy = re.compile(rf"\.{re.escape(folder.name)}\.[a-z0-9_]{{8}}")
    for stale in parent.iterdir():
        if legacy.fullmatch(stale.name) and stale.is_dir() and all(_is_model_file(p.name) for p in stale.iterdir()):
            _remove_tree(stale)
    if folder.is_dir():
        for staging in sorted(folder.glob(_STAGING_IN_PLACE + "*")):
            if staging.is_dir() and _read_marker(staging) is not None:
                _finish_in_place(staging, folder)  # the staged model is whole: finish what was started
            else:
                _remove_tree(staging)


def _auto_map(model) -> dict[str, str]:
    """``auto_map`` entries (Auto class -> ``module.Class``) of the format's model classes that ``model``'s
    modeling file defines: AutoModel -> the base model, AutoModelForImageClassification -> the classifier."""
    family = next(
        f for f in registered_families() if f.pruned_classes and isinstance(model.config, f.pruned_classes[0])
    )
    module = type(model).__module__
    return {
        cls._auto_class: f"{module.rsplit('.', 1)[-1]}.{cls.__name__}"
        for cls in family.pruned_classes[1:]
        if getattr(cls, "_auto_class", None) and cls.__module__ == module
    }


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
        auto_cls = auto_class_for_config(config)  # the task's Auto class for a head model, else AutoModel
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


def _latency_check_line(check: dict | None) -> str:
    """One sentence on the measured-latency check of the final solve (see mdp_hf.latency_check)."""
    if not check or check.get("status") == "off":
        return "The measured latency was not checked during pruning (`verify_latency=False`): the table was trusted."
    if check["status"] == "skipped":
        return f"The measured latency was not checked during pruning: {check.get('reason')}."
    rounds = check.get("rounds") or []
    text = (
        f"During pruning the structure was timed on the table's device and re-solved {max(len(rounds) - 1, 0)} "
        f"time(s) until it measured within {100 * check['tolerance']:.1f}% of the budget at two standard errors "
        "of the timing"
    )
    upper = check.get("upper_over_budget")  # absent from reports written before mdp_hf checked the bound
    text += "." if upper is None else f" (measured/budget {upper:.3f} at that bound)."
    if check.get("noise_limited"):
        text += (
            f" The timing noise ({100 * check['noise']:.1f}%) was above that tolerance, so the model was kept that "
            "far under the budget."
        )
    return text


CARD_TAGS = ("mdp_hf", "pruning", "structured-pruning", "latency-constrained")


def hub_repo_id(name: str | None) -> str | None:
    """``name`` when it can only mean a Hub repo id ("org/model"), None for a local path, an empty name or
    anything the Hub would refuse (a card's ``base_model`` must name a Hub model, never a folder)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or os.path.exists(name) or os.path.isabs(name) or name.startswith("."):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def model_card(
    report: dict,
    repo_or_path: str,
    *,
    model_name: str | None = None,
    base_model: str | None = None,
    pipeline_tag: str = "image-classification",
    tags: str | list[str] | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    datasets: str | list[str] | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    dataset_split: str | None = None,
    existing=None,
):
    """The model card (a ``huggingface_hub.ModelCard``) of a pruned model: the MDP figures of ``report`` as the
    body (template ``mdp_hf.hub_cards/pruned_model.md``) and Hub metadata written by ``ModelCardData``:
    ``library_name``, ``pipeline_tag``, tags, ``base_model`` (only a Hub repo id: ``base_model`` or
    ``report["base_model_id"]``), datasets, and a ``model-index`` entry with the evaluated accuracy.

    ``existing``: the ``ModelCardData`` of a card already in the folder: its tags are kept (merged with
    ``tags``), its datasets, language, license and model name unless given here.
    """
    from importlib.resources import files
    from string import Template

    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from .reporting import kept_dims_table

    template = Template(files("mdp_hf.hub_cards").joinpath("pruned_model.md").read_text(encoding="utf-8"))

    def fmt(value, digits=4):
        if value is None:
            return "n/a"
        return f"{value:.{digits}g}" if isinstance(value, float) else str(value)

    solver = report.get("solver", {})
    title = f"{report['base_model']} pruned to {fmt(report['budget_ms'])} ms with MDP"
    fields = {
        "title": title,
        "base_model": report["base_model"],
        "latency_model": report.get("latency_model", "table"),
        "device_name": report.get("device_name") or report["device"],
        "kept_table": kept_dims_table(report.get("kept_dims", []), report.get("removed_blocks", [])),
        "repo_or_path": repo_or_path,
        "pipeline_tag": pipeline_tag,
        "solver_backend": solver.get("backend", "n/a"),
        "solver_status": solver.get("status", "n/a"),
        "solver_gap": fmt(solver.get("gap")),
        "solver_time_s": fmt(solver.get("solve_time_s"), 3),
        "dense_predicted_ms": fmt(report.get("dense_predicted_latency_ms")),
        "preprocessing": _preprocessing_line(report.get("preprocessing")),
        "budget_unit": "fraction of the dense latency" if report.get("budget_fraction") else "milliseconds",
        "latency_check": _latency_check_line(report.get("latency_check")),
        "measured_noise": "not recorded"
        if report.get("measured_noise") is None
        else f"{100 * report['measured_noise']:.1f}% over {report.get('latency_repeats_timed')} repeats",
    }
    fields["auto_class"] = TASK_AUTO_CLASSES.get(pipeline_tag, "AutoModel")
    fields["quality_rows"] = "\n".join(
        f"| {label} | {fmt(report.get('dense_' + key))} | {fmt(report.get('pruned_' + key))} |"
        for label, key, _ in quality_metrics(report, pipeline_tag)
    )
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
        "dense_latency_spread",
        "pruned_latency_spread",
        "measured_over_budget",
    ):
        fields[key] = fmt(report.get(key), 3 if key.endswith(("spread", "budget")) else 4)
    body = template.substitute(fields)

    old = existing.to_dict() if existing is not None else {}
    all_tags = list(dict.fromkeys([*CARD_TAGS, *_as_list(old.get("tags")), *_as_list(tags)]))
    all_datasets = _as_list(datasets) or _as_list(old.get("datasets")) or None
    model_name = model_name or old.get("model_name") or os.path.basename(os.path.normpath(repo_or_path)) or title
    dataset_id = (all_datasets or [None])[0] or dataset_name or "custom"
    eval_results = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=dataset_id,
            dataset_name=dataset_name or dataset_id,
            dataset_config=dataset_config,
            dataset_split=dataset_split,
            metric_type=key,
            metric_name=name,
            metric_value=float(report["pruned_" + key]),
        )
        for _, key, name in quality_metrics(report, pipeline_tag)
        if report.get("pruned_" + key) is not None
    ] or None
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        base_model=hub_repo_id(base_model) or hub_repo_id(report.get("base_model_id")),
        tags=all_tags,
        language=language or old.get("language"),
        license=license or old.get("license"),
        datasets=all_datasets,
        model_name=model_name,
        eval_results=eval_results,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


#: (card row label, report key suffix, model-index metric name) of the quality metrics a report may carry
QUALITY_METRICS = (("accuracy", "accuracy", "Accuracy"), ("mAP (COCO 0.5:0.95)", "map", "mAP"))
#: the metric a card shows for a task even when the run evaluated nothing (as "n/a")
TASK_QUALITY = {"image-classification": "accuracy", "object-detection": "map"}


def quality_metrics(report: dict, pipeline_tag: str) -> list[tuple[str, str, str]]:
    """The quality metrics of ``report`` (dense or pruned evaluated), else the task's own one: (row label, report
    key suffix, model-index metric name) each, as the card and the recipes' summary show them."""
    found = [
        m
        for m in QUALITY_METRICS
        if report.get("dense_" + m[1]) is not None or report.get("pruned_" + m[1]) is not None
    ]
    return found or [m for m in QUALITY_METRICS if m[1] == TASK_QUALITY.get(pipeline_tag, "accuracy")]


def hub_api_for(repo_id: str, token: str | None = None, private: bool | None = None, revision: str | None = None):
    """An ``HfApi`` for ``token`` after creating ``repo_id`` and its branch ``revision`` where they are missing."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "MDP pruned model",
    revision: str | None = None,
    blocking: bool = True,
):
    """Create ``repo_id`` (and branch ``revision``) if needed and upload ``folder`` (a saved pruned model) as one
    commit. Returns the commit URL (a ``CommitInfo``, a str), or with ``blocking=False`` a ``Future`` of it."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} is not a saved pruned model (config.json / model.safetensors missing)")
    api = hub_api_for(repo_id, token, private, revision)
    # A run's output folder also holds Trainer checkpoints (full-size weights, pickled optimizer/RNG state)
    # and logs: only the pruned model's own files go up.
    return api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        commit_message=commit_message,
        ignore_patterns=PUSH_IGNORE_PATTERNS,
        revision=revision,
        run_as_future=not blocking,
    )
