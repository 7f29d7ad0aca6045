"""LASSO-MLPNet: LASSO pixel selection and an ensemble of sigmoid MLPs, one per label.

Method of Li et al. (MNRAS): features are continuum-normalised pixels, standardised; for
each label a cross-validated LASSO keeps the informative pixels, and a two-hidden-layer
sigmoid MLP with an L2 penalty and early stopping maps them to the label. Teff is learnt
as log10(Teff).

Uncertainties (the names are the catalogue's, ``etl/schema.py``):
- ``<label>_err_model``, the model uncertainty: ``n_members`` networks differing in their
  random initialisation, mini-batch order and early-stopping stars; the std of their
  predictions times a per-label factor k(SNRg) fitted so that repeated observations of one
  star differ by what it says (``calibrate``, ``models.calibration.RepeatScale``);
- ``<label>_err``, the 1-sigma uncertainty to quote: a per-spectrum error model
  (``models.calibration.ErrorModel``: SNRg, ensemble spread, estimated Teff, log g, [Fe/H]
  and how isolated the estimate is among the training stars, ``isolation``) fitted on
  out-of-sample residuals against reference labels so that 62-74% / 92-98% of
  residuals fall within +-1 / +-2 of it in every SNRg bin. NaN outside the calibrated
  SNRg bins and in bins with fewer than 30 calibration spectra.

Out-of-distribution score (``ood_score``): a sigmoid network saturates at the edges of its
training labels, so a hot or very metal-poor star comes out "inside" the domain. The
LASSO's linear model, fitted on the same pixels, extrapolates instead. The score is how far
the linear estimates lie beyond the training range of each label, in units of the linear
model's own held-out error (max over the labels; 0 inside the range). The threshold
(``ood_threshold_``) is the ``OOD_QUANTILE`` quantile of the scores of the training
spectra predicted out of fold (star-grouped folds of the LASSO cross-validation), i.e. of
stars the linear model had not seen. On the reference set (README, "Out-of-distribution
flag") it flags ~1% of held-out in-domain spectra and ~80% of the stars hotter than 7,000 K;
generic novelty scores (Mahalanobis distance, PCA reconstruction residual, nearest
training neighbour in the LASSO-pixel space), thresholds chosen the same way, flagged 0-18%
of those hot stars: noise, not the star, dominates those distances at SNRg < 40.

A spectrum without lines (constant or smooth flux: a dead fibre, a sky-subtraction
failure) is not caught by that score: its linear estimates fall inside the training range
(hot, metal-poor) and the networks return a confident in-domain star. ``line_content`` is
the spectrum's line depth along the training spectra's mean line profile over the selected
pixels (1 for a spectrum with the mean lines, 0 for none; noise averages out over
hundreds of pixels); below half the training spectra's 1st percentile
(``line_content_threshold_``) it sets OUT_OF_DISTRIBUTION too.
"""
from itertools import islice

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.preprocessing import StandardScaler

from .calibration import LEVEL_RULES, ErrorModel, RepeatScale
from .flags import (MASKED_SELECTED_PIXELS, MAX_MASKED_SELECTED_FRACTION, OUT_OF_DISTRIBUTION,
                    domain_flags)
from .labels import LABELS
from .networks import SigmoidMLPRegressor
from .selection import LassoFeatureSelector, lasso_support_at

SNR_BINS = (5.0, 10.0, 20.0, 40.0, 80.0)

# Hidden-layer sizes published in the paper, and the ones this project uses by default.
# In trials on the reference set (bench/train_vs_recipe.py data, star split), (100, 50)
# networks were about as accurate as the published sizes -- L2 penalty, learning rate and
# more LASSO pixels moved the MAE by a few per cent at most -- and a ten-network ensemble
# of them trains in a fraction of the time of one published net. What did matter is noise
# injection: star-grouped 3-fold CV on the training stars only (bench/tune_lasso_mlpnet.py)
# gave CV MAE Teff 153 -> 141 K, log g 0.418 -> 0.362, [Fe/H] 0.223 -> 0.181 dex going
# from no noise to 1.0 (0.5, 1.5, 2 and 3 were worse than 1.0 on every label). That noise
# is in standardised units: every pixel as noisy relative to its spread over the training
# spectra, which drowns the pixels that vary little between stars. Noise in flux units
# instead (``flux_noise``: every pixel as noisy as an observation's, ~1/SNR) was measured
# the same way and not adopted (README, "Noise in flux units"): no level beat 1.0
# standardised on every label and SNRg range. The Huber loss (``huber_delta``) lowered the
# same CV's MAE by 3-6% but left heavier residual tails that the calibrated errors could not
# cover, on the training stars too; squared error stays the default (README, "Huber loss").
PUBLISHED_HIDDEN = {"teff": (400, 50), "logg": (600, 50), "feh": (600, 100)}
DEFAULT_HIDDEN = {"teff": (100, 50), "logg": (100, 50), "feh": (100, 50)}
DEFAULT_INPUT_NOISE = 1.0
DEFAULT_FLUX_NOISE = 0.0
DEFAULT_HUBER_DELTA = 0.0
# The authors' notebook's Adam learning rates, per label.
PUBLISHED_LEARNING_RATE = {"teff": 9e-4, "logg": 2e-5, "feh": 3e-4}
# The paper's configuration (``train --paper``), to compare with: the published sizes, the
# notebook's learning rates and the scikit-learn MLPRegressor defaults it ran with (L2
# penalty 1e-4, batches of 200, stop after 10 epochs without improvement, at most 2000),
# no input noise, ten networks, each label's networks on its own LASSO pixels. Its training
# spectra are 10 < SNRg <= 20 (``PAPER_SNR_RANGE``).
PAPER_PARAMETERS = {"hidden": PUBLISHED_HIDDEN, "learning_rate": PUBLISHED_LEARNING_RATE,
                    "alpha": 1e-4, "batch_size": 200, "n_iter_no_change": 10, "max_epochs": 2000,
                    "input_noise": 0.0, "flux_noise": 0.0, "huber_delta": 0.0, "n_members": 10,
                    "shared_pixels": False}
PAPER_SNR_RANGE = (10.0, 20.0)
OOD_QUANTILE = 0.99         # of the out-of-fold training scores: the OUT_OF_DISTRIBUTION threshold
# Line content (``line_content``): spectra whose lines are shallower than LINE_CONTENT_FRACTION
# of the training spectra's LINE_CONTENT_QUANTILE quantile are flagged OUT_OF_DISTRIBUTION
LINE_CONTENT_QUANTILE = 0.01
LINE_CONTENT_FRACTION = 0.5
# Isolation (``LassoMLPNet.isolation``): the distance to the ISOLATION_NEIGHBOURS-th nearest
# training star. 3 had the best star-grouped CV interval score of the error model on the
# cross-fitted training stars of the reference split among 1, 2, 3 and 5 (README,
# "Calibration of the quoted uncertainty")
ISOLATION_NEIGHBOURS = 3


def per_label(value, default):
    """A parameter given once for every label, or as a dict label -> value (labels it
    leaves out take ``default``): the dict of every label."""
    if not isinstance(value, dict):
        return dict.fromkeys(LABELS, value)
    unknown = sorted(set(value) - set(LABELS))
    if unknown:
        raise ValueError(f"unknown labels {unknown}; the labels are {list(LABELS)}")
    return {**dict.fromkeys(LABELS, default), **value}


def star_parameters(raw):
    """(n, 3) log10 Teff, log g and [Fe/H] estimated from each spectrum: what the error
    model may use to know hard stars (cool, metal-poor) from easy ones."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.column_stack([np.log10(raw["teff"]), raw["logg"], raw["feh"]])


def _fit_member(X, y, groups, params, seed):
    return SigmoidMLPRegressor(random_state=seed, **params).fit(X, y, groups=groups)


def _fit_bootstrap_member(X, y, groups, params, seed, alpha, max_steps):
    """One member on a bootstrap sample of the stars (all spectra of each star drawn), with
    its own LASSO selection at the full set's alpha. Returns (support, network)."""
    rng = np.random.default_rng(seed)
    stars, index = np.unique(groups, return_inverse=True)
    rows_of = np.split(np.argsort(index, kind="stable"), np.cumsum(np.bincount(index))[:-1])
    rows = np.concatenate([rows_of[k] for k in rng.integers(0, stars.size, stars.size)])
    support = lasso_support_at(X[rows], y[rows], alpha, max_steps)
    X_selected = np.ascontiguousarray(X[np.ix_(rows, support)], dtype=np.float32)
    # the copies of a star drawn twice keep its one group, so early stopping never
    # validates a copy on its twin
    return support, _fit_member(X_selected, y[rows], index[rows], params, seed)


class LabelEnsemble(RegressorMixin, BaseEstimator):
    """One label: LASSO selection then an ensemble of sigmoid MLPs on the selected pixels.

    ``X`` must already be standardised (``LassoMLPNet`` does that once for all labels).
    ``fit`` is :meth:`select` then :meth:`fit_networks`; ``LassoMLPNet`` selects every label
    first (the networks may see every label's pixels: ``shared_pixels``), then trains all
    labels' networks together (:meth:`network_jobs`, :meth:`set_members`).
    ``input_pixels_`` are the pixels the networks see, ``support_`` the label's selection.
    ``input_noise`` is in standardised units, ``flux_noise`` in those of the pixels before
    standardisation (``fit_networks``'s ``pixel_scale``); their variances add.
    """

    flux_noise = 0.0        # an artifact from before flux_noise has none
    huber_delta = 0.0       # nor one from before huber_delta

    def __init__(self, log_target=False, hidden_layer_sizes=(100, 50), alpha=1e-3,
                 learning_rate_init=1e-3, batch_size=128, max_epochs=400, n_iter_no_change=30,
                 input_noise=0.0, flux_noise=0.0, huber_delta=0.0, n_members=10,
                 member_selection="shared", selector=None, n_jobs=-1, random_state=0):
        self.log_target = log_target
        self.hidden_layer_sizes = hidden_layer_sizes
        self.alpha = alpha
        self.learning_rate_init = learning_rate_init
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.n_iter_no_change = n_iter_no_change
        self.input_noise = input_noise
        self.flux_noise = flux_noise
        self.huber_delta = huber_delta
        self.n_members = n_members
        self.member_selection = member_selection
        self.selector = selector
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _target(self, y):
        return np.log10(y) if self.log_target else np.asarray(y, dtype=float)

    def _untarget(self, t):
        return 10.0**t if self.log_target else t

    def fit(self, X, y, groups=None, gram=None):
        return self.select(X, y, groups, gram).fit_networks(X, y, groups)

    def select(self, X, y, groups=None, gram=None):
        """The LASSO selection of the label's pixels (``selector_``, ``support_``)."""
        if self.member_selection not in ("shared", "bootstrap"):
            raise ValueError(f"member_selection must be 'shared' or 'bootstrap', got {self.member_selection!r}")
        selector = self.selector if self.selector is not None else LassoFeatureSelector(n_jobs=self.n_jobs)
        self.selector_ = selector.fit(X, self._target(y), groups=groups, gram=gram)
        self.support_ = self.selector_.get_support()
        return self

    def fit_networks(self, X, y, groups=None, pixels=None, pixel_scale=None):
        """The ensemble, on ``pixels`` (bool mask; default: ``support_``). With
        ``member_selection="bootstrap"`` every member selects its own pixels instead.
        ``pixel_scale``: each column's std before standardisation, which ``flux_noise``
        needs."""
        jobs = self.network_jobs(X, y, groups, pixels, pixel_scale)
        return self.set_members(Parallel(n_jobs=self.n_jobs)(jobs))

    def network_jobs(self, X, y, groups=None, pixels=None, pixel_scale=None):
        """``fit_networks`` as a list of joblib tasks, one per member, whose results go to
        :meth:`set_members`: ``LassoMLPNet`` runs every label's in one pool, so that no
        core idles while a label's last networks finish."""
        if self.flux_noise and (pixel_scale is None or self.member_selection == "bootstrap"):
            raise ValueError("flux_noise needs pixel_scale and member_selection='shared'")
        target = self._target(y)
        params = dict(hidden_layer_sizes=tuple(self.hidden_layer_sizes), alpha=self.alpha,
                      learning_rate_init=self.learning_rate_init, batch_size=self.batch_size,
                      max_epochs=self.max_epochs, n_iter_no_change=self.n_iter_no_change,
                      input_noise=self.input_noise, huber_delta=self.huber_delta)
        seeds = np.random.SeedSequence(self.random_state).generate_state(self.n_members)
        if self.member_selection == "bootstrap":
            groups = np.arange(X.shape[0]) if groups is None else np.asarray(groups)
            return [delayed(_fit_bootstrap_member)(X, target, groups, params, int(seed), self.selector_.alpha_,
                                                   getattr(self.selector_, "n_steps_", 1000))
                    for seed in seeds]
        self.input_pixels_ = self.support_ if pixels is None else np.asarray(pixels, dtype=bool)
        if self.flux_noise:     # one std per pixel, in its standardised units
            params["input_noise"] = np.hypot(
                self.input_noise, self.flux_noise / np.asarray(pixel_scale)[self.input_pixels_])
        X_selected = np.ascontiguousarray(X[:, self.input_pixels_], dtype=np.float32)
        return [delayed(_fit_member)(X_selected, target, groups, params, int(seed)) for seed in seeds]

    def set_members(self, fitted):
        """Keep the results of :meth:`network_jobs`' tasks, in their order."""
        if self.member_selection == "bootstrap":
            self.member_supports_ = [support for support, _ in fitted]
            self.members_ = [member for _, member in fitted]
        else:
            self.member_supports_ = None
            self.members_ = list(fitted)
        return self

    def predict_members(self, X):
        """Predictions of every member, shape (n_members, n_samples), in label units."""
        supports = getattr(self, "member_supports_", None)
        if supports is None:            # one shared selection: slice the pixels once
            X_selected = np.ascontiguousarray(X[:, self.pixels_seen()], dtype=np.float32)
            return np.array([self._untarget(m.predict(X_selected)) for m in self.members_])
        return np.array([self._untarget(m.predict(np.ascontiguousarray(X[:, support], dtype=np.float32)))
                         for m, support in zip(self.members_, supports)])

    def pixels_seen(self):
        """The pixels the networks see (an artifact from before ``input_pixels_``: the
        label's selection)."""
        return getattr(self, "input_pixels_", self.support_)

    def predict(self, X, return_std=False):
        members = self.predict_members(X)
        mean = members.mean(axis=0)
        if not return_std:
            return mean
        # one network has no spread: NaN, not 0 (which would claim a perfect model)
        spread = members.std(axis=0, ddof=1) if len(members) > 1 else np.full(mean.shape, np.nan)
        return mean, spread


class LassoMLPNet(BaseEstimator):
    """Teff, log g and [Fe/H] from continuum-normalised spectra.

    Parameters
    ----------
    hidden : dict label -> (h1, h2)
    member_selection : {"shared", "bootstrap"}
        "shared": every member learns on the one LASSO selection of all training spectra
        (members differ only by their initialisation); "bootstrap": each member learns on a
        bootstrap sample of the training stars with its own LASSO selection at the
        cross-validated alpha, so that the ensemble spread also holds the selection's
        variance.
    n_members : int
        Ensemble size (the paper: 10). With 1 network there is no spread: ``_err_model``
        is NaN (and so is ``_err``, whose error model needs the spread); the estimates are
        those of the one network (what ``bench/train_vs_recipe.py`` reports as one member).
    alpha : float
        L2 penalty of the networks.
    learning_rate : float or dict label -> float
        Adam's initial learning rate (one for every label, or per label).
    batch_size, n_iter_no_change : mini-batch size; epochs without improvement of the
        early-stopping loss before training stops.
    input_noise : float or dict label -> float
        Gaussian noise (in units of each standardised pixel's std) added to the networks'
        training inputs (see ``networks``); chosen by star-grouped CV on training stars
        (``bench/tune_lasso_mlpnet.py``).
    flux_noise : float or dict label -> float
        Gaussian noise in units of the continuum-normalised flux (as an observation's: 1/SNR
        per pixel) added to the same inputs; its variance adds to ``input_noise``'s. None
        by default (measured by the same CV, not better).
    huber_delta : float or dict label -> float
        The networks' loss: Huber with this threshold in units of the standardised target
        (``networks.SigmoidMLPRegressor``), 0: squared error.
    cv : int
        Folds of the LASSO cross-validation.
    max_lasso_steps : int
        LARS steps of the first pass (extended while the CV minimum is cut off; see
        ``selection``).
    shared_pixels : bool
        The networks of every label see the pixels LASSO selected for *any* label (with
        ``member_selection="shared"``); False: each label's own selection (the paper's).
        Chosen by star-grouped CV on the training stars (README, "Shared pixels").
    n_jobs, random_state

    Attributes
    ----------
    scaler_ : StandardScaler fitted on the training features
    estimators_ : dict label -> LabelEnsemble
    error_models_ : dict label -> fitted ``ErrorModel`` (None until ``calibrate``)
    repeat_scales_ : dict label -> fitted ``RepeatScale``, the factor k(SNRg) on the ensemble
        std (None until ``calibrate``: k = 1)
    repeat_levels_ : dict label -> one further factor on ``_err_model``, fitted on real repeat
        observations (``set_repeat_levels``, ``lamost-vac calibrate-repeats``); 1 until then
    calibration_counts_ : calibration spectra per SNRg bin (zeros until ``calibrate``)
    ood_range_, ood_scale_, ood_threshold_ : the out-of-distribution score's training label
        range and linear held-out error per label (target units) and its threshold
    line_profile_, line_content_threshold_ : the training spectra's mean line depth over
        the selected pixels (0 elsewhere) and the ``line_content`` below which a spectrum
        is flagged OUT_OF_DISTRIBUTION
    """

    # defaults of the parameters added after artifacts were first saved: an older pickled
    # model has no such attribute, and get_params() / repr() would fail on it
    learning_rate, batch_size, n_iter_no_change, member_selection = 1e-3, 128, 30, "shared"
    flux_noise = 0.0
    shared_pixels = False
    huber_delta = 0.0

    def __init__(self, hidden=None, n_members=10, alpha=1e-3, learning_rate=1e-3, batch_size=128,
                 n_iter_no_change=30, input_noise=DEFAULT_INPUT_NOISE, flux_noise=DEFAULT_FLUX_NOISE,
                 huber_delta=DEFAULT_HUBER_DELTA, max_epochs=400, cv=10,
                 max_lasso_steps=1000, member_selection="shared", shared_pixels=True, n_jobs=-1,
                 random_state=0):
        self.hidden = hidden
        self.shared_pixels = shared_pixels
        self.n_members = n_members
        self.member_selection = member_selection
        self.alpha = alpha
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.n_iter_no_change = n_iter_no_change
        self.input_noise = input_noise
        self.flux_noise = flux_noise
        self.huber_delta = huber_delta
        self.max_epochs = max_epochs
        self.cv = cv
        self.max_lasso_steps = max_lasso_steps
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X, labels, groups=None, progress=None, observed=None):
        """``labels``: dict label -> array (or a structured/astropy table with those columns).

        ``observed``: (n,) bool, the rows that are real observations (default all). The
        others, degraded copies (:mod:`models.augment`), train the selection and the
        networks but do not set the out-of-distribution and line-content thresholds, which
        describe the real spectra a model will be given. ``progress``: a callable
        ``(iterable, total)`` that wraps the networks (``n_members`` per label) as they
        finish, e.g. a progress bar.
        """
        if int(self.n_members) != self.n_members or self.n_members < 1:
            raise ValueError(f"n_members must be a positive integer, got {self.n_members!r}")
        X = np.asarray(X, dtype=np.float64)
        self.scaler_ = StandardScaler().fit(X)
        X_scaled = self.scaler_.transform(X)
        gram = X_scaled.T @ X_scaled          # shared by the three LASSO selections
        hidden = {**DEFAULT_HIDDEN, **(self.hidden or {})}
        rates = per_label(self.learning_rate, 1e-3)
        input_noise = per_label(self.input_noise, DEFAULT_INPUT_NOISE)
        flux_noise = per_label(self.flux_noise, DEFAULT_FLUX_NOISE)
        huber_delta = per_label(self.huber_delta, DEFAULT_HUBER_DELTA)
        values = {label: np.asarray(labels[label], dtype=float) for label in LABELS}
        self.estimators_ = {}
        for label in LABELS:
            selector = LassoFeatureSelector(cv=self.cv, max_steps=self.max_lasso_steps, label=label,
                                            n_jobs=self.n_jobs, random_state=self.random_state)
            self.estimators_[label] = LabelEnsemble(
                log_target=(label == "teff"), hidden_layer_sizes=hidden[label], alpha=self.alpha,
                learning_rate_init=rates[label], batch_size=self.batch_size,
                n_iter_no_change=self.n_iter_no_change, input_noise=input_noise[label],
                flux_noise=flux_noise[label], huber_delta=huber_delta[label],
                max_epochs=self.max_epochs,
                n_members=self.n_members, member_selection=self.member_selection,
                selector=selector, n_jobs=self.n_jobs,
                random_state=self.random_state,
            ).select(X_scaled, values[label], groups=groups, gram=gram)
        # every label's selection feeds every network: a pixel LASSO keeps for log g or
        # [Fe/H] still tells the Teff network something (README, "Shared pixels")
        pixels = self.selected_pixels() if self.shared_pixels else None
        jobs = {label: self.estimators_[label].network_jobs(X_scaled, values[label], groups=groups, pixels=pixels,
                                                            pixel_scale=self.scaler_.scale_)
                for label in LABELS}
        # one pool for all labels' networks: with one pool per label, each label's last
        # networks left a core idle (about one network's time per label)
        fitted = Parallel(n_jobs=self.n_jobs, return_as="generator")(
            job for label in LABELS for job in jobs[label])
        if progress is not None:
            fitted = progress(fitted, sum(len(j) for j in jobs.values()))
        fitted = iter(fitted)
        for label in LABELS:
            self.estimators_[label].set_members(list(islice(fitted, len(jobs[label]))))
        self.snr_bins_ = np.array(SNR_BINS)
        self.error_models_ = {label: None for label in LABELS}
        self.repeat_scales_ = {label: None for label in LABELS}
        self.repeat_levels_ = {}
        self.calibration_counts_ = np.zeros(len(SNR_BINS) - 1, dtype=int)
        observed = np.ones(len(X), dtype=bool) if observed is None else np.asarray(observed, dtype=bool)
        self._fit_ood({label: e._target(values[label]) for label, e in self.estimators_.items()}, observed)
        self._fit_line_content(X, observed)
        self._fit_isolation(values, groups)
        return self

    def selected_pixels(self):
        """The pixels LASSO selected for any label."""
        return np.any([e.support_ for e in self.estimators_.values()], axis=0)

    # -- isolation: where the training stars were few ------------------------------------------
    def _fit_isolation(self, values, groups):
        """Each training star's mean reference parameters (the space of ``star_parameters``)."""
        stars, index = np.unique(np.arange(len(values[LABELS[0]])) if groups is None else np.asarray(groups),
                                 return_inverse=True)
        parameters = star_parameters(values)
        counts = np.bincount(index, minlength=stars.size)
        self.isolation_stars_ = stars
        self.isolation_points_ = np.column_stack([np.bincount(index, weights=column, minlength=stars.size) / counts
                                                  for column in parameters.T])
        self.isolation_scale_ = np.maximum(self.isolation_points_.std(axis=0), 1e-12)

    def isolation(self, raw, exclude=None):
        """Per spectrum, the distance from its estimated parameters (log10 Teff, log g,
        [Fe/H]; ``predict_raw`` output) to the ``ISOLATION_NEIGHBOURS``-th nearest training
        star, each parameter in units of its spread over the training stars: small where the
        networks saw many stars like it, large in sparse corners (metal-poor giants, the
        ends of the ranges) and beyond the training set, where errors are larger. ``exclude``:
        the star of each spectrum, left out of its own neighbours (for a training star's
        cross-fitted prediction, whose star the predicting model did not see). NaN for an
        artifact from before the isolation, and for NaN estimates."""
        from scipy.spatial import cKDTree

        parameters = star_parameters(raw)
        out = np.full(parameters.shape[0], np.nan)
        if getattr(self, "isolation_points_", None) is None:
            return out
        usable = np.isfinite(parameters).all(axis=1)
        k = min(ISOLATION_NEIGHBOURS + (exclude is not None), len(self.isolation_stars_))
        distance, neighbour = cKDTree(self.isolation_points_ / self.isolation_scale_).query(
            parameters[usable] / self.isolation_scale_, k=k)
        distance, neighbour = distance.reshape(-1, k), neighbour.reshape(-1, k)
        if exclude is not None:
            own = self.isolation_stars_[neighbour] == np.asarray(exclude)[usable][:, None]
            distance = np.sort(np.where(own, np.inf, distance), axis=1)
        out[usable] = distance[:, min(ISOLATION_NEIGHBOURS, k) - 1]
        return out

    # -- line content (module doc) --------------------------------------------------------------
    def _fit_line_content(self, X, observed):
        self.line_profile_ = np.where(self.selected_pixels(), 1.0 - X.mean(axis=0), 0.0)
        content = self.line_content(X[observed])
        self.line_content_threshold_ = LINE_CONTENT_FRACTION * float(
            np.quantile(content, LINE_CONTENT_QUANTILE))

    def line_content(self, X):
        """Per spectrum, its line depth along the training spectra's mean line profile
        over the LASSO-selected pixels: 1 for the mean lines, 0 for a line-free spectrum."""
        profile = self.line_profile_
        return (1.0 - np.asarray(X, dtype=np.float64)) @ profile / max(profile @ profile, 1e-300)

    # -- out-of-distribution score (module doc) ---------------------------------------------
    def _fit_ood(self, targets, observed):
        """Training range and held-out error of each label's linear LASSO estimate, and the
        threshold: a quantile of the out-of-fold scores of the (observed) training spectra."""
        target = np.column_stack([targets[label] for label in self.estimators_])[observed]
        out_of_fold = np.column_stack([e.selector_.cv_predictions_ for e in self.estimators_.values()])[observed]
        self.ood_range_ = np.array([target.min(axis=0), target.max(axis=0)])
        self.ood_scale_ = np.maximum(np.std(out_of_fold - target, axis=0), 1e-12)
        self.ood_threshold_ = float(np.quantile(self._ood_from_linear(out_of_fold), OOD_QUANTILE))

    def _ood_from_linear(self, linear):
        low, high = self.ood_range_
        beyond = np.maximum(linear - high, low - linear) / self.ood_scale_
        return np.max(np.maximum(beyond, 0.0), axis=1)

    def ood_score(self, X, scaled=False):
        """Out-of-distribution score per spectrum (0: every linear estimate inside the
        training range). ``scaled=True``: ``X`` is already standardised by ``scaler_``."""
        X_scaled = X if scaled else self.scaler_.transform(np.asarray(X, dtype=np.float64))
        linear = np.column_stack([X_scaled @ e.selector_.coef_ + e.selector_.intercept_
                                  for e in self.estimators_.values()])
        return self._ood_from_linear(linear)

    def predict(self, X, snrg=None, masked=None):
        """Dict of arrays: ``label``, ``label_err`` (calibrated 1-sigma uncertainty; NaN
        before ``calibrate`` or without SNRg), ``label_err_model`` (scaled ensemble std),
        ``flags`` and ``ood_score`` (see :meth:`ood_score`).

        Rows of ``X`` containing NaN (spectra that could not be preprocessed) give NaN.
        ``masked`` (n, n_pixels) bool, the pixels preprocessing had to fill, sets
        MASKED_SELECTED_PIXELS where more than ``MAX_MASKED_SELECTED_FRACTION`` of a label's
        selected pixels are filled.
        """
        X = np.asarray(X, dtype=np.float64)
        raw = self.predict_raw(X)
        usable = np.isfinite(raw[LABELS[0]])
        out = {label: raw[label] for label in self.estimators_}
        out.update(self.uncertainties(raw, snrg))
        flags = domain_flags(out["teff"], out["feh"], snrg, usable)
        if masked is not None:
            flags |= np.where(usable & (self.masked_selected_fraction(masked) > MAX_MASKED_SELECTED_FRACTION),
                              MASKED_SELECTED_PIXELS, 0)
        out["ood_score"] = np.where(usable, self.ood_score(np.where(usable[:, None], X, 0.0)), np.nan)
        flags |= np.where(out["ood_score"] > self.ood_threshold_, OUT_OF_DISTRIBUTION, 0)
        if getattr(self, "line_profile_", None) is not None:     # (artifacts before it: no)
            shallow = self.line_content(np.where(usable[:, None], X, 1.0)) < self.line_content_threshold_
            flags |= np.where(usable & shallow, OUT_OF_DISTRIBUTION, 0)
        out["flags"] = flags
        return out

    def masked_selected_fraction(self, masked):
        """Per spectrum, the largest share of a label's LASSO-selected pixels that are masked
        (its own selection, what carries the label, also with ``shared_pixels``)."""
        masked = np.asarray(masked, dtype=bool)
        return np.max([masked[:, e.support_].mean(axis=1) for e in self.estimators_.values()], axis=0)

    def uncertainties(self, raw, snrg=None):
        """``label_err`` and ``label_err_model`` of every label from ``predict_raw`` output."""
        usable = np.isfinite(raw[LABELS[0]])
        # the error models' inputs shared by every label, computed once per batch
        parameters, isolation = star_parameters(raw), self.isolation(raw)
        out = {}
        for label in self.estimators_:
            out[label + "_err"] = np.where(usable, self._integrated(label, snrg, raw, parameters, isolation),
                                           np.nan)
            out[label + "_err_model"] = raw[label + "_spread"] * self._model_err_scale(label, snrg)
        return out

    def predict_raw(self, X):
        """Dict of arrays: ``label`` (ensemble mean) and ``label_spread`` (the members' std,
        unscaled), NaN for rows of ``X`` containing NaN: what ``calibrate`` is fitted on."""
        X = np.asarray(X, dtype=np.float64)
        usable = np.isfinite(X).all(axis=1)
        X_scaled = self.scaler_.transform(np.where(usable[:, None], X, 0.0))
        out = {}
        for label, estimator in self.estimators_.items():
            mean, std = estimator.predict(X_scaled, return_std=True)
            out[label] = np.where(usable, mean, np.nan)
            out[label + "_spread"] = np.where(usable, std, np.nan)
        return out

    def _model_err_scale(self, label, snrg):
        level = getattr(self, "repeat_levels_", {}).get(label, 1.0)
        scale = self.repeat_scales_.get(label)
        if scale is None:
            return level
        return level * scale.predict(np.nan if snrg is None else snrg)

    def set_repeat_levels(self, levels):
        """Multiply ``_err_model`` of each label by ``levels[label]`` (on top of any earlier
        level): the factor that real repeat observations call for, which simulated training
        repeats cannot show (visit-to-visit flux calibration, sky residuals)."""
        current = getattr(self, "repeat_levels_", {})
        self.repeat_levels_ = {label: current.get(label, 1.0) * float(levels.get(label, 1.0))
                               for label in LABELS}
        return self

    def _integrated(self, label, snrg, raw, parameters, isolation):
        """The calibrated uncertainty of ``label`` for every spectrum (NaN when uncalibrated);
        ``parameters`` and ``isolation``: ``star_parameters(raw)`` and ``isolation(raw)``."""
        error_model = self.error_models_.get(label)
        if error_model is None or snrg is None:
            return np.full(raw[label].shape, np.nan)
        return error_model.predict(snrg, raw[label + "_spread"], parameters, isolation)

    def calibrate(self, X, labels, snrg, groups=None):
        """Calibrate the uncertainties on spectra of stars held out from training (``X``):
        see ``calibrate_predictions``."""
        return self.calibrate_predictions(self.predict_raw(X), labels, snrg, groups)

    def calibrate_predictions(self, raw, labels, snrg, groups=None, level_rules=LEVEL_RULES):
        """Fit the uncertainties on out-of-sample predictions.

        ``raw``: ``predict_raw`` output for spectra whose stars the predicting model never
        saw (held-out stars, or cross-fitted predictions of the training stars, each from
        the fold model trained without its star); ``labels``: their reference labels;
        ``groups``: the star of each spectrum.

        - ``<label>_err``: an ``ErrorModel`` per label (form and, among ``level_rules``, level
          rule chosen by star-grouped CV on these residuals; NaN for SNRg bins with fewer
          than 30 spectra, with a warning);
        - ``<label>_err_model``: the ensemble std times k(SNRg) (``repeat_scales_``), fitted
          so that the pairs of spectra of one star differ by what it says (needs ``groups``;
          with fewer than 30 pairs k = 1).
        """
        snrg = np.asarray(snrg, dtype=float)
        isolation = self.isolation(raw, exclude=groups)
        self.error_models_, self.repeat_scales_ = {}, {label: None for label in LABELS}
        self.repeat_levels_ = {}
        for label in LABELS:
            residuals = raw[label] - np.asarray(labels[label], dtype=float)
            self.error_models_[label] = ErrorModel(bins=tuple(self.snr_bins_), level_rules=level_rules,
                                                   random_state=self.random_state).fit(
                residuals, snrg, raw[label + "_spread"], star_parameters(raw), groups=groups,
                isolation=isolation)
            if groups is not None:
                self.repeat_scales_[label] = RepeatScale().fit(raw[label], raw[label + "_spread"], snrg, groups)
        self.calibration_counts_ = self.error_models_[LABELS[0]].counts_
        # kept so that the uncertainties can be re-fitted and checked without retraining
        self.calibration_set_ = {"raw": {k: np.asarray(v, dtype=float) for k, v in raw.items()},
                                 "reference": {k: np.asarray(labels[k], dtype=float) for k in LABELS},
                                 "snrg": snrg, "groups": None if groups is None else np.asarray(groups)}
        return self
