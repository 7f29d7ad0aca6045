"""Catalogue database commands: ``db`` (schema), ``ingest`` (spectra, labels) and
``crossmatch``. They share the ``--url`` option (default LAMOST_VAC_DATABASE_URL)."""
import argparse
import sys
import time

from sqlalchemy.exc import DBAPIError

from etl import db, histogram_cells, schema
from etl.commands import add_url_argument, database_url, positive_float, positive_int
from etl.settings import settings


def register(subparsers):
    register_db(subparsers)
    register_ingest(subparsers)
    register_crossmatch(subparsers)


def register_db(subparsers):
    parser = subparsers.add_parser(
        "db", help="create, migrate and inspect the catalogue database",
        description="Database schema management (Alembic). The database is "
        "LAMOST_VAC_DATABASE_URL unless --url is given.")
    commands = parser.add_subparsers(dest="db_command", metavar="DB_COMMAND")
    commands.required = True

    upgrade = commands.add_parser(
        "upgrade", help="migrate to the newest schema (installs q3c on PostgreSQL)",
        description="Migrate to REVISION. On PostgreSQL run it as a superuser: it installs "
        f"q3c, creates the roles {schema.WRITER_ROLE} (owns the tables, not a superuser), "
        f"{schema.READER_ROLE} (the API: SELECT only) and {schema.ANALYST_ROLE} (SQL "
        "collaborators: SELECT on the published tables), and then sets their passwords "
        "from LAMOST_VAC_WRITER_PASSWORD, LAMOST_VAC_READER_PASSWORD and "
        "LAMOST_VAC_ANALYST_PASSWORD (or the files named by their _FILE variants), where set.")
    upgrade.add_argument("revision", nargs="?", default="head")
    add_url_argument(upgrade)
    upgrade.set_defaults(func=run_upgrade)

    downgrade = commands.add_parser("downgrade", help="undo migrations down to REVISION")
    downgrade.add_argument("revision", help="target revision, e.g. -1 or base")
    add_url_argument(downgrade)
    downgrade.set_defaults(func=run_downgrade)

    current = commands.add_parser("current", help="print the schema revision of the database")
    add_url_argument(current)
    current.set_defaults(func=run_current)

    maintain = commands.add_parser(
        "maintain", help="re-cluster positional tables on Q3C and refresh statistics",
        description="Re-cluster the positional tables on their Q3C index and refresh the "
        "planner statistics (PostgreSQL; ANALYZE on SQLite). With --recount-histograms, "
        "also count the histogram cells of the estimates again (estimate_cells): needed "
        "only after estimates were written with their triggers disabled; writers wait "
        "meanwhile (279 s for the 20 M estimates of two model versions at DR8 size).")
    maintain.add_argument("--recount-histograms", action="store_true",
                          help="count estimate_cells again from the estimates")
    add_url_argument(maintain)
    maintain.set_defaults(func=run_maintain)


def run_upgrade(args):
    url = database_url(args)
    db.upgrade(url, args.revision)
    print(f"database at revision {db.current_revision(url)}")
    passwords = {role: password for role, password in (
        (schema.WRITER_ROLE, settings.writer_password),
        (schema.READER_ROLE, settings.reader_password),
        (schema.ANALYST_ROLE, settings.analyst_password)) if password}
    if not passwords:
        return 0
    engine = db.make_engine(url)
    try:
        if not db.is_postgres(engine):
            print("role passwords ignored: only PostgreSQL has roles", file=sys.stderr)
            return 0
        passwords = set_role_passwords(engine, passwords)
    except DBAPIError as error:
        print(f"cannot set role passwords: {str(error.orig).strip()}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    if passwords:
        print(f"password set for {', '.join(passwords)}")
    return 0


def set_role_passwords(engine, passwords):
    """Give each role of ``passwords`` (role -> password) its password. The SCRAM verifier
    is computed here, as psql's \\password does: the password itself never reaches the
    server, so it cannot show up in its statement log. A role the schema's revision does
    not have yet (``db upgrade 0006`` has no analyst) is skipped with a word on stderr.
    Returns the roles whose password was set."""
    from psycopg import sql

    with engine.begin() as connection:
        existing = {name for (name,) in connection.exec_driver_sql("SELECT rolname FROM pg_roles")}
        for role in sorted(set(passwords) - existing):
            print(f"{role}: no such role at this revision; its password is not set",
                  file=sys.stderr)
        passwords = {role: password for role, password in passwords.items() if role in existing}
        driver_connection = connection.connection.dbapi_connection
        for role, password in passwords.items():
            verifier = driver_connection.pgconn.encrypt_password(
                password.encode(), role.encode(), b"scram-sha-256").decode()
            statement = sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(verifier))
            connection.exec_driver_sql(statement.as_string(driver_connection))
    return passwords


def run_downgrade(args):
    db.downgrade(database_url(args), args.revision)
    print(f"database at revision {db.current_revision(database_url(args)) or 'base (empty)'}")
    return 0


def run_current(args):
    revision = db.current_revision(database_url(args))
    head = db.head_revision()
    if revision is None:
        print(f"no schema (run 'lamost-vac db upgrade'); newest is {head}")
        return 1
    state = "up to date" if revision == head else f"behind: newest is {head}"
    print(f"{revision} ({state})")
    return 0


def run_maintain(args):
    engine = db.make_engine(database_url(args))
    if args.recount_histograms:
        started = time.perf_counter()
        with engine.begin() as connection:
            histogram_cells.recount(connection)
        print(f"histogram cells counted again in {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
    if db.is_postgres(engine):
        with engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            db.cluster_on_position(connection)
    else:
        with engine.connect() as connection:
            connection.exec_driver_sql("ANALYZE")
    print("maintenance done", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------
def register_ingest(subparsers):
    parser = subparsers.add_parser(
        "ingest", help="load spectra metadata or reference labels into the catalogue",
        description="Load data into the catalogue. Rejected rows and files go to the "
        "quarantine table with a reason; the exit status is non-zero only when nothing "
        "could be loaded. Re-running changes nothing.")
    commands = parser.add_subparsers(dest="ingest_command", metavar="WHAT")
    commands.required = True

    spectra = commands.add_parser(
        "spectra", help="spectrum metadata from a LAMOST LRS catalogue and/or file headers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ingest LAMOST LRS spectra.",
        epilog="""With CATALOG (CSV or FITS, gzip ok; DR8 LRS catalogue columns), each row
is joined to its file under --spectra-root (any depth) by the filename column
or the standard name spec-LMJD-PLANID_spSS-FFF.fits[.gz]. Files under the root
that no row names are read from their headers (see --unreferenced).
Without CATALOG every file is read from its header. A file without OBSID (DR1)
and without a catalogue row is quarantined: "no OBSID and no catalogue row".""")
    spectra.add_argument("catalog", nargs="?", help="LRS catalogue file (CSV/FITS[.gz])")
    spectra.add_argument("--spectra-root", default=settings.spectra_root,
                         help="folder holding the spectrum files "
                         "(default: LAMOST_VAC_SPECTRA_ROOT)")
    spectra.add_argument("--metadata-only", action="store_true",
                         help="load catalogue rows without looking for spectrum files")
    spectra.add_argument("--unreferenced", choices=["headers", "ignore"], default="headers",
                         help="files no catalogue row names: ingest from headers (default) "
                         "or ignore")
    spectra.add_argument("--batch-rows", type=positive_int, default=settings.ingest_batch_rows,
                         help="rows per transaction (default: %(default)s)")
    spectra.add_argument("--workers", type=positive_int, default=4,
                         help="threads reading spectrum files (default: %(default)s)")
    add_url_argument(spectra)
    spectra.set_defaults(func=run_ingest_spectra)

    labels = commands.add_parser(
        "labels", help="reference labels (APOGEE Payne, 2-D payne column or flat columns)",
        description="Ingest a reference-label catalogue (FITS or CSV). The repackaged "
        "APOGEE Payne layout (2-D payne column: Teff index 0, logg 1, [Fe/H] 19; -9999 "
        "missing; good_flag) is recognised; otherwise flat columns TEFF/LOGG/FE_H, "
        "Teff/Logg/FeH, ... or those named by --columns.")
    labels.add_argument("file")
    labels.add_argument("--columns", default=None,
                        help="column mapping, e.g. teff=TEFF,logg=LOGG,feh=PARAM_M_H "
                        "(also apogee_id=, ra=, dec=, good_flag=)")
    labels.add_argument("--payne-index", default=None,
                        help="positions in the payne column (default teff=0,logg=1,feh=19)")
    labels.add_argument("--label-set", default=None,
                        help="name of this reference set (default: the file name stem)")
    add_url_argument(labels)
    labels.set_defaults(func=run_ingest_labels)


def run_ingest_spectra(args):
    from etl.ingest import SpectraIngestOptions, ingest_spectra

    if not args.catalog and not args.spectra_root:
        print("give CATALOG, --spectra-root, or both", file=sys.stderr)
        return 2
    if not args.catalog and args.metadata_only:
        print("--metadata-only needs CATALOG", file=sys.stderr)
        return 2
    if not args.metadata_only and not args.spectra_root:
        print("--spectra-root is needed to find the files (or use --metadata-only)",
              file=sys.stderr)
        return 2
    options = SpectraIngestOptions(
        catalogue=args.catalog, spectra_root=args.spectra_root,
        metadata_only=args.metadata_only, unreferenced=args.unreferenced,
        batch_rows=args.batch_rows, workers=args.workers)
    return _ingest_and_report(args, ingest_spectra, options, (OSError, ValueError))


def run_ingest_labels(args):
    from etl.ingest import LabelsIngestOptions, PAYNE_INDEX, ingest_labels, \
        parse_column_mapping

    try:
        columns = parse_column_mapping(args.columns)
        payne_index = dict(PAYNE_INDEX)
        for label, position in (parse_column_mapping(args.payne_index, option="--payne-index")
                                if args.payne_index else {}).items():
            if not position.strip().isdigit():
                raise ValueError(f"--payne-index: {label}={position}: expected the column's "
                                 f"index, a whole number from 0")
            payne_index[label] = int(position)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    options = LabelsIngestOptions(path=args.file, columns=columns, label_set=args.label_set,
                                  payne_index=payne_index)
    return _ingest_and_report(args, ingest_labels, options, (OSError, ValueError, KeyError))


def _ingest_and_report(args, ingest, options, errors):
    """Run one ingest on the command's database, print its summary; the exit status is
    the summary's (non-zero only when nothing loaded), 1 when the input is unusable."""
    engine = db.make_engine(database_url(args))
    try:
        summary = ingest(engine, options)
    except errors as error:
        print(f"ingest failed: {error}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(summary.text())
    return summary.exit_code


# ---------------------------------------------------------------------------------------
def register_crossmatch(subparsers):
    parser = subparsers.add_parser(
        "crossmatch", help="match spectra to reference labels by position",
        description="Every reference star within --radius of each spectrum, ranked by "
        "separation; rank 1 is the best match (TOPCAT best-match mode). q3c_join on "
        "PostgreSQL, astropy elsewhere. Re-running changes nothing.")
    parser.add_argument("--radius", type=positive_float, default=3.0,
                        help="match radius in arcsec (default: %(default)s)")
    parser.add_argument("--label-set", default=None,
                        help="only this reference set (default: all)")
    add_url_argument(parser)
    parser.set_defaults(func=run_crossmatch)


def run_crossmatch(args):
    from etl.crossmatch import CrossmatchOptions, crossmatch

    engine = db.make_engine(database_url(args))
    try:
        summary = crossmatch(engine, CrossmatchOptions(args.radius, args.label_set))
    finally:
        engine.dispose()
    print(summary.text())
    return 0
