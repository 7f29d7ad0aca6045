"""The six comparison models of Li et al. (Table 4), on exactly LASSO-MLPNet's features.

For every label each baseline sees what that label's networks see: the training features
standardised by the fitted model's scaler, restricted to the pixels its LASSO kept, and the
same target (log10 Teff for Teff, dex for log g and [Fe/H]). Only the regressor differs,
so the comparison table measures the regressor and nothing else.

The baselines and the choices that the paper leaves open:

- ``LR``: ordinary least squares.
- ``ElasticNet``: ``ElasticNetCV`` with l1_ratio 0.5 over 10 alphas and 5 folds formed
  by star (repeat spectra of a star in both training and validation folds would favour
  too little regularisation).
- ``SVR``: RBF kernel, ``gamma="scale"``, C = 1, epsilon = 0.1 (scikit-learn defaults).
- ``LASSO-SVR``: the same SVR on features multiplied by |LASSO coefficient| of each
  selected pixel, so that pixels the LASSO found more informative weigh more in the
  kernel distance (``LassoWeightedSVR``).
- ``RF``: ``RandomForestRegressor``, 100 trees, each split drawn from a third of the
  pixels (Breiman's regression default, as in R's randomForest). scikit-learn's default of
  all pixels took 2.3x longer for no better accuracy ([Fe/H], 424 pixels, 2,036 spectra:
  64 s vs 28 s on two busy cores, held-out MAE 0.285 vs 0.272 dex).
- ``ET``: ``ExtraTreesRegressor``, 100 trees, scikit-learn defaults otherwise.

Cost, measured on 2,036 simulated training spectra (SNRg 10-20; 210 / 266 / 424 selected
pixels for Teff / log g / [Fe/H]) on a shared, busy two-core machine: 150 s for all
eighteen fits (RF 60 s, ET 66 s, LR 12 s, ElasticNetCV 9 s, each SVR about 1 s; with RF
on all pixels it was 345 s), and the fitted forests add ~50 MB to the compressed artifact;
this is why baselines are fitted only on request (``train-files --baselines``).

Every baseline learns a standardised target (zero mean, unit variance): SVR's epsilon
tube and ElasticNet's alpha are in target units, and log10 Teff spans ~0.2 while log g
spans ~5, so without it one fixed setting could not suit every label. For LR and the
tree ensembles standardising is an affine change that does not alter their predictions.
"""
import hashlib
import time

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin, clone
from sklearn.compose import TransformedTargetRegressor
from sklearn.ensemble import ExtraTreesRegressor, RandomForestRegressor
from sklearn.linear_model import ElasticNetCV, LinearRegression
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVR

from .labels import LABELS
from .training import split_rows

BASELINE_NAMES = ("LR", "ElasticNet", "SVR", "LASSO-SVR", "RF", "ET")
MODEL_NAME = "LASSO-MLPNet"
METHOD_NAMES = BASELINE_NAMES + (MODEL_NAME,)     # rows of the paper's Table 4, in order


class LassoWeightedSVR(RegressorMixin, BaseEstimator):
    """RBF support-vector regression on features scaled by |LASSO coefficient|.

    Parameters
    ----------
    weights : array (n_features,)
        LASSO coefficients of the features (signs are ignored).
    C, epsilon, gamma : as in ``sklearn.svm.SVR``
        With ``gamma="scale"`` an overall factor on ``weights`` does not change the fit;
        only the relative weights matter.

    Attributes
    ----------
    weights_ : array, |weights| as float
    svr_ : the fitted ``SVR`` on the weighted features
    """

    def __init__(self, weights=None, C=1.0, epsilon=0.1, gamma="scale"):
        self.weights = weights
        self.C = C
        self.epsilon = epsilon
        self.gamma = gamma

    def _weighted(self, X):
        X = np.asarray(X, dtype=np.float64)
        if X.shape[1] != self.weights_.size:
            raise ValueError(f"X has {X.shape[1]} features, the weights {self.weights_.size}")
        return X * self.weights_

    def fit(self, X, y):
        if self.weights is None:
            raise ValueError("LassoWeightedSVR needs the LASSO coefficients as weights")
        self.weights_ = np.abs(np.asarray(self.weights, dtype=np.float64)).ravel()
        self.svr_ = SVR(kernel="rbf", C=self.C, epsilon=self.epsilon, gamma=self.gamma)
        self.svr_.fit(self._weighted(X), y)
        return self

    def predict(self, X):
        return self.svr_.predict(self._weighted(X))


def _standardised_target(regressor):
    return TransformedTargetRegressor(regressor=regressor, transformer=StandardScaler())


class BaselineSet(BaseEstimator):
    """The paper's six comparison regressors per label, on a fitted ``LassoMLPNet``'s features.

    Parameters
    ----------
    baselines : tuple of str
        Which of ``BASELINE_NAMES`` to fit.
    n_estimators : int
        Trees of RF and ET.
    rf_max_features : float, int or str
        Pixels considered at each split of RF (``max_features`` of scikit-learn).
    svr_C, svr_epsilon : float
        SVR and LASSO-SVR settings (epsilon in units of the target's standard deviation).
    elasticnet_l1_ratio : float
    elasticnet_alphas : int
        Number of alphas ElasticNetCV tries.
    cv : int
        Folds (by star when ``groups`` are given) of ElasticNetCV.
    n_jobs : int
        Cores for the tree ensembles and ElasticNetCV.
    random_state : int

    Attributes
    ----------
    scaler_ : the LassoMLPNet's fitted feature scaler (shared, so ``predict`` needs only X)
    supports_ : dict label -> boolean pixel mask selected by the LASSO
    log_target_ : dict label -> bool, True where the target is log10 of the label
    estimators_ : dict label -> dict baseline name -> fitted regressor
    fit_seconds_ : dict label -> dict baseline name -> wall-clock seconds of its fit
    n_train_ : int
    """

    def __init__(self, baselines=BASELINE_NAMES, n_estimators=100, rf_max_features=1 / 3, svr_C=1.0,
                 svr_epsilon=0.1, elasticnet_l1_ratio=0.5, elasticnet_alphas=10, cv=5, n_jobs=-1,
                 random_state=0):
        self.baselines = baselines
        self.n_estimators = n_estimators
        self.rf_max_features = rf_max_features
        self.svr_C = svr_C
        self.svr_epsilon = svr_epsilon
        self.elasticnet_l1_ratio = elasticnet_l1_ratio
        self.elasticnet_alphas = elasticnet_alphas
        self.cv = cv
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _make(self, name, lasso_weights, cv_splits):
        if name == "LR":
            regressor = LinearRegression()
        elif name == "ElasticNet":
            regressor = ElasticNetCV(l1_ratio=self.elasticnet_l1_ratio, alphas=self.elasticnet_alphas,
                                     cv=cv_splits, n_jobs=self.n_jobs, max_iter=5000)
        elif name == "SVR":
            regressor = SVR(kernel="rbf", C=self.svr_C, epsilon=self.svr_epsilon, gamma="scale")
        elif name == "LASSO-SVR":
            regressor = LassoWeightedSVR(weights=lasso_weights, C=self.svr_C, epsilon=self.svr_epsilon)
        elif name == "RF":
            regressor = RandomForestRegressor(n_estimators=self.n_estimators, max_features=self.rf_max_features,
                                              n_jobs=self.n_jobs, random_state=self.random_state)
        elif name == "ET":
            regressor = ExtraTreesRegressor(n_estimators=self.n_estimators, n_jobs=self.n_jobs,
                                            random_state=self.random_state)
        else:
            raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINE_NAMES)}")
        return _standardised_target(regressor)

    def fit(self, model, X, labels, groups=None, progress=None):
        """Fit on the features ``X`` (unscaled, as given to ``model.fit``) of the model's
        training spectra; ``labels``: dict label -> array; ``groups``: star per spectrum."""
        X = np.asarray(X, dtype=np.float64)
        X_scaled = model.scaler_.transform(X)
        groups = np.arange(X.shape[0]) if groups is None else np.asarray(groups)
        n_folds = min(self.cv, np.unique(groups).size)
        cv_splits = list(GroupKFold(n_splits=n_folds).split(X_scaled, groups=groups))
        self.scaler_ = model.scaler_
        self.supports_, self.log_target_, self.estimators_, self.fit_seconds_ = {}, {}, {}, {}
        for label in (progress or iter)(list(model.estimators_)):
            ensemble = model.estimators_[label]
            support = np.asarray(ensemble.support_, dtype=bool)
            X_selected = X_scaled[:, support]
            target = ensemble._target(np.asarray(labels[label], dtype=float))
            lasso_weights = ensemble.selector_.coef_[support]
            self.supports_[label] = support
            self.log_target_[label] = bool(ensemble.log_target)
            self.estimators_[label], self.fit_seconds_[label] = {}, {}
            for name in self.baselines:
                start = time.perf_counter()
                self.estimators_[label][name] = clone(self._make(name, lasso_weights, cv_splits)).fit(
                    X_selected, target)
                self.fit_seconds_[label][name] = time.perf_counter() - start
        self.n_train_ = int(X.shape[0])
        return self

    def predict(self, X):
        """{label: {baseline name: predictions in label units}}; rows with NaN give NaN."""
        X = np.asarray(X, dtype=np.float64)
        usable = np.isfinite(X).all(axis=1)
        X_scaled = self.scaler_.transform(np.where(usable[:, None], X, 0.0))
        out = {}
        for label, estimators in self.estimators_.items():
            X_selected = X_scaled[:, self.supports_[label]]
            out[label] = {}
            for name, estimator in estimators.items():
                target = estimator.predict(X_selected)
                values = 10.0**target if self.log_target_[label] else target
                out[label][name] = np.where(usable, values, np.nan)
        return out


def fit_baselines_on_training_set(model, features, labels, snrg, stars, obsids, training,
                                  random_state=0, n_jobs=-1, progress=None, **params):
    """Fit a ``BaselineSet`` on the spectra the model was trained on.

    ``training`` is the training-set description returned by ``train_lasso_mlpnet`` (it
    holds the SNR range, hold-out fraction and the hash of the training obsids).
    Raises ``RuntimeError`` if the recomputed training rows do not match that hash, so a
    change of the training recipe cannot silently give the baselines other data.
    """
    train, _ = split_rows(features, labels, snrg, stars, tuple(training["snr_range"]),
                          training["holdout_fraction"], random_state)
    digest = hashlib.sha256(np.sort(np.asarray(obsids, dtype=np.int64)[train]).tobytes()).hexdigest()
    if digest != training["obsid_sha256"]:
        raise RuntimeError("baselines: could not reproduce the model's training spectra "
                           "(obsid hash differs); has models.training changed its split?")
    return BaselineSet(n_jobs=n_jobs, random_state=random_state, **params).fit(
        model, np.asarray(features)[train], {k: np.asarray(labels[k], dtype=float)[train] for k in LABELS},
        groups=np.asarray(stars)[train], progress=progress)
