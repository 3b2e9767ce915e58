"""Dependencies point one way: the core imports none of the other packages, `eval` never needs a
trainer, shipped code never imports `tests`, and `tests` is not installed."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("vlm_judge", "text_judge", "perception_collection", "train", "eval", "demo")
FORBIDDEN = {
    "vlm_judge": {"text_judge", "perception_collection", "train", "eval", "demo", "tests"},
    "eval": {"train", "perception_collection", "demo", "tests"},
    "text_judge": {"train", "eval", "demo", "perception_collection", "tests"},
    "train": {"eval", "demo", "tests"},
    "perception_collection": {"train", "eval", "demo", "tests"},
    "demo": {"tests"},
}


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports, at any depth (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_its_layer_may(package):
    bad = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & FORBIDDEN[package])
        for p in (ROOT / package).rglob("*.py")
    }
    assert not {k: v for k, v in bad.items() if v}


def test_pyproject_installs_the_shipped_packages_and_not_tests():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    packages = set(cfg["packages"])
    assert "tests" not in packages and "tests" not in cfg.get("package-data", {})
    assert set(SHIPPED) <= packages
    assert all((ROOT / p.replace(".", "/") / "__init__.py").is_file() for p in packages)
    assert (ROOT / "demo" / "demo_template.yaml").is_file()


def test_every_command_module_exists():
    from vlm_judge.cli import COMMANDS

    for name, (target, _) in COMMANDS.items():
        assert importlib.util.find_spec(target.split(":")[0]) is not None, name
