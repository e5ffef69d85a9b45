"""Packaging: setup.py declares ranges (tested lower bound, below the next major), constraints.txt pins the exact
versions CI installs, and the README's test command is exactly what .ci/run runs."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def setup_requirements() -> dict[str, list[str]]:
    """install_requires and extras_require of setup.py, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(
        node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    keywords = {
        k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")
    }
    return {"install": keywords["install_requires"], **keywords["extras_require"]}


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_requirements_are_ranges_from_the_tested_version_and_constraints_pin_it():
    pins = constraints()
    for group, requirements in setup_requirements().items():
        for requirement in requirements:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+),<([0-9.]+)", requirement)
            assert match, f"{group}: {requirement!r} is not a range 'name>=tested,<next major'"
            name, lower, upper = match.groups()
            key = name.lower().replace("_", "-")
            assert pins.get(key) == lower, f"{requirement}: constraints.txt must pin {name}=={lower}"
            next_major = int(lower.split(".")[0]) + 1
            assert upper == str(next_major), f"{requirement}: the upper bound should be <{next_major}"
    assert set(pins) == {
        re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-")
        for requirements in setup_requirements().values()
        for r in requirements
    }


def test_readme_test_command_is_what_ci_runs():
    command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "-c constraints.txt" in command
    assert f"```bash\n{command}\n```" in (REPO / "README.md").read_text()
