"""Subcommands of the lamost-vac CLI, one module per group, and the options they share."""
from etl.settings import settings


def display_url(url):
    """``url`` with its password replaced by ``***``: safe to print or log."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 -- not a URL SQLAlchemy parses (amqp://...): the scheme
        return str(url).split("://")[0] + "://..."


def add_url_argument(parser):
    """``--url``: the catalogue database, for every command that uses one."""
    parser.add_argument("--url", default=None,
                        help="SQLAlchemy database URL (default: LAMOST_VAC_DATABASE_URL, "
                        f"now {display_url(settings.database_url)})".replace("%", "%%"))


def database_url(args):
    return getattr(args, "url", None) or settings.database_url
