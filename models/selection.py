"""LASSO feature selection with the regularisation chosen by k-fold cross-validation.

scikit-learn's LassoCV runs coordinate descent on every fold and alpha from scratch; on
~4,000 spectra x ~2,800 strongly correlated pixels it needs thousands of sweeps per alpha
and is most of the published recipe's 15 minutes. Here:

- the LASSO path is computed exactly with LARS (``lars_path_gram``), one pass per fold,
  stopping after ``max_steps`` steps (the paper kept 643-930 pixels, so ~1,000 steps
  cover every alpha worth choosing);
- the Gram matrix X'X is computed once; each fold's centred Gram matrix is obtained by
  subtracting the held-out rows' contribution;
- folds are formed by star (``groups``), so a star's repeat spectra never validate its
  own fit.
"""
import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator
from sklearn.feature_selection import SelectorMixin
from sklearn.linear_model import lars_path_gram

from .splits import group_kfold_indices


def _centred(gram, xy, x_sum, y_sum, n):
    """Centre a Gram matrix and X'y given column sums, as if X and y had zero mean."""
    return gram - np.outer(x_sum, x_sum) / n, xy - x_sum * (y_sum / n)


def _lasso_path(gram, xy, n, max_steps, alpha_min=0.0):
    alphas, _, coefs = lars_path_gram(xy, gram, n_samples=n, max_iter=max_steps,
                                      alpha_min=alpha_min, method="lasso")
    return alphas, coefs


def _fold_path(X_test, y_test, n, gram_all, xy_all, x_sum, y_sum, max_steps):
    """LASSO path fitted on all rows but the held-out ones, and its residuals on them."""
    n_train = n - y_test.size
    x_sum_train, y_sum_train = x_sum - X_test.sum(axis=0), y_sum - y_test.sum()
    gram, xy = _centred(gram_all - X_test.T @ X_test, xy_all - X_test.T @ y_test,
                        x_sum_train, y_sum_train, n_train)
    alphas, coefs = _lasso_path(gram, xy, n_train, max_steps)
    residuals = (y_test - y_sum_train / n_train)[:, None] - (X_test - x_sum_train / n_train) @ coefs
    return alphas, residuals


class LassoFeatureSelector(SelectorMixin, BaseEstimator):
    """Keep the pixels with a non-zero LASSO coefficient at the cross-validated alpha.

    Parameters
    ----------
    cv : int
        Number of folds (the paper used 10).
    n_alphas : int
        Size of the alpha grid on which the folds' validation errors are compared.
    max_steps : int
        LARS steps per path; bounds the number of selected pixels.
    n_jobs : int or None
        Folds run in parallel processes (LARS is partly pure Python).
    random_state : int
        Seed of the fold assignment.

    Attributes
    ----------
    alphas_, mse_path_ (n_alphas, cv), alpha_, coef_, intercept_, n_selected_
    """

    def __init__(self, cv=10, n_alphas=100, max_steps=600, n_jobs=-1, random_state=0):
        self.cv = cv
        self.n_alphas = n_alphas
        self.max_steps = max_steps
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

        paths = Parallel(n_jobs=self.n_jobs)(
            delayed(_fold_path)(X[test], y[test], n, gram_all, xy_all, x_sum, y_sum, self.max_steps)
            for _, test in folds)
        # compare folds on a common grid, inside the range every fold's path reached;
        # residuals are linear in alpha between LARS knots, so interpolating them is exact
        top = min(a[0] for a, _ in paths)
        bottom = max(a[-1] for a, _ in paths)
        self.alphas_ = np.geomspace(top, max(bottom, top * 1e-6), self.n_alphas)
        mse = []
        for alphas, residuals in paths:
            at_grid = np.array([np.interp(self.alphas_, alphas[::-1], r[::-1]) for r in residuals])
            mse.append(np.mean(at_grid**2, axis=0))
        self.mse_path_ = np.array(mse).T
        best = int(np.argmin(self.mse_path_.mean(axis=1)))
        self.alpha_ = float(self.alphas_[best])

        gram, xy = _centred(gram_all, xy_all, x_sum, y_sum, n)
        _, coefs = _lasso_path(gram, xy, n, self.max_steps, alpha_min=self.alpha_)
        self.coef_ = coefs[:, -1]
        self.intercept_ = float(y_sum / n - (x_sum / n) @ self.coef_)
        self.n_selected_ = int(np.count_nonzero(self.coef_))
        return self

    def _get_support_mask(self):
        return self.coef_ != 0
