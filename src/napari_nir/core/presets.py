"""Presets: a ``FitConfig`` from the defaults, the preset's data, the motion table's and the task table's.

    preset_config(motion, preset)        = defaults + PRESET_OPTIONS[preset] + MOTIONS[motion].presets[preset]
    separation_config(task, preset, ...) = preset_config(...) + SEPARATION_PRESET_OPTIONS[preset] + the task's

Later layers win; the caller's overrides come last.
"""
from __future__ import annotations

from .config import PRESET_OPTIONS, PRESETS, FitConfig
from .motions import get_motion
from .tasks import get_task

__all__ = ["preset_config", "separation_config", "SEPARATION_PRESET_OPTIONS"]

# layer separation on top of a preset: the fast preset warms the scene up alone and holds an oscillating
# interference to zero mean; the paper preset keeps the official losses (its steps, batch and loss per task are
# in the task table's ``paper``)
SEPARATION_PRESET_OPTIONS = {
    "fast": {"steps": 600, "batch_ramp": 0.0, "scene_warmup": 0.3, "exposure": False, "zero_mean_prior": True},
    "paper": {"value_range": (0.0, 1.0), "scene_warmup": 0.0},
}


def _check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


def preset_config(motion: str, preset: str, **overrides) -> FitConfig:
    """The configuration of ``preset`` ("fast" or "paper") for ``motion``; ``overrides`` (flat option names)
    replace its values (None: keep the preset's)."""
    _check_preset(preset)
    entry = get_motion(motion)
    values = {**PRESET_OPTIONS[preset], **entry.presets.get(preset, {}), "motion": motion, "preset": preset}
    return FitConfig.from_flat(**values).replace(**{k: v for k, v in overrides.items() if v is not None})


def separation_config(task_name: str, preset: str, motion: str | None = None, **overrides) -> FitConfig:
    """The configuration of ``preset`` for a layer-separation task (its motion unless ``motion`` is given)."""
    _check_preset(preset)
    task = get_task(task_name)
    motion = motion or task.default_motion(preset)
    base = preset_config(motion, preset)
    values = {"task": task.name, **SEPARATION_PRESET_OPTIONS[preset]}
    if preset == "fast":
        # a flow scene gets the task's prior on its displacement; a homography has none
        values["flow_smoothness"] = task.flow_smoothness if get_motion(motion).alignment == "flow" else 0.0
        values.update(task.fast_options)
    else:
        paper = task.paper
        values.update(steps=paper["steps"], batch=paper["batch"], loss=paper["loss"],
                      field_options={**base.field.options, "omega0": paper["f1_omega0"]})
    return base.replace(**values).replace(**{k: v for k, v in overrides.items() if v is not None})
