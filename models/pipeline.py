"""From spectrum files to features, on all cores.

Reading and preprocessing run in worker processes, a chunk of files per task, so the
parent only receives the (n, n_pixels) float32 feature block of each chunk (and its mask
of filled pixels).

Redshift: the one given (the catalogue's) is used; when it is missing (NaN, empty or the
LAMOST sentinel -9999) the file header's ``Z`` is used instead, if usable. A spectrum with
neither is not estimated (``NO_USABLE_REDSHIFT``, never z = 0: a wrong rest frame moves
every line); one with |c z| above ``MAX_STELLAR_CZ_KMS`` is estimated and flagged
``SUSPICIOUS_REDSHIFT``. The same rule holds for every command, since all of them go
through :func:`featurise_files`.
"""
import os
from dataclasses import dataclass, field

import numpy as np
from joblib import Parallel, delayed

from .flags import (NO_USABLE_REDSHIFT, SUSPICIOUS_REDSHIFT, UNUSABLE_SPECTRUM, catalogue_flags,
                    missing_value, redshift_flags)
from .preprocess import INSTRUMENT_REGIONS, PreprocessConfig, preprocess_spectra
from .readers import SpectrumReadError, read_spectrum


@dataclass
class FeatureSet:
    """What :func:`featurise_files` returns.

    Iterating gives ``(features, good_fraction, errors)`` (the original return value).

    features : (n, n_pixels) float32, NaN rows for spectra not estimable
    good_fraction : (n,) share of pixels with usable data
    errors : {row: reason} for unreadable files
    masked : (n, n_pixels) bool, pixels whose feature is a fill (masked data)
    flags : (n,) int64, flags known before any model: NO_USABLE_REDSHIFT, SUSPICIOUS_REDSHIFT
    problems : {row: reason} for every row not estimable (unreadable, no usable redshift)
    z : (n,) the redshift used (NaN where none)
    """

    features: np.ndarray
    good_fraction: np.ndarray
    errors: dict
    masked: np.ndarray
    flags: np.ndarray
    problems: dict = field(default_factory=dict)
    z: np.ndarray = None
    min_good_fraction: float = PreprocessConfig.min_good_fraction

    def __iter__(self):
        return iter((self.features, self.good_fraction, self.errors))


def _shown(value):
    return "missing" if value is None or missing_value(value) else f"= {value:g}"


def redshift_to_use(catalogue_z, header_z):
    """The redshift each spectrum is shifted with: the catalogue's, or the file header's
    ``Z`` where the catalogue has no usable one (README: which z is used). Arrays; NaN in
    ``header_z`` means the header has none. Check the result with ``redshift_flags``."""
    catalogue_z, header_z = np.asarray(catalogue_z, dtype=float), np.asarray(header_z, dtype=float)
    from_header = (redshift_flags(catalogue_z) & NO_USABLE_REDSHIFT != 0) & ~np.isnan(header_z)
    return np.where(from_header, header_z, catalogue_z)


def _featurise_chunk(paths, z, config):
    n = len(paths)
    z = np.asarray(z, dtype=float)
    spectra, rows, errors, problems = [], [], {}, {}
    header_z = np.full(n, np.nan)
    for i, path in enumerate(paths):
        try:
            spectrum = read_spectrum(path)
        except SpectrumReadError as error:
            errors[i] = problems[i] = error.reason
            continue
        if spectrum.meta.get("z") is not None:
            header_z[i] = spectrum.meta["z"]
        spectra.append(spectrum)
        rows.append(i)
    z_used = np.full(n, np.nan)
    z_used[rows] = redshift_to_use(z[rows], header_z[rows])
    flags = np.zeros(n, dtype=np.int64)
    flags[rows] = redshift_flags(z_used[rows])
    for i in rows:
        if flags[i] & NO_USABLE_REDSHIFT:
            problems[i] = (f"no usable redshift (catalogue z {_shown(z[i])}, header Z "
                           f"{_shown(header_z[i])}): not estimated")
    keep = [k for k, i in enumerate(rows) if not flags[i] & NO_USABLE_REDSHIFT]
    rows = [rows[k] for k in keep]
    features = np.full((n, config.loglam.size), np.nan, dtype=np.float32)
    masked = np.ones((n, config.loglam.size), dtype=bool)
    good_fraction = np.zeros(n)
    if rows:
        features[rows], good_fraction[rows], masked[rows] = preprocess_spectra(
            [spectra[k] for k in keep], z_used[rows], config, return_masked=True)
    return features, good_fraction, errors, masked, flags, problems, z_used


def featurise_files(paths, z, config=PreprocessConfig(), n_jobs=-1, chunk_size=256, progress=None):
    """Read and preprocess spectrum files; returns a :class:`FeatureSet`.

    ``z``: the catalogue redshift per file (NaN or -9999 where missing; see the module doc).
    ``features, good_fraction, errors = featurise_files(...)`` still works.
    """
    paths = [os.fspath(p) for p in paths]
    z = np.asarray(z, dtype=float)
    starts = list(range(0, len(paths), chunk_size))
    jobs = (delayed(_featurise_chunk)(paths[s:s + chunk_size], z[s:s + chunk_size], config) for s in starts)
    if n_jobs == 1 or len(starts) <= 1:
        results = [job[0](*job[1], **job[2]) for job in jobs]
    else:
        results = Parallel(n_jobs=n_jobs, return_as="generator")(jobs)
    if progress is not None:
        results = progress(results, total=len(starts))
    n, p = len(paths), config.loglam.size
    out = FeatureSet(np.empty((n, p), dtype=np.float32), np.empty(n), {}, np.empty((n, p), dtype=bool),
                     np.zeros(n, dtype=np.int64), {}, np.empty(n), config.min_good_fraction)
    for start, (f, g, e, m, fl, pr, zu) in zip(starts, results):
        stop = start + len(f)
        out.features[start:stop], out.good_fraction[start:stop], out.masked[start:stop] = f, g, m
        out.flags[start:stop], out.z[start:stop] = fl, zu
        out.errors.update({start + i: reason for i, reason in e.items()})
        out.problems.update({start + i: reason for i, reason in pr.items()})
    return out


def unfit_for_training(feature_set, classes=None):
    """Rows whose features exist but must not train a model: a suspicious redshift (|c z|
    beyond ``MAX_STELLAR_CZ_KMS``: a wrong z, or not a star) or a catalogue class other
    than STAR (``classes``, when known). Returns (mask, {reason: count})."""
    suspicious = (feature_set.flags & SUSPICIOUS_REDSHIFT) != 0
    not_star = np.zeros(suspicious.size, dtype=bool) if classes is None else \
        np.char.upper(np.char.strip(np.asarray(classes, dtype=str))) != "STAR"
    return suspicious | not_star, {"suspicious_redshift": int(suspicious.sum()),
                                   "not_star": int(not_star.sum())}


def selected_pixels_by_region(model, config):
    """For every known instrument region (``preprocess.INSTRUMENT_REGIONS``): its limits,
    whether ``config`` masks it, and how many of each label's LASSO-selected pixels have a
    rest wavelength inside it (a star's |z| < 0.002 shifts a region by < 20 A)."""
    wavelength = config.wavelength
    masked = {name for name, _, _ in config.masked_regions}
    out = {}
    for name, (low, high) in INSTRUMENT_REGIONS.items():
        inside = (wavelength >= low) & (wavelength <= high)
        out[name] = {"range": [low, high], "masked": name in masked, "pixels": int(inside.sum()),
                     **{label: int(np.sum(e.support_ & inside)) for label, e in model.estimators_.items()}}
    return out


def predict_features(model, feature_set, snrg, subclass=None, teff=None, feh=None):
    """``model.predict`` on a :class:`FeatureSet` with every flag: the model's (domain,
    SNRg, masked selected pixels, out-of-distribution), the redshift's and the catalogue's
    (LASP ``subclass``, ``teff``, ``feh`` where given).

    Adds ``problem`` (row -> reason) for the spectra not estimated: unreadable, no usable
    redshift, too few usable pixels. A spectrum without a usable redshift carries
    NO_USABLE_REDSHIFT, not UNUSABLE_SPECTRUM: its pixels were never looked at.
    """
    features = feature_set.features
    out = model.predict(features, snrg, masked=feature_set.masked)
    flags = out["flags"] | feature_set.flags | catalogue_flags(len(features), subclass, teff, feh)
    no_redshift = (feature_set.flags & NO_USABLE_REDSHIFT) != 0
    out["flags"] = np.where(no_redshift, flags & ~UNUSABLE_SPECTRUM, flags)
    problem = dict(feature_set.problems)
    for i in np.flatnonzero(out["flags"] & UNUSABLE_SPECTRUM).tolist():
        problem.setdefault(i, f"too few usable pixels after preprocessing (good fraction "
                              f"{feature_set.good_fraction[i]:.2f} < {feature_set.min_good_fraction})")
    out["problem"] = problem
    return out
