"""Stages of a fit: what a model declares about its run, so that the training loop never asks what it is; and
cooperative stops for the parts of a run that yield no progress events (feature start, model build).

A model's ``stages(config)`` returns a list of ``Stage`` in order of ``start``. The loop (``train.fit_steps``)
reports the current stage's name in every ``ProgressEvent.stage``, calls a stage's ``enter`` once at the first
step whose progress reaches its ``start``, and uses its ``cauchy`` scale (when > 0) for the data term.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["Stage", "stage_at", "Stopped", "stop_check", "check_stop"]

_STOP_CHECK: ContextVar[Callable[[], bool] | None] = ContextVar("napari_nir_stop_check", default=None)


class Stopped(Exception):
    """A run was asked to stop during a part of it that yields no progress events (raised by ``check_stop``)."""


@contextmanager
def stop_check(should_stop: Callable[[], bool]) -> Iterator[None]:
    """While the block runs in this thread, ``check_stop()`` raises ``Stopped`` once ``should_stop()`` is true.

    A context variable rather than an argument: the loops that check it (ORB per frame, matching per pair, phase
    correlation per pair) sit three calls below the job, and a fit started without a job checks nothing."""
    token = _STOP_CHECK.set(should_stop)
    try:
        yield
    finally:
        _STOP_CHECK.reset(token)


def check_stop() -> None:
    """Raise ``Stopped`` when the run this thread serves was asked to stop (see ``stop_check``); else nothing."""
    should_stop = _STOP_CHECK.get()
    if should_stop is not None and should_stop():
        raise Stopped


@dataclass(frozen=True)
class Stage:
    """One part of a run.

    name: reported in progress events ("fit", "background", "occlusion", "scene warm-up", "separation").
    start: progress in [0, 1] (fraction of the steps) at which the stage begins.
    enter: called once when it begins, ``enter(model, data, shape, config, generator, progress)`` with the
        working frames ``data`` (T*h*w, C) on the device, ``shape`` (T, h, w, C) and the loop's generator.
    cauchy: Cauchy scale (working units) of the data term log(1 + (r / c)^2) during the stage; 0: the
        configured loss.
    """

    name: str
    start: float = 0.0
    enter: Callable | None = None
    cauchy: float = 0.0


def stage_at(stages: list[Stage], progress: float) -> Stage:
    """The stage a run is in at ``progress``: the last whose start it has reached (the first before any)."""
    current = stages[0]
    for stage in stages:
        if progress >= stage.start:
            current = stage
    return current
