"""What an install from the wheel or sdist holds: every package folder listed (the kernels' folder mapping
means setuptools cannot find them by itself, and an editable install would hide a missing one), the
declared dependencies exactly those imported, one version, and modules that import without side effects."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where an import name and its distribution's name differ.
DISTRIBUTION_OF = {"PIL": "pillow"}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _package_folders() -> dict[str, Path]:
    """Every folder of Python files under the two package roots, by the package name it installs as."""
    roots = {"hypertriton": ROOT / "hypertriton", "hypertriton.kernels": ROOT / "kernels"}
    found = {}
    for name, root in roots.items():
        for folder in [root, *(path for path in root.rglob("*") if path.is_dir())]:
            if folder.name == "__pycache__" or not (any(folder.glob("*.py")) or any(folder.glob("*.pt"))):
                continue
            found[".".join((name, *folder.relative_to(root).parts))] = folder
    return found


def test_every_package_folder_is_listed_and_mapped_to_its_folder():
    setuptools = _pyproject()["tool"]["setuptools"]
    folders = _package_folders()
    assert set(setuptools["packages"]) == set(folders), (
        "pyproject.toml [tool.setuptools] packages must list every folder of modules or data")
    for name, target in setuptools["package-dir"].items():
        assert (ROOT / target).resolve() == folders[name].resolve()
    assert any((ROOT / "hypertriton" / "weights").glob("*.pt"))
    assert setuptools["package-data"] == {"hypertriton.weights": ["*.pt"]}


def _imported_top_level_names(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"hypertriton", "__future__"}


def test_the_declared_dependencies_are_exactly_what_the_package_imports():
    project = _pyproject()["project"]

    def distribution(requirement: str) -> str:
        return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()

    required = {distribution(r) for r in project["dependencies"]}
    optional = {distribution(r) for extra in project["optional-dependencies"].values() for r in extra}
    imported = {DISTRIBUTION_OF.get(name, name).lower()
                for folder in ("hypertriton", "kernels") for name in _imported_top_level_names(ROOT / folder)}
    # Imported only inside try/except (matplotlib for plots, tensorboard through torch) may be an extra.
    assert imported - required - optional == set(), "imported but not declared"
    assert required - imported == set(), "declared but never imported"


def _source_version() -> str:
    """``__version__`` as written in the source (the one place: pyproject.toml reads it)."""
    tree = ast.parse((ROOT / "hypertriton" / "__init__.py").read_text(encoding="utf-8"))
    return next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets))


def test_the_version_is_written_once():
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hypertriton.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", _source_version())


def test_the_command_line_says_its_version(capsys):
    from hypertriton.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"hypertriton {_source_version()}\n"


def _all_modules() -> list[pkgutil.ModuleInfo]:
    """Every module of this source tree, by the name it installs as (from the files here, whatever
    ``import hypertriton`` happens to resolve to)."""
    found = []
    for package, root in (("hypertriton", ROOT / "hypertriton"), ("hypertriton.kernels", ROOT / "kernels")):
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join((package, *(parts[:-1] if is_package else parts)))
            found.append(pkgutil.ModuleInfo(None, name, is_package))
    return found


def test_every_module_imports_and_the_command_line_module_runs_nothing_on_import():
    names = [module.name for module in _all_modules()]
    assert {"hypertriton.__main__", "hypertriton.kernels", "hypertriton.ops.fused_first_layer",
            "hypertriton.commands.predict"} <= set(names)
    quiet = subprocess.run([sys.executable, "-c", "import hypertriton.__main__"], capture_output=True, text=True,
                           timeout=120)
    assert quiet.returncode == 0 and quiet.stdout == "" and "usage" not in quiet.stderr, quiet.stderr
    from hypertriton.backend import triton_installed

    for name in names:
        if name != "hypertriton.__main__" and (triton_installed() or not name.startswith("hypertriton.kernels")):
            importlib.import_module(name)
    ran = subprocess.run([sys.executable, "-m", "hypertriton", "--help"], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and "usage: hypertriton" in ran.stdout


def _build(kind: str, tmp_path: Path) -> Path:
    """Build the ``kind`` ("sdist" or "wheel") distribution from a copy of the tree; its path."""
    import shutil

    pytest.importorskip("setuptools", reason="building needs setuptools (not in Python 3.12+ virtual environments)")
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    if not source.exists():
        try:
            listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        except OSError:  # no git at all
            listed = None
        if (ROOT / ".git").exists() and listed is not None and listed.returncode == 0 and listed.stdout:
            for name in listed.stdout.splitlines():  # a checkout: what is tracked (and still there), no outputs
                if (ROOT / name).is_file():
                    (source / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / name, source / name)
        else:  # an unpacked sdist: all of it
            shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist"))
    # One process per build: setuptools' build_meta keeps state between calls.
    built = subprocess.run(
        [sys.executable, "-c", f"import sys; from setuptools import build_meta as b; "
         f"print('BUILT', b.build_{kind}(sys.argv[1]))", str(tmp_path / "dist")],
        cwd=source, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    name = [line.split()[1] for line in built.stdout.splitlines() if line.startswith("BUILT ")][0]
    return tmp_path / "dist" / name


def test_the_sdist_carries_what_its_tests_and_demo_read(tmp_path):
    import tarfile

    with tarfile.open(_build("sdist", tmp_path)) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    needed = {"LICENSE", "tests/conftest.py", "tests/helpers.py", "tests/datagen.py", "bench/original_hsnet.py",
              "bench/run.py", "examples/one_shot_demo.py", "docs/synthetic.md",
              "hypertriton/weights/synthetic_resnet18.pt"}
    assert needed <= in_sdist, needed - in_sdist
    assert not any(name.startswith("bench/results/") or "__pycache__" in name for name in in_sdist)


def test_the_wheel_holds_every_module_and_the_weights_and_nothing_else(tmp_path):
    import importlib.util
    import zipfile

    import setuptools

    version = tuple(int(part) for part in setuptools.__version__.split(".")[:2])
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:
        pytest.skip(f"building a wheel needs setuptools >= 70.1 or the wheel package (setuptools "
                    f"{setuptools.__version__} here)")
    wheel_path = _build("wheel", tmp_path)
    with zipfile.ZipFile(wheel_path) as wheel:
        in_wheel = set(wheel.namelist())
    for module in _all_modules():
        stem = module.name.replace(".", "/")
        assert f"{stem}.py" in in_wheel or f"{stem}/__init__.py" in in_wheel, module.name
    assert "hypertriton/weights/synthetic_resnet18.pt" in in_wheel
    metadata = next(name for name in in_wheel if name.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(wheel_path) as wheel:
        assert f"\nVersion: {_source_version()}\n" in wheel.read(metadata).decode()
    assert any(name.endswith("LICENSE") for name in in_wheel)
    assert not any(name.startswith(("tests/", "bench/", "examples/", "kernels/")) for name in in_wheel)


def test_every_public_module_says_what_it_exports_and_each_name_exists():
    """``from module import *`` takes ``__all__`` only: without one it took torch, helpers and, from
    hypertriton.reference, slow oracles named like the fast ops they would have replaced."""
    from hypertriton.backend import triton_installed

    checked = 0
    for module in _all_modules():
        leaf = module.name.rsplit(".", 1)[-1]
        if leaf.startswith("_") or module.ispkg or (module.name.startswith("hypertriton.kernels")
                                                    and not triton_installed()):
            continue
        imported = importlib.import_module(module.name)
        exported = getattr(imported, "__all__", None)
        assert exported is not None, f"{module.name} has no __all__"
        missing = [name for name in exported if not hasattr(imported, name)]
        assert not missing, f"{module.name}.__all__ names what it does not define: {missing}"
        checked += 1
    assert checked > 30


def test_the_packages_dir_lists_each_name_once_and_no_implementation_detail():
    import hypertriton

    hypertriton.HSNet  # a lazy export, once loaded, is a global too
    listed = dir(hypertriton)
    assert len(listed) == len(set(listed))
    assert set(hypertriton.__all__) <= set(listed) and "__version__" in listed
    assert not {"importlib", "annotations", "_EXPORTS"} & set(listed)

