"""The ``lamost-vac`` command line.

Each group of subcommands lives in its own module under ``etl/commands/`` and exposes
``register(subparsers)``; this module only assembles them.
"""
import argparse
import importlib
import sys

from sqlalchemy.exc import InterfaceError, OperationalError, ProgrammingError

from etl.commands import database_url, display_url
from etl.settings import settings
from models.artifact import IncompatibleArtifactError

COMMAND_MODULES = [
    "etl.commands.files",
    "etl.commands.evaluate",
    "etl.commands.validate",
    "etl.commands.demo",
    "etl.commands.db",
    "etl.commands.pipeline",
    "etl.commands.model_registry",
    "service.commands",
]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="lamost-vac",
        description="LAMOST low-resolution value-added catalogue: Teff, log g and [Fe/H] "
        "with uncertainties from LASSO-MLPNet (Li et al., MNRAS).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'lamost-vac COMMAND --help' for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, IncompatibleArtifactError, OperationalError,
            InterfaceError, ProgrammingError) as error:
        # bad input named in the message; LAMOST_VAC_DEBUG=1 shows the traceback instead
        # (and any other SQL error is ours: a traceback)
        if settings.debug or (isinstance(error, ProgrammingError) and not _older_schema(error)):
            raise
        if isinstance(error, (OperationalError, InterfaceError, ProgrammingError)):
            # the database is down, unreachable or refused us: name it (without password)
            url, older = display_url(database_url(args)), _older_schema(error)
            error = f"database {url}: {_first_line(error.orig)}"
            if older:
                error += ("; it holds no catalogue, or an older one: create or update its "
                          f"tables with 'lamost-vac db upgrade --url {url}'")
        print(f"lamost-vac {args.command}: error: {error}", file=sys.stderr)
        return 2


def _older_schema(error) -> bool:
    """Whether a database error says a table or column of the catalogue does not exist:
    no catalogue, or one from an older release (SQLSTATE 42P01 and 42703 on PostgreSQL,
    "no such table" and "no such column" on SQLite)."""
    original = getattr(error, "orig", error)
    return (getattr(original, "sqlstate", None) in ("42P01", "42703")
            or any(m in str(original) for m in ("no such table", "no such column")))


def _first_line(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
