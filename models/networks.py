"""A small two-hidden-layer sigmoid MLP regressor, written for speed on many spectra.

scikit-learn's MLPRegressor works in float64 and steps through mini-batches of 200 in
Python; training ten of them per label (the ensemble) would take most of an hour on two
cores. This network trains in float32 with larger mini-batches and Adam, and its early
stopping holds out whole stars (``groups``) so that repeated spectra of one star cannot
sit on both sides of the validation split.

Noise injection (``input_noise``): every mini-batch sees its standardised inputs plus
fresh Gaussian noise. A training set of a few hundred stars is small for networks of
this size; noise on the inputs is a data-driven regulariser (Bishop 1995: to first order
a Tikhonov penalty on the input gradient) and mimics the lower-S/N spectra the model is
applied to. ``bench/tune_lasso_mlpnet.py`` chooses its level by star-grouped CV.
"""
import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin

from .splits import group_holdout


def _sigmoid(a):
    # float32 exp overflows for a < -88; clipping keeps the gradient finite and exact enough
    return 1.0 / (1.0 + np.exp(-np.clip(a, -60.0, 60.0)))


class SigmoidMLPRegressor(RegressorMixin, BaseEstimator):
    """Two (or more) hidden sigmoid layers, linear output, L2 penalty, Adam, early stopping.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int
    alpha : float
        L2 penalty on the weights (as in scikit-learn: ``alpha / 2 * ||W||^2 / n_samples``).
    learning_rate_init : float
        Adam step size.
    batch_size : int
    max_epochs : int
    validation_fraction : float
        Fraction of the stars held out to decide when to stop.
    n_iter_no_change : int
        Epochs without improvement of the validation loss before stopping.
    input_noise : float
        Standard deviation of the Gaussian noise added to each training mini-batch's
        (standardised) inputs; 0 turns it off. Validation and prediction see clean inputs.
    random_state : int or None
    """

    def __init__(self, hidden_layer_sizes=(400, 50), alpha=1e-4, learning_rate_init=1e-3,
                 batch_size=128, max_epochs=300, validation_fraction=0.1, n_iter_no_change=20,
                 input_noise=0.0, random_state=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.alpha = alpha
        self.learning_rate_init = learning_rate_init
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.input_noise = input_noise
        self.random_state = random_state

    # -- the network ---------------------------------------------------------------------
    def _forward(self, X, weights, biases):
        activations = [X]
        for W, b in zip(weights[:-1], biases[:-1]):
            activations.append(_sigmoid(activations[-1] @ W + b))
        output = activations[-1] @ weights[-1] + biases[-1]
        return activations, output[:, 0]

    def _gradients(self, X, y, weights, biases):
        activations, output = self._forward(X, weights, biases)
        n = X.shape[0]
        delta = ((output - y) / n)[:, None].astype(np.float32)
        grad_w, grad_b = [None] * len(weights), [None] * len(biases)
        for layer in range(len(weights) - 1, -1, -1):
            grad_w[layer] = activations[layer].T @ delta + (self.alpha / n) * weights[layer]
            grad_b[layer] = delta.sum(axis=0)
            if layer:
                a = activations[layer]
                delta = (delta @ weights[layer].T) * a * (1.0 - a)
        return grad_w, grad_b

    def _init_weights(self, n_features, rng):
        sizes = [n_features, *self.hidden_layer_sizes, 1]
        weights, biases = [], []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = np.sqrt(2.0 / (fan_in + fan_out))   # Glorot, doubled for sigmoid units
            weights.append(rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32))
            biases.append(rng.uniform(-bound, bound, fan_out).astype(np.float32))
        return weights, biases

    # -- scikit-learn API ----------------------------------------------------------------
    def fit(self, X, y, groups=None):
        rng = np.random.default_rng(self.random_state)
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.float64)
        self.y_mean_, self.y_scale_ = float(y.mean()), float(y.std() or 1.0)
        target = ((y - self.y_mean_) / self.y_scale_).astype(np.float32)
        train, valid = group_holdout(len(y), groups, self.validation_fraction, rng)
        X_train, y_train = X[train], target[train]
        X_valid, y_valid = X[valid], target[valid]

        weights, biases = self._init_weights(X.shape[1], rng)
        params = weights + biases
        first_moment = [np.zeros_like(p) for p in params]
        second_moment = [np.zeros_like(p) for p in params]
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        best = (np.inf, None)
        since_best, step = 0, 0
        self.validation_curve_ = []
        for epoch in range(self.max_epochs):
            order = rng.permutation(len(y_train))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                inputs = X_train[batch]
                if self.input_noise:
                    inputs = inputs + np.float32(self.input_noise) * rng.standard_normal(
                        inputs.shape, dtype=np.float32)
                grad_w, grad_b = self._gradients(inputs, y_train[batch], weights, biases)
                step += 1
                lr = self.learning_rate_init * np.sqrt(1 - beta2**step) / (1 - beta1**step)
                for p, g, m, v in zip(params, grad_w + grad_b, first_moment, second_moment):
                    m *= beta1
                    m += (1 - beta1) * g
                    v *= beta2
                    v += (1 - beta2) * g * g
                    p -= lr * m / (np.sqrt(v) + eps)
            valid_loss = float(np.mean((self._forward(X_valid, weights, biases)[1] - y_valid) ** 2))
            self.validation_curve_.append(valid_loss)
            if valid_loss < best[0] - 1e-6:
                best = (valid_loss, [p.copy() for p in params])
                since_best = 0
            else:
                since_best += 1
                if since_best >= self.n_iter_no_change:
                    break
        n_layers = len(weights)
        self.coefs_ = best[1][:n_layers]
        self.intercepts_ = best[1][n_layers:]
        self.n_epochs_ = epoch + 1
        self.best_validation_loss_ = best[0]
        return self

    def predict(self, X):
        X = np.asarray(X, dtype=np.float32)
        return self._forward(X, self.coefs_, self.intercepts_)[1].astype(np.float64) * self.y_scale_ + self.y_mean_
