"""bench/train_vs_recipe.py: the published recipe as published, its configurations chosen by
CV on training stars, end to end on a tiny simulated set (the smoke configuration).

The numbers of a smoke run mean nothing (a few stars, 20 iterations); this checks that the
bench runs, reports what it promises and keeps the recipe's published settings.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import miles_ids

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from train_vs_recipe import CONFIGURATIONS, PUBLISHED_LEARNING_RATE, PublishedRecipe  # noqa: E402


def test_recipe_defaults_are_the_published_ones():
    recipe = PublishedRecipe()
    assert (recipe.n_alphas, recipe.cv, recipe.max_iter) == (50, 10, 2000)
    assert {k: recipe.learning_rate(k) for k in ("teff", "logg", "feh")} == \
        {"teff": 9e-4, "logg": 2e-5, "feh": 3e-4} == PUBLISHED_LEARNING_RATE
    assert not recipe.standardise_target and not recipe.group_folds
    # the as-published configuration trains on the paper's 10-20 spectra with the defaults
    assert CONFIGURATIONS["10-20"] == ((10.0, 20.0), {"standardise_target": False, "group_folds": False})
    assert CONFIGURATIONS["all-snr+std+star-folds"] == (None, {"standardise_target": True, "group_folds": True})


def test_star_folds_need_the_stars():
    X = np.random.default_rng(0).normal(size=(30, 5))
    labels = {"teff": np.full(30, 5000.0), "logg": np.zeros(30), "feh": np.zeros(30)}
    with pytest.raises(ValueError, match="groups"):
        PublishedRecipe(group_folds=True, cv=3).fit(X, labels)


@pytest.fixture(scope="module")
def tiny_reference(make_simulated_set):
    ids = miles_ids(make_simulated_set.miles, 20, teff=(3800.0, 6400.0))
    return make_simulated_set("sim-bench-recipe", ids, "2x10-20,1x5-10", seed=11, decoys=0)


@pytest.mark.parametrize("select_folds", [2, 0])
def test_recipe_bench_smoke_run(tiny_reference, select_folds):
    # without CV the choice is the held-out best: one configuration is enough to show that
    configurations = ["10-20", "all-snr+std+star-folds"] if select_folds else ["all-snr+std+star-folds"]
    done = subprocess.run(
        [sys.executable, str(BENCH / "train_vs_recipe.py"), "--reference", str(tiny_reference),
         "--configurations", ",".join(configurations), "--n-alphas", "4", "--cv", "3",
         "--select-folds", str(select_folds), "--max-iter", "20", "--ensemble", "2"],
        capture_output=True, text=True, timeout=600, cwd=BENCH.parent,
        env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **os.environ})
    assert done.returncode == 0, done.stderr[-3000:]
    document, markdown = done.stdout.split("--- markdown ---")
    result = json.loads(document)

    configs = result["recipe_configurations"]
    assert list(configs) == configurations
    assert configs["all-snr+std+star-folds"]["train_snr"] == "all"
    if select_folds:
        assert configs["10-20"]["train_snr"] == "10-20"
        assert configs["10-20"]["n_train"] == result["n_train_10_20"] < configs["all-snr+std+star-folds"]["n_train"]
    for config in configs.values():
        assert config["learning_rate"] == PUBLISHED_LEARNING_RATE
        assert config["max_iter"] == 20 and config["n_alphas"] == 4
        assert config["train_seconds"] > 0
        for label in ("teff", "logg", "feh"):
            warned = config["convergence_warnings"][label]
            assert isinstance(warned["lasso"], int) and isinstance(warned["mlp"], int)
            assert config["held_out"][label]["10-20"]["n"] > 0
            assert config["held_out"][label]["10-20"]["mae"] > 0
    best = result["recipe_best"]
    for label in ("teff", "logg", "feh"):
        on_held_out = result["recipe_best_on_held_out_10_20"][label]
        assert configs[on_held_out]["held_out"][label]["10-20"]["mae"] == \
            min(c["held_out"][label]["10-20"]["mae"] for c in configs.values())
    if select_folds == 0:          # no CV: the recipe's best configuration on the held-out stars
        assert all(config["cv_mae_10_20"] is None for config in configs.values())
        assert "held-out" in best["chosen_by"]
        assert best["configuration"] == result["recipe_best_on_held_out_10_20"]
        for label in ("teff", "logg", "feh"):
            assert best["held_out"][label] == configs[best["configuration"][label]]["held_out"][label]
        return
    assert best["chosen_by"].startswith("star-grouped CV")
    for label in ("teff", "logg", "feh"):
        # the choice is the configuration of lowest CV MAE (training stars), not held-out MAE
        chosen = best["configuration"][label]
        assert configs[chosen]["cv_mae_10_20"][label] == min(c["cv_mae_10_20"][label] for c in configs.values())
        assert best["held_out"][label] == configs[chosen]["held_out"][label]
    assert result["ours_ensemble"] == 2 and result["ours_single"]["teff"]["10-20"]["n"] > 0
    assert set(result["mae_change_vs_recipe_best"]) == {"5-10", "10-20"}
    assert result["speedup_vs_recipe_best"] > 0
    assert "| lamost-vac, 1 network per label |" in markdown
    assert "| recipe 10-20 (as published) |" in markdown
    assert "best configuration per label by star-grouped CV on the training stars" in markdown
