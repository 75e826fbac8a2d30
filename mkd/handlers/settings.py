"""The vocabulary of distillation settings: one declared entry per setting, the recipes, one check.

A distillation setting has one name, its key in the distill bundle (``bundles/mkd/configs/distill.json``).
The same name is its key in a grid's distill block (``mkd ablate``) and, with dashes, its option of
``mkd distill`` (``feature_loss``: ``--feature-loss``); older spellings stay accepted as declared
aliases (``--loss``, a grid's ``loss``). :data:`SETTINGS` declares each setting once: its type, default
(``None``: the recipe's, :data:`RECIPES`), choices, help text and what uses it.
:func:`distillation_settings` checks the settings of a run once, for the CLI, the grids and the bundle
alike, and fills in the defaults. A setting the run does not use is an error when it is given, never
when it is a default: ``temperature`` given with ``feature_loss`` ``mse`` says so in one line, the
recipe's temperature of an MSE run is simply not used.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mkd.errors import MkdError
from mkd.utils import LazyNames

__all__ = [
    "SETTINGS",
    "Setting",
    "SettingsError",
    "DistillSettings",
    "distillation_settings",
    "distillation_weights",
    "settings_table",
    "RECIPES",
    "DEFAULT_RECIPE",
    "recipe_setting",
    "THESIS_WEIGHTS",
    "SCALES",
]

#: the thesis's T1 -> S1 weights (SPEC §3)
THESIS_WEIGHTS = {"seg": 0.4, "bn": 0.2, "enc": 0.1, "dec": 0.1, "pmd": 0.2}
#: the feature scales every network exposes (SPEC §2)
SCALES = ("enc", "bn", "dec")

#: Distillation recipes: the defaults of a run's settings (the ones :data:`SETTINGS` declares with default
#: ``None``) and its term weights (docs/distill.md). ``thesis`` is the thesis's T1 -> S1 setting (B -> B + PMD,
#: T = 4, tau = 0.4, in-batch negatives as they come); ``recommended`` is the setting chosen on validation
#: data with ``grids/kd_select_cpu.yaml``. Every recipe was measured as B+PMD (``scales`` bn, ``pmd`` on:
#: docs/distill.md, grids/*.yaml), so that is what each one runs unless a setting says otherwise.
# chosen with grids/kd_select_cpu.yaml (candidate T1w1): the best mean best_val_pooled_dice over
# seeds 0-2 of four B+PMD candidates; the enc / dec weights were not part of the selection
_RECOMMENDED: dict[str, Any] = {
    "weights": {"seg": 1.0, "bn": 0.2, "enc": 0.1, "dec": 0.1, "pmd": 1.0},
    "scales": ["bn"],
    "pmd": True,
    "temperature": 0.4,
    "pmd_temperature": 1.0,
    "neighbour_distance": 3,
    "transfer": False,
    "dice_hard": False,
}
RECIPES: dict[str, dict[str, Any]] = {
    "recommended": _RECOMMENDED,
    "thesis": {
        "weights": dict(THESIS_WEIGHTS),
        "scales": ["bn"],
        "pmd": True,
        "temperature": 0.4,
        "pmd_temperature": 4.0,
        "neighbour_distance": 0,
        "transfer": False,
        "dice_hard": False,
    },
    # chosen for "half the labels + distillation vs all labels" (docs/distill.md, "Labels saved") before
    # grids/kd_labels_cpu.yaml ran on seeds 30-34: the recommended B+PMD terms plus the unlabelled transfer
    # set, the one row of grids/kd_cpu.yaml above the baseline on validation (seeds 0-2)
    "transfer": {**_RECOMMENDED, "weights": dict(_RECOMMENDED["weights"]), "transfer": True},
    # chosen with grids/kd_dice_select_cpu.yaml before grids/kd_labels_dice_cpu.yaml ran on seeds 30-34: the
    # 'transfer' recipe plus a batch Dice term (weight 1) against the teacher's thresholded mask on every slice,
    # the unlabelled ones included (pseudo-labels); it had the best mean validation pooled Dice over seeds 0-2
    # of the two Dice candidates (0.893 against 0.892 for the teacher's probabilities; S1 0.875)
    "pseudo": {
        **_RECOMMENDED,
        "weights": {**_RECOMMENDED["weights"], "dice": 1.0},
        "transfer": True,
        "dice_hard": True,
    },
}
#: the recipe of ``mkd distill``, of a grid and of the distill bundle when none is given: ``pseudo``, the one
#: recipe that beat its baseline on fresh seeds with every control (docs/distill.md, "Labels saved")
DEFAULT_RECIPE = "pseudo"

#: what uses a setting: every run, the feature loss of the distilled scales, the ``pmd`` term, the ``dice`` term
Use = Literal["run", "features", "pmd", "dice"]


class SettingsError(MkdError, ValueError):
    """Distillation settings that do not hold together; the message names the setting(s) in one line."""


@dataclass(frozen=True)
class Setting:
    """One distillation setting.

    Attributes:
        name: the key in ``distill.json`` and in a grid's distill block; ``--`` and the name with dashes is the
            option of ``mkd distill``.
        type: ``str``, ``bool``, ``int``, ``float``, ``list`` (of ``choices``) or ``dict`` (``{term: weight}``).
        help: one line for ``--help`` and the docs' table.
        default: the value when it is not given; ``None``: the recipe's (:data:`RECIPES`).
        choices: the allowed values (of the items, for a list); empty: any.
        minimum: the smallest allowed integer.
        used_by: ``"run"`` (every run), ``"features"`` (the feature loss of the distilled scales), ``"pmd"`` or
            ``"dice"`` (that term, when its weight is above 0).
        argument: for ``used_by="features"``, the feature loss's constructor argument the setting fills; a
            loss that does not take it does not use the setting (``mse`` and ``temperature``).
        aliases: older options of ``mkd distill`` that still set it (``--loss``).
        grid_aliases: older keys of a grid's distill block that still set it (``loss``).
    """

    name: str
    type: type
    help: str
    default: Any = None
    choices: Sequence[str] = ()
    minimum: int | None = None
    used_by: Use = "run"
    argument: str | None = None
    aliases: tuple[str, ...] = ()
    grid_aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        """The option of ``mkd distill``: ``--feature-loss`` for ``feature_loss``."""
        return "--" + self.name.replace("_", "-")

    @property
    def default_text(self) -> str:
        """The default as the help and the docs say it."""
        if self.default is None:
            return "the recipe's"
        return "none" if self.default == {} else str(self.default)


#: The distillation settings, by bundle key, in the order of ``mkd distill --help``.
SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("recipe", str, "Defaults of the settings marked 'the recipe's' and of the term weights (docs/distill.md, "
            "Recipes): pseudo (B+PMD, Dice against the teacher's mask, the unlabelled transfer set), recommended, "
            "transfer, or the thesis's.", default=DEFAULT_RECIPE, choices=tuple(RECIPES)),
    Setting("scales", list, "Feature scales to distil: any of enc, bn, dec ('none': PMD only; comma-separated on the "
            "command line).", choices=SCALES),
    Setting("pmd", bool, "Prediction-map distillation: Bernoulli KL of the temperature-softened logits, x T^2."),
    Setting("feature_loss", str, "The loss of every distilled scale: InfoNCE, feature regression (FitNets) or a "
            "dense-prediction loss (mkd.losses.LOSSES).", default="contrastive",
            choices=LazyNames("mkd.losses", "FEATURE_LOSSES"), used_by="features", aliases=("--loss",),
            grid_aliases=("loss",)),
    Setting("contrastive_mode", str, "InfoNCE variant: image-level in-batch (thesis), pixel-level, or supervised "
            "(positives: same class).", default="image", choices=LazyNames("mkd.losses.infonce", "MODES"),
            used_by="features", argument="mode", aliases=("--mode",), grid_aliases=("mode",)),
    Setting("temperature", float, "Temperature of the feature loss: InfoNCE's tau (CWD's T).", used_by="features",
            argument="temperature", aliases=("--tau",)),
    Setting("neighbour_distance", int, "InfoNCE: slices of the anchor's patient within N slices are not negatives "
            "(0: off).", minimum=0, used_by="features", argument="neighbour_distance", aliases=("--neighbours",)),
    Setting("pmd_temperature", float, "PMD temperature T.", used_by="pmd"),
    Setting("dice_hard", bool, "The dice term's target is the teacher's thresholded mask (pseudo-labels), not its "
            "probabilities.", used_by="dice"),
    Setting("transfer", bool, "Also learn from the teacher on unlabelled slices: training patients outside the "
            "student's half and imagesTs (their labels are never read)."),
    Setting("weight_overrides", dict, "Weights over the recipe's: seg, pmd, dice (Dice against the teacher's "
            "prediction) and the distilled scales, e.g. bn=0.2,pmd=0.5,dice=1.", default={},
            aliases=("--weights",), grid_aliases=("weights",)),
)}  # fmt: skip


def recipe_setting(recipe: str, key: str) -> Any:
    """One setting (``temperature``, ``scales``, ``pmd``, ...) of a recipe in :data:`RECIPES`.

    Example:
        >>> recipe_setting("thesis", "pmd_temperature")
        4.0
    """
    settings = _recipe(recipe)
    if key not in settings or key == "weights":
        raise ValueError(f"recipe setting {key!r} is not known; expected one of "
                         f"{sorted(k for k in settings if k != 'weights')}.")  # fmt: skip
    return settings[key]


def _recipe(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise ValueError(f"recipe={name!r} is not known; expected one of {sorted(RECIPES)}.")
    return RECIPES[name]


def distillation_weights(
    scales: Sequence[str],
    weights: Mapping[str, float] | None = None,
    pmd: bool = False,
    recipe: str = "thesis",
) -> dict[str, float]:
    """The ``{term: weight}`` mapping for a run: the recipe's defaults for ``scales``, updated by ``weights``.

    Terms are the scales, ``seg`` and ``pmd`` (0 unless ``pmd`` is true or given in ``weights``), and
    ``dice`` (Dice against the teacher's prediction) when the recipe has it or ``weights`` gives it.

    Args:
        scales: the distilled feature scales.
        weights: overrides, ``{term: weight}``.
        pmd: prediction-map distillation on.
        recipe: a name in :data:`RECIPES` whose weights are the defaults.

    Example:
        >>> distillation_weights(["bn"], pmd=True)
        {'seg': 0.4, 'bn': 0.2, 'pmd': 0.2}
        >>> distillation_weights(["enc", "bn"], {"bn": 0.5})
        {'seg': 0.4, 'enc': 0.1, 'bn': 0.5, 'pmd': 0.0}
    """
    defaults = _recipe(recipe)["weights"]
    out = {"seg": defaults["seg"]}
    for s in scales:
        out[s] = defaults.get(s, 0.1)
    out["pmd"] = defaults["pmd"] if pmd else 0.0
    if "dice" in defaults or "dice" in (weights or {}):
        out["dice"] = defaults.get("dice", 0.0)
    for k, v in (weights or {}).items():
        if k not in out:
            raise ValueError(
                f"weight for {k!r} given, but {k!r} is not a selected scale, 'seg', 'pmd' or 'dice' ({list(out)})."
            )
        out[k] = float(v)
    return out


def _loss_arguments(feature_loss: str) -> set[str]:
    """The constructor arguments of a feature loss named in :data:`mkd.losses.LOSSES`."""
    from mkd.losses import LOSSES

    return set(inspect.signature(LOSSES[feature_loss]).parameters)


class DistillSettings(Mapping[str, Any]):
    """The distillation settings of one run, every one resolved: given, or its default (the recipe's).

    A read-only mapping ``{bundle key: value}`` over :data:`SETTINGS`; build it with
    :func:`distillation_settings`, which checks it.

    Args:
        values: a value for every setting of :data:`SETTINGS`.
        given: the settings that were given (the others are defaults).
    """

    def __init__(self, values: Mapping[str, Any], given: frozenset[str] = frozenset()) -> None:
        self._values = {name: values[name] for name in SETTINGS}
        self.given = frozenset(given)

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"DistillSettings({self._values!r})"

    @property
    def weights(self) -> dict[str, float]:
        """The run's ``{term: weight}``: the recipe's for the scales and ``pmd``, with ``weight_overrides``."""
        return distillation_weights(self["scales"], self["weight_overrides"], pmd=self["pmd"], recipe=self["recipe"])

    def unused(self) -> dict[str, str]:
        """``{setting: why}`` of the settings whose value changes nothing in this run.

        Example:
            >>> distillation_settings(scales=[], pmd=True).unused()["temperature"]
            'no feature scale is distilled (scales none)'
        """
        weights = self.weights
        distilled = [s for s in self["scales"] if weights[s] > 0]
        takes = _loss_arguments(self["feature_loss"]) if distilled else set()
        off = {
            "pmd": "PMD is off (pmd false and no pmd weight)",
            "dice": "the run has no dice term ("
            + ("its weight is 0" if "dice" in weights else f"recipe {self['recipe']!r} has none; a dice weight adds it")
            + ")",
        }
        why: dict[str, str] = {}
        for s in SETTINGS.values():
            if s.used_by == "features" and not distilled:
                why[s.name] = "no feature scale is distilled " + (
                    "(scales none)" if not self["scales"] else "(every scale's weight is 0)"
                )
            elif s.used_by == "features" and s.argument is not None and s.argument not in takes:
                why[s.name] = f"feature_loss {self['feature_loss']!r} does not use it"
            elif s.used_by in off and weights.get(s.used_by, 0.0) <= 0:
                why[s.name] = off[s.used_by]
        return why


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_value(setting: Setting, value: Any) -> None:
    kind = setting.type
    if kind is list:
        ok = isinstance(value, (list, tuple)) and all(v in setting.choices for v in value)
        wanted = f"a list of {', '.join(setting.choices)} ([] for none)"
    elif kind is dict:
        ok = isinstance(value, Mapping) and all(_number(v) for v in value.values())
        wanted = "a mapping {term: weight}"
    elif kind is bool:
        ok, wanted = isinstance(value, bool), "true or false"
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and (setting.minimum is None or value >= setting.minimum)
        wanted = "an integer" + (f" >= {setting.minimum}" if setting.minimum is not None else "")
    elif kind is float:
        ok, wanted = _number(value), "a number"
    else:
        ok = isinstance(value, str) and (not setting.choices or value in setting.choices)
        wanted = f"one of {', '.join(setting.choices)}" if setting.choices else "a string"
    if not ok:
        raise SettingsError(f"{setting.name}={value!r}: expected {wanted}")


def _bool_text(setting: Setting, value: Any) -> Any:
    """``"true"`` / ``"false"`` (any case) as a switch's value: ``python -m monai.bundle run ... --pmd false``
    passes the word, and a non-empty string must never read as on."""
    if setting.type is bool and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def _copy(value: Any) -> Any:
    """A value of its own: a recipe's or a default's list or mapping is never shared with a run."""
    if isinstance(value, Mapping):
        return dict(value)
    return list(value) if isinstance(value, (list, tuple)) else value


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def distillation_settings(**given: Any) -> DistillSettings:
    """Check the distillation settings of a run once and fill in the rest: the declared default or the recipe's.

    What the CLI (``mkd distill``), a grid's distill block (``mkd ablate``) and the distill bundle
    (``distill.json``'s ``distillation``) all call. A setting is given when it is not ``None``.

    Args:
        given: settings by bundle key (:data:`SETTINGS`); ``None`` means not given.

    Returns:
        The run's :class:`DistillSettings`.

    Raises:
        SettingsError: in one line, an unknown setting; a value of the wrong type or not among the choices;
            nothing to distil (no scale and pmd off); a weight for a term the run does not have; a given setting
            the run does not use, e.g. ``temperature is set but feature_loss 'mse' does not use it``.

    Example:
        >>> s = distillation_settings()
        >>> s["recipe"], s["scales"], s["pmd"], s["transfer"], s["dice_hard"]
        ('pseudo', ['bn'], True, True, True)
        >>> distillation_settings(feature_loss="mse", temperature=0.2)
        Traceback (most recent call last):
        ...
        mkd.handlers.settings.SettingsError: temperature is set but feature_loss 'mse' does not use it
    """
    given = {k: _bool_text(SETTINGS[k], v) if k in SETTINGS else v for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise SettingsError(f"unknown distillation setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    for name, value in given.items():
        _check_value(SETTINGS[name], value)
    recipe = RECIPES[given.get("recipe", DEFAULT_RECIPE)]
    values = {name: _copy(given.get(name, recipe[name] if s.default is None else s.default))
              for name, s in SETTINGS.items()}  # fmt: skip
    settings = DistillSettings(values, frozenset(given))
    if not settings["scales"] and not settings["pmd"]:
        raise SettingsError("nothing to distil: scales is none and pmd is off; give at least one scale or pmd")
    try:
        unused = settings.unused()  # resolves the weights first
    except ValueError as err:  # a weight for a term the run does not have
        raise SettingsError(f"weight_overrides: {err}") from None
    by_reason: dict[str, list[str]] = {}
    for name, why in unused.items():
        if name in given:
            by_reason.setdefault(why, []).append(name)
    if by_reason:
        raise SettingsError("; ".join(
            f"{_join(names)} {'is' if len(names) == 1 else 'are'} set but "
            + (why.replace("use it", "use them") if len(names) > 1 else why)
            for why, names in by_reason.items()
        ))  # fmt: skip
    return settings


def _used_by_text(setting: Setting) -> str:
    if setting.used_by == "run":
        return "every run"
    if setting.used_by in ("pmd", "dice"):
        return f"the {setting.used_by} term (its weight above 0)"
    if setting.argument is None:
        return "a run with a distilled scale"
    from mkd.losses import FEATURE_LOSSES

    losses = [n for n in FEATURE_LOSSES if setting.argument in _loss_arguments(n)]
    return f"a distilled scale whose feature_loss takes it ({', '.join(losses)})"


def settings_table() -> str:
    """The Markdown table of :data:`SETTINGS` that docs/distill.md shows (a test keeps the two equal)."""
    rows = ["| key (bundle, grid) | `mkd distill` option | default | used by | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS.values():
        key = f"`{s.name}`" + "".join(f" (grid also `{a}`)" for a in s.grid_aliases)
        flag = f"`{s.flag}/--no-{s.flag[2:]}`" if s.type is bool else f"`{s.flag}`"
        flag += "".join(f" (`{a}`)" for a in s.aliases)
        rows.append(f"| {key} | {flag} | {s.default_text} | {_used_by_text(s)} | {s.help} |")
    return "\n".join(rows)
