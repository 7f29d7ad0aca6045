"""Shared pytest fixtures for lamost-vac."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """Shared test data (real LAMOST files, MILES, lamost_sim.py), never copied into the repo.

    Location: $LAMOST_VAC_SHARED, default <repo>/../shared.  Tests that need it are
    skipped, not failed, on machines without it.
    """
    path = Path(os.environ.get("LAMOST_VAC_SHARED", REPO_ROOT.parent / "shared")).resolve()
    if not path.is_dir():
        pytest.skip(f"shared test data not found at {path} (set LAMOST_VAC_SHARED)")
    return path


# --------------------------------------------------------------------------------------
# Catalogue databases (etl): the same tests run on SQLite and on a real PostgreSQL.
import subprocess
import sys

PG_TEST_URL = os.environ.get("LAMOST_VAC_TEST_PG_URL",
                             "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
CATALOGUE_DIALECTS = ["sqlite", "postgresql"]
# In CI (.ci/run starts the servers) a missing PostgreSQL/Redis is a failure, not a skip:
# a green run must mean the real servers were exercised.
REQUIRE_SERVICES = os.environ.get("CI", "").lower() in ("1", "true", "yes") or \
    os.environ.get("LAMOST_VAC_REQUIRE_SERVICES") == "1"


def service_unavailable(reason):
    """Skip a test that needs a server that is not there, or fail when services are required."""
    if REQUIRE_SERVICES:
        pytest.fail(f"required service unavailable: {reason}")
    pytest.skip(reason)


def _pg_admin_engine():
    from sqlalchemy import create_engine

    from etl.db import normalise_url

    return create_engine(normalise_url(PG_TEST_URL), isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def make_database(tmp_path_factory):
    """Factory: ``make_database(dialect)`` -> URL of a new empty database.

    PostgreSQL databases are named lamost_vac_test_<pid>_<n> and dropped at the end of
    the session; a PostgreSQL that cannot be reached (or lacks q3c) skips the test.
    """
    from sqlalchemy.engine import make_url

    created = []
    admin = None

    def make(dialect):
        nonlocal admin
        if dialect == "sqlite":
            path = tmp_path_factory.mktemp("catalogue") / "lamost_vac.db"
            return f"sqlite:///{path}"
        if admin is None:
            try:
                admin = _pg_admin_engine()
                with admin.connect() as connection:
                    has_q3c = connection.exec_driver_sql(
                        "SELECT 1 FROM pg_available_extensions WHERE name = 'q3c'").scalar()
            except Exception as error:  # noqa: BLE001 -- any connection problem: skip
                admin = None
                service_unavailable(f"PostgreSQL not reachable at {PG_TEST_URL}: {error}")
            if not has_q3c:
                service_unavailable("PostgreSQL has no q3c extension (install postgresql-15-q3c)")
        name = f"lamost_vac_test_{os.getpid()}_{len(created)}"
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
        created.append(name)
        return make_url(PG_TEST_URL).set(database=name).render_as_string(hide_password=False)

    yield make
    if admin is not None:
        with admin.connect() as connection:
            for name in created:
                connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@pytest.fixture(scope="session", params=CATALOGUE_DIALECTS)
def catalogue_url(request, make_database):
    """A migrated catalogue database, one per dialect for the whole session."""
    from etl import db

    url = make_database(request.param)
    db.upgrade(url)
    return url


@pytest.fixture
def catalogue_engine(catalogue_url):
    """Engine on the session's catalogue database, emptied before each test."""
    from etl import db, schema

    engine = db.make_engine(catalogue_url)
    with engine.begin() as connection:
        if db.is_postgres(connection):
            names = ", ".join(t.name for t in schema.metadata.sorted_tables)
            connection.exec_driver_sql(f"TRUNCATE {names} CASCADE")
        else:
            for table in reversed(schema.metadata.sorted_tables):
                connection.execute(table.delete())
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def simulated_set(shared_dir, tmp_path_factory):
    """A small LAMOST-like set from lamost_sim.py: 8 MILES stars, one spectrum each,
    every star with a decoy neighbour 2-6 arcsec away in apogee_payne.fits."""
    miles = shared_dir / "data" / "miles"
    tool = shared_dir / "tools" / "lamost_sim.py"
    if not tool.is_file() or not miles.is_dir():
        pytest.skip(f"lamost_sim.py or MILES not found under {shared_dir}")
    out = tmp_path_factory.mktemp("sim")
    ids = sorted(int(p.name[20:24]) for p in miles.glob("MILES_res2.50_star_m*V.fits"))[:12]
    stars = out / "stars.txt"
    stars.write_text("\n".join(str(i) for i in ids) + "\n")
    subprocess.run([sys.executable, str(tool), "--miles", str(miles), "--out", str(out),
                    "--stars", str(stars), "--per-star", "1x10-20", "--decoys", "1",
                    "--seed", "3"], check=True, capture_output=True, timeout=120)
    return out


# --------------------------------------------------------------------------------------
# Simulated LAMOST-like sets from real MILES stars (../shared/tools/lamost_sim.py).
def miles_ids(miles, count, teff=(3800.0, 6500.0), logg=(-1.0, 6.0), feh=(-5.0, 2.0), spread=True):
    """``count`` MILES ids with parameters in range and a spectrum file.

    ``spread=True`` picks them evenly over the sorted ids (a mix of stellar types),
    otherwise the first ``count``.
    """
    chosen = []
    for line in (miles / "MILES_params.db").read_text().splitlines():
        parts = line.split()
        if line.startswith("#") or len(parts) != 4:
            continue
        try:
            mid, t, g, f = int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3])
        except ValueError:
            continue
        if (teff[0] <= t <= teff[1] and logg[0] < g < logg[1] and feh[0] <= f <= feh[1]
                and (miles / f"MILES_res2.50_star_m{mid:04d}V.fits").is_file()):
            chosen.append(mid)
    chosen.sort()
    assert len(chosen) >= count, f"only {len(chosen)} MILES stars in range"
    if not spread:
        return chosen[:count]
    step = len(chosen) / count
    return [chosen[int(i * step)] for i in range(count)]


@pytest.fixture(scope="session")
def make_simulated_set(shared_dir, tmp_path_factory):
    """Factory: ``make_simulated_set(name, ids, per_star, seed, obsid_start=None)`` -> folder
    written by lamost_sim (sets meant to be used together need distinct ``obsid_start``)."""
    miles = shared_dir / "data" / "miles"
    tool = shared_dir / "tools" / "lamost_sim.py"
    if not tool.is_file() or not (miles / "MILES_params.db").is_file():
        pytest.skip(f"lamost_sim.py or MILES not found under {shared_dir}")

    def make(name, ids, per_star, seed, obsid_start=None):
        out = tmp_path_factory.mktemp(name)
        stars = out / "stars.txt"
        stars.write_text("\n".join(map(str, ids)) + "\n")
        extra = [] if obsid_start is None else ["--obsid-start", str(obsid_start)]
        subprocess.run([sys.executable, str(tool), "--miles", str(miles), "--out", str(out),
                        "--stars", str(stars), "--per-star", per_star, "--seed", str(seed), *extra],
                       check=True, capture_output=True, timeout=300)
        return out

    make.miles = miles
    return make
