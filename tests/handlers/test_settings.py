"""mkd.handlers.settings: one declared vocabulary of distillation settings, its recipes and its one check."""

from __future__ import annotations

from pathlib import Path

import pytest

from mkd.handlers.settings import (
    DEFAULT_RECIPE,
    RECIPES,
    SETTINGS,
    SettingsError,
    distillation_settings,
    settings_table,
)

ROOT = Path(__file__).resolve().parents[2]


def test_every_recipe_declares_the_settings_that_default_to_it_and_runs_what_was_measured():
    recipe_defaults = [name for name, s in SETTINGS.items() if s.default is None]
    assert set(recipe_defaults) == {"scales", "pmd", "temperature", "neighbour_distance", "pmd_temperature",
                                    "dice_hard", "transfer"}  # fmt: skip
    for name, recipe in RECIPES.items():
        assert set(recipe) == {"weights", *recipe_defaults}, name
        # every recipe was measured as B+PMD (docs/distill.md, grids/*.yaml); thesis: the thesis's B -> B + PMD
        assert (recipe["scales"], recipe["pmd"]) == (["bn"], True), name
    assert SETTINGS["recipe"].default == DEFAULT_RECIPE in RECIPES


def test_nothing_given_is_the_default_recipe_as_measured():
    settings = distillation_settings()
    assert dict(settings) == {
        "recipe": "pseudo", "scales": ["bn"], "pmd": True, "feature_loss": "contrastive", "contrastive_mode": "image",
        "temperature": 0.4, "neighbour_distance": 3, "pmd_temperature": 1.0, "dice_hard": True, "transfer": True,
        "weight_overrides": {},
    }  # fmt: skip
    assert settings.weights == {"seg": 1.0, "bn": 0.2, "pmd": 1.0, "dice": 1.0} and settings.unused() == {}
    settings["scales"].append("enc")
    assert RECIPES["pseudo"]["scales"] == ["bn"]  # a run's values are its own


@pytest.mark.parametrize(
    "given, message",
    [
        ({"feature_loss": "mse", "temperature": 0.2}, "temperature is set but feature_loss 'mse' does not use it"),
        ({"feature_loss": "mse", "contrastive_mode": "pixel", "temperature": 0.2},
         "contrastive_mode and temperature are set but feature_loss 'mse' does not use them"),
        ({"feature_loss": "cwd", "neighbour_distance": 2}, "neighbour_distance is set but feature_loss 'cwd' does not"),
        ({"scales": [], "contrastive_mode": "pixel"},
         "contrastive_mode is set but no feature scale is distilled (scales none)"),
        ({"weight_overrides": {"bn": 0}, "temperature": 0.1},
         "temperature is set but no feature scale is distilled (every scale's weight is 0)"),
        ({"pmd": False, "pmd_temperature": 2.0}, "pmd_temperature is set but PMD is off (pmd false and no pmd weight)"),
        ({"recipe": "recommended", "dice_hard": True},
         "dice_hard is set but the run has no dice term (recipe 'recommended' has none; a dice weight adds it)"),
        ({"dice_hard": False, "weight_overrides": {"dice": 0}},
         "dice_hard is set but the run has no dice term (its weight is 0)"),
        ({"scales": [], "pmd": False}, "nothing to distil: scales is none and pmd is off"),
        ({"weight_overrides": {"dec": 0.3}}, "weight_overrides: weight for 'dec' given, but 'dec' is not a selected"),
        ({"scales": ["bottleneck"]}, "scales=['bottleneck']: expected a list of enc, bn, dec"),
        ({"neighbour_distance": -1}, "neighbour_distance=-1: expected an integer >= 0"),
        ({"pmd": 1}, "pmd=1: expected true or false"),
        ({"pmd": "yes"}, "pmd='yes': expected true or false"),
        ({"temperature": "0.2"}, "temperature='0.2': expected a number"),
        ({"contrastive_mode": "pixels"}, "contrastive_mode='pixels': expected one of image, pixel, supervised"),
        ({"recipe": "best"}, "recipe='best': expected one of recommended, thesis, transfer, pseudo"),
        ({"tau": 0.2}, "unknown distillation setting(s) tau; known: recipe, scales, pmd, "),
    ],
)  # fmt: skip
def test_settings_that_do_not_hold_together_are_one_line_naming_them(given, message):
    with pytest.raises(SettingsError) as err:
        distillation_settings(**given)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_words_true_and_false_are_switches_as_the_bundle_cli_passes_them():
    """``python -m monai.bundle run ... --pmd false`` hands over the word: it must turn PMD off, not on."""
    assert distillation_settings(pmd="false")["pmd"] is False
    assert distillation_settings(pmd="False", transfer="TRUE")["transfer"] is True
    assert distillation_settings(pmd="false").weights.get("pmd", 0) == 0


def test_a_default_the_run_does_not_use_is_simply_not_used():
    """The recipe's temperature of an MSE run, its pmd_temperature with PMD off: not given, so no error."""
    mse = distillation_settings(feature_loss="mse", pmd=False)
    assert mse.unused() == {
        "contrastive_mode": "feature_loss 'mse' does not use it", "temperature": "feature_loss 'mse' does not use it",
        "neighbour_distance": "feature_loss 'mse' does not use it", "pmd_temperature": "PMD is off (pmd false and no "
        "pmd weight)",
    }  # fmt: skip
    assert distillation_settings(scales=[], pmd=True)["temperature"] == 0.4  # resolved, unused
    assert distillation_settings(feature_loss="cwd", temperature=2.0)["temperature"] == 2.0  # CWD takes it
    assert distillation_settings(pmd=False, weight_overrides={"pmd": 0.2}, pmd_temperature=4.0).weights["pmd"] == 0.2


def test_the_docs_table_is_the_declared_settings():
    """docs/distill.md shows mkd.handlers.settings.settings_table(), so the table cannot drift from the spec."""
    assert settings_table() in (ROOT / "docs" / "distill.md").read_text()
    for doc in ("ablate.md", "bundles.md"):
        assert "distill.md#settings" in (ROOT / "docs" / doc).read_text(), doc
