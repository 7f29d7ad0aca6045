"""Low-S/N copies of high-S/N training spectra, made from their own noise.

A star observed at SNRg 60 says as much about its labels as it ever will; the networks
must still learn to read stars at SNRg 5-20, where most LAMOST spectra are. A copy of the
high-S/N spectrum with more noise added is a realistic low-S/N observation of the same
star: the noise added to each pixel follows the spectrum's own inverse variance (the blue
end and the line cores noisier, as observed), not one level for every pixel.

To scale a spectrum's S/N from ``s`` to ``s / f`` (``f >= 1``), Gaussian noise of variance
``(f**2 - 1) / ivar`` is added to each pixel and ``ivar`` is divided by ``f**2``: the
copy's total noise variance is ``f**2 / ivar``. Pixels without data (``ivar == 0``) are
left as they are.
"""
import dataclasses

import numpy as np
from joblib import Parallel, delayed

from .preprocess import preprocess_spectra
from .readers import SpectrumReadError, read_spectrum

# S/N of the copies: the range where the catalogue's estimates are hardest and most
# numerous (the paper's 10-20 and the 5-10 below it)
COPY_SNR_RANGE = (5.0, 20.0)
# Copies per spectrum above that range: chosen by star-grouped CV on the training stars of
# the reference split (README, "Degraded copies")
DEFAULT_DEGRADED_COPIES = 24
# At most this many copies in all (~1.4 GB of float32 features at 3,600 pixels): a
# reference set of DR8 size has ~10^5 spectra above SNRg 20 and needs fewer copies of each
MAX_COPIES = 100_000


def degrade_spectrum(spectrum, factor, rng):
    """A copy of ``spectrum`` (a :class:`models.readers.Spectrum`) whose noise is ``factor``
    (>= 1) times larger, drawn with ``rng``."""
    if not factor >= 1:
        raise ValueError(f"noise factor must be >= 1, got {factor}")
    ivar = np.asarray(spectrum.ivar, dtype=np.float64)
    with np.errstate(divide="ignore"):
        sigma = np.where(ivar > 0, np.sqrt((factor ** 2 - 1) / ivar), 0.0)
    flux = spectrum.flux + rng.standard_normal(sigma.size) * sigma
    return dataclasses.replace(spectrum, flux=flux.astype(np.float32),
                               ivar=(ivar / factor ** 2).astype(np.float32))


def degraded_copies(snrg, n_copies, snr_range=COPY_SNR_RANGE, rng=None, max_copies=MAX_COPIES):
    """Plan ``n_copies`` copies, with S/N inside ``snr_range``, of every spectrum whose
    S/N is above it; fewer where that would exceed ``max_copies`` in all (as many per
    spectrum as fit, or one each of a random subset of the spectra).

    ``snrg``: (n,) the spectra's S/N. Each copy's target S/N is drawn log-uniformly over
    the range. Returns ``(source, factor)``: the row index of each copy's source (the
    copies of one source are consecutive) and the factor its noise is multiplied by (the
    copy's S/N is ``snrg[source] / factor``).
    """
    rng = np.random.default_rng(rng)
    snrg = np.asarray(snrg, dtype=float)
    low, high = snr_range
    sources = np.flatnonzero(snrg > high)
    if sources.size * n_copies > max_copies:
        n_copies = max_copies // sources.size
        if n_copies == 0:
            sources, n_copies = np.sort(rng.choice(sources, max_copies, replace=False)), 1
    source = np.repeat(sources, n_copies)
    target = np.exp(rng.uniform(np.log(low), np.log(high), source.size))
    return source, snrg[source] / target


@dataclasses.dataclass
class DegradedCopies:
    """Features of degraded copies (:func:`featurise_degraded_copies`).

    source : (m,) row (of the spectra they were made from) of each copy's source
    snrg : (m,) each copy's S/N
    features : (m, n_pixels) float32, NaN rows for copies that could not be made
    per_spectrum, snr_range : how they were planned
    """

    source: np.ndarray
    snrg: np.ndarray
    features: np.ndarray
    per_spectrum: int
    snr_range: tuple

    def first(self, n):
        """The first ``n`` copies of every source (all of them when ``n >= per_spectrum``)."""
        run_start = np.r_[0, np.flatnonzero(np.diff(self.source)) + 1]
        rank = np.arange(self.source.size) - np.repeat(run_start, np.diff(np.r_[run_start, self.source.size]))
        keep = rank < n
        return dataclasses.replace(self, source=self.source[keep], snrg=self.snrg[keep],
                                   features=self.features[keep], per_spectrum=min(n, self.per_spectrum))


def _featurise_copies(paths, z, factor, seeds, config):
    spectra, rows, cache = [], [], {}
    for i, (path, f, seed) in enumerate(zip(paths, factor, seeds)):
        try:
            original = cache[path] if path in cache else cache.setdefault(path, read_spectrum(path))
        except SpectrumReadError:
            continue
        spectra.append(degrade_spectrum(original, f, np.random.default_rng(seed)))
        rows.append(i)
    features = np.full((len(paths), config.loglam.size), np.nan, dtype=np.float32)
    if rows:
        features[rows], _ = preprocess_spectra(spectra, np.asarray(z, dtype=float)[rows], config)
    return features


def featurise_degraded_copies(paths, z, snrg, per_spectrum, config, snr_range=COPY_SNR_RANGE,
                              usable=None, seed=0, n_jobs=-1, chunk_size=128, progress=None):
    """``per_spectrum`` degraded copies (S/N inside ``snr_range``) of every spectrum above
    that range, preprocessed with ``config``; returns :class:`DegradedCopies`.

    ``z``: the redshift each spectrum was shifted with (``FeatureSet.z``); ``usable``:
    (n,) bool, the spectra that may be copied (default all). Each copy's noise is drawn
    from its own seed, so the result does not depend on ``n_jobs`` or the chunking.
    """
    paths = [str(p) for p in paths]
    snrg = np.asarray(snrg, dtype=float)
    if usable is not None:
        snrg = np.where(usable, snrg, np.nan)
    source, factor = degraded_copies(snrg, per_spectrum, snr_range, rng=seed)
    seeds = [[seed, k] for k in range(source.size)]
    z = np.asarray(z, dtype=float)
    starts = range(0, source.size, chunk_size)
    jobs = [delayed(_featurise_copies)([paths[i] for i in source[s:s + chunk_size]], z[source[s:s + chunk_size]],
                                       factor[s:s + chunk_size], seeds[s:s + chunk_size], config)
            for s in starts]
    blocks = Parallel(n_jobs=n_jobs, return_as="generator")(jobs) if n_jobs != 1 and len(jobs) > 1 \
        else (j[0](*j[1]) for j in jobs)
    if progress is not None:
        blocks = progress(blocks, total=len(jobs))
    features = np.empty((source.size, config.loglam.size), dtype=np.float32)
    for start, block in zip(starts, blocks):
        features[start:start + len(block)] = block
    return DegradedCopies(source, snrg[source] / factor, features, per_spectrum, tuple(snr_range))
