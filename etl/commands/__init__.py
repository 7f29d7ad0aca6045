"""Subcommands of the lamost-vac CLI, one module per group, and the options they share."""
from etl.settings import settings


def add_url_argument(parser):
    """``--url``: the catalogue database, for every command that uses one."""
    parser.add_argument("--url", default=None,
                        help="SQLAlchemy database URL (default: LAMOST_VAC_DATABASE_URL, "
                        f"now {settings.database_url})")


def database_url(args):
    return args.url or settings.database_url
