"""``lamost-vac demo``: the whole system, end to end, on the embedded default.

No services, no internet, no data: it generates a small labelled LAMOST-like sample with
the project's own analytic generator (``models.synthetic``), then runs exactly the
commands an operator would, against a SQLite file with Celery tasks run in-process:

    db upgrade -> ingest spectra -> ingest labels -> crossmatch -> train -> infer
    -> export (VOTable) -> evaluate (report + plots) -> serve

and prints the URLs of a cone search, a parameter-range query and the DataLink links of
a spectrum that return rows. The API is started with ``lamost-vac serve`` in its own
process, as an operator would, and the example queries are checked over HTTP against it.

``--database-url postgresql://...`` runs the same on an empty PostgreSQL database (with
the q3c extension available), which also serves TAP: an ADQL cone through ``/tap/sync``
is among the checked queries. The server reads with that URL (its sessions read-only);
tasks still run in-process.
"""
import glob
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from etl.commands import port_number, positive_int
from models.progress import progress

DEMO_PORT = 8000


def register(subparsers):
    parser = subparsers.add_parser(
        "demo", help="run the whole pipeline on generated data with no services (SQLite, eager tasks)",
        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="lamost-vac-demo",
                        help="working folder: spectra, database, model, report (default ./lamost-vac-demo)")
    parser.add_argument("--stars", type=positive_int, default=150, help="stars to generate (default 150)")
    parser.add_argument("--spectra-per-star", type=positive_int, default=3)
    parser.add_argument("--ensemble", type=positive_int, default=3, help="networks per label (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=port_number, default=DEMO_PORT)
    parser.add_argument("--no-serve", action="store_true", help="stop after the report; do not start the API")
    parser.add_argument("--database-url", default=None,
                        help="an empty PostgreSQL database to run on instead of a SQLite file in "
                             "--out, e.g. postgresql://USER@127.0.0.1/lamost_vac_demo (TAP needs it)")
    parser.set_defaults(func=run_demo)


def _step(title):
    print(f"\n== {title}", file=sys.stderr, flush=True)


def _run(argv):
    """One real CLI command; a failure stops the demo with that command's exit code."""
    from etl.cli import main

    print("$ lamost-vac " + " ".join(argv), file=sys.stderr, flush=True)
    code = main(argv)
    if code:
        raise SystemExit(f"demo stopped: 'lamost-vac {argv[0]}' exited with {code}")


def run_demo(args):
    from etl import tasks
    from etl.settings import Settings
    from models.synthetic import make_sample

    started = time.perf_counter()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.database_url:
        url = args.database_url
        _require_empty_catalogue(url)
    else:
        database = os.path.join(out, "lamost_vac.db")
        if os.path.exists(database):
            os.remove(database)             # a demo starts from an empty catalogue
        url = f"sqlite:///{database}"
    postgresql = url.startswith("postgres")
    settings = Settings(database_url=url, model_dir=os.path.join(out, "models"), spectra_root=out,
                        tap_job_dir=os.path.join(out, "tap-jobs"))
    tasks.configure(tasks.app, settings)       # no broker: tasks run in this process

    _step(f"generating {args.stars} stars x {args.spectra_per_star} LAMOST-like spectra in {out}")
    make_sample(out, n_stars=args.stars, spectra_per_star=args.spectra_per_star, seed=args.seed,
                progress=lambda it, total: progress(it, total, "writing FITS files"))
    catalogue = os.path.join(out, "lamost_catalog.csv")
    labels = os.path.join(out, "apogee_payne.fits")

    _step(f"catalogue database ({'PostgreSQL' if postgresql else 'SQLite'}) and ETL")
    _run(["db", "upgrade", "--url", url])
    _run(["ingest", "spectra", catalogue, "--spectra-root", out, "--url", url])
    _run(["ingest", "labels", labels, "--url", url])
    _run(["crossmatch", "--radius", "3", "--url", url])

    _step("training LASSO-MLPNet (small ensemble, 5-fold LASSO CV, 3-fold cross-fitted calibration, "
          "no degraded copies)")
    # 3 calibration folds instead of train's 5: four trainings instead of six, for a demo;
    # no degraded copies (most demo spectra are above SNRg 20: even 2 copies each made the
    # training set 3 times larger and the demo 3 times slower, 336 s against 118 s)
    _run(["train", "--url", url, "--snr-range", "5,80", "--ensemble", str(args.ensemble),
          "--lasso-folds", "5", "--calibration-folds", "3", "--degraded-copies", "0",
          "--model-dir", settings.model_dir, "--seed", str(args.seed),
          # the demo's few analytic stars span [Fe/H] below the valid domain: train on all
          "--label-domain", "none"])
    artifact = max(glob.glob(os.path.join(settings.model_dir, "*.joblib")), key=os.path.getmtime)

    _step("inference (Celery tasks, eager) and release files")
    _run(["infer", "--url", url, "--all", "--batch-size", "200"])
    _run(["export", "--url", url, "--format", "votable", "--out", os.path.join(out, "catalogue.vot")])
    _run(["export", "--url", url, "--format", "csv", "--out", os.path.join(out, "catalogue.csv")])

    _step("accuracy report and plots (all stars, training ones included: a demo, not a validation)")
    _run(["evaluate", "--model", artifact, "--catalog", catalogue, "--spectra-root", out,
          "--truth", os.path.join(out, "truth.csv"), "--out", os.path.join(out, "report"),
          "--include-training"])

    # --no-serve: check the queries on a free port, then stop; else serve on --port.
    port = _free_port() if args.no_serve else args.port
    server = _start_server(settings, port)
    try:
        queries = example_queries(settings, port)
        print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; files in {out}:",
              file=sys.stderr)
        print(f"  catalogue.vot, catalogue.csv, report/report.md, report/*.png, "
              f"{os.path.relpath(artifact, out)}", file=sys.stderr)
        # The browser URL first: the catalogue's search page (the pages of the service).
        print(f"  browse the catalogue: http://127.0.0.1:{args.port}/")
        for description, path, rows in queries:
            print(f"  {description} ({rows} rows): http://127.0.0.1:{args.port}{path}")
        if args.no_serve:
            return 0
        _step(f"serving the API on http://127.0.0.1:{port} (Ctrl-C to stop)")
        return server.wait()
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(settings, port, timeout_s=60):
    """``lamost-vac serve`` on the demo's catalogue in its own process, once it answers
    ``/health``; with the demo's model folder (the spectrum pages mark the model's
    pixels) and a TAP job folder of its own."""
    command = [sys.executable, "-m", "etl.cli", "serve", "--url", settings.database_url,
               "--port", str(port)]
    print("$ lamost-vac " + " ".join(command[3:]), file=sys.stderr, flush=True)
    env = dict(os.environ, LAMOST_VAC_MODEL_DIR=settings.model_dir,
               LAMOST_VAC_TAP_JOB_DIR=settings.tap_job_dir)
    server = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise SystemExit(f"demo stopped: 'lamost-vac serve' exited with {server.returncode} "
                             f"(is port {port} taken? try --port)")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return server
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                server.terminate()
                raise SystemExit(f"demo stopped: the API did not answer on port {port}")
            time.sleep(0.2)


def _get(url, attempts=5):
    """The body of ``url``; a 429 is retried after its Retry-After, as clients should (the
    server frees a large query's slot only once it has closed the previous answer)."""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                return response.read().decode()
        except urllib.error.HTTPError as error:
            if error.code != 429 or attempt == attempts - 1:
                raise SystemExit(f"demo: {url} answered {error.code}: "
                                 f"{error.read()[:300]!r}") from None
            time.sleep(min(float(error.headers.get("Retry-After") or 1), 5))


def example_queries(settings, port):
    """A cone search, a range query and a spectrum's DataLink links (and on PostgreSQL an
    ADQL cone through TAP) that return rows, checked against the running API."""
    from urllib.parse import quote

    from sqlalchemy import select

    from etl import db, schema

    engine = db.make_engine(settings.database_url)
    with engine.connect() as connection:
        obsid, ra, dec = connection.execute(
            select(schema.spectra.c.obsid, schema.spectra.c.ra, schema.spectra.c.dec)
            .order_by(schema.spectra.c.obsid).limit(1)).one()
        postgresql = db.is_postgres(connection)
    engine.dispose()
    queries = [
        ("IVOA cone search, 1 deg around a demo star",
         f"/scs?RA={ra:.5f}&DEC={dec:.5f}&SR=1"),
        ("G dwarfs with [Fe/H] > -0.5, as CSV",
         "/api/v1/estimates?teff_min=5300&teff_max=6000&logg_min=4&feh_min=-0.5&format=csv&limit=20"),
        ("DataLink links of a demo spectrum: its FITS file, a preview, its record",
         f"/datalink/links?ID={obsid}"),
    ]
    if postgresql:
        adql = ("SELECT obsid, ra, dec, teff, logg, feh FROM v_current_estimates WHERE 1 = "
                f"CONTAINS(POINT('ICRS', ra, dec), CIRCLE('ICRS', {ra:.5f}, {dec:.5f}, 1))")
        queries.append(("ADQL through TAP, the same cone",
                        f"/tap/sync?LANG=ADQL&QUERY={quote(adql)}"))
    checked = []
    for description, path in queries:
        text = _get(f"http://127.0.0.1:{port}{path}")
        rows = (max(text.count("\n") - 1, 0) if "format=csv" in path
                else text.count("<TR>"))
        checked.append((description, path, rows))
    return checked


def _require_empty_catalogue(url):
    """The demo fills a catalogue from nothing: it stops rather than add its generated
    spectra to a database that already holds one."""
    from sqlalchemy import func, select
    from sqlalchemy.engine import make_url

    from etl import db, schema

    try:
        revision = db.current_revision(url)
        if revision is None:
            return
        engine = db.make_engine(url)
        try:
            with engine.connect() as connection:
                count = connection.execute(select(func.count()).select_from(schema.spectra)).scalar()
        finally:
            engine.dispose()
    except Exception as error:  # noqa: BLE001 -- unreachable, wrong password, no such database
        raise SystemExit(f"demo stopped: cannot use {make_url(url)!r}: "
                         f"{type(error).__name__}: {str(error).splitlines()[0]}") from None
    if count:
        raise SystemExit(f"demo stopped: {make_url(url)!r} already holds a catalogue ({count} "
                         "spectra); the demo starts from an empty database: give it a new one "
                         "(e.g. createdb lamost_vac_demo)")
