"""The installable package (issue 11, item 13).

A wheel is built from this checkout (``pip wheel``, as ``pip install .`` and the Dockerfile
do), installed into a fresh virtual environment, and run from a folder outside the
repository with PYTHONPATH unset: it must migrate a real PostgreSQL database and run the
whole demo with nothing imported from the checkout (the run is shared with test_demo:
``conftest.installed_postgresql_demo``).
"""
import zipfile
from pathlib import Path

from conftest import run_installed
from etl import db
from release_validators import assert_valid_votable

REPO = Path(__file__).resolve().parent.parent
PACKAGE_FOLDERS = ["etl", "models", "service"]
# The repository's top-level migrations/ is installed inside the etl package.
INSTALLED_AS = {"migrations": "etl/migrations"}


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


def test_installed_package_migrates_postgresql_and_runs_the_demo(venv, installed_postgresql_demo,
                                                                tmp_path):
    imported = run_installed(venv, ["python", "-c", (
        "import etl, etl.db, models, service\n"
        "for module in (etl, models, service):\n"
        "    print(module.__file__)\n"
        "print(etl.db.MIGRATIONS_DIR)\n")], cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    paths = [Path(line).resolve() for line in imported.stdout.split()]
    assert len(paths) == 4
    for path in paths:
        assert venv.resolve() in path.parents, f"{path} is not inside the virtual environment"

    # 'lamost-vac db upgrade' of the installed package brought the empty database to the
    # repository's head (every migration was shipped), and its demo ran on it
    url, out, steps = installed_postgresql_demo
    assert db.current_revision(url) == db.head_revision()
    for name in ("catalogue.vot", "catalogue.csv", "report/report.md"):
        assert (out / name).is_file(), name
    urls = [line for line in steps["demo"].stdout.splitlines() if "http://127.0.0.1" in line]
    assert "browse the catalogue" in urls[0]                        # the browser URL first
    assert any("/datalink/links?ID=" in url for url in urls)
    assert any("/tap/sync?" in url for url in urls)
    assert_valid_votable(out / "catalogue.vot")
