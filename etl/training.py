"""``lamost-vac train``: the reference set from the database, training, the model registry.

Reference set: every STAR spectrum with a file whose best cross-match (``match_rank = 1``:
the nearest reference star of the label set within the cross-match radius, as TOPCAT's
best-match mode) is a star with a good label (``good_flag = 1`` and Teff, log g, [Fe/H]
present). As in ``train-files``, the nearest star is chosen among *all* reference stars
before bad labels are dropped, so a spectrum whose own star has a bad label never
borrows a neighbour's labels. Of those, only the labels inside ``label_domain`` (by
default the method's valid domain, :mod:`etl.label_domain`) train the model.

The recipe (featurise, LASSO + MLP ensembles, calibration on cross-fitted predictions) is the one of
``train-files`` (:func:`models.training.train_lasso_mlpnet`). The artifact goes to
``LAMOST_VAC_MODEL_DIR/<version>.joblib``; the models row is registered by
:func:`etl.registry.register_model`: ``pending`` while another version is current, or
``current`` at once (``--activate``).
"""
import os
import sys
from dataclasses import dataclass, field
from typing import Optional, Tuple

import numpy as np
from sqlalchemy import and_, func, select

from etl import schema
from etl.inference import spectra_for, star_condition
from etl.label_domain import (DEFAULT_LABEL_DOMAIN, format_label_domain, parse_label_domain,
                              select_label_domain)
from etl.registry import register_model
from models.artifact import new_model_version, save_model
from models.augment import DEFAULT_DEGRADED_COPIES, featurise_degraded_copies
from models.labels import LABELS
from models.pipeline import featurise_files, unfit_for_training
from models.preprocess import PreprocessConfig
from models.progress import progress
from models.report import describe_label_domain
from models.training import DEFAULT_TRAINING_SNR, train_lasso_mlpnet


@dataclass
class TrainOptions:
    snr_range: Tuple[float, float] = DEFAULT_TRAINING_SNR
    wave_range: Tuple[float, float] = (3881.0, 8890.0)
    ensemble: int = 10
    holdout: float = 0.0            # 0: calibrate on cross-fitted predictions (models.training)
    degraded_copies: int = DEFAULT_DEGRADED_COPIES      # per spectrum above SNRg 20 (models.augment)
    seed: int = 0
    label_set: Optional[str] = None
    model_dir: str = "runs/models"
    spectra_root: Optional[str] = None
    jobs: int = -1
    model_params: dict = field(default_factory=dict)    # e.g. max_epochs, cv (quick trials)
    notes: Optional[str] = None
    activate: str = "when-estimated"                    # register_model's
    # label -> (low, high), None = open side; {} = every label (etl.label_domain)
    label_domain: dict = field(default_factory=lambda: parse_label_domain(DEFAULT_LABEL_DOMAIN))
    preprocess: Optional[PreprocessConfig] = None       # default: the defaults over wave_range


def label_sets_matched(connection):
    return [row[0] for row in connection.execute(
        select(schema.crossmatch.c.label_set).where(schema.crossmatch.c.match_rank == 1)
        .distinct().order_by(schema.crossmatch.c.label_set))]


def reference_set(connection, label_set=None, spectra_root=None):
    """The reference set as a dict of arrays (obsid, path, z, snrg, apogee_id, teff, logg,
    feh) and the label set it came from."""
    sets = label_sets_matched(connection)
    if label_set is None:
        if not sets:
            raise ValueError("the crossmatch table is empty: run 'lamost-vac ingest labels' and "
                             "'lamost-vac crossmatch' first")
        if len(sets) > 1:
            raise ValueError(f"several label sets are cross-matched ({', '.join(sets)}): "
                             "choose one with --label-set")
        label_set = sets[0]
    x, labels, s = schema.crossmatch, schema.reference_labels, schema.spectra
    rows = connection.execute(
        select(x.c.obsid, x.c.apogee_id, labels.c.teff, labels.c.logg, labels.c.feh, s.c.ra, s.c.dec)
        .select_from(x.join(labels, labels.c.label_id == x.c.label_id)
                     .join(s, s.c.obsid == x.c.obsid))
        .where(and_(x.c.match_rank == 1, x.c.label_set == label_set, labels.c.good_flag == 1,
                    labels.c.teff.is_not(None), labels.c.logg.is_not(None),
                    labels.c.feh.is_not(None), s.c.file_path.is_not(None), star_condition()))
        .order_by(x.c.obsid)).all()
    if not rows:
        raise ValueError(f"no STAR spectrum with a file is best-matched to a good label of "
                         f"{label_set!r}")
    files = {obsid: (path, z, snrg) for obsid, path, z, snrg in
             spectra_for(connection, [r[0] for r in rows], spectra_root)}
    data = {
        "obsid": np.array([r[0] for r in rows], dtype=np.int64),
        "apogee_id": np.array([r[1] for r in rows], dtype=str),
        "teff": np.array([r[2] for r in rows], dtype=float),
        "logg": np.array([r[3] for r in rows], dtype=float),
        "feh": np.array([r[4] for r in rows], dtype=float),
        "radec": np.array([(r[5], r[6]) for r in rows], dtype=float),
    }
    data["path"] = [files[int(o)][0] for o in data["obsid"]]
    data["z"] = np.array([np.nan if files[int(o)][1] is None else files[int(o)][1]
                          for o in data["obsid"]], dtype=float)
    data["snrg"] = np.array([np.nan if files[int(o)][2] is None else files[int(o)][2]
                             for o in data["obsid"]], dtype=float)
    return data, label_set


def crossmatch_radius(connection, label_set):
    return connection.execute(select(func.max(schema.crossmatch.c.radius_arcsec))
                              .where(schema.crossmatch.c.label_set == label_set)).scalar()


def unique_version(connection, version):
    """``version``, or ``version-2``, ``-3``... when a model of that name exists already."""
    taken = {row[0] for row in connection.execute(
        select(schema.models.c.version).where(schema.models.c.version.like(f"{version}%")))}
    candidate, n = version, 1
    while candidate in taken:
        n += 1
        candidate = f"{version}-{n}"
    return candidate


def json_safe(value):
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def train_with_degraded_copies(paths, z, features, labels, snrg, stars, obsids, positions,
                               degraded_copies, config, seed, n_jobs, **train_options):
    """``degraded_copies`` low-S/N copies of each usable spectrum (``features`` finite; ``z``
    the redshift its features were made with; see :mod:`models.augment`), then
    :func:`models.training.train_lasso_mlpnet` on the spectra and their copies, with
    progress bars; what ``train`` and ``train-files`` share."""
    copies = featurise_degraded_copies(
        paths, z, snrg, degraded_copies, config,
        usable=np.isfinite(features).all(axis=1), seed=seed, n_jobs=n_jobs,
        progress=lambda it, total: progress(it, total, "degraded copies"))
    return train_lasso_mlpnet(
        features, labels, snrg, stars, obsids, random_state=seed, n_jobs=n_jobs,
        progress=lambda it, total: progress(it, total, "training networks"),
        positions=positions, copies=copies, **train_options)


def train_from_database(engine, options: TrainOptions, log=None):
    """Build the reference set, train, save the artifact and register it; returns a dict
    with version, artifact, sha256, n_train and metrics.

    ``jobs > 0`` also caps BLAS threads at ``jobs`` (``--jobs 1``: one core, no
    oversubscription when other processes share the machine).
    """
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    limit = threadpool_limits(limits=options.jobs, user_api="blas") if options.jobs > 0 \
        else nullcontext()
    with limit:
        return _train(engine, options, log or sys.stderr)


def _train(engine, options, log):
    config = options.preprocess or PreprocessConfig(wave_min=options.wave_range[0],
                                                    wave_max=options.wave_range[1])
    with engine.connect() as connection:
        data, label_set = reference_set(connection, options.label_set, options.spectra_root)
        radius = crossmatch_radius(connection, label_set)
    n_reference, n_reference_stars = len(data["obsid"]), len(set(data["apogee_id"]))
    inside, domain_record = select_label_domain(data, options.label_domain)
    data = {k: ([v[i] for i in np.flatnonzero(inside)] if isinstance(v, list) else v[inside])
            for k, v in data.items()}
    print(f"reference set: {n_reference} spectra of {n_reference_stars} "
          f"stars best-matched to good {label_set} labels; training on "
          f"{describe_label_domain(domain_record)}", file=log)
    if not len(data["obsid"]):
        raise ValueError(f"no reference spectrum has labels inside the label domain "
                         f"{format_label_domain(options.label_domain)} (--label-domain)")
    feature_set = featurise_files(
        data["path"], data["z"], config, n_jobs=options.jobs,
        progress=lambda it, total: progress(it, total, "preprocessing"))
    features, errors = feature_set.features, feature_set.errors
    for index, reason in sorted(errors.items())[:20]:
        print(f"skipped obsid {data['obsid'][index]}: {reason}", file=log)
    if len(errors) > 20:
        print(f"... {len(errors) - 20} more unreadable spectra skipped", file=log)
    unfit, excluded = unfit_for_training(feature_set)      # the reference set is STAR only
    features[unfit] = np.nan
    if unfit.any():
        print(f"not trained on: {excluded['suspicious_redshift']} spectra with a suspicious "
              f"redshift", file=log)
    model, training, metrics = train_with_degraded_copies(
        data["path"], feature_set.z, features, {k: data[k] for k in LABELS}, data["snrg"],
        data["apogee_id"], data["obsid"], data["radec"], options.degraded_copies, config,
        seed=options.seed, n_jobs=options.jobs, snr_range=options.snr_range,
        holdout_fraction=options.holdout, n_members=options.ensemble, **options.model_params)
    training.update(source="database", label_set=label_set, radius_arcsec=radius,
                    reference_spectra=n_reference, unreadable=len(errors), excluded=excluded,
                    **domain_record,
                    seed=options.seed, n_members=options.ensemble,
                    model_params=dict(options.model_params),
                    wave_range=list(options.wave_range))
    with engine.connect() as connection:
        version = unique_version(connection, new_model_version(training))
    path = os.path.join(os.path.abspath(options.model_dir), f"{version}.joblib")
    version, sha = save_model(path, model, config, training, metrics, version=version)
    status = register_model(engine, version, path, sha, json_safe(training), json_safe(metrics),
                            options.notes, activate=options.activate)
    return {"version": version, "status": status, "artifact": path, "sha256": sha,
            "n_train": training["n_spectra"], "metrics": metrics}
