"""``lamost-vac models``: list the registered model versions and change which one the
catalogue serves (:mod:`etl.registry`)."""
import argparse
import json
import sys

from etl import db
from etl.commands import add_url_argument, database_url


def register(subparsers):
    parser = subparsers.add_parser(
        "models", help="list the model versions; activate, roll back or withdraw one",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""The catalogue serves one model version, the current one. A version
registered while another is current waits as pending: 'infer' and the beat
estimate with it, and it becomes current once it has an estimate of every
spectrum the current version serves, so a model update never takes a spectrum
out of the served catalogue. Earlier versions are retired; their estimates stay.""",
        epilog="""Examples:
  lamost-vac models list                   versions, statuses, estimates and failures
  lamost-vac models activate V             serve V now (a pending version, or a retired
                                           one: a roll-back); the current and pending
                                           versions are retired
  lamost-vac models withdraw V             retire the pending version V""")
    commands = parser.add_subparsers(dest="models_command", metavar="ACTION")
    commands.required = True
    listing = commands.add_parser("list", help="every version: status, estimates, failures")
    listing.add_argument("--json", action="store_true", help="print JSON")
    add_url_argument(listing)
    listing.set_defaults(func=run_list)
    activate = commands.add_parser("activate", help="make VERSION current now")
    activate.add_argument("version")
    add_url_argument(activate)
    activate.set_defaults(func=run_activate)
    withdraw = commands.add_parser("withdraw", help="retire the pending VERSION")
    withdraw.add_argument("version")
    add_url_argument(withdraw)
    withdraw.set_defaults(func=run_withdraw)


def _with_engine(args, action):
    engine = db.make_engine(database_url(args))
    try:
        return action(engine)
    finally:
        engine.dispose()


def run_list(args):
    from etl.registry import model_versions

    rows = _with_engine(args, model_versions)
    if args.json:
        print(json.dumps(rows, default=str))
        return 0
    print(f"{'version':40s} {'status':8s} {'created (UTC)':19s} {'estimates':>10s} {'failures':>9s}")
    for row in rows:
        print(f"{row['version']:40s} {row['status']:8s} {str(row['created_at'])[:19]:19s} "
              f"{row['estimates']:>10d} {row['failures']:>9d}")
    return 0


def run_activate(args):
    from etl.registry import activate_model

    previous = _with_engine(args, lambda engine: activate_model(engine, args.version))
    print(f"{args.version} is current" + (f" ({previous} retired)" if previous not in (None, args.version)
                                          else ""), file=sys.stderr)
    return 0


def run_withdraw(args):
    from etl.registry import withdraw_model

    _with_engine(args, lambda engine: withdraw_model(engine, args.version))
    print(f"{args.version} is retired", file=sys.stderr)
    return 0
