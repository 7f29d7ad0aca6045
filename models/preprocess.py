"""Preprocessing of LAMOST spectra for LASSO-MLPNet, vectorised over batches of spectra.

The steps follow Li et al. (MNRAS), section 3:

0. (not in the paper) pixels standing out of the running median of the observed pixels by
   ``despike_sigma`` of their noise -- cosmic-ray hits, which LAMOST marks in the or-mask
   only -- are masked (:func:`cosmic_ray_spikes`);
1. shift to the rest frame with the catalogue redshift and resample linearly onto a common
   log10(lambda) grid (step 1e-4, 3881-8890 A by default);
2. median filter of width 3 (it does not remove a single observed pixel's spike: the
   resampling has spread it over two pixels);
3. pseudo-continuum: an iteratively sigma-clipped 6th-order polynomial;
4. divide the spectrum by its pseudo-continuum.

Every function takes 2-D arrays, one row per spectrum. Masked pixels (ivar = 0 or any
and-mask bit set) never enter a fit or a neighbour's value: they are bridged by linear
interpolation between the nearest good pixels, and their feature is that bridged flux
over the continuum -- a masked line core reads as the depth of the line's wings, not as
"no line" (which a fill of 1 would claim).

Instrument regions: pixels whose *observed* wavelength lies in one of
``PreprocessConfig.masked_regions`` are treated like masked pixels. By default these are
the blue/red dichroic overlap and the two strongest telluric bands (O2 B and A);
``INSTRUMENT_REGIONS`` lists the others that can be added (water bands, the sky-line
forest). The list is part of the configuration, so of its hash and of every artifact.

Continuum: one polynomial over the whole range, as in the paper (``continuum="single"``,
the default), or one per spectrograph arm (``"per-arm"``, split at ``arm_split``); the
measurement that chose the default is in the README ("Preprocessing options").
"""
import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np
from numpy.polynomial import legendre


# Observed-frame (vacuum, Angstrom) regions where LAMOST data are unreliable for reasons of
# the instrument or the atmosphere, not of the star.
INSTRUMENT_REGIONS = {
    "dichroic": (5700.0, 5900.0),       # blue/red arm overlap: two calibrations meet
    "O2 B": (6860.0, 6890.0),           # telluric oxygen bands
    "O2 A": (7590.0, 7700.0),
    "H2O 7200": (7160.0, 7340.0),       # telluric water bands
    "H2O 8200": (8130.0, 8350.0),
    "sky forest": (8300.0, 9100.0),     # OH sky-line residuals
}
DEFAULT_MASKED_REGIONS = tuple((name, *INSTRUMENT_REGIONS[name])
                               for name in ("dichroic", "O2 B", "O2 A"))
CONTINUUM_MODES = ("single", "per-arm")


def masked_regions_from_names(names):
    """``"dichroic,O2 A"`` or a list of names -> a ``masked_regions`` tuple; "" or "none" -> ()."""
    if isinstance(names, str):
        names = [] if names.strip().lower() in ("", "none") else names.split(",")
    out = []
    for name in names:
        name = name.strip()
        if name not in INSTRUMENT_REGIONS:
            raise ValueError(f"unknown instrument region {name!r}; known: "
                             f"{', '.join(INSTRUMENT_REGIONS)}")
        out.append((name, *INSTRUMENT_REGIONS[name]))
    return tuple(out)


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that determines the features; its hash is part of every estimate's provenance."""

    wave_min: float = 3881.0          # Angstrom, rest frame, vacuum
    wave_max: float = 8890.0
    dloglam: float = 1e-4             # log10 step of the common grid (LAMOST's own step)
    median_width: int = 3
    continuum_order: int = 6
    continuum_iterations: int = 5
    clip_low: float = 1.5             # absorption lines lie below the continuum: clip them harder
    clip_high: float = 3.0
    min_good_fraction: float = 0.5    # below this the spectrum is not usable
    # (name, low, high) in observed-frame Angstrom, treated as masked pixels
    masked_regions: tuple = DEFAULT_MASKED_REGIONS
    continuum: str = "single"         # or "per-arm": one polynomial per spectrograph arm
    arm_split: float = 5800.0         # rest-frame Angstrom between the arms (inside the dichroic)
    # single- and two-pixel spikes this many sigma (from ivar) and this fraction of the
    # flux above the running median of five observed pixels are masked (cosmic rays;
    # despike_sigma 0: none, the paper's recipe)
    despike_sigma: float = 5.0
    despike_min_fraction: float = 0.3

    def __post_init__(self):
        if self.continuum not in CONTINUUM_MODES:
            raise ValueError(f"continuum must be one of {CONTINUUM_MODES}, got {self.continuum!r}")
        # stored as nested tuples whatever came in (lists from JSON), so equal configs hash equal
        object.__setattr__(self, "masked_regions", tuple(
            (str(name), float(low), float(high)) for name, low, high in self.masked_regions))

    def __setstate__(self, state):
        # a configuration pickled before despiking existed had none: it keeps its features
        object.__setattr__(self, "__dict__", {"despike_sigma": 0.0, "despike_min_fraction": 0.3,
                                              **state})

    @property
    def loglam(self):
        """The common rest-frame grid in log10(Angstrom)."""
        start, stop = np.log10(self.wave_min), np.log10(self.wave_max)
        return start + self.dloglam * np.arange(int(np.floor((stop - start) / self.dloglam)) + 1)

    @property
    def wavelength(self):
        return 10.0 ** self.loglam

    def digest(self):
        """Short stable hash of the configuration, for provenance. Without despiking, the
        despike fields are left out: a configuration made before they existed keeps its
        hash (artifacts are checked against it)."""
        fields = asdict(self)
        if not fields["despike_sigma"]:
            del fields["despike_sigma"], fields["despike_min_fraction"]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


DR1_MIN_WEIGHTED_FRACTION = 0.5   # of the clear pixels with ivar > 0, for the DR1 exception


def _good_pixels(spectrum, mask_bits):
    """Usable pixels: finite flux, no and-mask bit set, and a positive inverse variance.

    Exception, from the data: the LAMOST DR1 pipeline sets ivar = 0 in the cores of the
    strongest absorption lines (Ca II H and K, the G band, ...) although the flux there is
    measured and the and-mask is clear. Masking those pixels erases the lines that carry
    most of the temperature information (on the DR1 plate of ../shared, Teff came out
    1,100 K hotter than LASP; 160 K once they were kept). So for the DR1 layout a pixel
    with ivar = 0 counts as good when its flux is positive and its and-mask is clear --
    in a spectrum whose other pixels mostly carry a weight (at most 12% of a real file's
    pixels have ivar = 0; a file with ivar = 0 nearly everywhere has no usable weights
    and was estimated as if every pixel were good).
    """
    clear = ((spectrum.andmask.astype(np.int64) & mask_bits) == 0) & np.isfinite(spectrum.flux)
    weighted = spectrum.ivar > 0
    if getattr(spectrum, "layout", None) == "dr1-image" and clear.any() and \
            np.mean(weighted[clear]) >= DR1_MIN_WEIGHTED_FRACTION:
        weighted |= spectrum.flux > 0
    return clear & weighted


@dataclass
class SpectrumStack:
    """Spectra of different lengths padded into 2-D arrays, with their log-linear grids.

    LAMOST pixels are uniform in log10(lambda), so each row's grid is fully described by
    ``loglam0`` (log10 of its first wavelength) and ``dloglam`` (its step).
    """

    flux: np.ndarray       # (n, N_max) float64, zero-padded
    good: np.ndarray       # (n, N_max) bool, False for masked and padding pixels
    ivar: np.ndarray       # (n, N_max) float64, zero-padded
    loglam0: np.ndarray    # (n,)
    dloglam: np.ndarray    # (n,)
    npix: np.ndarray       # (n,) number of real pixels per row

    @classmethod
    def from_spectra(cls, spectra, mask_bits=0xFFFFFFFF):
        """Stack objects with ``wavelength``, ``flux``, ``ivar`` and ``andmask`` arrays."""
        n = len(spectra)
        npix = np.array([s.flux.size for s in spectra], dtype=int)
        width = int(npix.max()) if n else 0
        flux = np.zeros((n, width))
        good = np.zeros((n, width), dtype=bool)
        ivar = np.zeros((n, width))
        loglam0 = np.empty(n)
        dloglam = np.empty(n)
        for i, s in enumerate(spectra):
            m = npix[i]
            # a non-finite flux is never good: stored as 0, so no arithmetic warns about it
            flux[i, :m] = np.where(np.isfinite(s.flux), s.flux, 0.0)
            good[i, :m] = _good_pixels(s, mask_bits)
            ivar[i, :m] = np.where(np.isfinite(s.ivar), s.ivar, 0.0)
            loglam = np.log10(s.wavelength)
            loglam0[i] = loglam[0]
            dloglam[i] = (loglam[-1] - loglam[0]) / (m - 1)
        return cls(flux, good, ivar, loglam0, dloglam, npix)


def cosmic_ray_spikes(stack, n_sigma, min_fraction=0.3):
    """(n, N_max) bool: good pixels standing more than ``n_sigma`` of their own noise
    (from ivar), and more than ``min_fraction`` of it, above the median of the five
    observed pixels around them -- cosmic-ray
    hits of one or two pixels, which LAMOST marks in the or-mask only, so they reach the
    features. The median filter of the recipe cannot remove them: it runs after the
    resampling, which spreads one observed pixel over two. Absorption lines stay, and so
    do emission lines a few pixels wide (the median follows them); the fraction keeps the
    peaks between the crowded lines of a high-S/N spectrum, which rise above their
    neighbours by many (small) sigma. Limit: the core pixel of an emission line as narrow
    as the resolution (FWHM ~2.4 pixels) and several times the continuum is masked too
    (bridged from its shoulders), as a cosmic ray would be.

    The noise is the larger of the pixel's own (ivar) and the spectrum's pixel-to-pixel
    scatter (robust: the median absolute difference of neighbours), so that an ivar too
    small for the data (a file whose flux was rescaled without it) masks no more.
    Candidates (above the lower of their two neighbours) are few; the median is taken
    for them only."""
    flux, ivar = stack.flux, stack.ivar
    n, width = flux.shape
    with np.errstate(divide="ignore"):
        sigma = np.where(ivar > 0, 1.0 / np.sqrt(np.maximum(ivar, 1e-300)), np.inf)
    lower_neighbour = np.minimum(np.concatenate([flux[:, :1], flux[:, :-1]], axis=1),
                                 np.concatenate([flux[:, 1:], flux[:, -1:]], axis=1))
    column = np.arange(width)
    inside = (column >= 2) & (column[None, :] < stack.npix[:, None] - 2)
    candidate = stack.good & inside & (flux - lower_neighbour > n_sigma * sigma)
    rows, cols = np.nonzero(candidate)
    median = np.sort(flux[rows[:, None], cols[:, None] + np.arange(-2, 3)], axis=1)[:, 2]
    excess = flux[rows, cols] - median
    keep = (excess > n_sigma * sigma[rows, cols]) & (excess > min_fraction * np.abs(median))
    rows, cols, excess = rows[keep], cols[keep], excess[keep]
    spikes = np.zeros((n, width), dtype=bool)
    for row in np.unique(rows):          # few: the spectra with a spike by their ivar
        good = stack.good[row, :stack.npix[row]]
        steps = np.abs(np.diff(flux[row, :stack.npix[row]]))[good[1:] & good[:-1]]
        scatter = 1.4826 * np.median(steps) / np.sqrt(2.0) if steps.size else np.inf
        mine = rows == row
        spikes[row, cols[mine][excess[mine] > n_sigma * scatter]] = True
    return spikes


def resample_rest_frame(stack, z, loglam_rest):
    """Shift to the rest frame and interpolate linearly onto ``loglam_rest``.

    Returns (flux, good) of shape (n, len(loglam_rest)). A new pixel is good only when both
    source pixels it is interpolated from are good, so masked pixels cannot leak.
    """
    z = np.asarray(z, dtype=float)
    n, width = stack.flux.shape
    observed = loglam_rest[None, :] + np.log10(1.0 + z)[:, None]
    position = (observed - stack.loglam0[:, None]) / stack.dloglam[:, None]
    left = np.floor(position).astype(np.int64)
    inside = (left >= 0) & (left + 1 < stack.npix[:, None])
    left = np.clip(left, 0, width - 2)
    weight = position - left
    # gather through flat indices: much faster than 2-D fancy indexing
    flat = left + (np.arange(n) * width)[:, None]
    f_left, f_right = stack.flux.ravel().take(flat), stack.flux.ravel().take(flat + 1)
    flux = f_left + (f_right - f_left) * weight
    good = inside & stack.good.ravel().take(flat) & stack.good.ravel().take(flat + 1)
    return flux, good


def bridge_masked(flux, good):
    """Replace masked pixels by linear interpolation between the nearest good pixels.

    Pixels before the first (after the last) good pixel take its value. Rows without any
    good pixel are returned unchanged.
    """
    out = flux.copy()
    todo = np.flatnonzero((~good).any(axis=1) & good.any(axis=1))   # most rows need nothing
    if todo.size == 0:
        return out
    f, g = flux[todo], good[todo]
    n, p = f.shape
    index = np.broadcast_to(np.arange(p), (n, p))
    prev = np.maximum.accumulate(np.where(g, index, -1), axis=1)
    nxt = np.minimum.accumulate(np.where(g, index, p)[:, ::-1], axis=1)[:, ::-1]
    # before the first / after the last good pixel, use that pixel on both sides
    prev = np.where(prev < 0, nxt, prev)
    nxt = np.where(nxt >= p, prev, nxt)
    offsets = (np.arange(n) * p)[:, None]
    f_prev, f_next = f.ravel().take(prev + offsets), f.ravel().take(nxt + offsets)
    t = (index - prev) / np.maximum(nxt - prev, 1)
    out[todo] = np.where(g, f, f_prev + t * (f_next - f_prev))
    return out


def median_filter3(flux):
    """Running median of width 3 along each row (edges keep their value).

    The median of three is max(min(a, b), min(max(a, b), c)): no sort, no Python loop.
    """
    out = flux.copy()
    a, b, c = flux[:, :-2], flux[:, 1:-1], flux[:, 2:]
    out[:, 1:-1] = np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))
    return out


def fit_pseudo_continuum(flux, good, order=6, iterations=5, clip_low=1.5, clip_high=3.0):
    """Iteratively sigma-clipped polynomial continuum for every row at once.

    Each iteration solves the weighted least-squares problem of all rows as one batch of
    (order+1) x (order+1) normal equations, in a Legendre basis for conditioning.
    """
    n, p = flux.shape
    x = np.linspace(-1.0, 1.0, p)
    basis = legendre.legvander(x, order)                     # (p, order+1)
    k = order + 1
    # products of basis pairs, so each row's normal matrix is one matrix product away
    pair_products = (basis[:, :, None] * basis[:, None, :]).reshape(p, k * k)
    weight = good.astype(float)
    continuum = np.ones_like(flux)
    for _ in range(iterations):
        normal = (weight @ pair_products).reshape(n, k, k)
        rhs = (weight * flux) @ basis
        # a tiny ridge keeps rows with (almost) no good pixels solvable; they are rejected later
        normal += 1e-9 * np.eye(k)[None]
        coef = np.linalg.solve(normal, rhs[..., None])[..., 0]
        continuum = coef @ basis.T
        resid = flux - continuum
        used = np.maximum(weight.sum(axis=1), 1.0)
        sigma = np.sqrt((weight * resid**2).sum(axis=1) / used)[:, None]
        weight = (good & (resid > -clip_low * sigma) & (resid < clip_high * sigma)).astype(float)
    return continuum


def region_mask(observed_loglam, regions, margin=0.0):
    """True where log10(observed wavelength) lies in one of ``regions`` ((name, low, high)
    in Angstrom), widened by ``margin`` (log10 units, scalar or broadcastable) on each side."""
    inside = np.zeros(np.shape(observed_loglam), dtype=bool)
    for _, low, high in regions:
        inside |= (observed_loglam >= np.log10(low) - margin) & (observed_loglam <= np.log10(high) + margin)
    return inside


def _continuum(flux, good, config):
    """The pseudo-continuum: one polynomial, or one per arm (``config.continuum``)."""
    fit = lambda f, g: fit_pseudo_continuum(f, g, config.continuum_order,  # noqa: E731
                                            config.continuum_iterations, config.clip_low,
                                            config.clip_high)
    if config.continuum == "single":
        return fit(flux, good)
    blue = config.wavelength < config.arm_split
    continuum = np.empty_like(flux)
    for arm in (blue, ~blue):
        if arm.any():
            continuum[:, arm] = fit(flux[:, arm], good[:, arm])
    return continuum


def continuum_normalise(stack, z, config=PreprocessConfig(), return_masked=False,
                        return_continuum=False):
    """Full preprocessing: rest frame, resample, median filter, pseudo-continuum division.

    Returns ``(features, good_fraction)``: features of shape (n, n_pixels) as float32, and
    the fraction of pixels with usable data per row; rows below ``config.min_good_fraction``
    are NaN. ``return_masked=True`` adds ``masked`` (n, n_pixels) bool: the pixels whose feature is
    a fill because the *data* were masked (ivar, and-mask, no coverage, continuum ~0); the
    configured instrument regions are filled in every spectrum alike and are not counted.
    ``return_continuum=True`` adds the fitted pseudo-continuum (n, n_pixels) on the rest-frame
    grid, in the units of the spectrum's flux (for plots).
    """
    z = np.asarray(z, dtype=float)
    if getattr(config, "despike_sigma", 0.0):
        stack = replace(stack, good=stack.good & ~cosmic_ray_spikes(
            stack, config.despike_sigma, config.despike_min_fraction))
    flux, data_good = resample_rest_frame(stack, z, config.loglam)
    # a rest pixel is interpolated from the observed pixels within one step of it: widen the
    # regions by that step, so that no value from inside a region leaks out
    observed = config.loglam[None, :] + np.log10(1.0 + z)[:, None]
    good = data_good & ~region_mask(observed, config.masked_regions, stack.dloglam[:, None])
    # scale each row to order unity so the polynomial fit is equally conditioned for all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # rows with no good pixel
        scale = np.nanmedian(np.where(good, flux, np.nan), axis=1)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    flux = bridge_masked(flux / scale[:, None], good)
    if config.median_width == 3:
        flux = median_filter3(flux)
    elif config.median_width > 1:
        from scipy.ndimage import median_filter
        flux = median_filter(flux, size=(1, config.median_width), mode="nearest")
    continuum = _continuum(flux, good, config)
    # where a polynomial dips to ~0 (deep molecular bands at the blue end of cool stars) the
    # ratio is meaningless: those pixels are masked, their ratio bridged from the neighbours
    divisible = continuum > 0.01
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = flux / continuum
        # a garbage pixel far above its neighbours (1e30 among 1e-25) overflows float32:
        # masked like any bad pixel, not passed on as inf
        divisible &= np.abs(ratio) < np.finfo(np.float32).max
        features = bridge_masked(np.where(divisible, ratio, 1.0), divisible)
    # the share of pixels with usable data; the instrument regions, masked in every
    # spectrum alike, say nothing about this one
    usable = data_good & divisible
    good_fraction = usable.mean(axis=1)
    features[good_fraction < config.min_good_fraction] = np.nan
    features = features.astype(np.float32)
    extra = (~usable,) if return_masked else ()
    if return_continuum:
        extra += (continuum * scale[:, None],)
    return (features, good_fraction) + extra


def preprocess_spectra(spectra, z, config=PreprocessConfig(), chunk_size=128, return_masked=False):
    """``continuum_normalise`` over any number of spectra, in chunks.

    Chunks of ~100-250 spectra keep the temporaries in cache and in memory the allocator
    reuses; one 5,000-spectrum block is ~3x slower on the same machine.
    """
    z = np.asarray(z, dtype=float)
    features = np.empty((len(spectra), config.loglam.size), dtype=np.float32)
    good_fraction = np.empty(len(spectra))
    masked = np.empty(features.shape, dtype=bool)
    for start in range(0, len(spectra), chunk_size):
        stop = start + chunk_size
        stack = SpectrumStack.from_spectra(spectra[start:stop])
        features[start:stop], good_fraction[start:stop], masked[start:stop] = continuum_normalise(
            stack, z[start:stop], config, return_masked=True)
    return (features, good_fraction, masked) if return_masked else (features, good_fraction)
