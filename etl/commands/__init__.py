"""Subcommands of the lamost-vac CLI, one module per group, and the options they share."""
import argparse
import math

from etl.settings import settings


# -- argparse types: a bad number is refused by the parser, naming its option ------------
def _number(text, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def at_least(minimum, kind=int):
    """An argparse type: a number (``kind``) no smaller than ``minimum``."""
    def check(text):
        value = _number(text, kind)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        return value
    check.__name__ = f"number >= {minimum:g}"
    return check


def positive_float(text):
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def fraction(text):
    """A fraction in [0, 1)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def worker_count(text):
    """Worker processes: a positive number, or -1 for every core."""
    value = _number(text, int)
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, or -1 for every core, got {text}")
    return value


def port_number(text):
    value = _number(text, int)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1-65535, got {text}")
    return value


positive_int = at_least(1)
non_negative_int = at_least(0)
non_negative_float = at_least(0, float)


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


def add_jobs_argument(parser):
    """``--jobs``: worker processes, for every command that preprocesses or predicts."""
    parser.add_argument("--jobs", type=worker_count, default=-1,
                        help="worker processes (-1 = all cores)")


def add_activate_argument(parser, default="when-estimated"):
    """``--activate``: when a newly registered version becomes the catalogue's."""
    from etl.registry import ACTIVATIONS

    parser.add_argument(
        "--activate", choices=ACTIVATIONS, default=default,
        help="when-estimated (default): while another version is current, register this one "
        "as pending; 'infer' and the beat estimate with it, and it becomes current once it has "
        "an estimate of every spectrum the current version serves (the catalogue serves the "
        "current version until then). now: current at once (the catalogue serves only what "
        "it has estimated so far)")


def registered_message(version, status, where=""):
    """What a command that registered ``version`` tells its user."""
    if status == "pending":
        return (f"registered {version} as pending{where}: it becomes current once it has an "
                f"estimate of every spectrum the current version serves ('lamost-vac infer', "
                f"or the beat; 'lamost-vac models' shows and changes the statuses)")
    return f"registered {version} as current{where}"


def database_url(args):
    """The database URL of ``--url`` or LAMOST_VAC_DATABASE_URL; ValueError naming the one
    it came from when it is not a PostgreSQL or SQLite URL."""
    from etl.db import normalise_url

    given = getattr(args, "url", None)
    url = given or settings.database_url
    try:
        normalise_url(url)
    except ValueError as error:
        raise ValueError(f"{'--url' if given else 'LAMOST_VAC_DATABASE_URL'}: {error}") from None
    return url
