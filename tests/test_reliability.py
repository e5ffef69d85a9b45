"""Nothing lost, nothing silently wrong (issue #11, points 1, 2, 3, 5, 6): one parametrised case per matrix row.

3. save_pruned_model is all-or-nothing: a save stopped at each of its filesystem steps (an error, which the save
   rolls back, or a kill, after which nothing more runs) leaves the folder as the complete old or the complete
   new model, never a mix; the next save cleans what a killed one left and gives the user's files back.
2. A checkpoint save interrupted inside Trainer._save_checkpoint never costs the previous good checkpoint, and
   resume falls back to the newest complete one (or refuses, naming what is missing and what is complete).
5. A schedule that cannot finish within the run is refused up front; an unfinished one is never exported
   silently as the result.
6. One-shot prune() hands the caller's model back bit-identical (state_dict, train/eval flags, gradients).
1. The recipes' --overwrite_output_dir replaces the previous run only once the new run has its files.
"""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import GROUPS, IMAGE_SIZE, build
from test_trainer import RandomImages, StopAfter, args, config
from transformers import DeiTConfig, Trainer

from mdp_hf import PruningChoice, build_space, hub, slice_model
from mdp_hf.hub import load_pruned_model, save_pruned_model
from mdp_hf.latency import TableLatencyModel, build_table
from mdp_hf.pruning import prune
from mdp_hf.trainer import MDPTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_latency(model):
    """An exact, machine-independent 'latency' (sum of the cell's widths): the tests are about files, not timing."""
    space = build_space(model, group_sizes=GROUPS)
    table = build_table(model, space=space, timer=lambda t, widths: float(sum(widths)), repeats=1, warmup=0,
                        progress=False, image_size=IMAGE_SIZE)  # fmt: skip
    return TableLatencyModel(table)


def pruned(variant):
    """A sliced tiny model (every dimension cut to its second-smallest width)."""
    model = build(variant)
    space = build_space(model, group_sizes=GROUPS)
    kept = {name: list(range(dim.widths()[min(1, len(dim.widths()) - 1)])) for name, dim in space.dimensions.items()}
    return slice_model(model, space, PruningChoice(kept))


def files_of(folder):
    """{relative path: bytes} of every file below ``folder``."""
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


# --- 3. save_pruned_model: all-or-nothing --------------------------------------------------------------------
class Killed(BaseException):
    """The process dies here: nothing after it runs (no except/finally clean-up can change the folder)."""


class FaultAt:
    """Stops a save at its ``at``-th change to the files under ``root`` (rename, replace, link, unlink, rmdir,
    rmtree, folder exchange). ``kill``: every later change fails too, as after SIGKILL; else one OSError, which the
    code under test may roll back."""

    def __init__(self, root, at, kill):
        self.root, self.at, self.kill = os.path.abspath(root) + os.sep, at, kill
        self.count, self.fired = 0, False

    def wrap(self, fn):
        def wrapper(*args, **kwargs):
            paths = [os.path.abspath(os.fspath(a)) for a in args if isinstance(a, (str, os.PathLike))]
            if "dir_fd" in kwargs or not any(p.startswith(self.root) for p in paths):
                return fn(*args, **kwargs)
            if self.fired and self.kill:
                raise Killed("already dead")
            self.count += 1
            if self.count == self.at:
                self.fired = True
                if self.kill:
                    raise Killed(f"killed at change {self.at}")
                if kwargs.get("ignore_errors"):
                    return None
                raise OSError(errno.EIO, f"injected I/O error at change {self.at}")
            return fn(*args, **kwargs)

        return wrapper

    def install(self, monkeypatch):
        for name in ("replace", "rename", "unlink", "remove", "rmdir", "link", "symlink"):
            monkeypatch.setattr(os, name, self.wrap(getattr(os, name)))
        monkeypatch.setattr(shutil, "rmtree", self.wrap(shutil.rmtree))
        if hasattr(hub, "_exchange_dirs"):
            monkeypatch.setattr(hub, "_exchange_dirs", self.wrap(hub._exchange_dirs))


OLD_CARD, NEW_CARD = "# the old model\n", "# the new model\n"
USER_FILES = {"notes.txt": b"my notes", "checkpoint-7/trainer_state.json": b"{}", "runs/events.out": b"log"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The old folder (a pruned ResNet with card, report, pruning config, latency table, plot, and the user's
    files) and the exact files a clean save of the new model (a pruned ViT) writes."""
    base = tmp_path_factory.mktemp("models")
    old = base / "old"
    save_pruned_model(pruned("resnet_bottleneck"), old, extra_files={
        "README.md": OLD_CARD, "pruning_report.json": "{}", "pruning_config.json": "{}",
        "latency_table.json": "{}", "pruning_report.png": "png"})  # fmt: skip
    old_model = files_of(old)
    for name, data in USER_FILES.items():
        (old / name).parent.mkdir(parents=True, exist_ok=True)
        (old / name).write_bytes(data)
    new_model = pruned("vit")
    clean = base / "clean"
    save_pruned_model(new_model, clean, extra_files={"README.md": NEW_CARD})
    assert load_pruned_model(clean).config.model_type == "mdp_vit"
    assert load_pruned_model(old).config.model_type == "mdp_resnet"
    return {"old": old, "old_model": old_model, "new": new_model, "new_model": files_of(clean)}


def model_state(folder, models):
    """'old' / 'new' when the folder's model files are exactly one complete save; 'no config' when config.json
    is missing (the folder refuses to load: the fallback for folders that cannot be swapped); else 'mixed'."""
    found = {k: v for k, v in files_of(folder).items() if k not in USER_FILES and not k.startswith(".mdp-save")}
    if found == models["old_model"]:
        return "old"
    if found == models["new_model"]:
        return "new"
    return "no config" if "config.json" not in found else f"mixed: {sorted(found)}"


SWAP_MODES = {
    "atomic exchange": lambda monkeypatch: None,
    "two renames (no renameat2)": lambda monkeypatch: monkeypatch.setattr(
        hub, "_exchange_dirs", _unsupported, raising=False
    ),
    "in place (a mount point)": lambda monkeypatch: monkeypatch.setattr(
        hub, "_can_swap", lambda folder: False, raising=False
    ),
}


def _unsupported(first, second):
    raise OSError(errno.ENOSYS, "renameat2 is not available")


@pytest.mark.parametrize("mode", list(SWAP_MODES))
@pytest.mark.parametrize("fault", ["error", "kill"])
def test_save_stopped_at_any_step_leaves_old_or_new_model_never_a_mix(tmp_path, monkeypatch, models, mode, fault):
    allowed = {"old", "new"} | ({"no config"} if mode.startswith("in place") else set())
    SWAP_MODES[mode](monkeypatch)
    at, steps_seen = 1, None
    while steps_seen is None or at <= steps_seen:
        root = tmp_path / f"at{at}"
        folder = root / "model"
        shutil.copytree(models["old"], folder)
        injector = FaultAt(root, at, kill=fault == "kill")
        with monkeypatch.context() as patch:
            injector.install(patch)
            try:
                save_pruned_model(models["new"], folder, extra_files={"README.md": NEW_CARD})
                steps_seen = injector.count  # the fault came after the last change: the save is complete
            except (Killed, OSError):
                pass
        state = model_state(folder, models) if folder.is_dir() else "missing"
        if not (mode.startswith("two renames") and fault == "kill" and state == "missing"):
            assert state in allowed, f"stopped at change {at}: {state}"
        if folder.is_dir():  # the user's files never leave the folder, whatever the moment
            assert {k: v for k, v in files_of(folder).items() if k in USER_FILES} == USER_FILES, at
        # the next save cleans what a killed one left: staging gone, the user's files back, the new model whole
        save_pruned_model(models["new"], folder, extra_files={"README.md": NEW_CARD})
        assert sorted(p.name for p in root.iterdir()) == ["model"], at
        assert files_of(folder) == {**models["new_model"], **USER_FILES}, at
        at += 1
    assert steps_seen >= 3  # the loop stopped the save at every one of its changes


def test_overwrite_removes_the_old_models_own_files_and_keeps_the_users(tmp_path, models):
    folder = tmp_path / "model"
    shutil.copytree(models["old"], folder)
    save_pruned_model(models["new"], folder, extra_files={"README.md": NEW_CARD})
    # old card, report, pruning config, latency table, plot, ResNet modeling files: gone; the user's files: kept
    assert files_of(folder) == {**models["new_model"], **USER_FILES}
    assert load_pruned_model(folder).config.model_type == "mdp_vit"


def test_stale_staging_folders_of_killed_saves_are_cleaned_by_the_next_save(tmp_path, models):
    folder = tmp_path / "model"
    shutil.copytree(models["old"], folder)
    legacy = tmp_path / ".model.k3j_x9ab"  # what a killed save of the previous version left (mkdtemp)
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(b"half")
    user_hidden = tmp_path / ".model.settings"  # a hidden sibling of the user's, not a staging folder
    user_hidden.mkdir()
    (user_hidden / "keep.txt").write_text("mine")
    save_pruned_model(models["new"], folder, extra_files={"README.md": NEW_CARD})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.settings", "model"]
    assert (user_hidden / "keep.txt").read_text() == "mine"


# --- 2. checkpoints: an interrupted save never costs a good checkpoint; resume falls back ----------------------
SCHEDULE = dict(
    schedule="iterative", num_pruning_steps=2, accumulation_steps=2, pruning_interval=2, budget_fraction=0.5
)


@pytest.fixture(scope="module")
def vit_synthetic():
    return synthetic_latency(build("vit"))


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, vit_synthetic):
    trainer = MDPTrainer(
        model=build("vit"),
        args=args(tmp_path_factory.mktemp("straight"), max_steps=5),
        prunable_config=config(**SCHEDULE),
        latency_model=vit_synthetic,
        train_dataset=RandomImages(48),
    )
    trainer.train()
    return trainer


def _checkpointing_trainer(out, latency, **kw):
    kw = {"save_strategy": "steps", "save_steps": 2, **kw}
    return MDPTrainer(
        model=build("vit"),
        args=args(out, output_dir=str(out), max_steps=5, **kw),
        prunable_config=config(**SCHEDULE),
        latency_model=latency,
        train_dataset=RandomImages(48),
    )


def _interrupt_second_checkpoint(monkeypatch, where):
    """Raise out of train() (a killed job) while the checkpoint of step 4 is being written."""

    def at_step_4(method, after=False):
        def patched(self, *a, **kw):
            if self.state.global_step != 4:
                return method(self, *a, **kw)
            if after:
                method(self, *a, **kw)
            raise Killed(f"killed {'after' if after else 'in'} {method.__name__} at step 4")

        return patched

    if where == "before the pruning state":
        monkeypatch.setattr(MDPTrainer, "_save_pruning_state", at_step_4(MDPTrainer._save_pruning_state))
    elif where == "after the pruning state":
        monkeypatch.setattr(MDPTrainer, "_save_pruning_state", at_step_4(MDPTrainer._save_pruning_state, True))
    else:  # in Trainer's own files (the RNG state), after the model and the optimizer
        monkeypatch.setattr(Trainer, "_save_rng_state", at_step_4(Trainer._save_rng_state))


@pytest.mark.parametrize(
    "where",
    [
        "before the pruning state",
        "in Trainer's files",
        pytest.param("after the pruning state", marks=pytest.mark.slow),
        pytest.param("state file deleted afterwards", marks=pytest.mark.slow),
    ],
)
def test_interrupted_checkpoint_keeps_the_previous_one_and_resume_falls_back(
    tmp_path, monkeypatch, caplog, vit_synthetic, straight_run, where
):
    out = tmp_path / "run"
    if where == "state file deleted afterwards":
        _checkpointing_trainer(out, vit_synthetic).train()  # checkpoints 2, 4 and the final 5
        for later in ("checkpoint-4", "checkpoint-5"):
            os.remove(out / later / "mdp_state.json")
    else:
        with monkeypatch.context() as patch:
            _interrupt_second_checkpoint(patch, where)
            with pytest.raises(Killed):
                _checkpointing_trainer(out, vit_synthetic, save_total_limit=1).train()
    # save_total_limit=1 did not rotate the good checkpoint away for one that never completed
    assert (out / "checkpoint-2" / "mdp_state.json").is_file()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    left_incomplete = (out / "checkpoint-4").exists()
    resumed = _checkpointing_trainer(out, vit_synthetic, save_total_limit=1)
    with caplog.at_level("WARNING", logger="mdp_hf.trainer"):
        resumed.train(resume_from_checkpoint=True)
    if left_incomplete:  # said, with the reason and the checkpoint used instead
        assert "checkpoint-4" in caplog.text and "interrupted" in caplog.text and "checkpoint-2" in caplog.text
    # the real resume path: the run continues from step 2 and ends exactly where the uninterrupted one did
    assert len(resumed.mdp.results) == 2
    for a, b in zip(resumed.mdp.results, straight_run.mdp.results):
        assert a.choice.kept == b.choice.kept and a.choice.removed_blocks == b.choice.removed_blocks
        assert a.budget_ms == pytest.approx(b.budget_ms)
    for (name, a), b in zip(straight_run.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5"]  # complete ones, rotated as asked


def test_resume_from_an_incomplete_checkpoint_path_names_what_is_missing(tmp_path, monkeypatch, vit_synthetic):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_second_checkpoint(patch, "after the pruning state")
        with pytest.raises(Killed):
            _checkpointing_trainer(out, vit_synthetic, save_total_limit=1).train()
    with pytest.raises(ValueError, match=r"lacks trainer_state\.json.*interrupted.*checkpoint-2"):
        _checkpointing_trainer(out, vit_synthetic).train(resume_from_checkpoint=str(out / "checkpoint-4"))


# --- 5. unfinished schedules ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "schedule,max_steps",
    [
        (dict(schedule="iterative", num_pruning_steps=3, accumulation_steps=2, pruning_interval=2), 4),  # last: 6
        (dict(schedule="one_shot", accumulation_steps=5), 3),  # max_steps < accumulation_steps
    ],
    ids=["max_steps below the last pruning step", "max_steps below accumulation_steps"],
)
def test_schedule_that_cannot_finish_is_refused_at_construction(tmp_path, vit_synthetic, schedule, max_steps):
    with pytest.raises(ValueError, match="cannot finish") as error:
        MDPTrainer(
            model=build("vit"),
            args=args(tmp_path, max_steps=max_steps),
            prunable_config=config(**schedule),
            latency_model=vit_synthetic,
            train_dataset=RandomImages(16),
        )
    for field in ("max_steps", "accumulation_steps", "pruning_interval", "num_pruning_steps"):
        assert field in str(error.value), field


def test_epoch_based_run_too_short_is_refused_before_the_first_step(tmp_path, vit_synthetic):
    trainer = MDPTrainer(
        model=build("vit"),
        args=args(tmp_path, max_steps=-1, num_train_epochs=1),  # 16 samples / batch 8: 2 optimizer steps
        prunable_config=config(accumulation_steps=3),
        latency_model=vit_synthetic,
        train_dataset=RandomImages(16),
    )
    with pytest.raises(ValueError, match=r"accumulation_steps=3.*num_train_epochs=1 x 2 optimizer steps per epoch"):
        trainer.train()
    assert trainer.state.global_step == 0 and not trainer.mdp.results


@pytest.mark.parametrize("stop_at,expected", [(3, "has not finished: 1 of 2"), (1, "no pruning step has run")])
def test_unfinished_schedule_is_never_exported_silently(tmp_path, vit_synthetic, stop_at, expected):
    trainer = _checkpointing_trainer(tmp_path / "run", vit_synthetic, save_strategy="no")
    trainer.add_callback(StopAfter(stop_at))  # e.g. early stopping, or a user's callback
    trainer.train()
    out = tmp_path / "pruned"
    with pytest.raises(ValueError, match=expected):
        trainer.save_model(str(out))
    assert not out.exists()  # nothing written as "the pruned model"
    if stop_at == 3:  # asked for explicitly: written, and marked unfinished in the report and the card
        trainer.save_model(str(out), allow_unfinished=True)
        report = json.loads((out / "pruning_report.json").read_text())
        assert report["schedule_finished"] is False
        assert (report["pruning_steps_done"], report["pruning_steps_planned"]) == (1, 2)
        assert report["final_budget_ms"] < report["budget_ms"]
        assert "Unfinished pruning schedule" in (out / "README.md").read_text()


# --- 6. one-shot prune() leaves the caller's model as it was --------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
@pytest.mark.parametrize("variant", ["resnet_bottleneck", "vit"])
def test_one_shot_prune_leaves_the_callers_model_bit_identical(variant, mode):
    model = build(variant).train(mode != "eval")
    if mode == "mixed":  # e.g. frozen normalisation layers in an otherwise training model
        for module in list(model.modules())[1::3]:
            module.eval()
    for p in model.parameters():  # the caller's own gradients, e.g. mid-accumulation
        p.grad = torch.full_like(p, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    data = RandomImages(8)
    prune(model, config(budget_fraction=0.7), [(data.x[:4], data.y[:4]), (data.x[4:], data.y[4:])],
          synthetic_latency(build(variant)))  # fmt: skip
    after = model.state_dict()
    assert list(after) == list(state)
    changed = [k for k, v in state.items() if not torch.equal(after[k], v)]
    assert not changed, f"buffers/weights changed by the scoring passes: {changed[:5]}"
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(p.grad is not None and torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())


# --- 1. recipes: --overwrite_output_dir never loses the previous run ------------------------------------------
TINY_DEIT = DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, architectures=["DeiTForImageClassification"])  # fmt: skip
QUICK = ["--max_train_samples", "64", "--max_eval_samples", "32", "--dense_epochs", "0", "--max_steps", "4",
         "--accumulation_steps", "2", "--pruning_interval", "1", "--num_pruning_steps", "2", "--latency_repeats", "2",
         "--latency_subgrid", "4", "--latency_batch_size", "2", "--per_device_train_batch_size", "16",
         "--group_sizes", json.dumps({"embed": 16, "mlp": 32}), "--budget_fraction", "0.8",
         # what these runs check is the output folder, not latency: a 2-repeat table timed beside the other worker's
         # tests predicted -0.95 ms and the measured check refused the budget (CI, 2026-12-03)
         "--verify_latency", "false"]  # fmt: skip


def run_recipe(*argv):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "recipes", "prune_deit.py"), *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.fixture
def previous_run(tmp_path, models):
    """A finished run's folder: model, card, report, pruning config, latency table, a checkpoint of that run,
    and the user's own files (including a folder named dense/)."""
    out = tmp_path / "out"
    shutil.copytree(models["old"], out)
    (out / "checkpoint-99").mkdir()
    (out / "checkpoint-99" / "trainer_state.json").write_text("{}")
    (out / "dense").mkdir()
    (out / "dense" / "keep.txt").write_text("mine")
    TINY_DEIT.save_pretrained(tmp_path / "cfg")
    return out, files_of(out)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--dataset_name", "/nonexistent/dataset"], "/nonexistent/dataset"),
        pytest.param(["--teacher", "/nonexistent/teacher"], "/nonexistent/teacher", marks=pytest.mark.slow),
        (["--max_steps", "1"], "cannot finish"),
    ],
    ids=["fails at data loading", "fails after the latency table (missing teacher)", "schedule cannot finish"],
)
def test_overwrite_run_that_fails_leaves_the_previous_run_intact(tmp_path, previous_run, extra, message):
    out, before = previous_run
    result = run_recipe("--model_config", str(tmp_path / "cfg"), "--output_dir", str(out), "--overwrite_output_dir",
                        "true", *QUICK, *extra)  # fmt: skip
    assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
    after = {k: v for k, v in files_of(out).items() if not k.startswith("_mdp_run")}
    assert after == before, sorted(set(after) ^ set(before))
    if message == "/nonexistent/teacher":  # the new run's table was built aside; the previous one stayed in place
        assert (out / "_mdp_run" / "latency_table.json").is_file()
    if message == "cannot finish":
        assert "max_steps" in result.stderr and "accumulation_steps" in result.stderr
        assert not (out / "_mdp_run").exists()  # refused before the latency table


def test_overwrite_run_replaces_the_previous_run_and_keeps_the_users_files(tmp_path, previous_run):
    out, before = previous_run
    result = run_recipe("--model_config", str(tmp_path / "cfg"), "--output_dir", str(out), "--overwrite_output_dir",
                        "true", *QUICK)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    after = files_of(out)
    for name in USER_FILES:
        if not name.startswith("checkpoint-"):  # the previous run's checkpoints go once the new run has finished
            assert after[name] == before[name], name
    assert after["dense/keep.txt"] == b"mine"
    assert not any(k.startswith(("checkpoint-99", "checkpoint-7", "_mdp_run")) for k in after), sorted(after)
    assert not any("mdp_resnet" in k for k in after)  # the previous model's own files are gone
    assert load_pruned_model(out).config.model_type == "mdp_vit"
    report = json.loads(after["pruning_report.json"])
    assert report["schedule_finished"] is True and after["latency_table.json"] != before["latency_table.json"]
