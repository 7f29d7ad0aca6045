"""LASSO feature selection with the regularisation chosen by k-fold cross-validation.

scikit-learn's LassoCV runs coordinate descent on every fold and alpha from scratch; on
~4,000 spectra x ~2,800 strongly correlated pixels it needs thousands of sweeps per alpha
and is most of the published recipe's 15 minutes. Here:

- the LASSO path is computed exactly with LARS (:func:`models.lasso_path.lasso_path_gram`,
  the path of scikit-learn's solver, several times faster here), one pass per fold,
  stopping after ``max_steps`` steps; when the cross-validated minimum falls at the end of
  the path that was computed (the path was cut before the best alpha), the path is
  extended (steps x 1.5) until the minimum is inside it or the path is complete. So
  ``max_steps`` (default 1,000: the paper kept 643-930 pixels) only sets where the search
  starts, never what it finds; a minimum still at an end of the alpha grid (no pixel at
  all, or the smallest alpha of a complete path) raises a :class:`LassoPathWarning`;
- the Gram matrix X'X is computed once; each fold's centred Gram matrix is obtained by
  subtracting the held-out rows' contribution;
- folds are formed by star (``groups``), so a star's repeat spectra never validate its
  own fit.
"""
import warnings

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectorMixin

from .lasso_path import LassoPathWarning, lasso_path_gram
from .splits import group_kfold_indices


def _centred(gram, xy, x_sum, y_sum, n):
    """Centre a Gram matrix and X'y given column sums, as if X and y had zero mean."""
    return gram - np.outer(x_sum, x_sum) / n, xy - x_sum * (y_sum / n)


def _fold_path(X_test, y_test, n, gram_all, xy_all, x_sum, y_sum, max_steps):
    """LASSO path fitted on all rows but the held-out ones, and its residuals on them."""
    n_train = n - y_test.size
    x_sum_train, y_sum_train = x_sum - X_test.sum(axis=0), y_sum - y_test.sum()
    gram, xy = _centred(gram_all - X_test.T @ X_test, xy_all - X_test.T @ y_test,
                        x_sum_train, y_sum_train, n_train)
    alphas, coefs = lasso_path_gram(xy, gram, n_train, max_steps)
    residuals = (y_test - y_sum_train / n_train)[:, None] - (X_test - x_sum_train / n_train) @ coefs
    return alphas, residuals


def _lasso_coef_at(gram, xy, n, alpha, max_steps):
    """LASSO coefficients at ``alpha`` from a centred Gram matrix: LARS stops at alpha_min =
    alpha, so the step budget only has to be large enough to get there, and only the end
    point is kept."""
    return lasso_path_gram(xy, gram, n, 10 * (gram.shape[0] + max_steps), alpha_min=alpha,
                           return_path=False)[1]


def lasso_support_at(X, y, alpha, max_steps=1000):
    """Pixels with a non-zero LASSO coefficient at a given ``alpha`` (no cross-validation):
    the selection of one bootstrap member at the alpha the full training set chose."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x_sum = X.sum(axis=0)
    gram, xy = _centred(X.T @ X, X.T @ y, x_sum, y.sum(), X.shape[0])
    return _lasso_coef_at(gram, xy, X.shape[0], alpha, max_steps) != 0


class LassoFeatureSelector(SelectorMixin, BaseEstimator):
    """Keep the pixels with a non-zero LASSO coefficient at the cross-validated alpha.

    Parameters
    ----------
    cv : int
        Number of folds (the paper used 10).
    n_alphas : int
        Size of the alpha grid on which the folds' validation errors are compared.
    max_steps : int
        LARS steps of the first pass per fold; x 1.5 while the CV minimum sits at the end
        of the computed path (see the module doc), so it does not bound the selection.
    label : str
        Name used in warnings (e.g. "teff").
    n_jobs : int or None
        Folds run in parallel processes (LARS is partly pure Python).
    random_state : int
        Seed of the fold assignment.

    Attributes
    ----------
    alphas_, mse_path_ (n_alphas, cv), alpha_, coef_, intercept_, n_selected_
    n_steps_ : int, LARS steps per fold path that the search needed
    interior_minimum_ : bool, whether ``alpha_`` is an interior minimum of the CV curve
    cv_predictions_ : (n_samples,) out-of-fold predictions of the linear LASSO at ``alpha_``
    """

    def __init__(self, cv=10, n_alphas=100, max_steps=1000, label=None, n_jobs=-1, random_state=0):
        self.cv = cv
        self.n_alphas = n_alphas
        self.max_steps = max_steps
        self.label = label
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X, y, groups=None, gram=None):
        """Fit on scaled features ``X``; ``gram`` (X'X) may be passed to share it between labels."""
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        n = X.shape[0]
        groups = np.arange(n) if groups is None else np.asarray(groups)
        gram_all = X.T @ X if gram is None else gram
        xy_all, x_sum, y_sum = X.T @ y, X.sum(axis=0), y.sum()
        rng = np.random.default_rng(self.random_state)
        folds = list(group_kfold_indices(groups, self.cv, rng))

        steps = max(int(self.max_steps), 1)
        while True:
            paths = Parallel(n_jobs=self.n_jobs)(
                delayed(_fold_path)(X[test], y[test], n, gram_all, xy_all, x_sum, y_sum, steps)
                for _, test in folds)
            best = self._cv_curve(paths)
            # a path shorter than the step budget ran to its end (alpha 0 or no variable left)
            cut = any(alphas.size > steps for alphas, _ in paths)
            if best < self.n_alphas - 1 or not cut:
                break
            # the minimum may lie beyond where the paths were cut; x 1.5, not x 2: a path's
            # steps cost more the more variables are active (timings in models/lasso_path.py),
            # and a cut minimum is usually not far beyond the cut
            steps = max(int(steps * 1.5), steps + 1)
        self.n_steps_ = steps
        self.alpha_ = float(self.alphas_[best])
        # out-of-fold linear predictions at alpha_: every row predicted by a fit that never
        # saw its star (used to choose thresholds on held-out stars, see lasso_mlpnet)
        self.cv_predictions_ = np.empty(n)
        for (_, test), residuals in zip(folds, self._fold_residuals):
            self.cv_predictions_[test] = y[test] - residuals[:, best]
        del self._fold_residuals
        self.interior_minimum_ = 0 < best < self.n_alphas - 1
        if not self.interior_minimum_:
            where = ("the largest alpha of the grid (next to no pixel selected)" if best == 0 else
                     "the smallest alpha of the complete path (an unregularised fit)")
            warnings.warn(LassoPathWarning(
                f"LASSO {self.label or 'selection'}: the cross-validated alpha {self.alpha_:.3g} is "
                f"{where}, not an interior minimum of the CV curve: too few training spectra "
                f"for this many pixels, or labels the pixels do not predict"), stacklevel=2)

        gram, xy = _centred(gram_all, xy_all, x_sum, y_sum, n)
        self.coef_ = _lasso_coef_at(gram, xy, n, self.alpha_, steps)
        self.intercept_ = float(y_sum / n - (x_sum / n) @ self.coef_)
        self.n_selected_ = int(np.count_nonzero(self.coef_))
        return self

    def _cv_curve(self, paths):
        """Set ``alphas_`` and ``mse_path_`` from the folds' paths; the index of the minimum.

        Folds are compared on a common grid inside the range every fold's path reached;
        residuals are linear in alpha between LARS knots, so interpolating them is exact.
        """
        top = min(a[0] for a, _ in paths)
        bottom = max(a[-1] for a, _ in paths)
        self.alphas_ = np.geomspace(top, max(bottom, top * 1e-6), self.n_alphas)
        mse = []
        self._fold_residuals = []
        for alphas, residuals in paths:
            at_grid = np.array([np.interp(self.alphas_, alphas[::-1], r[::-1]) for r in residuals])
            mse.append(np.mean(at_grid**2, axis=0))
            self._fold_residuals.append(at_grid)
        self.mse_path_ = np.array(mse).T
        return int(np.argmin(self.mse_path_.mean(axis=1)))

    def _get_support_mask(self):
        return self.coef_ != 0
