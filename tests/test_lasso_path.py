"""The LASSO path (models/lasso_path.py) against scikit-learn's solver and the LASSO's
optimality conditions, on problems whose paths drop variables."""
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import lars_path_gram

from models.lasso_path import LassoPathWarning, lasso_path_gram


def correlated_problem(n, p, seed, n_informative=10):
    """Centred X with neighbouring columns correlated (as neighbouring pixels are) and y
    from a few of them: LASSO paths on such data drop variables as well as add them."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, p))
    X = z + 0.8 * np.roll(z, 1, axis=1)
    y = X[:, :n_informative] @ rng.standard_normal(n_informative) + rng.standard_normal(n)
    X -= X.mean(axis=0)
    y -= y.mean()
    return X.T @ X, X.T @ y, n


def n_drops(coefs):
    """Knots at which some coefficient goes back to zero."""
    nonzero = coefs != 0
    return int(np.sum(np.any(nonzero[:, :-1] & ~nonzero[:, 1:], axis=0)))


@pytest.mark.parametrize("n, p, steps", [(80, 40, 200), (200, 150, 300), (300, 500, 250)])
def test_path_is_scikit_learns(n, p, steps):
    gram, xy, n = correlated_problem(n, p, seed=p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        alphas_ref, _, coefs_ref = lars_path_gram(xy, gram, n_samples=n, max_iter=steps, method="lasso")
    alphas, coefs = lasso_path_gram(xy, gram, n, steps)
    assert n_drops(coefs_ref) > 0          # the paths exercise the LASSO modification
    assert alphas.shape == alphas_ref.shape and coefs.shape == coefs_ref.shape
    np.testing.assert_allclose(alphas, alphas_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(coefs, coefs_ref, rtol=0, atol=1e-9 * np.abs(coefs_ref).max())


def test_path_satisfies_the_lasso_optimality_conditions():
    """At every knot: |X'(y - Xw)| / n <= alpha everywhere, with equality and the
    coefficient's sign on every non-zero coefficient."""
    gram, xy, n = correlated_problem(200, 150, seed=3)
    alphas, coefs = lasso_path_gram(xy, gram, n, 400)
    assert n_drops(coefs) > 0
    tolerance = 1e-9 * alphas[0]
    for alpha, coef in zip(alphas, coefs.T):
        corr = (xy - gram @ coef) / n
        assert np.all(np.abs(corr) <= alpha + tolerance)
        on = coef != 0
        np.testing.assert_allclose(corr[on], alpha * np.sign(coef[on]), rtol=0, atol=tolerance)


def test_stops_at_alpha_min_with_the_solution_there():
    gram, xy, n = correlated_problem(200, 150, seed=4)
    full_alphas, full_coefs = lasso_path_gram(xy, gram, n, 10_000)
    alpha_min = 0.5 * (full_alphas[40] + full_alphas[41])      # between two knots
    alpha, coef = lasso_path_gram(xy, gram, n, 10_000, alpha_min=alpha_min, return_path=False)
    assert alpha == alpha_min
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        _, _, reference = lars_path_gram(xy, gram, n_samples=n, max_iter=10_000, alpha_min=alpha_min,
                                         method="lasso", return_path=False)
    np.testing.assert_allclose(coef, reference, rtol=0, atol=1e-10)
    # linear between the knots
    t = (full_alphas[40] - alpha_min) / (full_alphas[40] - full_alphas[41])
    np.testing.assert_allclose(coef, full_coefs[:, 40] + t * (full_coefs[:, 41] - full_coefs[:, 40]),
                               atol=1e-10)
    alphas, coefs = lasso_path_gram(xy, gram, n, 10_000, alpha_min=alpha_min)
    assert alphas[-1] == alpha_min and np.allclose(coefs[:, -1], coef)


def test_path_runs_to_the_least_squares_fit_when_not_cut():
    """More rows than columns, no step budget: the path ends at alpha 0 on the
    unregularised least-squares solution."""
    gram, xy, n = correlated_problem(300, 30, seed=5)
    alphas, coefs = lasso_path_gram(xy, gram, n, 10_000)
    assert alphas[-1] == pytest.approx(0, abs=1e-10)
    np.testing.assert_allclose(coefs[:, -1], np.linalg.solve(gram, xy), rtol=1e-8)


def test_collinear_variable_is_left_out_with_a_warning():
    """An exact copy of an active column (its Cholesky pivot below 1e-7) is left out for
    good with a warning naming it: the path is then the path without that column, which
    also solves the LASSO with it (scikit-learn's solver lets such a column come back with a
    made-up correlation and leaves the path)."""
    rng = np.random.default_rng(6)
    X = rng.standard_normal((100, 8)) * 1e-3         # small norms: the pivot is ~1e-10
    X = np.column_stack([X, X[:, 2]])
    X -= X.mean(axis=0)
    y = X[:, 2] * 3 + X[:, 5] + 1e-4 * rng.standard_normal(100)
    y -= y.mean()
    with pytest.warns(LassoPathWarning, match="variable 8 is collinear with the 1 active ones"):
        alphas, coefs = lasso_path_gram(X.T @ y, X.T @ X, 100, 100)
    without = X[:, :8]
    reference_alphas, reference_coefs = lasso_path_gram(without.T @ y, without.T @ without, 100, 100)
    np.testing.assert_allclose(alphas, reference_alphas, rtol=1e-9)
    np.testing.assert_allclose(coefs[:8], reference_coefs, rtol=1e-9, atol=1e-12)
    assert not coefs[8].any()
