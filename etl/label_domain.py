"""Which reference labels train the model: by default only those inside the valid domain.

LASSO-MLPNet is valid for 3500 <= Teff <= 6500 K and [Fe/H] >= -1.5 (``models.flags``);
estimates outside it are flagged. Training spectra of hot, cool or metal-poor stars spend
network capacity on labels the catalogue flags anyway and pull the in-domain fit towards
them, so ``train`` and ``train-files`` keep, by default, the reference labels inside the
domain (the paper's training sample is drawn from the same domain). ``--label-domain``
changes the bounds (``none``: every label); the artifact's training-set description records
the bounds used and how many matched spectra fell outside.

Syntax: comma-separated ``LABEL=LOW:HIGH`` with inclusive bounds, either side may be empty
(open), e.g. ``teff=3500:6500,feh=-1.5:``.
"""
import numpy as np

from models.flags import FEH_MIN, TEFF_RANGE
from models.labels import LABELS

OPTION = "--label-domain"
DEFAULT_LABEL_DOMAIN = f"teff={TEFF_RANGE[0]:g}:{TEFF_RANGE[1]:g},feh={FEH_MIN:g}:"
NO_DOMAIN = "none"


def _bound(text, option, item):
    if text.strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise SystemExit(f"{option}: {item!r}: bound {text.strip()!r} is not a number") from None
    if not np.isfinite(value):
        raise SystemExit(f"{option}: {item!r}: bound {text.strip()!r} is not finite")
    return value


def parse_label_domain(text, option=OPTION):
    """``"teff=3500:6500,feh=-1.5:"`` -> ``{"teff": (3500.0, 6500.0), "feh": (-1.5, None)}``.

    ``"none"`` -> ``{}`` (no restriction). Bad input exits with a message naming ``option``.
    """
    if text is None or text.strip().lower() == NO_DOMAIN:
        return {}
    domain = {}
    for item in text.split(","):
        item = item.strip()
        label, sep, bounds = item.partition("=")
        label = label.strip().lower()
        if not sep or ":" not in bounds:
            raise SystemExit(f"{option}: expected LABEL=LOW:HIGH items separated by commas "
                             f"(e.g. {DEFAULT_LABEL_DOMAIN}) or '{NO_DOMAIN}', got {text!r}")
        if label not in LABELS:
            raise SystemExit(f"{option}: unknown label {label!r} in {text!r} "
                             f"(labels: {', '.join(LABELS)})")
        if label in domain:
            raise SystemExit(f"{option}: label {label!r} given twice in {text!r}")
        low_text, _, high_text = bounds.partition(":")
        low, high = _bound(low_text, option, item), _bound(high_text, option, item)
        if low is None and high is None:
            raise SystemExit(f"{option}: {item!r} has neither a lower nor an upper bound")
        if low is not None and high is not None and not low < high:
            raise SystemExit(f"{option}: {item!r}: LOW must be below HIGH")
        domain[label] = (low, high)
    return domain


def format_label_domain(domain):
    """The option's text for ``domain`` (``"none"`` when empty)."""
    if not domain:
        return NO_DOMAIN
    return ",".join(f"{label}={'' if low is None else f'{low:g}'}:{'' if high is None else f'{high:g}'}"
                    for label, (low, high) in domain.items())


def in_label_domain(labels, domain):
    """Boolean mask over rows: every bounded label finite and within its (inclusive) bounds.

    ``labels``: mapping label -> array (a dict of arrays or an astropy Table).
    """
    n = len(np.asarray(labels[LABELS[0]]))
    inside = np.ones(n, dtype=bool)
    for label, (low, high) in domain.items():
        values = np.asarray(labels[label], dtype=float)
        with np.errstate(invalid="ignore"):
            inside &= np.isfinite(values)
            if low is not None:
                inside &= values >= low
            if high is not None:
                inside &= values <= high
    return inside


def select_label_domain(labels, domain):
    """``(mask, record)``: the rows inside ``domain`` and what the artifact records of it
    (``label_domain``: label -> [low, high] with None for an open side, and
    ``n_outside_label_domain``: matched spectra left out)."""
    inside = in_label_domain(labels, domain)
    record = {"label_domain": {label: [low, high] for label, (low, high) in domain.items()},
              "n_outside_label_domain": int((~inside).sum())}
    return inside, record


def add_label_domain_argument(parser):
    parser.add_argument(OPTION, default=DEFAULT_LABEL_DOMAIN, metavar="LABEL=LOW:HIGH,...",
                        help="train only on reference labels inside these inclusive bounds "
                             f"(default {DEFAULT_LABEL_DOMAIN}: the method's valid domain; an "
                             f"empty side is open; '{NO_DOMAIN}' keeps every label)")
