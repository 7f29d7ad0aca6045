"""Shared pytest fixtures and helpers for lamost-vac's tests."""
import contextlib
import dataclasses
import datetime as dt
import io
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert

from etl import db, schema
from etl.settings import Settings

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


STILTS = shutil.which("stilts")
needs_stilts = pytest.mark.skipif(
    STILTS is None, reason="STILTS not installed (Debian: apt-get install -y stilts)")


def stilts(*args, timeout=300):
    """Run a STILTS command (``tapquery``, ``taplint``, ``datalinklint``, ``cone``, ...);
    its standard output, the command having succeeded."""
    done = subprocess.run([STILTS, *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def psql(url, sql, user, password=None):
    """Run ``sql`` (one statement or psql command) with the real psql client as ``user``
    on the database of ``url``, over TCP; no password prompt (``-w``)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = password
    return subprocess.run(
        ["psql", "-X", "-w", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", parsed.host,
         "-p", str(parsed.port or 5432), "-U", user, "-d", parsed.database, "-c", sql],
        env=env, capture_output=True, text=True, timeout=60)


def assert_refused(result, message):
    """``result`` (of :func:`psql`) failed, with ``message`` in its error output."""
    assert result.returncode != 0, f"not refused: {result.stdout}"
    assert message in result.stderr, result.stderr


@contextlib.contextmanager
def serving(app):
    """``app`` served over real HTTP by werkzeug in a thread; yields its base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)


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
    url = make_database(request.param)
    db.upgrade(url)
    return url


@pytest.fixture
def catalogue_engine(catalogue_url):
    """Engine on the session's catalogue database, emptied before each test."""
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
    """Factory: ``make_simulated_set(name, ids, per_star, seed, decoys=None,
    obsid_start=None)`` -> folder written by lamost_sim (``decoys``: the chance per star of
    a neighbour 2-6 arcsec away in apogee_payne.fits, None: the tool's default;
    ``obsid_start``: default, a range of its own for every set of the session)."""
    miles = shared_dir / "data" / "miles"
    tool = shared_dir / "tools" / "lamost_sim.py"
    if not tool.is_file() or not (miles / "MILES_params.db").is_file():
        pytest.skip(f"lamost_sim.py or MILES not found under {shared_dir}")

    made = []

    def make(name, ids, per_star, seed, decoys=None, obsid_start=None):
        # Each set gets its own obsids unless told otherwise: a model trained on one set
        # and evaluated on another must not see the same obsid twice (evaluate recognises
        # training spectra by obsid).
        if obsid_start is None:
            obsid_start = 700_000_001 + 1_000_000 * len(made)
        made.append(name)
        out = tmp_path_factory.mktemp(name)
        stars = out / "stars.txt"
        stars.write_text("\n".join(map(str, ids)) + "\n")
        extra = ["--obsid-start", str(obsid_start)]
        subprocess.run([sys.executable, str(tool), "--miles", str(miles), "--out", str(out),
                        "--stars", str(stars), "--per-star", per_star, "--seed", str(seed),
                        *(["--decoys", str(decoys)] if decoys is not None else []), *extra],
                       check=True, capture_output=True, timeout=300)
        return out

    make.miles = miles
    return make


@pytest.fixture(scope="session")
def simulated_set(make_simulated_set):
    """A small LAMOST-like set from lamost_sim.py: 12 MILES stars, one spectrum each,
    every star with a decoy neighbour 2-6 arcsec away in apogee_payne.fits."""
    miles = make_simulated_set.miles
    ids = sorted(int(p.name[20:24]) for p in miles.glob("MILES_res2.50_star_m*V.fits"))[:12]
    return make_simulated_set("sim", ids, "1x10-20", seed=3, decoys=1)


# --------------------------------------------------------------------------------------
# The query service's test catalogue (test_service, test_scs_clients, test_tap, ...).

N_SPECTRA = 3000
CURRENT, RETIRED = "v2.0", "v1.0"
NOW = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


# ---------------------------------------------------------------------------------------
# Test catalogue: jittered positions, dense near the poles, across RA = 0/360 and in a
# cluster; two model versions (current, retired).
def make_catalogue(seed=5):
    rng = np.random.default_rng(seed)
    parts = []

    def uniform(n):
        ra = rng.uniform(0, 360, n)
        dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
        return ra, dec

    parts.append(uniform(1200))
    for pole in (90.0, -90.0):                          # within 0.5 deg of each pole
        ra = rng.uniform(0, 360, 300)
        dec = pole - np.sign(pole) * rng.uniform(0, 0.5, 300)
        parts.append((ra, dec))
    for dec0 in (0.0, 60.0):                            # straddling RA = 0/360
        ra = rng.normal(0, 0.3, 300) % 360.0
        dec = dec0 + rng.normal(0, 0.3, 300)
        parts.append((ra, dec))
    parts.append((rng.normal(150, 0.05, 600), rng.normal(30, 0.05, 600)))   # dense cluster
    ra = np.concatenate([p[0] for p in parts]) % 360.0
    dec = np.clip(np.concatenate([p[1] for p in parts]), -90.0, 90.0)
    ra[ra >= 360.0] = 0.0
    n = len(ra)
    assert n == N_SPECTRA
    obsid = np.arange(100001, 100001 + n)
    teff = rng.uniform(3800, 7500, n)
    logg = rng.uniform(0.5, 5.0, n)
    feh = rng.uniform(-2.5, 0.5, n)
    snrg = rng.uniform(5, 300, n)
    flags = rng.choice([0, 0, 0, 1, 2, 4, 5], n)
    teff_null = rng.random(n) < 0.02                    # a few estimates without Teff
    return dict(obsid=obsid, ra=ra, dec=dec, teff=teff, logg=logg, feh=feh, snrg=snrg,
                flags=flags, teff_null=teff_null)


def load_catalogue(url, cat):
    engine = db.make_engine(url)
    spectra_rows, current_rows, retired_rows = [], [], []
    for i in range(len(cat["obsid"])):
        obsid, ra, dec = int(cat["obsid"][i]), float(cat["ra"][i]), float(cat["dec"][i])
        spectra_rows.append(dict(
            obsid=obsid, designation=f"J{i:06d}", ra=ra, dec=dec, zone=db.zone_of(dec),
            lmjd=56000 + i % 50, mjd=56000 + i % 50, planid=f"plan{i % 7}", spid=1 + i % 16,
            fiberid=1 + i % 250, snrg=float(cat["snrg"][i]), snrr=float(cat["snrg"][i]) * 1.2,
            class_="STAR", subclass="G2", z=0.0001, data_version="LAMOST DR8",
            file_path=f"spec-{obsid}.fits.gz", layout="dr8-image"))
        teff = None if cat["teff_null"][i] else float(cat["teff"][i])
        common = dict(obsid=obsid, code_version="0.1.0", preprocessing_hash="p" * 64,
                      run_id="run-1", created_at=NOW, flags=int(cat["flags"][i]))
        current_rows.append(dict(
            common, model_version=CURRENT, teff=teff, teff_err=teff and 80.0 + i % 50,
            teff_err_model=teff and 40.0, logg=float(cat["logg"][i]),
            logg_err=0.1 + (i % 10) / 100, logg_err_model=0.05, feh=float(cat["feh"][i]),
            feh_err=0.08, feh_err_model=0.04))
        if i % 2 == 0:
            retired_rows.append(dict(
                common, model_version=RETIRED, teff=float(cat["teff"][i]) + 30,
                teff_err=120.0, teff_err_model=60.0, logg=float(cat["logg"][i]), logg_err=0.2,
                logg_err_model=0.1, feh=float(cat["feh"][i]), feh_err=0.1, feh_err_model=0.05))
    model_common = dict(artifact_path="/models/x.joblib", artifact_sha256="a" * 64,
                        code_version="0.1.0")
    with engine.begin() as connection:
        connection.execute(insert(schema.models), [
            dict(model_common, version=RETIRED, created_at=NOW - dt.timedelta(days=30),
                 status="retired", training_set={"n_stars": 1000, "labels": "apogee-payne"},
                 metrics={"teff": {"bias": 5.0, "scatter": 110.0}}),
            dict(model_common, version=CURRENT, created_at=NOW, status="current",
                 training_set={"n_stars": 2000, "labels": "apogee-payne"},
                 metrics={"teff": {"bias": 1.0, "scatter": 90.0}}, notes="current model")])
        connection.execute(insert(schema.spectra), spectra_rows)
        connection.execute(insert(schema.estimates), current_rows + retired_rows)
        connection.execute(insert(schema.estimate_failures), [dict(
            obsid=int(cat["obsid"][1]), model_version=RETIRED, stage="read",
            reason="truncated file", created_at=NOW)])
        db.analyze(connection, ["spectra", "estimates", "models"])
    engine.dispose()


def separation_deg(ra1, dec1, ra2, dec2):
    """Vincenty great-circle distance (numpy), independent of the service code."""
    lon1, lat1, lon2, lat2 = map(np.radians, (ra1, dec1, ra2, dec2))
    dlon = lon2 - lon1
    num1 = np.cos(lat2) * np.sin(dlon)
    num2 = np.cos(lat1) * np.sin(lat2) - np.sin(lat1) * np.cos(lat2) * np.cos(dlon)
    den = np.sin(lat1) * np.sin(lat2) + np.cos(lat1) * np.cos(lat2) * np.cos(dlon)
    return np.degrees(np.arctan2(np.hypot(num1, num2), den))


def expected_cone(cat, ra, dec, radius):
    """obsids within ``radius`` sorted by (distance, obsid), and their distances."""
    distance = separation_deg(cat["ra"], cat["dec"], ra, dec)
    inside = np.nonzero(distance <= radius)[0]
    order = sorted(inside, key=lambda i: (distance[i], cat["obsid"][i]))
    return [int(cat["obsid"][i]) for i in order], distance[order]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def service_db(request, make_database):
    """A migrated catalogue with the test rows: (writer URL, reader URL, catalogue)."""
    url = make_database(request.param)
    db.upgrade(url)
    cat = make_catalogue()
    load_catalogue(url, cat)
    return url, db.reader_url_for(url), cat


# One folder for the session's /tap/async job folders, removed when the session ends.
_TAP_JOBS = tempfile.TemporaryDirectory(prefix="lamost-vac-tap-jobs-")


def service_settings(url, reader_url, timeout_ms=10000):
    # /tap/async jobs (the fuzzer creates some) go to a temporary folder, not the checkout.
    return Settings(database_url=url, reader_database_url=reader_url,
                    statement_timeout_ms=timeout_ms,
                    tap_job_dir=tempfile.mkdtemp(dir=_TAP_JOBS.name))


def with_test_limits(settings, **changes):
    """``settings`` with the default limits, but cones up to 10 deg and pages of 10,000
    rows (the tests reach a 9.9-deg cone and read the whole test catalogue in one page)
    and no practical concurrency limit: the Flask test client never closes a response, so
    a large query it made would hold its slot while the test keeps the response. The
    limits as shipped are tested on a real gunicorn (test_service_availability.py)."""
    defaults = dict(scs_max_sr_deg=10.0, api_max_limit=10000, large_queries_per_client=1000,
                    large_queries_max=1000)
    return dataclasses.replace(settings, **{**defaults, **changes})


SCS_UCD1 = ("ID_MAIN", "POS_EQ_RA_MAIN", "POS_EQ_DEC_MAIN")


def parse_votable(data):
    """Parse with astropy; any VOTable warning fails, except W06 for the three UCD1 words
    that SCS requires (and pyvo looks for) although VOTable >= 1.2 expects UCD1+."""
    from astropy.io.votable import parse
    from astropy.utils.exceptions import AstropyWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        votable = parse(io.BytesIO(data), verify="warn")
    # Only astropy's own warnings speak of the document: a ResourceWarning that garbage
    # collection happens to emit during the parse (the test client's temporary file of
    # an earlier large upload) is not about the VOTable.
    unexpected = [str(w.message) for w in caught
                  if issubclass(w.category, AstropyWarning)
                  and not ("W06" in str(w.message)
                          and any(f"'{word}'" in str(w.message) for word in SCS_UCD1))
                  # log(cm.s**-2) is the VOUnits spec's own example; astropy cannot parse
                  # unit functions.
                  and not ("W50" in str(w.message) and "log(cm.s**-2)" in str(w.message))]
    assert not unexpected, unexpected
    return votable


def tap_error_message(response):
    """The QUERY_STATUS=ERROR message of a TAP answer (a Flask or a requests response)."""
    votable = parse_votable(getattr(response, "data", None) or response.content)
    infos = [i for i in votable.resources[0].infos if i.name == "QUERY_STATUS"]
    assert infos and infos[0].value == "ERROR", response.data[:500]
    return infos[0].content


@pytest.fixture(scope="session")
def postgresql_catalogue(make_database):
    """(URL, reader URL) of a PostgreSQL database holding the test catalogue, for tests
    that only read it."""
    from etl import db

    url = make_database("postgresql")
    db.upgrade(url)
    load_catalogue(url, make_catalogue())
    return url, db.reader_url_for(url)


# --------------------------------------------------------------------------------------
# The package as users get it, and the demo it runs. A demo trains four times (3-fold
# cross-fitted calibration and the final networks), so the suite runs it twice and shares
# each run: the checkout's demo on the embedded SQLite default (test_demo,
# test_pages_browser) and the installed wheel's demo on PostgreSQL (test_demo,
# test_packaging). Both start in background threads when the session
# starts (if a collected test needs them): each is minutes of mostly one core, which the
# other tests would otherwise wait for.
# What the wheel is built from: the Dockerfile copies the same.
WHEEL_SOURCE = ["pyproject.toml", "README.md", "etl", "models", "service", "migrations"]
# fixture -> the fixture that starts it in the background, in the order they start
DEMO_STARTERS = {"sqlite_demo": "_sqlite_demo_future", "installed_postgresql_demo": "_installed_demo_future",
                 "venv": "_venv_future", "wheel": "_wheel_future"}


def build_wheel(tmp):
    """The wheel of this checkout, built from a copy: an in-tree build would leave build/
    and *.egg-info behind, and a stale build/ could hide a file missing from the sources."""
    source = tmp / "source"
    source.mkdir()
    for name in WHEEL_SOURCE:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO_ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp / "dist"),
         str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = (tmp / "dist").glob("lamost_vac-*.whl")
    return path


def make_venv(wheel, folder):
    """A fresh virtual environment with the wheel installed; its dependencies come from the
    system site-packages, so nothing is downloaded."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(folder)],
                   check=True, capture_output=True, timeout=300)
    # --force-reinstall: an editable lamost-vac of the same version in the system
    # site-packages must not count as "already installed".
    installed = subprocess.run(
        [str(folder / "bin" / "python"), "-m", "pip", "install", "--no-deps",
         "--force-reinstall", str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return folder


def run_installed(venv, argv, cwd, timeout=900):
    """Run a program of the virtual environment from ``cwd``, with PYTHONPATH unset and none
    of the caller's LAMOST_VAC_* settings (the embedded defaults)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME") and not key.startswith("LAMOST_VAC_")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_demo(out, *options, check=True):
    """``lamost-vac demo --no-serve`` of the checkout in ``out`` with no LAMOST_VAC_ setting
    (the embedded default unless ``options`` say otherwise)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMOST_VAC_")}
    result = subprocess.run(
        [sys.executable, "-m", "etl.cli", "demo", "--no-serve", "--out", str(out), *options],
        cwd=out, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def installed_demo(venv, url, work):
    """``lamost-vac db upgrade`` of the installed wheel on an empty database, then its demo
    (small settings: what is checked on it is the package, the database, TAP and DataLink,
    not the accuracy). Returns {step: completed process}."""
    steps = {"upgrade": run_installed(venv, ["lamost-vac", "db", "upgrade", "--url", url], cwd=work)}
    assert steps["upgrade"].returncode == 0, steps["upgrade"].stderr[-3000:]
    steps["demo"] = run_installed(venv, ["lamost-vac", "demo", "--no-serve", "--out", "demo",
                                         "--stars", "40", "--ensemble", "1",
                                         "--database-url", url], cwd=work)
    assert steps["demo"].returncode == 0, steps["demo"].stderr[-3000:]
    return steps


@pytest.fixture(scope="session")
def _background():
    """Threads for the slow session fixtures; each waits on subprocesses, not on the GIL."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="demo") as pool:
        yield pool


@pytest.fixture(scope="session")
def _wheel_future(_background, tmp_path_factory):
    return _background.submit(build_wheel, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="session")
def _venv_future(_background, _wheel_future, tmp_path_factory):
    folder = tmp_path_factory.mktemp("venv") / "env"
    return _background.submit(lambda: make_venv(_wheel_future.result(), folder))


@pytest.fixture(scope="session")
def _sqlite_demo_future(_background, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, _background.submit(run_demo, out, "--stars", "60", "--ensemble", "2")


@pytest.fixture(scope="session")
def _installed_demo_future(_background, _venv_future, make_database, tmp_path_factory):
    url = make_database("postgresql")          # skips without PostgreSQL, before the wheel is built
    work = tmp_path_factory.mktemp("elsewhere")
    # the venv's thread finishes first (one pool, submitted in order): this one then waits on it
    return url, work, _background.submit(lambda: installed_demo(_venv_future.result(), url, work))


@pytest.fixture(scope="session", autouse=True)
def _start_demos_early(request):
    """Start the slow fixtures the collected tests use (``fixturenames`` is each test's
    whole closure), without waiting for them. The pool runs jobs in the order submitted and a
    job waits only on earlier ones, so the two threads cannot deadlock."""
    used = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    for fixture, starter in DEMO_STARTERS.items():
        if fixture in used:
            try:
                request.getfixturevalue(starter)
            except (pytest.skip.Exception, pytest.fail.Exception):
                pass                           # the tests that need it skip or fail themselves


@pytest.fixture(scope="session")
def wheel(_wheel_future):
    return _wheel_future.result()


@pytest.fixture(scope="session")
def venv(_venv_future):
    return _venv_future.result()


@pytest.fixture(scope="session")
def sqlite_demo(_sqlite_demo_future):
    """(folder, completed process) of the checkout's demo on the embedded default."""
    out, future = _sqlite_demo_future
    return out, future.result()


@pytest.fixture(scope="session")
def installed_postgresql_demo(_installed_demo_future):
    """The installed wheel, run from a folder outside the repository: ``lamost-vac db
    upgrade`` on an empty PostgreSQL database, then the demo on it. Returns (database URL,
    demo folder, {step: completed process})."""
    url, work, future = _installed_demo_future
    return url, work / "demo", future.result()
