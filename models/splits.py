"""Splits that hold data out by star, never by spectrum.

The same star is observed several times; if its spectra sat on both sides of a split, the
held-out score would measure memory of that star rather than skill on new stars.
"""
import numpy as np


def group_holdout(n_samples, groups, fraction, rng):
    """Indices (train, held_out) with about ``fraction`` of the groups held out.

    ``groups=None`` treats every sample as its own group.
    """
    groups = np.arange(n_samples) if groups is None else np.asarray(groups)
    unique = np.unique(groups)
    n_out = max(1, int(round(fraction * unique.size)))
    held = rng.choice(unique, size=n_out, replace=False)
    mask = np.isin(groups, held)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def group_kfold_indices(groups, n_splits, rng):
    """Yield (train, test) index arrays of a shuffled k-fold split over groups."""
    groups = np.asarray(groups)
    unique = rng.permutation(np.unique(groups))
    fold_of_group = dict(zip(unique, np.arange(unique.size) % n_splits))
    fold = np.array([fold_of_group[g] for g in groups])
    for k in range(n_splits):
        yield np.flatnonzero(fold != k), np.flatnonzero(fold == k)
