"""Every knob of a fit, typed and self-describing: ``FitConfig`` (no torch here).

A ``FitConfig`` is five frozen sections, each a dataclass whose fields carry their type (``Literal`` for
choices), a one-line description and their bounds::

    config.optimiser.steps        config.field.kind        config.motion.model
    config.separation.task        config.runtime.seed

Every leaf also has a *flat name*, unique over the sections (``steps``, ``field``, ``motion``, ``task``,
``seed``, ...). Flat names are the public option names: ``napari_nir.fuse(burst, batch=8192)``, the CLI's
``--set batch=8192`` and the ``parameters`` of every provenance record use them. ``options()`` lists the
leaves with their metadata; the CLI's help, the widgets' "Advanced" section and docs/architecture.md are
generated from it.

Validation (:meth:`FitConfig.validate`) is driven by the annotations and the bounds in the metadata; a few
rules that tie several fields together follow it (``_check_together``). Presets are data
(``PRESET_OPTIONS``); the motion and task tables add their own per-preset values (see ``presets.py``).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any, Literal

__all__ = ["FitConfig", "OptimiserOptions", "FieldOptions", "MotionOptions", "SeparationOptions", "RuntimeOptions",
           "Option", "options", "option", "find_option", "PRESETS", "PRESET_OPTIONS", "parse_value"]

PRESETS = ("fast", "paper")


def option(default, doc: str, *, low=None, high=None, low_open=False, flat: str | None = None, factory=None):
    """A config leaf: its default, a one-line description, optional bounds (``low``/``high`` inclusive unless
    ``low_open``) and its flat name when it differs from the attribute name."""
    meta = {"doc": doc, "low": low, "high": high, "low_open": low_open, "flat": flat}
    if factory is not None:
        return dc_field(default_factory=factory, metadata=meta)
    return dc_field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptimiserOptions:
    """How the networks are optimised."""

    steps: int = option(400, "optimisation steps", low=1, high=100_000)
    batch: int = option(16384, "pixels per step, drawn uniformly over all frames; -k: H * W / k")
    batch_ramp: float = option(0.0, "fraction of the run over which the points per step grow from a quarter of batch "
                                    "to batch (0: the whole batch from the first step)", low=0, high=1)
    lr_field: float = option(0.02, "learning rate of the canonical field (and the interference)", low=0,
                             low_open=True)
    lr_motion: float = option(3e-3, "learning rate of the motion model", low=0, low_open=True)
    lr_final_fraction: float = option(0.1, "cosine decay of both learning rates down to this fraction", low=0,
                                      high=1)
    coarse_to_fine: float = option(0.5, "fraction of the run over which finer grid levels fade in (0: all at once)",
                                   low=0, high=1)
    coarse_to_fine_featured: float = option(
        0.1, "coarse_to_fine when a homography motion started from feature matches (already within a pixel or "
             "two, so fine levels may come sooner)", low=0, high=1)
    motion_warmup: float = option(0.0, "fraction of the run with the motion frozen", low=0, high=1)
    blank_weight: float = option(
        0.1, "how often pixels of a frame found blank (almost no contrast) are drawn, relative to the other frames' "
             "(1: as often); such frames are named in the verdict and the provenance", low=0, high=1)
    loss: Literal["l1", "mse"] = option("l1", "data term: l1 (robust to lighting changes and outliers) or mse "
                                              "(the paper's)")
    value_range: tuple[float, float] = option((0.0, 1.0), "intensities the networks see (the paper: (-1, 1))")


@dataclass(frozen=True)
class FieldOptions:
    """The canonical field f(x)."""

    kind: Literal["grid", "siren"] = option("grid", "grid: multiresolution dense grids (fast); siren: the paper's "
                                                    "sinusoidal MLP", flat="field")
    options: dict = option(None, "extra GridField / Siren arguments (grid: levels, coarsest, finest, features, "
                                 "hidden, depth_cells; siren: width, hidden_layers, omega0)", flat="field_options",
                           factory=dict)
    grid_density: float = option(1.0, "finest grid cells per input pixel (1: robust to noise; 2: more detail)",
                                 low=0, low_open=True)
    exposure: bool = option(True, "learn a per-frame, per-channel gain and offset (real bursts change brightness)")


@dataclass(frozen=True)
class MotionOptions:
    """The motion model W_t (its name is an entry of the motion table, ``core/motions.py``)."""

    model: str = option("homography", "motion model: a name from the motion table", flat="motion")
    param: Literal["lie", "mlp"] = option("lie", "homography parameters: lie (sl(3) coefficients per frame) or mlp "
                                                 "(the paper's g(t))", flat="motion_param")
    init: Literal["auto", "features", "identity"] = option(
        "auto", "start: auto (feature matches when they succeed, else identity), features (required), identity")
    feature_prefilter: int = option(0, "median filter (pixels) on the frames before feature matching (0: none)",
                                    low=0)
    align_size: int = option(
        0, "fusion with a feature start on frames longer than this: a first fit of the frames reduced to this size "
           "aligns them, and the full-size fit starts from its motion (0: off; try 512 where large frames end off "
           "their neighbours)", low=0)
    polish: int = option(3, "drift motions (translation, rigid, similarity, affine): Gauss-Newton iterations that "
                            "refine every frame's matrix over all its pixels against the canonical view after the "
                            "fit (0: none)", low=0, high=50)
    flow_base: Literal["homography", "none"] = option(
        "homography", "flow models: a displacement on top of a global homography, or none")
    flow_levels: int = option(4, "levels of the displacement grid", low=1)
    flow_coarsest: float = option(2.0, "cells per normalised unit of the coarsest displacement level", low=0,
                                  low_open=True)
    flow_finest: float = option(16.0, "cells per normalised unit of the finest displacement level", low=0,
                                low_open=True)
    flow_knots: int = option(0, "time knots of the displacement grid (0: one per frame)", low=0)
    flow_smoothness: float = option(0.02, "weight of the mean |Jacobian| of the displacement w.r.t. (x, y, t)",
                                    low=0)
    occlusion_cells: int = option(16, "cells along w of the occlusion model's 3-D canonical", low=1)
    occlusion_warmup: float = option(
        0.5, "occlusion model: fraction of the run fitting the homography alone (every pixel at w = 0) before "
             "outlier pixels start on a depth slice of their own", low=0, high=1)
    occlusion_seed_w: float = option(0.5, "occlusion model: the depth w outlier pixels start at, in (-1, 1), not 0")


@dataclass(frozen=True)
class SeparationOptions:
    """Layer separation (ignored by fusion, where ``task`` is "")."""

    task: str = option("", "a name from the task table, or \"\" for fusion")
    scene_warmup: float = option(0.0, "fraction of the run fitting the scene alone (a robust fusion)", low=0,
                                 high=1)
    warmup_cauchy: float = option(
        0.0, "Cauchy scale of the scene warm-up's loss log(1 + (r / c)^2) in working units (0: off); used when "
             "the motion started from feature matches", low=0)
    sparsity: float | None = option(None, "weight of the interference's sparsity (None: the task's)", low=0)
    exclusion: float | None = option(None, "weight of the exclusion loss (None: the task's)", low=0)
    zero_mean_prior: bool = option(
        False, "hold an oscillating interference (the task's zero_mean weight, moire) to zero mean per frame")
    interference_options: dict = option(None, "extra GridField / Siren arguments of the interference network",
                                        factory=dict)
    interference_density: float = option(0.0, "finest cells per pixel of a grid interference (0: grid_density)",
                                         low=0)
    detail_transfer: float = option(
        0.0, "how much of what the fit leaves unexplained (frame - reconstruction) goes back into each frame's "
             "scene where the interference leaves it visible (1: all of it; 0: the scene as the networks render "
             "it, the paper)", low=0, high=1)
    scene_consensus: bool = option(
        False, "give back to each frame's scene what the other frames remove at the same scene point (scene detail "
               "the interference soaked up; interference does not move with the scene); matrix scene motions only "
               "(core/guard.py)")
    thick_alpha_guard: bool = option(
        False, "fence, rain: where the alpha forms blobs much thicker than the burst's wires or streaks (something "
               "else soaked up: an object moving by itself), the scene keeps the frame's own values (core/guard.py)")
    interference_motion: Literal["none", "homography", "auto"] = option(
        "none", "none: the interference is free in every frame (the paper); homography: plus a layer moving "
                "rigidly by homographies of its own; auto: that layer where the residuals show one")
    rigid_layer_score: float = option(10.0, "auto: peak-to-noise ratio of the residuals' phase correlation above "
                                            "which a rigid layer is kept", low=0)
    interference_free: float = option(0.5, "with a rigid layer: weight of the L1 of what the free part adds", low=0)
    interference_free_start: float = option(0.65, "with a rigid layer: fraction of the run before the free part "
                                                  "starts", low=0, high=1)


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how a fit runs; what is recorded about it."""

    preset: str = option("fast", "the preset this configuration started from (a label: behaviour is in the "
                                 "other fields)")
    working_size: int = option(0, "fit on frames downscaled so the longer side is at most this (0: no limit)",
                               low=0)
    preview_every: int = option(50, "steps between canonical previews in the progress events (0: none)", low=0)
    seed: int = option(0, "random seed: the same seed, input and device give the same result", low=0,
                       high=2**32 - 1)
    device: str = option("cpu", "auto, cpu, cuda, cuda:N or mps")
    threads: int = option(0, "torch CPU threads during the fit (0: the process's current setting); the count used "
                             "is recorded, since results are bit-identical per seed only at the same count",
                          low=0, high=1024)


SECTIONS = (("optimiser", OptimiserOptions), ("field", FieldOptions), ("motion", MotionOptions),
            ("separation", SeparationOptions), ("runtime", RuntimeOptions))


@dataclass(frozen=True)
class Option:
    """One config leaf: ``flat`` name, ``path`` (section, attribute), type annotation, default, description."""

    flat: str
    section: str
    attribute: str
    annotation: Any
    default: Any
    doc: str
    low: float | None
    high: float | None
    low_open: bool

    @property
    def path(self) -> str:
        return f"{self.section}.{self.attribute}"

    @property
    def choices(self) -> tuple | None:
        """The allowed values of a ``Literal`` option, else None."""
        return typing.get_args(self.annotation) if typing.get_origin(self.annotation) is Literal else None


def _collect() -> dict[str, Option]:
    out = {}
    for section, cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            flat = f.metadata.get("flat") or f.name
            assert flat not in out, f"flat option name {flat!r} is used twice"
            out[flat] = Option(flat, section, f.name, hints[f.name], default, f.metadata["doc"], f.metadata["low"],
                               f.metadata["high"], f.metadata["low_open"])
    return out


_OPTIONS = _collect()


def options() -> dict[str, Option]:
    """{flat name: Option} for every leaf, in section order."""
    return dict(_OPTIONS)


@dataclass(frozen=True)
class FitConfig:
    """A fit's configuration: five sections (see the module docstring). Build one with
    ``FitConfig.from_flat(steps=200, motion="flow")`` or a preset (``presets.preset_config``)."""

    optimiser: OptimiserOptions = dc_field(default_factory=OptimiserOptions)
    field: FieldOptions = dc_field(default_factory=FieldOptions)
    motion: MotionOptions = dc_field(default_factory=MotionOptions)
    separation: SeparationOptions = dc_field(default_factory=SeparationOptions)
    runtime: RuntimeOptions = dc_field(default_factory=RuntimeOptions)

    # -- flat names ---------------------------------------------------------------------------------
    @classmethod
    def from_flat(cls, **values) -> FitConfig:
        """A config with the defaults replaced by ``values`` (flat names); TypeError for an unknown name."""
        return cls().replace(**values)

    def replace(self, **values) -> FitConfig:
        """A copy with the options given by flat name (or ``section.attribute``) replaced."""
        per_section: dict[str, dict] = {}
        for name, value in values.items():
            opt = _resolve(name)
            per_section.setdefault(opt.section, {})[opt.attribute] = value
        return dataclasses.replace(self, **{s: dataclasses.replace(getattr(self, s), **v)
                                            for s, v in per_section.items()})

    def get(self, name: str):
        """The value of the option called ``name`` (flat or ``section.attribute``)."""
        opt = _resolve(name)
        return getattr(getattr(self, opt.section), opt.attribute)

    def to_dict(self) -> dict:
        """{flat name: JSON-able value} of every option (provenance's ``parameters``)."""
        out = {}
        for flat, opt in _OPTIONS.items():
            value = getattr(getattr(self, opt.section), opt.attribute)
            out[flat] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, params: dict) -> FitConfig:
        """The inverse of :meth:`to_dict` (JSON lists back to tuples); unknown names raise TypeError."""
        values = dict(params)
        if "value_range" in values and values["value_range"] is not None:
            values["value_range"] = tuple(values["value_range"])
        return cls.from_flat(**values)

    # -- validation ---------------------------------------------------------------------------------
    def validate(self) -> FitConfig:
        """Raise ValueError / TypeError naming any option with an impossible value; returns self."""
        for opt in _OPTIONS.values():
            _check(opt, getattr(getattr(self, opt.section), opt.attribute))
        _check_together(self)
        return self

    # -- convenient names for what the code reads most ------------------------------------------------
    @property
    def task(self) -> str:
        return self.separation.task

    @property
    def preset(self) -> str:
        return self.runtime.preset

    @property
    def steps(self) -> int:
        return self.optimiser.steps

    @property
    def seed(self) -> int:
        return self.runtime.seed

    @property
    def value_range(self) -> tuple[float, float]:
        return self.optimiser.value_range


def find_option(name: str) -> Option | None:
    """The option called ``name`` (flat name or ``section.attribute``), or None."""
    if name in _OPTIONS:
        return _OPTIONS[name]
    return next((opt for opt in _OPTIONS.values() if opt.path == name), None)


def _resolve(name: str) -> Option:
    opt = find_option(name)
    if opt is None:
        raise TypeError(f"unknown option {name!r}; valid: {', '.join(_OPTIONS)}")
    return opt


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fail(opt: Option, value, fix: str, exc=ValueError):
    raise exc(f"option {opt.flat}={value!r} is invalid: {fix}")


def _check(opt: Option, value) -> None:
    """Check one value against its annotation and bounds."""
    annotation = opt.annotation
    if opt.choices is not None:
        if value not in opt.choices:
            _fail(opt, value, "use " + " or ".join(repr(c) for c in opt.choices))
        return
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        and type(None) in typing.get_args(annotation)
    if optional:
        if value is None:
            return
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        if not isinstance(value, bool):
            _fail(opt, value, "use True or False", TypeError)
        return
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(opt, value, f"give a whole number ({opt.doc})", TypeError)
    elif annotation is float:
        if not _is_number(value):
            _fail(opt, value, f"give a number ({opt.doc})", TypeError)
        if not math.isfinite(value):
            _fail(opt, value, "give a finite number")
    elif annotation is str:
        if not isinstance(value, str):
            _fail(opt, value, f"give a string ({opt.doc})", TypeError)
        return
    elif annotation is dict:
        if not isinstance(value, dict):
            _fail(opt, value, f"give a dict ({opt.doc})", TypeError)
        return
    elif typing.get_origin(annotation) is tuple:
        if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_number(v) and math.isfinite(v)
                                                                                for v in value):
            _fail(opt, value, "give (low, high), e.g. (0, 1)")
        return
    if opt.low is not None and (value < opt.low or (opt.low_open and value == opt.low)):
        _fail(opt, value, f"use a value {'>' if opt.low_open else '>='} {opt.low}"
                          + (f" and <= {opt.high}" if opt.high is not None else ""))
    if opt.high is not None and value > opt.high:
        _fail(opt, value, f"use a value between {opt.low} and {opt.high}")


def _check_together(config: FitConfig) -> None:
    """The rules that tie several options together."""
    o, f, m, s = config.optimiser, config.field, config.motion, config.separation
    opts = _OPTIONS
    if o.batch == 0:
        _fail(opts["batch"], 0, "use a number of pixels per step (e.g. 16384) or -k for H*W/k pixels per step "
                                "(e.g. -4)")
    if not o.value_range[0] < o.value_range[1]:
        _fail(opts["value_range"], o.value_range, "give (low, high) with low < high, e.g. (0, 1)")
    lo, hi = o.value_range
    if not (max(abs(lo), abs(hi)) <= 1e3 and 1e-3 <= hi - lo):  # beyond: float32 losses overflow or vanish
        _fail(opts["value_range"], o.value_range, "give bounds within +-1000 at least 0.001 apart, e.g. (0, 1) or "
                                                  "(-1, 1)")
    if not (_is_number(m.occlusion_seed_w) and 0 < abs(m.occlusion_seed_w) < 1):
        _fail(opts["occlusion_seed_w"], m.occlusion_seed_w, "use a depth in (-1, 1) other than 0, e.g. 0.5")
    if s.interference_motion != "none":
        if f.kind != "grid":
            _fail(opts["interference_motion"], s.interference_motion,
                  "a rigid interference layer needs field='grid' (the fast preset); use interference_motion='none'")
        if s.scene_warmup <= 0:
            _fail(opts["interference_motion"], s.interference_motion,
                  "a rigid interference layer starts from the scene warm-up's residuals: give scene_warmup > 0 "
                  "(e.g. 0.3)")
    known = {"grid": {"levels", "coarsest", "finest", "features", "hidden", "depth_cells"},
             "siren": {"width", "hidden_layers", "omega0"}}[f.kind]
    bogus = set(f.options) - known
    if bogus:
        _fail(opts["field_options"], f.options,
              f"unknown key(s) {', '.join(sorted(bogus))}; a {f.kind} field takes {', '.join(sorted(known))}")


def parse_value(name: str, text: str):
    """The value of option ``name`` written as ``text`` on a command line (``--set name=text``) or in a
    widget: numbers, true/false, none, (low, high), JSON dicts; Literal and str options as given."""
    import json

    opt = _resolve(name)
    annotation = opt.annotation
    text = text.strip()
    if opt.choices is not None or annotation is str:
        return text
    if text.lower() in ("none", "null") and type(None) in typing.get_args(annotation):
        return None
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError
            return value
        if typing.get_origin(annotation) is tuple:
            parts = [p for p in text.strip("()[] ").replace(",", " ").split()]
            return tuple(float(p) for p in parts)
        return float(text)  # float and float | None
    except (ValueError, json.JSONDecodeError):
        kind = getattr(annotation, "__name__", str(annotation))
        raise ValueError(f"option {opt.flat}: cannot read {text!r} as {kind} ({opt.doc})") from None


# Presets as data: flat option values on top of the defaults. The motion table (per motion and preset) and the
# task table (per task and preset) add their own; ``presets.preset_config`` composes them.
PRESET_OPTIONS: dict[str, dict] = {
    "fast": {"working_size": 1024},
    # the official configuration (the paper's code): SIREN field and MLP motion, tiny learning rates, no
    # schedule, values in [-1, 1], identity start; steps, batch, loss and depth per motion in the motion table
    "paper": {"field": "siren", "field_options": {"width": 256, "hidden_layers": 4, "omega0": 30.0},
              "motion_param": "mlp", "lr_field": 1e-4, "lr_motion": 1e-4, "lr_final_fraction": 1.0,
              "coarse_to_fine": 0.0, "value_range": (-1.0, 1.0), "init": "identity", "working_size": 512,
              "exposure": False, "flow_base": "none", "flow_smoothness": 0.02},
}
