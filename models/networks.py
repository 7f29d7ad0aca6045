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

Huber loss (``huber_delta``): squared error for residuals up to ``huber_delta`` (in units
of the standardised target), absolute error beyond. The catalogue is judged by its mean
absolute error, and reference labels carry errors of their own (a few stars' labels are
off by far more than the spectra's noise): under squared error those few stars pull every
network towards them, under Huber each counts no more than its sign beyond the threshold.
"""
import warnings

import numpy as np
from scipy.special import ndtri
from sklearn.base import BaseEstimator, RegressorMixin

from .splits import group_holdout


# N(0, 1) at the middle of each of 2^16 equal-probability bins, scaled to unit variance:
# indexed by 16 random bits, a number drawn from this table is a normal variate rounded to
# its bin (|z| <= 4.3). numpy's ziggurat took as long per epoch as the network's forward
# and backward passes; 16 raw bits and one table lookup take about a fifth of that.
_NORMAL_QUANTILES = ndtri((np.arange(2**16) + 0.5) / 2**16)
_NORMAL_QUANTILES = (_NORMAL_QUANTILES / np.sqrt(np.mean(_NORMAL_QUANTILES**2))).astype(np.float32)


def standard_normal_float32(rng, out):
    """Fill the float32 array ``out`` with standard normal variates (2^16-level quantised)
    from the generator ``rng``, and return it."""
    bits = rng.bit_generator.random_raw(-(-out.size // 4)).view(np.uint16)[:out.size]
    return np.take(_NORMAL_QUANTILES, bits.reshape(out.shape), out=out)


def _sigmoid(a):
    # float32 exp overflows for a < -88; clipping keeps the gradient finite and exact enough
    return 1.0 / (1.0 + np.exp(-np.clip(a, -60.0, 60.0)))


class AdamOptimizer:
    """Adam (Kingma & Ba 2015) on a list of float32 arrays, updated in place.

    The counterpart of scikit-learn's ``AdamOptimizer.update_params``: ``update_params``
    takes the gradients in the order of ``params`` and moves every parameter one step.
    """

    def __init__(self, params, learning_rate_init=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-8):
        self.params = params
        self.learning_rate_init = learning_rate_init
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.t = 0
        self.ms = [np.zeros_like(p) for p in params]
        self.vs = [np.zeros_like(p) for p in params]
        # scratch arrays, so that a step allocates no temporaries (the first layer's
        # weights are ~150,000 numbers, updated after every mini-batch); the step itself
        # is float64, as numpy computes lr * m with lr a float64 scalar
        self._scratch = [(np.empty_like(p), np.empty(p.shape)) for p in params]

    def update_params(self, grads):
        self.t += 1
        b1, b2 = self.beta_1, self.beta_2
        lr = self.learning_rate_init * np.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        for p, g, m, v, (a, step) in zip(self.params, grads, self.ms, self.vs, self._scratch):
            # m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= lr m / (sqrt(v) + eps)
            m *= b1
            m += np.multiply(g, 1 - b1, out=a)
            v *= b2
            np.multiply(g, 1 - b2, out=a)
            a *= g
            v += a
            np.sqrt(v, out=a)
            a += self.epsilon
            np.multiply(m, lr, out=step)
            step /= a
            p -= step


class EarlyStopping:
    """Keeps the parameters of the best validation loss; says when to stop.

    A loss that is not finite (NaN from diverging weights) never counts as an improvement;
    if no epoch ever gave a finite loss, the parameters of the last epoch are kept and
    ``best_loss`` stays infinite, so the caller can tell.
    """

    def __init__(self, patience, tol=1e-6):
        self.patience, self.tol = patience, tol
        self.best_loss = np.inf
        self.best_params = None
        self.no_improvement_count = 0

    def update(self, loss, params):
        """Record one epoch's validation loss; returns True when training should stop."""
        if np.isfinite(loss) and loss < self.best_loss - self.tol:
            self.best_loss = float(loss)
            self.best_params = [p.copy() for p in params]
            self.no_improvement_count = 0
            return False
        self.no_improvement_count += 1
        return self.no_improvement_count >= self.patience

    def params(self, current):
        return self.best_params if self.best_params is not None else [p.copy() for p in current]


class SigmoidMLPRegressor(RegressorMixin, BaseEstimator):
    """Two (or more) hidden sigmoid layers, linear output, L2 penalty, Adam, early stopping.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default=(400, 50)
        Units of each hidden layer (the paper's Teff network by default).
    alpha : float, default=1e-4
        L2 penalty on the weights (as in scikit-learn: ``alpha / 2 * ||W||^2 / n_samples``).
    learning_rate_init : float, default=1e-3
        Adam step size.
    batch_size : int, default=128
        Spectra per mini-batch.
    max_epochs : int, default=300
        Upper bound on passes over the training stars.
    validation_fraction : float, default=0.1
        Fraction of the stars held out to decide when to stop (whole stars: ``groups``).
    n_iter_no_change : int, default=20
        Epochs without improvement of the validation loss before stopping.
    input_noise : float or array of shape (n_features,), default=0.0
        Standard deviation of the Gaussian noise added to each training mini-batch's
        (standardised) inputs, one for every feature or one per feature; 0 turns it off.
        Validation and prediction see clean inputs.
    huber_delta : float, default=0.0
        Residual (standardised target) beyond which the loss grows linearly, for training
        and for the early-stopping validation loss alike; 0: squared error.
    random_state : int or None, default=None
        Seed of the initialisation, the mini-batch order, the noise and the held-out stars.

    Attributes
    ----------
    coefs_ : list of ndarray (float32)
        Weight matrices, input to output, of the epoch with the best validation loss.
    intercepts_ : list of ndarray (float32)
        Bias vectors, likewise.
    y_mean_, y_scale_ : float
        The target is learnt standardised; predictions are mapped back with these.
    n_epochs_ : int
        Epochs run before stopping.
    best_validation_loss_ : float
        Validation loss (standardised target; squared or Huber) of the kept weights; ``inf``
        when no epoch gave a finite loss (a warning is raised then).
    validation_curve_ : list of float
        Validation loss after every epoch.
    """

    def __init__(self, hidden_layer_sizes=(400, 50), alpha=1e-4, learning_rate_init=1e-3,
                 batch_size=128, max_epochs=300, validation_fraction=0.1, n_iter_no_change=20,
                 input_noise=0.0, huber_delta=0.0, random_state=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.alpha = alpha
        self.learning_rate_init = learning_rate_init
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.input_noise = input_noise
        self.huber_delta = huber_delta
        self.random_state = random_state

    def _validate_params(self):
        sizes = tuple(self.hidden_layer_sizes)
        checks = [
            (len(sizes) >= 1 and all(int(h) == h and h >= 1 for h in sizes),
             f"hidden_layer_sizes must be positive integers, got {self.hidden_layer_sizes!r}"),
            (self.alpha >= 0, f"alpha must be >= 0, got {self.alpha!r}"),
            (self.learning_rate_init > 0,
             f"learning_rate_init must be > 0, got {self.learning_rate_init!r}"),
            (int(self.batch_size) == self.batch_size and self.batch_size >= 1,
             f"batch_size must be a positive integer, got {self.batch_size!r}"),
            (int(self.max_epochs) == self.max_epochs and self.max_epochs >= 1,
             f"max_epochs must be a positive integer, got {self.max_epochs!r}"),
            (0 < self.validation_fraction < 1,
             f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}"),
            (int(self.n_iter_no_change) == self.n_iter_no_change and self.n_iter_no_change >= 1,
             f"n_iter_no_change must be a positive integer, got {self.n_iter_no_change!r}"),
            (np.all(np.asarray(self.input_noise) >= 0) and np.ndim(self.input_noise) <= 1,
             f"input_noise must be >= 0 (a number or one per feature), got {self.input_noise!r}"),
            (self.huber_delta >= 0, f"huber_delta must be >= 0, got {self.huber_delta!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

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
        residual = output - y
        if self.huber_delta:                    # the Huber loss's derivative
            residual = np.clip(residual, -self.huber_delta, self.huber_delta)
        delta = (residual / n)[:, None].astype(np.float32)
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
        self._validate_params()
        rng = np.random.default_rng(self.random_state)
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.float64)
        if X.ndim != 2 or len(X) != len(y) or len(y) < 2:
            raise ValueError(f"need X of shape (n_samples >= 2, n_features) and y of "
                             f"n_samples, got {X.shape} and {y.shape}")
        if np.ndim(self.input_noise) == 1 and np.size(self.input_noise) != X.shape[1]:
            raise ValueError(f"input_noise has {np.size(self.input_noise)} values for "
                             f"{X.shape[1]} features")
        self.y_mean_, self.y_scale_ = float(y.mean()), float(y.std() or 1.0)
        target = ((y - self.y_mean_) / self.y_scale_).astype(np.float32)
        train, valid = group_holdout(len(y), groups, self.validation_fraction, rng)
        X_train, y_train = X[train], target[train]
        X_valid, y_valid = X[valid], target[valid]

        weights, biases = self._init_weights(X.shape[1], rng)
        # the noise's std (one, or one per feature) as float32 once, not per mini-batch
        noise = np.asarray(self.input_noise, dtype=np.float32) if np.any(self.input_noise) else None
        params = weights + biases
        optimizer = AdamOptimizer(params, self.learning_rate_init)
        stopping = EarlyStopping(self.n_iter_no_change)
        self.validation_curve_ = []
        for epoch in range(self.max_epochs):
            self._train_one_epoch(X_train, y_train, weights, biases, optimizer, rng, noise)
            valid_loss = self._loss(self._forward(X_valid, weights, biases)[1] - y_valid)
            self.validation_curve_.append(valid_loss)
            if stopping.update(valid_loss, params):
                break
        if not np.isfinite(stopping.best_loss):
            warnings.warn("SigmoidMLPRegressor: the validation loss was never finite "
                          "(diverged); try a smaller learning_rate_init", RuntimeWarning)
        kept = stopping.params(params)
        n_layers = len(weights)
        self.coefs_, self.intercepts_ = kept[:n_layers], kept[n_layers:]
        self.n_epochs_ = epoch + 1
        self.best_validation_loss_ = stopping.best_loss
        return self

    def _loss(self, residual):
        """Mean squared error of the residuals, or their mean Huber loss with ``huber_delta``."""
        if not self.huber_delta:
            return float(np.mean(residual ** 2))
        a, d = np.abs(residual), self.huber_delta
        return float(np.mean(np.where(a <= d, 0.5 * a * a, d * (a - 0.5 * d))))

    def _train_one_epoch(self, X_train, y_train, weights, biases, optimizer, rng, noise):
        """One pass over the training spectra in mini-batches. Each spectrum gets fresh
        noise of std ``noise`` (none if None)."""
        order = rng.permutation(len(y_train))
        drawn = np.empty((min(self.batch_size, len(order)), X_train.shape[1]), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            if noise is not None:     # in place: noise * N(0, 1) + X
                inputs = standard_normal_float32(rng, drawn[:len(batch)])
                inputs *= noise
                inputs += X_train[batch]
            else:
                inputs = X_train[batch]
            grad_w, grad_b = self._gradients(inputs, y_train[batch], weights, biases)
            optimizer.update_params(grad_w + grad_b)

    def predict(self, X):
        X = np.asarray(X, dtype=np.float32)
        return self._forward(X, self.coefs_, self.intercepts_)[1].astype(np.float64) * self.y_scale_ + self.y_mean_
