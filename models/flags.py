"""Quality flags of an estimate, as a bitmask (0 = inside the method's valid domain).

The valid domain of LASSO-MLPNet (Li et al.): 3500 <= Teff <= 6500 K, [Fe/H] >= -1.5 and
5 < SNRg <= 80. Estimates outside it are kept but flagged, so users can choose.

A network cannot predict outside the labels it was trained on, so the *predicted* Teff and
[Fe/H] alone cannot reveal a hot or very metal-poor star: it comes out at the edge of the
training range, "inside" the domain. Two more witnesses are therefore flagged: the LAMOST
catalogue (LASP subclass, Teff and [Fe/H] where present) and the spectrum itself, scored
against the training spectra (``OUT_OF_DISTRIBUTION``, see ``models.lasso_mlpnet``).

Bits marked "not estimated" come with NaN estimates (the file flow) or an
``estimate_failures`` row (the database), with the reason.
"""
import re

import numpy as np

TEFF_OUT_OF_DOMAIN = 1 << 0     # predicted Teff outside 3500-6500 K
FEH_OUT_OF_DOMAIN = 1 << 1      # predicted [Fe/H] below -1.5
SNR_OUT_OF_DOMAIN = 1 << 2      # SNRg <= 5 or > 80 (or unknown)
NOT_A_STAR = 1 << 3             # catalogue class is not STAR: not estimated
UNUSABLE_SPECTRUM = 1 << 4      # no file, unreadable, or too few good pixels: not estimated
NO_USABLE_REDSHIFT = 1 << 5     # z missing (NaN, empty, -9999) or <= -1: not estimated
SUSPICIOUS_REDSHIFT = 1 << 6    # |c z| above MAX_STELLAR_CZ_KMS
MASKED_SELECTED_PIXELS = 1 << 7  # > MAX_MASKED_SELECTED_FRACTION of a label's pixels masked
CATALOGUE_OUT_OF_DOMAIN = 1 << 8  # LASP subclass, Teff or [Fe/H] outside the domain
OUT_OF_DISTRIBUTION = 1 << 9    # spectrum unlike the training spectra (OOD score)

TEFF_RANGE = (3500.0, 6500.0)
FEH_MIN = -1.5
SNR_RANGE = (5.0, 80.0)
# Galactic stars move at up to ~500 km/s relative to the Sun (halo stars); a larger |c z|
# is more likely a wrong redshift (e.g. a template mismatch) than a real velocity, and a
# wrong rest-frame shift moves every line.
SPEED_OF_LIGHT_KMS = 299792.458
MAX_STELLAR_CZ_KMS = 600.0
MISSING_VALUE = -9999.0         # the LAMOST / APOGEE catalogues' "no value"
# A masked pixel is filled with the bridged flux over the continuum: a guess, not data.
# Above this share of a label's LASSO-selected pixels the estimate leans on guesses.
MAX_MASKED_SELECTED_FRACTION = 0.10

FLAG_DESCRIPTIONS = {
    TEFF_OUT_OF_DOMAIN: "predicted Teff outside 3500-6500 K",
    FEH_OUT_OF_DOMAIN: "predicted [Fe/H] below -1.5 dex",
    SNR_OUT_OF_DOMAIN: "SNRg outside (5, 80] or unknown (integrated uncertainty NaN at SNRg <= 5)",
    NOT_A_STAR: "catalogue class is not STAR: not estimated",
    UNUSABLE_SPECTRUM: ("spectrum missing, unreadable or with too few usable pixels after "
                        "preprocessing (the reason is recorded): not estimated"),
    NO_USABLE_REDSHIFT: "no usable redshift (missing, -9999 or <= -1): not estimated",
    SUSPICIOUS_REDSHIFT: f"c z beyond +-{MAX_STELLAR_CZ_KMS:g} km/s: redshift suspicious",
    MASKED_SELECTED_PIXELS: (f"more than {MAX_MASKED_SELECTED_FRACTION:.0%} of a label's "
                             "LASSO-selected pixels masked (filled by interpolation)"),
    CATALOGUE_OUT_OF_DOMAIN: ("catalogue (LASP subclass, Teff or [Fe/H]) outside the domain "
                              "(3500-6500 K, [Fe/H] >= -1.5)"),
    OUT_OF_DISTRIBUTION: ("spectrum unlike the training spectra (out-of-distribution score, "
                          "or lines far shallower than theirs)"),
}
# Bits whose spectra get no estimate.
NOT_ESTIMATED = NOT_A_STAR | UNUSABLE_SPECTRUM | NO_USABLE_REDSHIFT


def flag_table_text():
    """One line listing every bit and its meaning (for column descriptions and docs)."""
    return "; ".join(f"{bit} = {text}" for bit, text in FLAG_DESCRIPTIONS.items())


def domain_flags(teff, feh, snrg=None, usable=None):
    """Bitmask per spectrum from predicted Teff and [Fe/H], SNRg and preprocessing success."""
    teff = np.asarray(teff, dtype=float)
    feh = np.asarray(feh, dtype=float)
    flags = np.zeros(teff.shape, dtype=np.int64)
    with np.errstate(invalid="ignore"):
        flags |= np.where((teff < TEFF_RANGE[0]) | (teff > TEFF_RANGE[1]), TEFF_OUT_OF_DOMAIN, 0)
        flags |= np.where(feh < FEH_MIN, FEH_OUT_OF_DOMAIN, 0)
        if snrg is None:
            flags |= SNR_OUT_OF_DOMAIN
        else:
            flags |= np.where(snr_in_domain(snrg), 0, SNR_OUT_OF_DOMAIN)
    if usable is not None:
        flags |= np.where(np.asarray(usable, dtype=bool), 0, UNUSABLE_SPECTRUM)
    return flags


def snr_in_domain(snrg):
    """True where 5 < SNRg <= 80 (NaN, unknown: False)."""
    snrg = np.asarray(snrg, dtype=float)
    with np.errstate(invalid="ignore"):
        return (snrg > SNR_RANGE[0]) & (snrg <= SNR_RANGE[1])


# --------------------------------------------------------------------------- redshift
def missing_value(values):
    """True where a catalogue number is missing: NaN, +-inf or the -9999 sentinel."""
    values = np.asarray(values, dtype=float)
    return ~np.isfinite(values) | (values == MISSING_VALUE)


def redshift_flags(z):
    """Per redshift: NO_USABLE_REDSHIFT (missing or <= -1: no rest frame) or
    SUSPICIOUS_REDSHIFT (|c z| > MAX_STELLAR_CZ_KMS), else 0."""
    z = np.asarray(z, dtype=float)
    with np.errstate(invalid="ignore"):
        unusable = missing_value(z) | (z <= -1.0)
        suspicious = ~unusable & (np.abs(z) * SPEED_OF_LIGHT_KMS > MAX_STELLAR_CZ_KMS)
    return (np.where(unusable, NO_USABLE_REDSHIFT, 0)
            | np.where(suspicious, SUSPICIOUS_REDSHIFT, 0)).astype(np.int64)


# --------------------------------------------------------------------------- catalogue
# LASP subclasses whose stars lie outside 3500-6500 K or are not normal stars. In the DR10
# catalogue rows of ../shared (labels/lamost_dr10_lasp_afg_rows.csv) every A subclass but A0
# (2 rows) has a median LASP Teff above 6500 K, F0 6,640 K, F2 and later below; M3 and later
# types are cooler than 3500 K; white dwarfs, carbon stars and cataclysmic variables are
# outside the method's training sample whatever their Teff.
_SUBCLASS_OUTSIDE = re.compile(
    r"^\s*(?:[OBA]\d|[OBA]\s*$|F0|(?:d|g|sd)?M[3-9]|WD|D[ABCOQZ]|Carbon|CV)", re.IGNORECASE)


def subclass_outside_domain(subclass):
    """True where a LASP subclass (e.g. 'A1', 'dM4', 'WD') lies outside the domain."""
    values = np.atleast_1d(np.asarray(subclass, dtype=object))
    return np.array([isinstance(s, str) and bool(_SUBCLASS_OUTSIDE.match(s)) for s in values],
                    dtype=bool)


def catalogue_flags(n, subclass=None, teff=None, feh=None):
    """CATALOGUE_OUT_OF_DOMAIN per spectrum from the catalogue's LASP subclass, Teff and
    [Fe/H] (each optional; missing values, NaN or -9999, never flag)."""
    outside = np.zeros(n, dtype=bool)
    if subclass is not None:
        outside |= subclass_outside_domain(subclass)
    with np.errstate(invalid="ignore"):
        if teff is not None:
            teff = np.asarray(teff, dtype=float)
            outside |= ~missing_value(teff) & ((teff < TEFF_RANGE[0]) | (teff > TEFF_RANGE[1]))
        if feh is not None:
            feh = np.asarray(feh, dtype=float)
            outside |= ~missing_value(feh) & (feh < FEH_MIN)
    return np.where(outside, CATALOGUE_OUT_OF_DOMAIN, 0).astype(np.int64)


def describe_flags(value):
    """The reasons set in one flag value, as a list of strings."""
    return [text for bit, text in FLAG_DESCRIPTIONS.items() if value & bit]
