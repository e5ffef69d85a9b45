"""The real Hub code paths (HfApi.create_repo / upload_folder / upload_file, hf_hub_download, from_pretrained)
against a loopback stand-in of the Hub HTTP API (tests/hub_standin.py).

huggingface_hub reads HF_ENDPOINT when it is imported, so every client runs in a subprocess with
HF_ENDPOINT pointing at the stand-in, Xet disabled (content goes inline in the commit) and a fresh HF_HOME.
The stand-in only answers 127.0.0.1; nothing leaves the machine.
"""

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import GROUPS, IMAGE_SIZE, build, logits_of
from hub_standin import HubStandin
from safetensors.torch import save_file

from mdp_hf import PruningChoice, build_space, slice_model
from mdp_hf.hub import save_pruned_model
from mdp_hf.latency import LatencyTable, build_table

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
CARD = "---\nlicense: apache-2.0\nlibrary_name: transformers\ntags:\n- mdp\n---\n# tiny pruned ViT\n"
# a fresh process must load a pruned model with trust_remote_code alone: mdp_hf is made unimportable
BLOCK_MDP_HF = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mdp_hf" or name.startswith("mdp_hf."):
            raise ImportError("mdp_hf must not be needed to load a pruned model")
sys.meta_path.insert(0, Block())
"""


@pytest.fixture
def hub():
    with HubStandin(lifetime_s=300) as server:
        yield server


def client_env(hub, tmp_path) -> dict:
    """The environment of a fresh process whose huggingface_hub talks to the stand-in only."""
    drop = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and not k.lower().endswith("_proxy")}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_TOKEN="hf_standin_dummy_token",
        NO_PROXY="127.0.0.1,localhost",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def run_client(hub, tmp_path, script, prelude="", timeout=240):
    """Run ``prelude + script`` in a fresh interpreter whose huggingface_hub talks to the stand-in only."""
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        env=client_env(hub, tmp_path),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{result.stderr[-4000:]}\n--- requests seen by the stand-in:\n{hub.requests()}"
    return result.stdout


def pruned_vit(seed):
    """A sliced tiny ViT (embed, heads, qk/v, mlp cut and one block removed) and its logits on fixed input."""
    model = build("vit")
    space = build_space(model, group_sizes=GROUPS)
    rng = random.Random(seed)
    kept = {
        name: sorted(rng.sample(range(dim.size), rng.choice(dim.widths()[:-1] or dim.widths())))
        for name, dim in space.dimensions.items()
    }
    pruned = slice_model(model, space, PruningChoice(kept, [rng.choice(sorted(space.blocks))]))
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return pruned, x, logits_of(pruned, x)


def folder_files(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def test_push_folder_to_hub_then_from_pretrained_without_mdp_hf(hub, tmp_path):
    pruned, x, expected = pruned_vit(seed=3)
    folder = save_pruned_model(pruned, tmp_path / "pruned", extra_files={"README.md": CARD})
    save_file({"x": x, "expected": expected}, str(tmp_path / "io.safetensors"))
    # a run's output folder also holds Trainer checkpoints: they must not be uploaded
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"pickled optimizer state")
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"full-size weights")
    new_card = CARD + "updated\n"

    # push twice: the second run finds the repo (409 from create_repo, exist_ok) and commits only what changed
    out = run_client(
        hub,
        tmp_path,
        f"""
        from pathlib import Path
        from mdp_hf.hub import push_folder_to_hub
        print("URL1", push_folder_to_hub({str(folder)!r}, "org/tiny-pruned", commit_message="tiny pruned ViT"))
        Path({str(folder / "README.md")!r}).write_text({new_card!r})
        print("URL2", push_folder_to_hub({str(folder)!r}, "org/tiny-pruned", commit_message="update card"))
    """,
    )
    repo = hub.repos[("model", "org/tiny-pruned")]
    (first, first_files, first_msg), (second, second_files, second_msg) = repo.commits[-2:]
    assert (first_msg, second_msg) == ("tiny pruned ViT", "update card")
    assert f"URL1 {hub.endpoint}/org/tiny-pruned/commit/{first}" in out
    assert f"URL2 {hub.endpoint}/org/tiny-pruned/commit/{second}" in out
    remote = {name: data for name, data in hub.files("org/tiny-pruned").items() if name != ".gitattributes"}
    pushed = {n: d for n, d in folder_files(folder).items() if not n.startswith("checkpoint-")}
    assert remote == pushed  # byte for byte, nothing more (no checkpoints), nothing less
    names = set(remote)
    assert {"config.json", "model.safetensors", "README.md"} <= names
    assert any(n.startswith("modeling_mdp_") and n.endswith(".py") for n in names), names
    assert any(n.startswith("configuration_mdp_") and n.endswith(".py") for n in names), names
    assert "auto_map" in json.loads(remote["config.json"])
    assert {n for n in second_files if second_files[n] != first_files.get(n)} == {"README.md"}
    assert ("POST", "/api/repos/create", 409) in hub.log

    # fresh process without mdp_hf: the Hub copy is enough
    out = run_client(
        hub,
        tmp_path,
        prelude=BLOCK_MDP_HF,
        script="""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForImageClassification
        io = load_file("io.safetensors")
        model = AutoModelForImageClassification.from_pretrained("org/tiny-pruned", trust_remote_code=True).eval()
        with torch.no_grad():
            got = model(io["x"]).logits
        assert torch.equal(got, io["expected"]), (got - io["expected"]).abs().max()
        assert not any(m.startswith("mdp_hf") for m in sys.modules)
        print("FRESH_OK", type(model).__name__, sum(p.numel() for p in model.parameters()))
    """,
    )
    assert f"FRESH_OK {type(pruned).__name__} {sum(p.numel() for p in pruned.parameters())}" in out
    # served by the stand-in, at the commit main pointed to (transformers pins the revision via the repo info)
    assert ("GET", f"/org/tiny-pruned/resolve/{second}/model.safetensors", 200) in hub.log, hub.requests()


def test_push_and_pull_latency_table(hub, tmp_path):
    model = build("vit")
    space = build_space(model, group_sizes=GROUPS)
    path = tmp_path / "vit_table.json"
    table = build_table(
        model,
        path,
        space=space,
        timer=lambda t, widths: float(sum(widths)),
        subgrid=4,
        repeats=1,
        warmup=0,
        progress=False,
        image_size=IMAGE_SIZE,
    )
    table.save(path)

    out = run_client(
        hub,
        tmp_path,
        f"""
        import json
        from mdp_hf.latency import LatencyTable, pull_table, push_table
        from mdp_hf.latency.table import LatencyTableMismatchError
        local = LatencyTable.load({str(path)!r})
        print("PUSHED", push_table({str(path)!r}, "org/latency-tables", filename="tables/vit_cpu.json"))
        print("PUSHED", push_table(local, "org/latency-tables", filename="tables/vit_cpu_object.json"))
        for name in ("tables/vit_cpu.json", "tables/vit_cpu_object.json"):
            pulled = pull_table("org/latency-tables", filename=name, expect=local.metadata)
            assert json.dumps(pulled.to_dict(), sort_keys=True) == json.dumps(local.to_dict(), sort_keys=True), name
        try:
            pull_table("org/latency-tables", filename="tables/vit_cpu.json",
                       expect={{**local.metadata, "batch_size": local.metadata["batch_size"] + 7, "dtype": "float16"}})
        except LatencyTableMismatchError as error:
            print("MISMATCH", sorted(error.differences))
        with_warning = pull_table("org/latency-tables", filename="tables/vit_cpu.json", allow_mismatch=True,
                                  expect={{**local.metadata, "batch_size": local.metadata["batch_size"] + 7}})
        print("ALLOWED", with_warning.metadata["batch_size"])
    """,
    )
    assert "PUSHED org/latency-tables/tables/vit_cpu.json" in out
    assert "PUSHED org/latency-tables/tables/vit_cpu_object.json" in out
    assert "MISMATCH ['batch_size', 'dtype']" in out
    assert f"ALLOWED {table.metadata['batch_size']}" in out
    remote = hub.files("org/latency-tables")
    assert remote["tables/vit_cpu.json"] == path.read_bytes()
    assert LatencyTable.load(path).to_dict() == json.loads(remote["tables/vit_cpu_object.json"])
    summaries = [msg for _, _, msg in hub.repos[("model", "org/latency-tables")].commits]
    assert summaries[-1].startswith("Add latency table (") and "batch 1" in summaries[-1]


def test_load_pruned_model_from_the_hub(hub, tmp_path):
    first, x, first_logits = pruned_vit(seed=3)
    second, _, _ = pruned_vit(seed=5)
    with torch.no_grad():
        second_logits = logits_of(second, x)
    # two versions of one repo: the revision argument must reach both the shape check and the weights
    old = hub.seed("org/tiny-pruned", folder_files(save_pruned_model(first, tmp_path / "first")))
    hub.seed("org/tiny-pruned", folder_files(save_pruned_model(second, tmp_path / "second")))
    broken = folder_files(tmp_path / "first")
    config = json.loads(broken["config.json"])
    config["hidden_size"] += 4  # config.json no longer describes the weights
    broken["config.json"] = json.dumps(config).encode()
    hub.seed("org/broken", broken)
    save_file({"x": x, "first": first_logits, "second": second_logits}, str(tmp_path / "io.safetensors"))

    out = run_client(
        hub,
        tmp_path,
        f"""
        import torch
        from safetensors.torch import load_file
        from conftest import logits_of
        from mdp_hf.hub import CheckpointError, load_pruned_model
        io = load_file("io.safetensors")
        for revision, key in ((None, "second"), ({old!r}, "first")):
            model = load_pruned_model("org/tiny-pruned", **({{"revision": revision}} if revision else {{}}))
            assert not model.training
            with torch.no_grad():
                got = logits_of(model, io["x"])
            assert torch.equal(got, io[key]), (key, (got - io[key]).abs().max() if got.shape == io[key].shape else got.shape)
            print("LOADED", key, type(model).__module__.split(".")[0])
        try:
            load_pruned_model("org/broken")
        except CheckpointError as error:
            print("REJECTED", "do not match" in str(error) or "parameters" in str(error))
    """,
    )
    assert "LOADED second mdp_hf" in out and "LOADED first mdp_hf" in out
    assert "REJECTED True" in out
    assert any(p == f"/org/tiny-pruned/resolve/{old}/model.safetensors" for _, p, _ in hub.log), hub.requests()


PRUNED_RUN = """
import json, os, sys
from transformers import TrainingArguments, ViTImageProcessor
from conftest import GROUPS, IMAGE_SIZE, build
from test_trainer import RandomImages
from mdp_hf import build_space
from mdp_hf.config import PrunableConfig
from mdp_hf.latency import TableLatencyModel, build_table
from mdp_hf.trainer import MDPTrainer

out = "run"
model = build("vit")
# a synthetic table (the sum of the cell's widths), saved where a run writes the table it builds
table = build_table(model, space=build_space(model, group_sizes=GROUPS), timer=lambda t, widths: float(sum(widths)),
                    repeats=1, warmup=0, progress=False, image_size=IMAGE_SIZE)
os.makedirs(out)
table.save(os.path.join(out, "latency_table.json"))
args = TrainingArguments(output_dir=out, max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3,
                         report_to="none", save_strategy="steps", save_steps=2, logging_steps=1, use_cpu=True, seed=0,
                         push_to_hub=True, hub_model_id="org/mdp-run", hub_strategy="checkpoint",
                         hub_token="hf_args_token")
cfg = PrunableConfig(budget_fraction=0.6, group_sizes=GROUPS, accumulation_steps=3)
trainer = MDPTrainer(model=model, args=args, prunable_config=cfg, latency_model=TableLatencyModel(table),
                     train_dataset=RandomImages(48), eval_dataset=RandomImages(8, seed=1),
                     compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
                     processing_class=ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}))
trainer.train()  # checkpoints at steps 2, 4, 6, with push_to_hub=True and hub_strategy="checkpoint"
future = trainer.push_to_hub(commit_message="pruned ViT", token="hf_push_token", revision="pruned", blocking=False)
print("FUTURE", type(future).__name__, future.result())
print("REPORT", json.dumps(trainer.export_report))
url = cfg.push_to_hub("org/mdp-config", commit_message="the config", token="hf_cfg_token", revision="v1")
print("CONFIG", url, PrunableConfig.from_pretrained("org/mdp-config", revision="v1") == cfg)
"""


def test_trainer_push_honours_its_arguments_and_uploads_only_the_pruned_run(hub, tmp_path):
    """Trainer's pushes during training (hub_strategy="checkpoint") upload nothing; push_to_hub uploads the
    exported folder with the given token, branch, message and blocking=False; PrunableConfig.push_to_hub too."""
    out = run_client(hub, tmp_path, PRUNED_RUN, timeout=400)
    assert "FUTURE Future" in out
    report = json.loads(out.split("REPORT ", 1)[1].splitlines()[0])
    repo = hub.repos[("model", "org/mdp-run")]
    assert [msg for _, _, msg in repo.commits] == ["initial commit", "pruned ViT"]  # nothing during training
    assert set(hub.files("org/mdp-run")) == {".gitattributes"}  # main untouched: the push went to its branch
    files = hub.files("org/mdp-run", revision="pruned")
    assert set(files) == {
        ".gitattributes", "config.json", "model.safetensors", "configuration_mdp_vit.py", "modeling_mdp_vit.py",
        "configuration_mdp_common.py", "preprocessor_config.json", "README.md", "pruning_config.json", "pruning_report.json", "pruning_report.png",
        "latency_table.json",
    }  # fmt: skip
    assert json.loads(files["config.json"])["model_type"] == "mdp_vit"
    assert json.loads(files["pruning_report.json"]) == report
    from safetensors.torch import load as load_safetensors

    assert sum(t.numel() for t in load_safetensors(files["model.safetensors"]).values()) == report["pruned_params"]
    assert "| dimension | kind | kept / size |" in files["README.md"].decode()
    commits = [(path, token) for method, path, token in hub.tokens if method == "POST" and "/commit/" in path]
    assert commits[0] == ("/api/models/org/mdp-run/commit/pruned", "hf_push_token"), commits
    assert commits[1] == ("/api/models/org/mdp-config/commit/v1", "hf_cfg_token"), commits
    assert "CONFIG " in out and out.rstrip().endswith("True")
    assert "pruning_config.json" in hub.files("org/mdp-config", revision="v1")


def test_card_base_model_is_a_hub_repo_id_or_absent(tmp_path):
    """A card's base_model names the Hub repo the weights came from; never a local folder (nor a model_type)."""
    from transformers import ViTForImageClassification

    from mdp_hf.hub import hub_repo_id
    from mdp_hf.trainer import source_repo_id

    build("vit").save_pretrained(tmp_path / "local")
    assert source_repo_id(ViTForImageClassification.from_pretrained(tmp_path / "local")) is None
    assert source_repo_id(build("vit")) is None  # built from a config
    model = build("vit")
    model.config.name_or_path = "google/vit-base-patch16-224"
    assert source_repo_id(model) == "google/vit-base-patch16-224"
    assert [hub_repo_id(n) for n in ("", None, "./out", "/abs/path", "a/b/c", "org/name")] == [None] * 5 + ["org/name"]


@pytest.mark.parametrize(
    "task, metrics, row, auto_class",
    [
        ("image-classification", {"dense_accuracy": 0.91, "pruned_accuracy": 0.9}, "| accuracy | 0.91 | 0.9 |",
         "AutoModelForImageClassification"),
        ("object-detection", {"dense_map": 0.31, "pruned_map": 0.3}, "| mAP (COCO 0.5:0.95) | 0.31 | 0.3 |",
         "AutoModelForObjectDetection"),
        ("object-detection", {}, "| mAP (COCO 0.5:0.95) | n/a | n/a |", "AutoModelForObjectDetection"),
    ],
)  # fmt: skip
def test_card_shows_the_tasks_quality_metric_and_auto_class(task, metrics, row, auto_class):
    """A detector's card reports COCO mAP (in its table and its model-index), not an empty accuracy row, and loads
    with the detection Auto class; a classifier's reports accuracy."""
    from mdp_hf.hub import model_card

    report = {"base_model": "tiny", "budget_ms": 10.0, "device": "cpu", **metrics}
    card = model_card(report, "org/pruned", pipeline_tag=task)
    assert row in card.content
    assert ("| accuracy |" in card.content) == (task == "image-classification")
    assert f"model = {auto_class}.from_pretrained(" in card.content
    results = card.data.eval_results
    if metrics:
        key = "accuracy" if task == "image-classification" else "map"
        assert [(r.metric_type, r.metric_value) for r in results] == [(key, metrics["pruned_" + key])]
    else:
        assert not results
