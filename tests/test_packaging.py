"""The installable package (issue 11, item 13).

A wheel is built from this checkout (``pip wheel``, as ``pip install .`` and the Dockerfile
do), installed into a fresh virtual environment, and run from a folder outside the
repository with PYTHONPATH unset: it must migrate a real PostgreSQL database and run the
whole demo with nothing imported from the checkout.
"""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from etl import db
from release_validators import assert_valid_votable

REPO = Path(__file__).resolve().parent.parent
# What the wheel is built from: the Dockerfile copies the same.
SOURCE = ["pyproject.toml", "README.md", "etl", "models", "service", "migrations"]
PACKAGE_FOLDERS = ["etl", "models", "service"]
# The repository's top-level migrations/ is installed inside the etl package.
INSTALLED_AS = {"migrations": "etl/migrations"}
NOT_SHIPPED = shutil.ignore_patterns("__pycache__", "*.pyc")


def source_files():
    """Every file the installed package needs, as (path in the repo, path in the wheel)."""
    files = []
    for folder in PACKAGE_FOLDERS + list(INSTALLED_AS):
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                relative = path.relative_to(REPO).as_posix()
                installed = INSTALLED_AS.get(folder, folder) + relative[len(folder):]
                files.append((relative, installed))
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel of this checkout, built from a copy: an in-tree build would leave build/
    and *.egg-info behind, and a stale build/ could hide a file missing from the sources."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in SOURCE:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=NOT_SHIPPED)
        else:
            shutil.copy2(REPO / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp / "dist"),
         str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = (tmp / "dist").glob("lamost_vac-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh virtual environment with the wheel installed; its dependencies come from the
    system site-packages, so nothing is downloaded."""
    folder = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(folder)],
                   check=True, capture_output=True, timeout=300)
    # --force-reinstall: an editable lamost-vac of the same version in the system
    # site-packages must not count as "already installed".
    installed = subprocess.run(
        [str(folder / "bin" / "python"), "-m", "pip", "install", "--no-deps",
         "--force-reinstall", str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return folder


def run_installed(venv, argv, cwd, timeout=600):
    """Run a program of the virtual environment from ``cwd``, with PYTHONPATH unset and none
    of the caller's LAMOST_VAC_* settings (the embedded defaults)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME") and not key.startswith("LAMOST_VAC_")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_wheel_holds_every_file_of_the_packages_and_the_migrations(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        top_level = archive.read(next(n for n in names if n.endswith(".dist-info/top_level.txt")))
    missing = [relative for relative, installed in source_files() if installed not in names]
    assert not missing, f"in the repository but not in {wheel.name}: {missing}"
    assert any(installed.startswith("etl/migrations/versions/") for _, installed in source_files())
    # No generic top-level "migrations" package in site-packages.
    assert not any(name.startswith("migrations/") for name in names)
    assert sorted(top_level.decode().split()) == sorted(PACKAGE_FOLDERS)


def test_installed_package_migrates_postgresql_and_runs_the_demo(venv, make_database,
                                                                tmp_path):
    work = tmp_path / "elsewhere"          # outside the repository
    work.mkdir()
    imported = run_installed(venv, ["python", "-c", (
        "import etl, etl.db, models, service\n"
        "for module in (etl, models, service):\n"
        "    print(module.__file__)\n"
        "print(etl.db.MIGRATIONS_DIR)\n")], cwd=work)
    assert imported.returncode == 0, imported.stderr
    paths = [Path(line).resolve() for line in imported.stdout.split()]
    assert len(paths) == 4
    for path in paths:
        assert venv.resolve() in path.parents, f"{path} is not inside the virtual environment"

    url = make_database("postgresql")
    upgrade = run_installed(venv, ["lamost-vac", "db", "upgrade", "--url", url], cwd=work)
    assert upgrade.returncode == 0, upgrade.stderr[-3000:]
    # every migration of the checkout was shipped: the database is at the repository's head
    assert db.current_revision(url) == db.head_revision()

    demo = run_installed(venv, ["lamost-vac", "demo", "--no-serve", "--out", "demo",
                                "--stars", "60", "--ensemble", "2"], cwd=work)
    assert demo.returncode == 0, demo.stderr[-3000:]
    out = work / "demo"
    for name in ("catalogue.vot", "catalogue.csv", "report/report.md", "lamost_vac.db"):
        assert (out / name).is_file(), name
    urls = [line for line in demo.stdout.splitlines() if "http://127.0.0.1" in line]
    assert len(urls) == 4 and "browse the catalogue" in urls[0]    # the browser URL first
    assert any("/datalink/links?ID=" in url for url in urls)
    assert_valid_votable(out / "catalogue.vot")
