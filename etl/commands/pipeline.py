"""Batch-pipeline commands: ``train``, ``infer``, ``worker``, ``beat`` and ``export``.

They use the catalogue database (``--url``, default LAMOST_VAC_DATABASE_URL) and, for
``infer``, the Celery app of :mod:`etl.tasks`: with LAMOST_VAC_BROKER_URL set, batches
go to the workers; unset, they run in this process (eager mode, no services needed).
"""
import argparse
import json
import os
import sys
import time
from array import array

from etl import db
from etl.commands.files import (add_training_arguments, degraded_copies_per_spectrum,
                                model_parameters, preprocess_config, print_held_out,
                                training_snr_range)
from etl.commands import (add_activate_argument, add_url_argument, database_url, display_url,
                          non_negative_int, positive_float, positive_int, registered_message)
from etl.label_domain import parse_label_domain
from etl.settings import settings


def register(subparsers):
    register_train(subparsers)
    register_infer(subparsers)
    register_worker(subparsers)
    register_beat(subparsers)
    register_export(subparsers)


# ---------------------------------------------------------------------------------------
def register_train(subparsers):
    parser = subparsers.add_parser(
        "train", help="train LASSO-MLPNet on the cross-matched reference set and register it",
        description="Build the reference set from the database (best cross-match of each "
        "STAR spectrum, good labels only), train with the train-files recipe, store the "
        "artifact in --model-dir and register the model version (see --activate; the version "
        "it replaces is retired, its estimates stay). Prints the version.")
    add_training_arguments(parser)
    parser.add_argument("--label-set", default=None,
                        help="reference label set (default: the only one cross-matched)")
    parser.add_argument("--model-dir", default=settings.model_dir,
                        help="where artifacts go (default: LAMOST_VAC_MODEL_DIR, now %(default)s)")
    parser.add_argument("--spectra-root", default=None,
                        help="folder of the spectrum files (default: LAMOST_VAC_SPECTRA_ROOT, "
                        "else the root recorded by the ingest)")
    parser.add_argument("--notes", default=None, help="free text stored with the model")
    add_activate_argument(parser)
    add_url_argument(parser)
    parser.set_defaults(func=run_train)


def run_train(args):
    from etl.training import TrainOptions, train_from_database

    params = model_parameters(args)
    config = preprocess_config(args)
    options = TrainOptions(
        snr_range=training_snr_range(args),
        wave_range=(config.wave_min, config.wave_max), preprocess=config, ensemble=args.ensemble,
        holdout=args.holdout, seed=args.seed, label_set=args.label_set,
        degraded_copies=degraded_copies_per_spectrum(args),
        model_dir=args.model_dir, spectra_root=args.spectra_root, jobs=args.jobs,
        model_params=params, notes=args.notes, label_domain=parse_label_domain(args.label_domain),
        activate=args.activate)
    engine = db.make_engine(database_url(args))
    try:
        result = train_from_database(engine, options)
    except ValueError as error:
        print(f"train failed: {error}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print_held_out(result["metrics"])
    print(registered_message(result["version"], result["status"])
          + f" ({result['n_train']} training spectra; artifact {result['artifact']})", file=sys.stderr)
    print(result["version"])
    return 0


# ---------------------------------------------------------------------------------------
def register_infer(subparsers):
    parser = subparsers.add_parser(
        "infer", help="estimate Teff, log g, [Fe/H] for the catalogue's spectra (Celery batches)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Split the STAR spectra into batches of consecutive obsids and run one "
        "Celery task per batch (read, preprocess, predict, write in one transaction).",
        epilog="""Which spectra: --stale (default) those without an estimate and without a
recorded failure from the model; --all every STAR spectrum (rewrites existing
estimates of the version with this run's provenance). Workers: with
LAMOST_VAC_BROKER_URL set the batches go to 'lamost-vac worker' processes and this
command waits for their results (progress on stderr, summary on stdout);
unset, they run here. A task carries only the model version, the obsids and the
run id: each worker reads its own LAMOST_VAC_DATABASE_URL (the same database as
--url, or it refuses the batches), LAMOST_VAC_MODEL_DIR and LAMOST_VAC_SPECTRA_ROOT.
A pending version (registered by 'train' while another was current) becomes current
at the end of a run once it has an estimate of every spectrum the current version
serves (see 'lamost-vac models --help').
Exit status 1 when a batch raised or --timeout passed.""")
    parser.add_argument("--model", default=None,
                        help="model version (default: the pending one if a version waits for its "
                        "estimates, else the current one)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--stale", dest="mode", action="store_const", const="stale",
                       help="only spectra without an estimate from the model (default)")
    which.add_argument("--all", dest="mode", action="store_const", const="all",
                       help="every STAR spectrum")
    parser.set_defaults(mode="stale")
    parser.add_argument("--retry-failed", action="store_true",
                        help="with --stale, also retry spectra whose earlier attempt failed")
    parser.add_argument("--batch-size", type=positive_int, default=500,
                        help="spectra per task (default %(default)s)")
    parser.add_argument("--limit", type=non_negative_int, default=None, help="at most this many spectra")
    parser.add_argument("--no-wait", action="store_true",
                        help="dispatch and exit (follow progress in the database)")
    parser.add_argument("--timeout", type=positive_float, default=None,
                        help="give up waiting after this many seconds (batches stay queued)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_url_argument(parser)
    parser.set_defaults(func=run_infer)


class _Progress:
    """Progress on stderr: a bar on a terminal, else a line at most every 2 s."""

    def __init__(self, total_batches, total_spectra, stream=None):
        self.total_batches, self.total_spectra = total_batches, total_spectra
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = 0.0
        self.started = time.perf_counter()

    def update(self, batches, totals, final=False):
        now = time.perf_counter()
        if not final and now - self.last < (0.2 if self.tty else 2.0):
            return
        self.last = now
        processed = totals.done + totals.failed
        rate = processed / max(now - self.started, 1e-9)
        text = (f"infer: {batches}/{self.total_batches} batches, {processed}/"
                f"{self.total_spectra} spectra ({totals.done} done, {totals.flagged} flagged, "
                f"{totals.failed} failed), {rate:.0f} spectra/s")
        if self.tty:
            width = 30
            filled = int(width * batches / max(self.total_batches, 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}"
                              + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def run_infer(args):
    from etl import tasks

    if not 1 <= args.batch_size <= tasks.MAX_BATCH:
        print(f"--batch-size must be between 1 and {tasks.MAX_BATCH}", file=sys.stderr)
        return 2
    url = database_url(args)
    eager = bool(tasks.app.conf.task_always_eager)
    if eager:            # this process is the worker, and --url its database
        with tasks.in_process_worker(url):
            return _infer(args, url, eager)
    return _infer(args, url, eager)


def _infer(args, url, eager):
    from etl import inference, registry, tasks

    engine = db.make_engine(url)
    try:
        with engine.connect() as connection:
            model = registry.model_to_estimate(connection, args.model)
            version = model["version"]
            total = inference.count_selected(connection, version, args.mode, args.retry_failed)
        if args.limit is not None:
            total = min(total, args.limit)
        n_batches = -(-total // args.batch_size)
        run_id = inference.start_inference_run(engine, version, {
            "mode": args.mode, "batch_size": args.batch_size, "retry_failed": args.retry_failed,
            "limit": args.limit, "spectra": total, "eager": eager})
        where = "in this process (eager)" if eager else f"to {display_url(tasks.app.conf.broker_url)}"
        print(f"infer: model {version}, {total} {args.mode} spectra in {n_batches} batches "
              f"{where} [run {run_id}]", file=sys.stderr)
        totals = inference.BatchResult()
        errors = []
        progress = _Progress(n_batches, total)
        pending = []
        done_batches = dispatched = 0
        for async_result, size, obsids in inference.dispatch_batches(
                engine, tasks.infer_batch, version, run_id, args.mode, args.batch_size,
                args.retry_failed, args.limit, eager=eager):
            dispatched += size
            if eager:
                totals += inference.BatchResult.from_dict(async_result.get())
                done_batches += 1
                progress.update(done_batches, totals)
            else:
                # obsids as 8-byte integers: a 10-million-spectrum run keeps them all
                pending.append((async_result, size, array("q", obsids)))
        # The count above was an estimate for the progress bar: another run (the beat) may
        # have estimated some of those spectra, or new ones arrived, before the selection
        # was dispatched. The run accounts for what it sent.
        total = dispatched
        if not eager and (args.no_wait or not tasks.app.conf.result_backend):
            why = "--no-wait" if args.no_wait else "no result backend"
            inference.finish_inference_run(
                engine, run_id, inference.BatchResult(selected=total),
                message=f"dispatched {len(pending)} batches ({why}); results not collected")
            if not pending:     # nothing left to send: the pending version may be complete
                _report_promotion(registry.promote_pending(engine))
            # (batches sent now are estimated later: the beat promotes then; checking now
            # would scan the catalogue only to say the version is not complete yet)
            print(json.dumps({"run_id": run_id, "model_version": version,
                              "dispatched_batches": len(pending), "spectra": total})
                  if args.json else f"dispatched {len(pending)} batches [run {run_id}] "
                  f"({why}: follow estimates.run_id in the database)")
            return 0
        timed_out = False
        if pending:
            done_batches, timed_out = _wait(
                pending, totals, errors, progress, args.timeout,
                lambda obsids: tasks.infer_batch.apply_async((version, obsids, run_id)),
                _stall_seconds(tasks.current_settings()))
        progress.update(done_batches, totals, final=True)
        totals.selected = total
        status = "failed" if (errors or timed_out) else "finished"
        message = totals.text() + (f"; {len(errors)} batches raised" if errors else "") + \
            ("; timed out waiting" if timed_out else "")
        inference.finish_inference_run(engine, run_id, totals, status=status, message=message)
        promotion = registry.promote_pending(engine) if status == "finished" else registry.Promotion()
    except inference.NoModelError as error:
        print(f"infer: {error}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    summary = {"run_id": run_id, "model_version": version, "selected": total,
               "done": totals.done, "flagged": totals.flagged, "failed": totals.failed,
               "batch_errors": len(errors), "timed_out": timed_out,
               "failure_reasons": totals.reasons,
               "promoted": promotion.version if promotion.promoted else None}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"infer {version} [run {run_id}]: {total} spectra, done {totals.done} "
              f"(flagged {totals.flagged}), failed {totals.failed}"
              + (f", {len(errors)} batches raised" if errors else "")
              + (", TIMED OUT (batches still queued)" if timed_out else ""))
        for reason, count in sorted(totals.reasons.items(), key=lambda kv: -kv[1])[:10]:
            print(f"  failed {count:>7} x {reason}")
    for error in errors[:5]:
        print(f"batch error: {error}", file=sys.stderr)
    _report_promotion(promotion)
    return 1 if (errors or timed_out) else 0


def _report_promotion(promotion):
    if promotion.version is not None:
        print(f"infer: {promotion.text()}", file=sys.stderr)


def _stall_seconds(settings):
    """How long without a finished batch before the unfinished ones are sent again.

    A worker killed between taking a message from Redis and recording it as unacknowledged
    loses that message (kombu's Redis transport has no atomic hand-over): no visibility
    timeout brings it back. A message held by a dead worker comes back after the
    visibility timeout (which must exceed the longest batch); twice that with no progress,
    and nothing of the queue left in the broker (when it can tell), means a batch is lost,
    not slow. Sending it again is safe: a task rewrites the same rows of the same spectra."""
    return 2 * settings.visibility_timeout_s + 10


def lost_messages_may_be_queued():
    """Whether the broker may still hold the unfinished batches: then they are slow, not
    lost (workers busy elsewhere or stopped). A broker that cannot tell (not Redis, whose
    hand-over is the one that loses messages) is taken to hold them."""
    from etl.tasks import messages_in_broker

    held = messages_in_broker()
    return held is None or held > 0


def _wait(pending, totals, errors, progress, timeout, resend=None, stall_seconds=None):
    """Collect task results as they finish; returns (batches finished, timed out).

    ``pending``: (async result, size, obsids) per batch. After ``stall_seconds`` without a
    finished batch, when the broker holds none of the queue's messages, every unfinished
    one is sent again with ``resend(obsids)`` (see ``_stall_seconds``)."""
    from etl.inference import BatchResult

    deadline = None if timeout is None else time.monotonic() + timeout
    last_progress = time.monotonic()
    finished = 0
    while pending:
        still = []
        checked = 0
        for async_result, size, obsids in pending:
            # Check at most 500 results per sweep: a big run has thousands queued.
            if checked < 500 and async_result.ready():
                try:
                    totals += BatchResult.from_dict(async_result.get(propagate=True))
                except Exception as error:  # noqa: BLE001 -- reported, the run goes on
                    errors.append(f"{type(error).__name__}: {error}")
                finished += 1
                last_progress = time.monotonic()
                async_result.forget()
            else:
                still.append((async_result, size, obsids))
            checked += 1
        pending[:] = still
        progress.update(finished, totals)
        if pending:
            now = time.monotonic()
            if deadline is not None and now > deadline:
                return finished, True
            if resend is not None and stall_seconds is not None and now - last_progress > stall_seconds:
                if not lost_messages_may_be_queued():
                    print(f"infer: no batch finished for {stall_seconds:.0f} s and the broker "
                          f"holds none of them; sending the {len(pending)} unfinished batches "
                          "again (messages lost with a killed worker)", file=sys.stderr)
                    pending[:] = [(resend(list(obsids)), size, obsids) for _, size, obsids in pending]
                last_progress = now            # look again after another stall, not at once
            time.sleep(0.25)
    return finished, False


# ---------------------------------------------------------------------------------------
def _require_broker(what):
    from etl import tasks

    if tasks.app.conf.task_always_eager:
        print(f"{what}: LAMOST_VAC_BROKER_URL is not set, so tasks run inside 'lamost-vac "
              "infer' (eager mode) and no worker is needed; set it (e.g. "
              "redis://127.0.0.1:6379/0) to use workers", file=sys.stderr)
        return False
    return True


def register_worker(subparsers):
    parser = subparsers.add_parser(
        "worker", help="start a Celery worker for the inference tasks",
        description="A Celery worker (prefork pool) of the etl.tasks app; the same as "
        "'celery -A etl.tasks worker'. Run one per machine, --concurrency = cores.")
    parser.add_argument("--concurrency", "-c", type=positive_int, default=None,
                        help="worker processes (default: cores)")
    parser.add_argument("--pool", default="prefork", help="prefork (default), solo, threads")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--hostname", "-n", default=None, help="node name, e.g. w1@%%h")
    parser.add_argument("--queues", "-Q", default=None, help="queues to consume (default: celery)")
    parser.set_defaults(func=run_worker)


def run_worker(args):
    from etl import tasks

    if not _require_broker("worker"):
        return 2
    argv = ["worker", f"--loglevel={args.loglevel}", f"--pool={args.pool}"]
    if args.concurrency:
        argv.append(f"--concurrency={args.concurrency}")
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    if args.queues:
        argv.append(f"--queues={args.queues}")
    tasks.app.worker_main(argv)
    return 0


def register_beat(subparsers):
    parser = subparsers.add_parser(
        "beat", help="start the scheduler that estimates stale spectra and switches model versions",
        description="Celery beat: every LAMOST_VAC_REPROCESS_INTERVAL_S seconds (default "
        "3600) it queues reprocess_stale, which makes a pending model version current once "
        "it has estimated every spectrum the current one serves, then dispatches the spectra "
        "without an estimate from the pending version (if any, else the current one). Run "
        "exactly one beat per deployment.")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--schedule-file", default=os.path.join("runs", "celerybeat-schedule"),
                        help="where beat keeps its last-run times (default %(default)s)")
    parser.set_defaults(func=run_beat)


def run_beat(args):
    from etl import tasks

    if not _require_broker("beat"):
        return 2
    folder = os.path.dirname(os.path.abspath(args.schedule_file))
    os.makedirs(folder, exist_ok=True)
    tasks.app.start(["beat", f"--loglevel={args.loglevel}",
                     f"--schedule={args.schedule_file}"])
    return 0


# ---------------------------------------------------------------------------------------
def register_export(subparsers):
    parser = subparsers.add_parser(
        "export", help="write the value-added catalogue (CSV, FITS or VOTable)",
        description="The estimates of one model version (default: the current one) with "
        "position and SNRg, units, UCDs and descriptions from the schema.")
    parser.add_argument("--format", choices=["csv", "fits", "votable"], required=True)
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--model", default=None, help="model version (default: current)")
    add_url_argument(parser)
    parser.set_defaults(func=run_export)


def run_export(args):
    from etl.export import ExportTargetError, export_catalogue
    from etl.inference import NoModelError

    engine = db.make_engine(database_url(args))
    try:
        info = export_catalogue(engine, args.out, args.format, args.model)
    except (NoModelError, ExportTargetError) as error:
        print(f"export: {error}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(f"exported {info['rows']} estimates of {info['model_version']} -> {args.out}",
          file=sys.stderr)
    return 0
