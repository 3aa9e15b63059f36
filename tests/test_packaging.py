"""The package's shape: one installed namespace, and dependencies that run one way (server -> backends)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from tests.conftest import REPO

OWN_FOLDERS = {"server": "llm_endpoint.server", "backends": "llm_endpoint.backends"}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))]


def test_backends_never_import_the_server() -> None:
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in _python_files("backends")
        for name in _imports(path)
        if name == "llm_endpoint.server" or name.startswith("llm_endpoint.server.")
    ]
    assert offenders == []


@pytest.mark.parametrize("folder", ["server", "backends", "tests", "scripts", "deploy"])
def test_own_code_is_imported_only_through_the_namespace(folder: str) -> None:
    """A bare `import server` would load a second copy of a module beside `llm_endpoint.server`'s."""
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in _python_files(folder)
        for name in _imports(path)
        if name.split(".")[0] in OWN_FOLDERS
    ]
    assert offenders == []


def test_every_package_folder_is_listed_in_pyproject() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {package: folder for folder, package in OWN_FOLDERS.items()}
    found = {
        ".".join([OWN_FOLDERS[init.relative_to(REPO).parts[0]], *init.relative_to(REPO).parts[1:-1]])
        for folder in OWN_FOLDERS
        for init in (REPO / folder).rglob("__init__.py")
        if ".venv" not in init.parts
    }
    assert set(setuptools["packages"]) == found


@pytest.mark.slow
def test_installed_wheel_has_one_namespace(tmp_path: Path) -> None:
    """Built and imported outside the repository: llm_endpoint.server imports, plain `server` does not."""
    source = tmp_path / "source"  # a copy, so setuptools' build/ folder does not land in the checkout
    for folder in OWN_FOLDERS:
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path),
         str(source)],
        check=True,
    )
    wheel = next(tmp_path.glob("llm_endpoint-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "site")
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"llm_endpoint"}
    expected = {
        f"llm_endpoint/{OWN_FOLDERS[p.relative_to(REPO).parts[0]].split('.')[1]}/"
        + "/".join(p.relative_to(REPO).parts[1:])
        for p in _python_files(*OWN_FOLDERS)
    }
    assert expected <= set(names)
    # -S: no site-packages (so no editable finder), run from an empty folder: only the wheel's files count.
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import llm_endpoint.server, llm_endpoint.backends\n"
        "try:\n    import server\nexcept ModuleNotFoundError:\n    print('no plain server')\n"
        "print(llm_endpoint.server.__file__)"
    )
    out = subprocess.run([sys.executable, "-S", "-c", probe, str(tmp_path / "site")], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "no plain server"
    assert out[1].startswith(str(tmp_path / "site"))
