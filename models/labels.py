"""The labels lamost-vac estimates and the names every table, file and API gives them.

For each label ``L`` of :data:`LABELS` there are three columns (:data:`ESTIMATE_SUFFIXES`):
``L`` the estimate, ``L_err`` the calibrated 1-sigma uncertainty to quote and
``L_err_model`` the (scaled) standard deviation of the ensemble. This module has no
dependencies, so that the schema, the exports and the service can all name the columns
from it without importing the science.
"""
LABELS = ("teff", "logg", "feh")
ESTIMATE_SUFFIXES = ("", "_err", "_err_model")


def estimate_columns(labels=LABELS, suffixes=ESTIMATE_SUFFIXES):
    """``["teff", "teff_err", "teff_err_model", "logg", ...]``: the columns of ``labels``."""
    return [label + suffix for label in labels for suffix in suffixes]
