"""Statistics for validating estimates on real spectra without reference labels.

Repeat observations of one star should give the same labels within the reported
uncertainties; these functions measure the scatter of repeated estimates and the
pairwise z-scores ``(x_i - x_j) / sqrt(err_i**2 + err_j**2)``, whose standard deviation
is ~1 when the uncertainties are honest (< 1: uncertainties too large, > 1: too small).

Plain arrays in, plain dicts out; no I/O.
"""
import itertools

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord

# expected fraction of a unit Gaussian inside |z| < 1 and |z| < 2
GAUSS_WITHIN_1 = 0.6826894921370859
GAUSS_WITHIN_2 = 0.9544997361036416
MAD_TO_SIGMA = 1.482602218505602


def _groups(group_ids, valid):
    """{group id: indices of its valid members}, only groups with >= 2 of them."""
    members = {}
    for index, (group, ok) in enumerate(zip(group_ids, valid)):
        if ok and group is not None and not (isinstance(group, float) and np.isnan(group)):
            members.setdefault(group, []).append(index)
    return {group: np.array(rows) for group, rows in members.items() if len(rows) >= 2}


def repeat_scatter(values, group_ids, snrg, errors=None):
    """Per group of repeat observations with >= 2 finite values: the scatter of the values.

    Returns a dict of equal-length arrays: ``group``, ``n`` (spectra used), ``mean_snrg``,
    ``std`` (sample std, ddof=1), ``mean`` and, when ``errors`` is given, ``rms_err``
    (root-mean-square reported uncertainty of the group's spectra: what ``std`` should be
    if the uncertainties are honest and describe only the random part).
    """
    values = np.asarray(values, dtype=float)
    snrg = np.asarray(snrg, dtype=float)
    valid = np.isfinite(values)
    if errors is not None:
        errors = np.asarray(errors, dtype=float)
        valid &= np.isfinite(errors)
    groups = _groups(group_ids, valid)
    out = {"group": list(groups), "n": np.array([len(r) for r in groups.values()], dtype=int),
           "mean_snrg": np.array([np.nanmean(snrg[r]) if np.isfinite(snrg[r]).any() else np.nan
                                  for r in groups.values()]),
           "std": np.array([np.std(values[r], ddof=1) for r in groups.values()]),
           "mean": np.array([np.mean(values[r]) for r in groups.values()])}
    if errors is not None:
        out["rms_err"] = np.array([np.sqrt(np.mean(errors[r] ** 2)) for r in groups.values()])
    return out


def pairwise_z(values, errors, group_ids):
    """z = (x_i - x_j) / sqrt(err_i^2 + err_j^2) for every pair of spectra of each group.

    Spectra with a non-finite value or a non-finite / non-positive error are left out.
    Returns ``(z, group of each pair)``.
    """
    values = np.asarray(values, dtype=float)
    errors = np.asarray(errors, dtype=float)
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(values) & np.isfinite(errors) & (errors > 0)
    z, owner = [], []
    for group, rows in _groups(group_ids, valid).items():
        for i, j in itertools.combinations(rows, 2):
            z.append((values[i] - values[j]) / np.hypot(errors[i], errors[j]))
            owner.append(group)
    return np.array(z, dtype=float), owner


def z_summary(z):
    """Count, std (about zero, the honest-uncertainty statistic: ~1 expected), the robust
    std 1.4826*MAD (insensitive to a few outliers) and the fractions with |z| < 1 and < 2
    (0.683 and 0.954 for a unit Gaussian)."""
    z = np.asarray(z, dtype=float)
    z = z[np.isfinite(z)]
    if z.size == 0:
        return {"n": 0, "std": None, "robust_std": None, "mean_abs": None,
                "within_1": None, "within_2": None}
    # the sign of a pair's difference is arbitrary (which spectrum came first), so the
    # spread is measured about zero, not about the sample mean
    return {"n": int(z.size),
            "std": float(np.sqrt(np.mean(z ** 2))),
            "robust_std": float(MAD_TO_SIGMA * np.median(np.abs(z))),
            "mean_abs": float(np.mean(np.abs(z))),
            "within_1": float(np.mean(np.abs(z) < 1)),
            "within_2": float(np.mean(np.abs(z) < 2))}


def scatter_summary(scatter, bins):
    """Median per-group scatter (and median rms uncertainty, when present) per mean-SNRg bin
    (low, high], plus "all": {name: {"n_groups", "median_std", "median_rms_err"}}."""
    std = np.asarray(scatter["std"], dtype=float)
    snr = np.asarray(scatter["mean_snrg"], dtype=float)
    rms = np.asarray(scatter.get("rms_err", np.full(std.shape, np.nan)), dtype=float)

    def summary(mask):
        return {"n_groups": int(mask.sum()),
                "median_std": float(np.median(std[mask])) if mask.any() else None,
                "median_rms_err": (float(np.nanmedian(rms[mask])) if mask.any() and np.isfinite(rms[mask]).any()
                                   else None)}

    out = {"all": summary(np.ones(std.shape, dtype=bool))}
    for lo, hi in zip(bins[:-1], bins[1:]):
        out[f"{lo:g}-{hi:g}"] = summary((snr > lo) & (snr <= hi))
    return out


def group_by_position(ra, dec, radius_arcsec):
    """Repeat groups from positions: spectra within ``radius_arcsec`` of each other belong
    to one group, linked transitively (friends of friends), as repeat observations of one
    star are (LAMOST fibre positions of a star agree to well under an arcsecond).

    Returns one group id per spectrum: 1, 2, ... numbered in order of each group's first
    spectrum, 0 for a spectrum alone within the radius or without a finite position.
    """
    ra, dec = np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)
    groups = np.zeros(ra.shape, dtype=int)
    placed = np.flatnonzero(np.isfinite(ra) & np.isfinite(dec))
    if placed.size < 2:
        return groups
    coords = SkyCoord(ra[placed], dec[placed], unit="deg")
    first, second, _, _ = coords.search_around_sky(coords, radius_arcsec * u.arcsec)
    parent = np.arange(placed.size)            # union-find over the pairs within the radius

    def root(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for i, j in zip(first, second):
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = np.array([root(k) for k in range(placed.size)])
    sizes = np.bincount(roots, minlength=placed.size)
    number = {}
    for k, r in enumerate(roots):
        if sizes[r] >= 2:
            groups[placed[k]] = number.setdefault(r, len(number) + 1)
    return groups
