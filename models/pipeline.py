"""From spectrum files to features, on all cores.

Reading and preprocessing run in worker processes, a chunk of files per task, so the
parent only receives the (n, n_pixels) float32 feature block of each chunk.
"""
import os

import numpy as np
from joblib import Parallel, delayed

from .preprocess import PreprocessConfig, preprocess_spectra
from .readers import SpectrumReadError, read_spectrum


def _featurise_chunk(paths, z, config):
    spectra, z_ok, rows, errors = [], [], [], {}
    for i, (path, redshift) in enumerate(zip(paths, z)):
        try:
            spectra.append(read_spectrum(path))
        except SpectrumReadError as error:
            errors[i] = error.reason
            continue
        z_ok.append(redshift if np.isfinite(redshift) else 0.0)
        rows.append(i)
    features = np.full((len(paths), config.loglam.size), np.nan, dtype=np.float32)
    good_fraction = np.zeros(len(paths))
    if spectra:
        features[rows], good_fraction[rows] = preprocess_spectra(spectra, np.array(z_ok), config)
    return features, good_fraction, errors


def featurise_files(paths, z, config=PreprocessConfig(), n_jobs=-1, chunk_size=256, progress=None):
    """Read and preprocess spectrum files.

    Returns ``(features, good_fraction, errors)``: features (n, n_pixels) float32 with NaN
    rows for files that could not be read or normalised, and ``errors`` mapping the index
    of each unreadable file to the reason.
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
    features = np.empty((len(paths), config.loglam.size), dtype=np.float32)
    good_fraction = np.empty(len(paths))
    errors = {}
    for start, (f, g, e) in zip(starts, results):
        features[start:start + len(f)] = f
        good_fraction[start:start + len(g)] = g
        errors.update({start + i: reason for i, reason in e.items()})
    return features, good_fraction, errors
