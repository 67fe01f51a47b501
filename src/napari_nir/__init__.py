"""napari-nir: neural image representations for multi-image fusion and layer separation.

Public API (docs/architecture.md describes the layers behind it)::

    import napari_nir as nir
    fit = nir.fuse(burst, "homography")      # burst: (T, H, W[, C]) array-like
    fit.canonical(); fit.frames(); fit.homographies; fit.save("fit.npz"); nir.load("fit.npz")
    fit = nir.fuse(stack, "rigid"); fit.registered(); fit.apply(labels, order=0); fit.transforms()
"""
import importlib

from ._version import __version__

# The public names are imported on first use (PEP 562), so that `import napari_nir` (and the command line's start)
# takes no torch: a Ctrl-C while torch loads then reaches napari_nir.cli.main, which exits 130 without a traceback.
_LAZY = {"FusionJob": "core.api", "SeparationJob": "core.api", "fuse": "core.api", "separate": "core.api",
         "convert_transforms": "core.registration", "FusionResult": "core.result", "SeparationResult": "core.result",
         "load": "core.result", "TASKS": "core.tasks", "ProgressEvent": "core.train", "Stopped": "core.stages",
         "fuse_many": "distributed", "separate_many": "distributed", "fuse_tiled": "tiled"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def add_result_to_viewer(viewer, fit, source_name: str = "burst", **kwargs):
    """Add (or replace) a result's layers in a napari viewer; see ``napari_nir._layers.add_result_to_viewer``."""
    from ._layers import add_result_to_viewer as add

    return add(viewer, fit, source_name, **kwargs)


def run_in_viewer(viewer, layer, task: str = "fuse", **options):
    """Fit a layer in napari without blocking it; returns the run (cancel(), outcome, result). See
    ``napari_nir._widgets.run_in_viewer``."""
    from ._widgets import run_in_viewer as run

    return run(viewer, layer, task, **options)


__all__ = ["__version__", "fuse", "separate", "FusionJob", "SeparationJob", "SeparationResult", "TASKS", "load",
           "FusionResult", "ProgressEvent", "Stopped", "add_result_to_viewer", "convert_transforms", "run_in_viewer",
           "fuse_many", "separate_many", "fuse_tiled"]
