"""Re-running a fit from its provenance (``result.provenance()``, also stored in every saved result).

``fuse(burst, **fuse_kwargs_from_provenance(prov))`` reproduces a fusion bit-identically on the same kind of
device (CPU runs are deterministic for a seed); :func:`rerun` does the same for fusion and separation.
"""
from __future__ import annotations

import warnings

from .._version import __version__
from . import api
from .config import FitConfig, options

__all__ = ["fuse_kwargs_from_provenance", "separate_kwargs_from_provenance", "rerun"]

_NAMED = ("motion", "preset", "steps", "seed", "device")  # fuse()'s own arguments; the rest are options


def _parameters(prov) -> dict:
    """The options of a provenance record (flat names), checked; value_range back to a tuple."""
    if not isinstance(prov, dict) or not isinstance(prov.get("parameters"), dict):
        raise ValueError("not a napari-nir provenance record: expected a dict with a 'parameters' dict, as returned "
                         "by result.provenance()")
    if prov.get("software", "napari-nir") != "napari-nir":
        raise ValueError(f"provenance was written by {prov.get('software')!r}, not napari-nir")
    params = dict(prov["parameters"])
    unknown = set(params) - set(options())
    if unknown:
        raise ValueError(f"provenance has parameter(s) this version does not know: {', '.join(sorted(unknown))} "
                         f"(written by napari-nir {prov.get('version')}, this is {__version__}); "
                         "install the version that wrote it")
    if prov.get("version") not in (None, __version__):
        warnings.warn(f"provenance written by napari-nir {prov.get('version')}, this is {__version__}: the re-run "
                      "may not be bit-identical", stacklevel=3)
    if "value_range" in params:
        params["value_range"] = tuple(params["value_range"])
    FitConfig.from_dict(params).validate()  # every option accepted
    return params


def _split(params: dict) -> dict:
    named = {k: params.pop(k) for k in _NAMED if k in params}
    return {**named, **params}


def fuse_kwargs_from_provenance(prov: dict) -> dict:
    """Keyword arguments for ``napari_nir.fuse(burst, **kwargs)`` that repeat the fit recorded in ``prov``
    (every option: motion, preset, steps, seed, device and the rest)."""
    task = str(prov.get("task", "fuse")) if isinstance(prov, dict) else "fuse"
    params = _parameters(prov)
    if task != "fuse" or params.pop("task", ""):
        raise ValueError(f"this provenance records a {task!r} run, not a fusion; use "
                         "separate_kwargs_from_provenance (or rerun)")
    return _split(params)


def separate_kwargs_from_provenance(prov: dict) -> dict:
    """Keyword arguments for ``separate(burst, **kwargs)`` (task included) repeating the separation in ``prov``."""
    params = _parameters(prov)
    task = params.pop("task", "")
    if not task:
        raise ValueError("this provenance records a fusion, not a separation; use fuse_kwargs_from_provenance")
    return {"task": task, **_split(params)}


def rerun(burst, prov: dict, **overrides):
    """Repeat the run recorded in ``prov`` on ``burst`` (fusion or separation); ``overrides`` (e.g. callback,
    device) replace recorded values."""
    if str(prov.get("task", "fuse")).startswith("separate"):
        return api.separate(burst, **{**separate_kwargs_from_provenance(prov), **overrides})
    return api.fuse(burst, **{**fuse_kwargs_from_provenance(prov), **overrides})
