"""The README's main job, run as a new user runs it, and what the README promises of it (issue #19).

The command is read from README.md ("Two commands"), so the test follows the README: `python recipes/prune_deit.py`
(the `pip install -e . -c constraints.txt` before it is what this suite already runs under), in a fresh working
directory, with nothing but the embedded defaults. The same promises are checked for `python recipes/prune_resnet.py`
("does the same for a bottleneck ResNet") and for the DeiT recipe under `accelerate launch` with two CPU processes,
both with quicker flags (below). One run per recipe per session; several tests read it.

What the README promises, and the figures the tests hold it to:
- the measured latency: the report's `latency_check` is "met", its exported round within budget x (1 + tolerance)
  at two standard errors of its timing; the export times the model once more, independently, so its
  measured/budget may exceed that by its own timing noise (the report's `measured_noise`) plus
  EXPORT_DRIFT: two timings minutes apart on a shared machine drift apart by a few % in their dense/pruned ratio
  even when both are interleaved;
- accuracy far above chance (0.1 on digits' 10 classes): the embedded DeiT reached 0.93-0.95 in earlier runs;
  MAIN_JOB_ACCURACY = 0.8 leaves room for seeds and thread counts while a broken fine-tuning, slicing or
  evaluation (at chance: 0.05-0.11) fails; the shortened DeiT run gets QUICK_ACCURACY = 0.5, still 5x chance;
  the shortened ResNet run (3 fine-tuning epochs after pruning to 7 % of its parameters) RESNET_QUICK_ACCURACY =
  0.3, 3x chance: it reached 0.478 (under coverage) and 0.497 (dense 0.925, once the latency check held the
  model to its budget at two standard errors);
- the folder loads with plain transformers and trust_remote_code in a fresh process where mdp_hf cannot be
  imported, and that model, fed by the folder's own image processor, classifies the validation images as well as
  the report says;
- card, report, latency table and plot are in the folder.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TWO_PROCESS_LAUNCH

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
CHANCE = 0.1  # digits: 10 classes
MAIN_JOB_ACCURACY = 0.8
QUICK_ACCURACY = 0.5
RESNET_QUICK_ACCURACY = 0.3
EXPORT_DRIFT = 0.05
# These runs assert latency as measured here, so nothing else may share the CPU while they time: on CI, next to
# another worker's tests, a table built under that load predicted 0.5 of dense for a structure measuring 0.79 and
# the job failed its budget (2026-12-02). The README's test command runs them after the rest, in one process.
pytestmark = pytest.mark.timed_alone

# ResNet: 3 + 3 epochs instead of 6 + 6 (the one-shot step after 30 iterations still fits in 3 epochs of 23).
RESNET_QUICK = ["--dense_epochs", "3", "--num_train_epochs", "3"]
# DeiT on two ranks (global batch 128: 12 steps an epoch): 8 dense epochs instead of 15, 4 pruning steps 5
# iterations apart after 10 (the schedule's 30 iterations fit in 4 epochs), and the latency table the main job
# measured on this machine (a table built earlier, as the README's --latency_table describes)
DEIT_TWO_PROCESS_QUICK = [
    "--dense_epochs", "8", "--num_train_epochs", "4", "--accumulation_steps", "10", "--pruning_interval", "5",
]  # fmt: skip


def as_argv(command: str) -> list[str]:
    """A README command `python recipes/<recipe>.py ...` as argv for this interpreter (script path made absolute)."""
    words = shlex.split(command)
    assert words[0] == "python" and words[1].startswith("recipes/"), words
    return [sys.executable, str(REPO / words[1]), *words[2:]]


def main_command() -> list[str]:
    """`python recipes/prune_deit.py` from the README's "Two commands" block (after its pip install)."""
    section = README.split("## Two commands", 1)[1]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    install, run = (part.strip() for part in block.split("&&"))
    assert install == "pip install -e . -c constraints.txt", install
    return as_argv(run)


def resnet_command() -> list[str]:
    match = re.search(r"`(python recipes/prune_resnet\.py)` does the same for a bottleneck ResNet", README)
    assert match, "README.md no longer says what `python recipes/prune_resnet.py` does"
    return as_argv(match.group(1))


class Run:
    """One recipe run in a fresh working directory: its process, output folder and report."""

    def __init__(self, argv: list[str], cwd: Path, output_dir: Path, env: dict | None = None, timeout: int = 2400):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.argv, self.output_dir = argv, output_dir
        self.result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert self.result.returncode == 0, f"{argv}\n{self.result.stdout[-3000:]}\n{self.result.stderr[-5000:]}"
        self.report = json.loads((output_dir / "pruning_report.json").read_text())


@pytest.fixture(scope="module")
def deit_main_job(tmp_path_factory):
    """`python recipes/prune_deit.py` exactly as the README gives it, in an empty folder."""
    cwd = tmp_path_factory.mktemp("new_user")
    return Run(main_command(), cwd, cwd / "outputs" / "prune_deit")


@pytest.fixture(scope="module")
def resnet_job(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("new_user_resnet")
    return Run(resnet_command() + RESNET_QUICK, cwd, cwd / "outputs" / "prune_resnet")


@pytest.fixture(scope="module")
def deit_two_processes(tmp_path_factory, deit_main_job):
    cwd = tmp_path_factory.mktemp("new_user_two_ranks")
    table = deit_main_job.output_dir / "latency_table.json"
    argv = [*TWO_PROCESS_LAUNCH, *main_command()[1:], *DEIT_TWO_PROCESS_QUICK, "--latency_table", str(table)]
    return Run(argv, cwd, cwd / "outputs" / "prune_deit")


JOBS = [
    ("deit_main_job", MAIN_JOB_ACCURACY, 1),
    ("resnet_job", RESNET_QUICK_ACCURACY, 1),
    ("deit_two_processes", QUICK_ACCURACY, 2),
]


@pytest.mark.parametrize("job,floor,world_size", JOBS)
def test_the_pruned_model_meets_the_budget_as_measured(request, job, floor, world_size):
    run = request.getfixturevalue(job)
    report = run.report
    assert report["world_size"] == world_size and report["schedule_finished"]
    assert report["budget_fraction"] == 0.5  # the README's "50 % of the dense model's latency"
    check = report["latency_check"]
    assert check["status"] == "met", check
    assert check["budget_unit"] == "fraction_of_dense" and check["budget"] == 0.5
    assert check["rounds"], "the final structure was never timed"
    exported = check["rounds"][check["chosen"]]  # the largest structure that fits (not always the last round)
    assert exported["measured_over_budget"] * (1 + exported["noise"]) <= 1 + check["tolerance"], check
    assert check["upper_over_budget"] == exported["measured_over_budget"] * (1 + exported["noise"])
    allowed = 1 + check["tolerance"] + report["measured_noise"] + EXPORT_DRIFT
    assert report["measured_over_budget"] <= allowed, (report["measured_over_budget"], allowed, check)
    assert report["pruned_latency_ms"] < report["dense_latency_ms"]
    # the table's prediction meets the budget the solver was given: the nominal one, or a loosened one when the
    # table proved pessimistic on this machine (what the export must meet is the measured budget, above)
    assert report["predicted_latency_ms"] <= exported["solver_budget_ms"] * (1 + 1e-9)
    assert report["pruned_params"] < report["dense_params"]


@pytest.mark.parametrize("job,floor,world_size", JOBS)
def test_accuracy_is_far_above_chance(request, job, floor, world_size):
    report = request.getfixturevalue(job).report
    assert report["dense_accuracy"] > floor and report["pruned_accuracy"] > floor, (
        report["dense_accuracy"],
        report["pruned_accuracy"],
    )


@pytest.mark.parametrize("job,floor,world_size", JOBS)
def test_folder_holds_card_report_table_and_plot_and_the_summary_names_it(request, job, floor, world_size):
    run = request.getfixturevalue(job)
    out = run.output_dir
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "pruning_config.json",
                 "latency_table.json", "pruning_report.json"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (out / "pruning_report.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert "until it measured within" in card  # the card states the measured-latency check
    assert f"| accuracy | {run.report['dense_accuracy']:.4g} | {run.report['pruned_accuracy']:.4g} |" in card
    assert not (out / "_mdp_run").exists()  # the run's intermediates are gone
    stdout = run.result.stdout
    assert "measured latency (ms)" in stdout and "latency check during pruning: measured" in stdout
    assert f"pruned model, card, report and plot: {out}" in stdout


RELOAD = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mdp_hf" or name.startswith("mdp_hf."):
            raise ImportError("mdp_hf must not be needed to load a pruned model")
sys.meta_path.insert(0, Block())
import numpy as np, torch
from PIL import Image
from safetensors.numpy import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification
folder, data = sys.argv[1], load_file(sys.argv[2])
model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(folder)
images = [Image.fromarray(image).convert("RGB") for image in data["images"]]
with torch.no_grad():
    logits = model(**processor(images, return_tensors="pt")).logits
accuracy = float((logits.argmax(-1).numpy() == data["labels"]).mean())
assert not any(m.startswith("mdp_hf") for m in sys.modules)
print("RELOADED", type(model).__name__, sum(p.numel() for p in model.parameters()), accuracy)
"""


@pytest.mark.parametrize("job,floor,world_size", JOBS)
def test_folder_loads_and_classifies_with_plain_transformers(request, tmp_path, job, floor, world_size):
    """A fresh process, mdp_hf unimportable: the folder, its image processor and trust_remote_code are enough,
    and the model classifies the recipe's validation images (same split: digits shuffled with the run's seed 42)
    as accurately as the report says (within 2 points: the processor resizes like the recipe's transform, not
    bit for bit)."""
    from safetensors.numpy import save_file

    from mdp_hf.data import load_image_classification

    run = request.getfixturevalue(job)
    validation = load_image_classification("digits", None, None, "image", "label", 42)["validation"]
    images = np.stack([np.asarray(image) for image in validation["image"]])
    save_file({"images": images, "labels": np.asarray(validation["label"])}, str(tmp_path / "validation.safetensors"))
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, str(run.output_dir), str(tmp_path / "validation.safetensors")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    name, params, accuracy = result.stdout.split("RELOADED ", 1)[1].split()
    assert name == ("MDPViTForImageClassification" if "deit" in job else "MDPResNetForImageClassification"), name
    assert int(params) == run.report["pruned_params"]
    assert float(accuracy) > floor and abs(float(accuracy) - run.report["pruned_accuracy"]) <= 0.02, accuracy
    assert float(accuracy) > 2 * CHANCE
