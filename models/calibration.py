"""Calibrated uncertainties: the 1-sigma error to quote with every estimate, and an honest
ensemble spread.

``ErrorModel`` (one per label) predicts a per-spectrum standard deviation of the residual
``estimate - reference`` from what is known at prediction time: the spectrum's SNRg, the
ensemble spread of the estimate, the star's estimated parameters (cool and metal-poor
stars are harder) and how isolated those parameters are among the training stars (a
network is least sure where it saw few stars). It is fitted on *out-of-sample*
residuals: cross-fitted predictions of the training stars (``models.training``) or the
predictions for held-out stars.

Fitting, in two steps:

1. the *shape*: log|residual| is regressed (least squares, a small ridge) on the chosen
   inputs. For Gaussian residuals E[log|r|] = log(sigma) - 0.635, so the fit is log(sigma)
   up to a constant; the logarithm keeps a few outliers from dominating;
2. the *level*, per SNRg bin: a factor on the shape. A heavy-tailed residual distribution
   cannot put 68.3% within +-1 sigma and 95.4% within +-2 sigma at once, so the factor is a
   compromise between the two coverages, by one of two rules (``LEVEL_RULES``):
   "gaussian" brings both as close as possible to a Gaussian's (least squares, each in
   units of its binomial spread); "windows" puts both as deep as possible inside the
   acceptance windows of a calibrated error (``WITHIN_1``, ``WITHIN_2``: 62-74% and
   92-98%), minimising the larger of the two distances from the windows' centres in units
   of their half-widths. Which rule is kept is chosen, like the form, by star-grouped
   cross-validation on the calibration residuals (``level_cv_scores_``: the mean over bins
   of that larger distance, out of fold; below 1 in a bin means inside both windows).

Which inputs the shape uses (``FORMS``, from the SNRg bin alone -- the paper's per-bin
constant -- to SNRg, spread, the star's estimated parameters and their isolation) is
chosen by star-grouped cross-validation on the calibration residuals themselves, scored
by the interval score of the +-1 and +-2 sigma intervals (Gneiting & Raftery 2007): it
rewards narrow intervals and penalises residuals outside them, so it prefers informative
errors that still cover.

A bin with fewer than ``min_count`` calibration spectra gets NaN (no honest number can be
given) and a warning; ``counts_`` keeps the counts.

``RepeatScale`` fits the factor that makes the ensemble spread honest against repeated
observations of one star (see ``LassoMLPNet.calibrate``); ``repeat_level`` the one further
factor that real repeat observations call for (``lamost-vac calibrate-repeats``).
"""
import warnings

import numpy as np
from sklearn.base import BaseEstimator

from .splits import group_kfold_indices
from .validation import GAUSS_WITHIN_1, GAUSS_WITHIN_2

# candidate inputs of the log-sigma shape, simplest first: "bin" is a constant per SNRg
# bin (the paper's integrated uncertainty); "snr" adds log SNRg inside the bins; "spread"
# the log ensemble std; "stars" piecewise-linear terms in each of the star's estimated
# parameters (``LassoMLPNet`` passes log10 Teff, log g and [Fe/H]); "isolation" the log
# distance from those parameters to the nearest training stars (``LassoMLPNet.isolation``)
FORMS = ("bin", "bin+snr", "bin+snr+spread", "bin+snr+stars", "bin+snr+spread+stars",
         "bin+snr+isolation", "bin+snr+spread+isolation", "bin+snr+spread+stars+isolation")
LEVEL_RULES = ("gaussian", "windows")
# a calibrated error: 62-74% of residuals within +-1 err, 92-98% within +-2 err, per label
# and SNRg bin, in at least MIN_COUNT spectra (the criteria of bench/calibration.py)
WITHIN_1 = (0.62, 0.74)
WITHIN_2 = (0.92, 0.98)
MIN_COUNT = 30
RIDGE = 1.0                       # on standardised inputs; n is in the hundreds or more
SCALE_GRID = np.geomspace(0.2, 5.0, 801)


def snr_bin_index(snrg, bins):
    """Index of the (low, high] bin of every SNRg; -1 outside every bin or unknown."""
    snrg = np.asarray(snrg, dtype=float)
    index = np.searchsorted(np.asarray(bins), snrg, side="left") - 1
    with np.errstate(invalid="ignore"):
        inside = np.isfinite(snrg) & (snrg > bins[0]) & (snrg <= bins[-1])
    return np.where(inside, index, -1)


def coverage(residuals, sigma, k):
    """Fraction of the finite (residual, sigma) pairs with |residual| < k sigma."""
    residuals, sigma = np.asarray(residuals, dtype=float), np.asarray(sigma, dtype=float)
    ok = np.isfinite(residuals) & np.isfinite(sigma)
    return float(np.mean(np.abs(residuals[ok]) < k * sigma[ok])) if ok.any() else np.nan


def interval_score(residuals, sigma):
    """Mean interval score of the central +-1 and +-2 sigma intervals (lower is better)."""
    score = 0.0
    for k, level in ((1.0, GAUSS_WITHIN_1), (2.0, GAUSS_WITHIN_2)):
        alpha = 1.0 - level
        outside = np.maximum(np.abs(residuals) - k * sigma, 0.0)
        score += np.mean(2 * k * sigma + (2.0 / alpha) * 2 * outside)
    return float(score)


def _coverage_curves(z):
    """Fractions of |z| below s and below 2 s for every s of ``SCALE_GRID``."""
    a = np.sort(np.abs(z))
    return (np.searchsorted(a, SCALE_GRID, side="left") / a.size,
            np.searchsorted(a, 2 * SCALE_GRID, side="left") / a.size)


def window_distance(within_1, within_2):
    """The larger distance of the two coverages from the centres of the acceptance windows,
    in units of the windows' half-widths: at most 1 means inside both windows."""
    return np.maximum(*(np.abs(c - np.mean(w)) / (0.5 * (w[1] - w[0]))
                        for c, w in ((within_1, WITHIN_1), (within_2, WITHIN_2))))


def _middle_of_optimum(loss):
    best = np.flatnonzero(loss == loss.min())
    return float(np.sqrt(SCALE_GRID[best[0]] * SCALE_GRID[best[-1]]))   # middle of a flat optimum


def _coverage_scale(z, rule="gaussian"):
    """The factor s on |z| that the level ``rule`` asks for (see the module's docstring).
    "gaussian": each deviation from a Gaussian's coverage in units of its binomial spread
    sqrt(p (1 - p)) (0.47 at 68%, 0.21 at 95%), squared and summed; "windows": the
    ``window_distance``."""
    within_1, within_2 = _coverage_curves(z)
    if rule == "windows":
        return _middle_of_optimum(window_distance(within_1, within_2))
    if rule != "gaussian":
        raise ValueError(f"level rule must be one of {LEVEL_RULES}, not {rule!r}")
    return _middle_of_optimum((within_1 - GAUSS_WITHIN_1) ** 2 / (GAUSS_WITHIN_1 * (1 - GAUSS_WITHIN_1)) +
                              (within_2 - GAUSS_WITHIN_2) ** 2 / (GAUSS_WITHIN_2 * (1 - GAUSS_WITHIN_2)))


class ErrorModel(BaseEstimator):
    """Per-spectrum 1-sigma uncertainty of one label, fitted on out-of-sample residuals.

    Parameters
    ----------
    bins : SNRg bin edges of the (low, high] bins, e.g. ``lasso_mlpnet.SNR_BINS``.
    forms : tuple of str
        Candidate inputs (see ``FORMS``); the one with the best cross-validated interval
        score is kept. One form: no choice.
    min_count : int
        Calibration spectra a bin needs; fewer gives NaN for that bin (and a warning).
    cv : int
        Star-grouped folds of the choice of form and level rule.
    level_rules : tuple of str
        Candidate level rules (see ``LEVEL_RULES``); the one whose out-of-fold coverages lie
        deepest inside the acceptance windows is kept. One rule: no choice.
    random_state : int

    Attributes
    ----------
    form_ : the chosen form; ``cv_scores_``: {form: interval score} (with the first rule)
    level_rule_ : the chosen level rule; ``level_cv_scores_``: {rule: mean window distance}
    counts_ : calibration spectra per bin
    scale_ : per-bin level factor (NaN for bins below ``min_count``)
    coverage_ : {"within_1": per bin, "within_2": per bin} on the calibration residuals
    """

    def __init__(self, bins, forms=FORMS, min_count=MIN_COUNT, cv=5, level_rules=LEVEL_RULES, random_state=0):
        self.forms = forms
        self.level_rules = level_rules
        self.bins = bins
        self.min_count = min_count
        self.cv = cv
        self.random_state = random_state

    # -- inputs ---------------------------------------------------------------------------
    def _learn_knots(self, stars):
        # low-side knots: errors grow towards cool, metal-poor (and extreme-gravity) stars
        self.knots_ = [(float(x.min()), float(x.max()), np.quantile(x, [0.1, 0.3, 0.5]),
                        np.quantile(x, [0.7, 0.9])) for x in stars.T]

    def _design(self, form, x):
        """The columns of ``form`` for the inputs ``x`` (dict: snrg, spread, stars, isolation)."""
        n_bins = len(self.bins) - 1
        which = snr_bin_index(x["snrg"], self.bins)
        columns = [(which == k).astype(float) for k in range(n_bins)]
        parts = form.split("+")
        if "snr" in parts:
            log_snr = np.log(np.clip(x["snrg"], self.bins[0], self.bins[-1]))
            # log SNRg relative to its bin's centre, so the bin constants stay the levels
            centre = np.log(np.sqrt(np.asarray(self.bins[:-1]) * np.asarray(self.bins[1:])))
            columns.append(log_snr - centre[np.clip(which, 0, n_bins - 1)])
        if "spread" in parts:
            columns.append(np.log(np.maximum(x["spread"], self.spread_floor_)))
        if "isolation" in parts:
            columns.append(np.log(np.hypot(x["isolation"], self.isolation_floor_)))
        if "stars" in parts:
            for values, (low, high, low_knots, high_knots) in zip(x["stars"].T, self.knots_):
                values = np.clip(values, low, high)
                columns.append(values)
                columns += [np.maximum(knot - values, 0.0) for knot in low_knots]
                columns += [np.maximum(values - knot, 0.0) for knot in high_knots]
        return np.column_stack(columns)

    def _fit_shape(self, form, residuals, x):
        """Ridge coefficients of log|r| on the standardised non-bin inputs (bins unpenalised)."""
        design = self._design(form, x)
        n_bins = len(self.bins) - 1
        extra = design[:, n_bins:]
        mean, std = extra.mean(axis=0), extra.std(axis=0)
        std[std == 0] = 1.0
        design = np.column_stack([design[:, :n_bins], (extra - mean) / std])
        target = np.log(np.maximum(np.abs(residuals), self.residual_floor_))
        penalty = np.diag(np.r_[np.full(n_bins, 1e-8), np.full(extra.shape[1], RIDGE)])
        coef = np.linalg.solve(design.T @ design + penalty, design.T @ target)
        return {"form": form, "coef": coef, "mean": mean, "std": std}

    def _shape(self, shape, x):
        design = self._design(shape["form"], x)
        n_bins = len(self.bins) - 1
        design[:, n_bins:] = (design[:, n_bins:] - shape["mean"]) / shape["std"]
        return np.exp(design @ shape["coef"])

    def _fit_scales(self, shape, residuals, x, rule):
        which = snr_bin_index(x["snrg"], self.bins)
        z = residuals / self._shape(shape, x)
        return np.array([_coverage_scale(z[which == k], rule) if np.sum(which == k) >= max(self.min_count, 1)
                         else np.nan for k in range(len(self.bins) - 1)])

    # -- scikit-learn API ---------------------------------------------------------------------
    def fit(self, residuals, snrg, spread, stars, groups=None, isolation=None):
        """``residuals``: estimate - reference of out-of-sample predictions; ``spread``: the
        raw ensemble std; ``stars``: (n, k) the star parameters *estimated* from each
        spectrum (e.g. log10 Teff, log g, [Fe/H]); ``groups``: star of each spectrum
        (cross-validation folds by star); ``isolation``: how far each estimate lies from
        the stars the networks were trained on (``LassoMLPNet.isolation``), None: the
        forms that use it are not tried."""
        residuals = np.asarray(residuals, dtype=float)
        stars = np.asarray(stars, dtype=float).reshape(residuals.size, -1)
        x = self._inputs(snrg, spread, stars, isolation, residuals.size)
        groups = np.arange(residuals.size) if groups is None else np.asarray(groups)
        which = snr_bin_index(x["snrg"], self.bins)
        self.counts_ = np.array([int(np.sum((which == k) & np.isfinite(residuals)))
                                 for k in range(len(self.bins) - 1)])
        keep = (which >= 0) & np.isfinite(residuals) & np.isfinite(x["stars"]).all(axis=1)
        forms = tuple(self.forms)
        for name in ("spread", "isolation"):
            # an input that is missing for a calibration spectrum rules out the forms using it
            if not np.isfinite(x[name][keep]).all():
                forms = tuple(f for f in forms if name not in f.split("+")) or ("bin",)
            if any(name in f.split("+") for f in forms):
                keep &= np.isfinite(x[name])
        residuals, groups = residuals[keep], groups[keep]
        x = {name: values[keep] for name, values in x.items()}
        few = [f"{lo:g}-{hi:g} ({n})" for lo, hi, n in zip(self.bins[:-1], self.bins[1:], self.counts_)
               if n < self.min_count]
        if few:
            warnings.warn(f"uncertainty calibration: fewer than {self.min_count} out-of-sample spectra "
                          f"in SNRg bin(s) {', '.join(few)}: their uncertainty is NaN", stacklevel=2)
        if residuals.size == 0:
            raise ValueError("no finite out-of-sample residual inside the SNRg bins to calibrate on")
        self.residual_floor_ = _floor(np.abs(residuals), 1e-3)
        self.spread_floor_ = _floor(x["spread"], 1e-3)
        # an estimate may fall on a training star: a floor at a tenth of the typical distance
        # keeps such a chance coincidence from standing for "no error at all"
        self.isolation_floor_ = _floor(x["isolation"], 0.1)
        self._learn_knots(x["stars"])

        rules = tuple(self.level_rules)
        self.cv_scores_, self.level_cv_scores_ = {}, {}
        which = snr_bin_index(x["snrg"], self.bins)
        if (len(forms) > 1 or len(rules) > 1) and np.unique(groups).size >= self.cv:
            folds = list(group_kfold_indices(groups, self.cv, np.random.default_rng(self.random_state)))
            predicted = {}                # (form, rule) -> out-of-fold sigma
            for form in forms:
                for rule in rules:
                    predicted[form, rule] = np.empty(residuals.size)
                for fit_rows, test_rows in folds:
                    x_fit = {name: values[fit_rows] for name, values in x.items()}
                    shape = self._fit_shape(form, residuals[fit_rows], x_fit)
                    x_test = {name: values[test_rows] for name, values in x.items()}
                    for rule in rules:
                        scale = self._fit_scales(shape, residuals[fit_rows], x_fit, rule)
                        # a fold may lack a bin's minimum: score with the other bins' median level
                        scale = np.where(np.isfinite(scale), scale, np.nanmedian(scale))
                        predicted[form, rule][test_rows] = self._shape(shape, x_test) * scale[which[test_rows]]
                self.cv_scores_[form] = interval_score(residuals, predicted[form, rules[0]])
            self.form_ = min(self.cv_scores_, key=self.cv_scores_.get)
            for rule in rules:
                sigma = predicted[self.form_, rule]
                distances = [window_distance(coverage(residuals[which == k], sigma[which == k], 1.0),
                                             coverage(residuals[which == k], sigma[which == k], 2.0))
                             for k in range(len(self.bins) - 1) if np.sum(which == k) >= self.min_count]
                self.level_cv_scores_[rule] = float(np.mean(distances)) if distances else np.nan
            scored = {rule: v for rule, v in self.level_cv_scores_.items() if np.isfinite(v)}
            self.level_rule_ = min(scored, key=scored.get) if scored else rules[0]
        else:
            self.form_ = forms[0] if len(forms) == 1 else forms[-1]
            self.level_rule_ = rules[0]
        self.shape_ = self._fit_shape(self.form_, residuals, x)
        self.scale_ = np.where(self.counts_ >= self.min_count,
                               self._fit_scales(self.shape_, residuals, x, self.level_rule_), np.nan)
        sigma = self.predict(x["snrg"], x["spread"], x["stars"], x["isolation"])
        self.coverage_ = {name: [coverage(residuals[which == k], sigma[which == k], k_sigma)
                                 if np.any(which == k) else None for k in range(len(self.bins) - 1)]
                          for name, k_sigma in (("within_1", 1.0), ("within_2", 2.0))}
        return self

    @staticmethod
    def _inputs(snrg, spread, stars, isolation, n):
        """The per-spectrum inputs as one dict of ``n`` rows (scalars broadcast); ``stars``
        is (n or 1, k)."""
        def column(values):
            return np.broadcast_to(np.asarray(np.nan if values is None else values, dtype=float), (n,))
        return {"snrg": column(snrg), "spread": column(spread), "isolation": column(isolation),
                "stars": np.broadcast_to(stars, (n, stars.shape[1]))}

    def predict(self, snrg, spread, stars, isolation=None):
        """1-sigma uncertainty per spectrum; NaN at or below the first bin's low edge or
        without SNRg, in bins with too few calibration spectra, and where an input the form
        uses is NaN; above the last bin, the value at its upper edge."""
        stars = np.asarray(stars, dtype=float).reshape(-1, len(self.knots_))
        n = np.broadcast(np.asarray(snrg), np.asarray(spread), np.asarray(np.nan if isolation is None else isolation),
                         np.empty(stars.shape[0])).size
        x = self._inputs(snrg, spread, stars, isolation, n)
        # Above the last bin: the error at its upper edge -- errors fall with SNRg, so this
        # bounds them from above (conservative); at or below the first edge, or unknown: NaN.
        snrg = np.where(x["snrg"] > self.bins[-1], self.bins[-1], x["snrg"])
        which = snr_bin_index(snrg, self.bins)
        x["snrg"] = np.where(which >= 0, snrg, self.bins[1])
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            sigma = self._shape(self.shape_, x) * self.scale_[np.clip(which, 0, None)]
        return np.where(which >= 0, sigma, np.nan)


def _floor(values, fraction):
    """``fraction`` of the median of the finite positive ``values`` (1e-12 without any)."""
    values = np.asarray(values, dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    return float(fraction * np.median(positive)) if positive.size else 1e-12


def _pairs(values, spread, snrg, groups):
    """Index pairs (i, j) of spectra of one star with finite values, spreads and SNRg."""
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(values) & np.isfinite(spread) & (spread > 0) & np.isfinite(snrg) & (snrg > 0)
    first, second = [], []
    order = np.argsort(np.asarray(groups), kind="stable")
    sorted_groups = np.asarray(groups)[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    for rows in np.split(order, starts[1:]):
        rows = rows[valid[rows]]
        for a in range(rows.size):
            first += [rows[a]] * (rows.size - a - 1)
            second += list(rows[a + 1:])
    return np.array(first, dtype=int), np.array(second, dtype=int)


class RepeatScale(BaseEstimator):
    """The factor k(SNRg) = exp(a + b ln(SNRg / 15)) that makes the ensemble spread ``s`` an
    honest 1-sigma of the differences between repeated observations of one star:
    x_i - x_j ~ N(0, k_i^2 s_i^2 + k_j^2 s_j^2), fitted by maximum likelihood on the pairs.

    The members of an ensemble disagree about a star by roughly the same amount at any S/N,
    while the noise that makes repeats differ shrinks with S/N: hence the SNRg slope ``b``.
    Outside the SNRg range of the fitting pairs, k keeps the value at the nearest end
    (no extrapolation). Fewer than ``min_pairs`` pairs: k = 1 (the raw spread).

    Attributes: ``intercept_`` (a), ``slope_`` (b), ``snr_range_``, ``n_pairs_``,
    ``z_rms_`` (rms pair z-score after the fit).
    """

    REFERENCE_SNR = 15.0

    def __init__(self, min_pairs=30):
        self.min_pairs = min_pairs

    def fit(self, values, spread, snrg, groups):
        from scipy.optimize import minimize

        values, spread, snrg = (np.asarray(a, dtype=float) for a in (values, spread, snrg))
        i, j = _pairs(values, spread, snrg, groups)
        self.n_pairs_ = int(i.size)
        self.intercept_, self.slope_ = 0.0, 0.0
        self.snr_range_ = (float(np.min(snrg[np.r_[i, j]])), float(np.max(snrg[np.r_[i, j]]))) if i.size \
            else (self.REFERENCE_SNR, self.REFERENCE_SNR)
        if self.n_pairs_ < self.min_pairs:
            self.z_rms_ = np.nan
            return self
        difference2 = (values[i] - values[j]) ** 2
        log_snr = np.log(np.clip(snrg, *self.snr_range_) / self.REFERENCE_SNR)

        def variance(params):
            a, b = params
            return (np.exp(2 * (a + b * log_snr[i])) * spread[i] ** 2 +
                    np.exp(2 * (a + b * log_snr[j])) * spread[j] ** 2)

        def negative_log_likelihood(params):
            v = variance(params)
            return 0.5 * np.sum(np.log(v) + difference2 / v)

        start = np.log(np.sqrt(np.mean(difference2 / (spread[i] ** 2 + spread[j] ** 2))))
        fitted = minimize(negative_log_likelihood, [start, 0.0], method="Nelder-Mead",
                          options={"xatol": 1e-6, "fatol": 1e-9, "maxiter": 2000})
        self.intercept_, self.slope_ = (float(v) for v in fitted.x)
        self.z_rms_ = float(np.sqrt(np.mean(difference2 / variance(fitted.x))))
        return self

    def predict(self, snrg):
        """k per spectrum; SNRg unknown: the largest k of the fitted range (conservative)."""
        snrg = np.asarray(snrg, dtype=float)
        ends = np.log(np.asarray(self.snr_range_) / self.REFERENCE_SNR)
        with np.errstate(invalid="ignore", divide="ignore"):
            log_snr = np.clip(np.log(snrg / self.REFERENCE_SNR), *ends)
        k = np.exp(self.intercept_ + self.slope_ * log_snr)
        return np.where(np.isfinite(snrg) & (snrg > 0), k,
                        np.exp(self.intercept_ + np.max(self.slope_ * ends)))


def repeat_level(values, errors, groups):
    """The factor c that makes ``errors`` honest on the pairs of spectra of one star: the
    rms pair z-score (x_i - x_j) / sqrt(err_i^2 + err_j^2), the statistic ``validate``
    reports (its maximum-likelihood scale if the pairs were independent; a star with m
    spectra gives m(m-1)/2 pairs). Returns ``(c, number of pairs)`` (NaN without pairs)."""
    from .validation import pairwise_z, z_summary

    summary = z_summary(pairwise_z(values, errors, groups)[0])
    return (np.nan if summary["std"] is None else summary["std"]), summary["n"]


def repeat_level_cross_validated(values, errors, groups, folds=2, seed=0):
    """The rms pair z-score on stars *not* used to fit the level: the groups (stars) are
    dealt into ``folds`` folds; each fold's pairs are scored with the level fitted on the
    other folds' pairs. ~1 when one level carries over from star to star. Returns
    ``(rms z, number of pairs scored)``."""
    from .validation import pairwise_z, z_summary

    names = sorted({str(g) for g in groups if g is not None})
    fold_of = dict(zip(names, np.random.default_rng(seed).permutation(len(names)) % folds))
    fold = [None if g is None else fold_of[str(g)] for g in groups]
    scored = []
    for k in range(folds):
        level, n = repeat_level(values, errors, [g if f not in (None, k) else None for g, f in zip(groups, fold)])
        if n:
            z, _ = pairwise_z(values, np.asarray(errors, dtype=float) * level,
                              [g if f == k else None for g, f in zip(groups, fold)])
            scored.append(z[np.isfinite(z)])
    summary = z_summary(np.concatenate(scored) if scored else [])
    return (np.nan if summary["std"] is None else summary["std"]), summary["n"]


def cross_validated_sigma(error_model, residuals, snrg, spread, stars, groups, folds=5, seed=0,
                          isolation=None):
    """The 1-sigma of every spectrum from a clone of ``error_model`` fitted without its star:
    the stars are dealt into ``folds`` folds and each fold is predicted by the error model fitted
    on the others. On cross-fitted residuals (``LassoMLPNet.calibration_set_``) neither the
    network nor the calibration of a spectrum has seen its star, so the coverage of these
    sigmas is a held-out measurement on every training star, not only on a held-out split."""
    from sklearn.base import clone

    residuals, snrg, spread = (np.asarray(a, dtype=float) for a in (residuals, snrg, spread))
    isolation = np.full(residuals.size, np.nan) if isolation is None else np.asarray(isolation, dtype=float)
    stars = np.asarray(stars, dtype=float).reshape(residuals.size, -1)
    groups = np.asarray(groups)
    sigma = np.full(residuals.size, np.nan)
    for fit_rows, test_rows in group_kfold_indices(groups, folds, np.random.default_rng(seed)):
        with warnings.catch_warnings():
            # a fold's small bins are NaN by design; the full model's warning already said so
            warnings.simplefilter("ignore", UserWarning)
            fold_model = clone(error_model).fit(residuals[fit_rows], snrg[fit_rows], spread[fit_rows],
                                                stars[fit_rows], groups=groups[fit_rows],
                                                isolation=isolation[fit_rows])
        sigma[test_rows] = fold_model.predict(snrg[test_rows], spread[test_rows], stars[test_rows],
                                              isolation[test_rows])
    return sigma
