"""The package root and the CLI are lazy: `mdp-hf solve` never imports torch or transformers, and
`import mdp_hf` still registers the pruned-model classes with the Auto API in either import order."""

import os
import subprocess
import sys
import textwrap
import time

from mdp_hf.solver import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCK_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "pyomo"):
            raise ImportError(f"{name} must not be imported by `mdp-hf solve`")
sys.meta_path.insert(0, Block())
"""


def run_python(code: str, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_mdp_hf_solve_runs_with_torch_blocked(tmp_path):
    path = tmp_path / "resnet50.json"
    synthetic.resnet(50, seed=0, fraction=0.5).to_json(path)
    result = run_python(
        BLOCK_TORCH
        + f"""
from mdp_hf.cli import main
code = main(["solve", {str(path)!r}])
assert code == 0, code
assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
print("NO_TORCH_OK")
"""
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "status:      optimal" in result.stdout and "NO_TORCH_OK" in result.stdout


def test_mdp_hf_solve_starts_fast(tmp_path):
    """A whole `python -m mdp_hf.cli solve` process on a ResNet-50 problem. The bound is loose on purpose (a
    shared CI machine); before the lazy root it took 7-13 s, now about 0.4 s here."""
    path = tmp_path / "resnet50.json"
    synthetic.resnet(50, seed=0, fraction=0.5).to_json(path)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mdp_hf.cli", "solve", str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert elapsed < 4.0, f"mdp-hf solve took {elapsed:.1f} s"


def test_import_mdp_hf_is_lazy_and_names_resolve():
    result = run_python("""
import sys
import mdp_hf
assert "torch" not in sys.modules and "transformers" not in sys.modules, "import mdp_hf must stay cheap"
assert "PrunableConfig" in dir(mdp_hf) and "solver" in dir(mdp_hf)
assert mdp_hf.solver.solve is not None and "torch" not in sys.modules
from mdp_hf import PrunableConfig, build_space, slice_model
assert callable(build_space) and callable(slice_model) and PrunableConfig.__name__ == "PrunableConfig"
try:
    mdp_hf.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("unknown attributes must raise AttributeError")
print("LAZY_OK")
""")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LAZY_OK" in result.stdout


def test_auto_classes_registered_in_either_import_order():
    check = """
from transformers import AutoConfig, CONFIG_MAPPING
assert "mdp_vit" in CONFIG_MAPPING and "mdp_resnet" in CONFIG_MAPPING
assert type(AutoConfig.for_model("mdp_vit")).__name__ == "MDPViTConfig"
print("REGISTERED_OK")
"""
    for prologue in ("import mdp_hf\nimport transformers\n", "import transformers\nimport mdp_hf\n", "import mdp_hf\n"):
        result = run_python(prologue + check)
        assert result.returncode == 0, (prologue, result.stderr[-3000:])
        assert "REGISTERED_OK" in result.stdout
