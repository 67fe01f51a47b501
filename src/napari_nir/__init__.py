"""napari-nir: neural image representations for multi-image fusion and layer separation.

Public API (docs/architecture.md describes the layers behind it)::

    import napari_nir as nir
    fit = nir.fuse(burst, "homography")      # burst: (T, H, W[, C]) array-like
    fit.canonical(); fit.frames(); fit.homographies; fit.save("fit.npz"); nir.load("fit.npz")
    fit = nir.fuse(stack, "rigid"); fit.registered(); fit.apply(labels, order=0); fit.transforms()
"""
from ._version import __version__
from .core.api import FusionJob, SeparationJob, fuse, separate
from .core.registration import convert_transforms
from .core.result import FusionResult, SeparationResult, load
from .core.tasks import TASKS
from .core.train import ProgressEvent


def add_result_to_viewer(viewer, fit, source_name: str = "burst", **kwargs):
    """Add (or replace) a result's layers in a napari viewer; see ``napari_nir._layers.add_result_to_viewer``."""
    from ._layers import add_result_to_viewer as add

    return add(viewer, fit, source_name, **kwargs)

__all__ = ["__version__", "fuse", "separate", "FusionJob", "SeparationJob", "SeparationResult", "TASKS", "load",
           "FusionResult", "ProgressEvent", "add_result_to_viewer", "convert_transforms"]
