"""Training recipe shared by every front end (files, database, benchmarks).

Stars, not spectra, are split: a fraction of the stars is held out entirely (all of their
spectra, at every SNR) to calibrate the integrated uncertainty and to report held-out
accuracy; the model is trained on the other stars' spectra inside the SNR range.
"""
import numpy as np

from .artifact import training_set_description
from .lasso_mlpnet import LABELS, LassoMLPNet
from .metrics import accuracy_by_snr
from .splits import group_holdout


def split_rows(features, labels, snrg, stars, snr_range, holdout_fraction, random_state):
    """Boolean masks (train, held_out) over spectra.

    Usable rows only (finite features and labels); ``held_out`` holds every spectrum of
    about ``holdout_fraction`` of the stars, drawn with ``random_state``; ``train`` the other
    stars' spectra with ``snr_range[0] < SNRg <= snr_range[1]``. Deterministic, so the
    baselines can be fitted on exactly the spectra the model was trained on.
    """
    features = np.asarray(features)
    snrg = np.asarray(snrg, dtype=float)
    usable = np.isfinite(features).all(axis=1)
    for label in LABELS:
        usable &= np.isfinite(np.asarray(labels[label], dtype=float))
    train_idx, held_idx = group_holdout(len(snrg), np.asarray(stars), holdout_fraction,
                                        np.random.default_rng(random_state))
    train = np.zeros(len(snrg), dtype=bool)
    train[train_idx] = True
    held = ~train
    in_range = (snrg > snr_range[0]) & (snrg <= snr_range[1])
    return train & usable & in_range, held & usable


def train_lasso_mlpnet(features, labels, snrg, stars, obsids, snr_range=(10.0, 20.0),
                       holdout_fraction=0.15, random_state=0, progress=None, **model_params):
    """Fit, calibrate and assess a ``LassoMLPNet``.

    ``features``: (n, n_pixels) with NaN rows for unusable spectra (dropped here);
    ``labels``: dict label -> (n,) array; ``stars``: star identifier per spectrum.
    Returns ``(model, training_description, metrics)``.
    """
    features = np.asarray(features)
    snrg = np.asarray(snrg, dtype=float)
    stars = np.asarray(stars)
    labels = {k: np.asarray(labels[k], dtype=float) for k in LABELS}
    train, held = split_rows(features, labels, snrg, stars, snr_range, holdout_fraction, random_state)
    if train.sum() < 20:
        raise ValueError(f"only {int(train.sum())} usable training spectra with "
                         f"{snr_range[0]} < SNRg <= {snr_range[1]}; need at least 20")

    model = LassoMLPNet(random_state=random_state, **model_params)
    model.fit(features[train], {k: v[train] for k, v in labels.items()}, groups=stars[train],
              progress=progress)
    metrics = {}
    if held.sum() > 1:
        model.calibrate(features[held], {k: v[held] for k, v in labels.items()}, snrg[held])
        predicted = model.predict(features[held], snrg[held])
        metrics["held_out"] = accuracy_by_snr(predicted, {k: v[held] for k, v in labels.items()}, snrg[held])
        metrics["held_out_stars"] = int(np.unique(stars[held]).size)
    metrics["n_selected_pixels"] = {k: int(e.support_.sum()) for k, e in model.estimators_.items()}
    description = training_set_description(obsids[train], snrg[train], {k: v[train] for k, v in labels.items()})
    description.update(snr_range=list(snr_range), n_stars=int(np.unique(stars[train]).size),
                       holdout_fraction=holdout_fraction)
    return model, description, metrics
