"""Quality flags of an estimate, as a bitmask (0 = inside the method's valid domain).

The valid domain of LASSO-MLPNet (Li et al.): 3500 <= Teff <= 6500 K, [Fe/H] >= -1.5 and
5 < SNRg <= 80. Estimates outside it are kept but flagged, so users can choose.
"""
import numpy as np

TEFF_OUT_OF_DOMAIN = 1 << 0     # predicted Teff outside 3500-6500 K
FEH_OUT_OF_DOMAIN = 1 << 1      # predicted [Fe/H] below -1.5
SNR_OUT_OF_DOMAIN = 1 << 2      # SNRg <= 5 or > 80 (or unknown)
NOT_A_STAR = 1 << 3             # catalogue class is not STAR: not estimated
UNUSABLE_SPECTRUM = 1 << 4      # too few good pixels after preprocessing: not estimated

FLAG_DESCRIPTIONS = {
    TEFF_OUT_OF_DOMAIN: "predicted Teff outside 3500-6500 K",
    FEH_OUT_OF_DOMAIN: "predicted [Fe/H] below -1.5 dex",
    SNR_OUT_OF_DOMAIN: "SNRg outside (5, 80] or unknown",
    NOT_A_STAR: "catalogue class is not STAR; not estimated",
    UNUSABLE_SPECTRUM: "too few usable pixels after preprocessing; not estimated",
}

TEFF_RANGE = (3500.0, 6500.0)
FEH_MIN = -1.5
SNR_RANGE = (5.0, 80.0)


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
            snrg = np.asarray(snrg, dtype=float)
            flags |= np.where(~((snrg > SNR_RANGE[0]) & (snrg <= SNR_RANGE[1])), SNR_OUT_OF_DOMAIN, 0)
    if usable is not None:
        flags |= np.where(np.asarray(usable, dtype=bool), 0, UNUSABLE_SPECTRUM)
    return flags


def describe_flags(value):
    """The reasons set in one flag value, as a list of strings."""
    return [text for bit, text in FLAG_DESCRIPTIONS.items() if value & bit]
