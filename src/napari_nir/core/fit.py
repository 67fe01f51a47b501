"""The optimisation loop: fit a canonical field and a motion model to a burst.

``fit_steps`` is a generator of ``ProgressEvent``: the caller (API, CLI progress bar, napari thread worker)
drives it and can stop at any ``yield`` (cancellation). Everything is seeded; on CPU a run is bit-identical
for the same seed.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from dataclasses import field as dc_field

import numpy as np
import torch
from torch import nn

from . import fields, motion as motion_models
from .burst import Burst

MOTIONS = ("homography", "flow", "occlusion")
PRESETS = ("fast", "paper")


@dataclass(frozen=True)
class FitConfig:
    """Every knob of a fit; presets are instances of this. Recorded in every output's provenance."""

    motion: str = "homography"
    preset: str = "fast"
    steps: int = 400
    batch: int = 16384  # pixels per step, drawn uniformly over all frames; <= 0: H * W // -batch
    field: str = "grid"  # "grid" | "siren"
    field_options: dict = dc_field(default_factory=dict)
    grid_density: float = 1.0  # finest grid cells per input pixel (1: robust to noise; 2: more detail)
    motion_param: str = "lie"  # "lie" (direct sl(3) coefficients) | "mlp" (the paper's g(t))
    lr_field: float = 0.02
    lr_motion: float = 3e-3
    lr_final_fraction: float = 0.1  # cosine decay of both learning rates down to this fraction
    coarse_to_fine: float = 0.5  # fraction of the run over which finer levels fade in (0: all at once)
    # the same for motion="homography" started from features: the motion is then already within a pixel or two,
    # so fine levels may come sooner (9 x 256^2 benchmark: 30 dB after 4.5 s -> 2.5 s, final min frame PSNR
    # 39.9 -> 41.4 dB, corner error 0.031 -> 0.024 px with 0.5 -> 0.1)
    coarse_to_fine_featured: float = 0.1
    motion_warmup: float = 0.0  # fraction of the run with the motion frozen
    loss: str = "l1"  # "l1" (robust to lighting changes and outliers in real bursts) | "mse" (the paper's)
    exposure: bool = True  # learn a per-frame, per-channel gain and offset (real bursts change brightness)
    flow_base: str = "homography"  # flow models: "homography" (flow on top of a global homography) | "none"
    flow_levels: int = 4  # displacement grid levels, from flow_coarsest to flow_finest cells per unit
    flow_coarsest: float = 2.0
    flow_finest: float = 16.0
    flow_knots: int = 0  # time knots of the displacement grid (0: one per frame)
    flow_smoothness: float = 0.02  # weight of the mean absolute Jacobian of g w.r.t. (x, y, t) (paper: 0.02)
    task: str = ""  # layer separation: a name from tasks.TASKS ("" for fusion)
    scene_warmup: float = 0.0  # separation: fraction of the run fitting the scene alone (robust fusion)
    # separation: Cauchy scale (working units) of the scene warm-up's loss, log(1 + (r / c)^2), in place of
    # ``loss`` (0: off). Used only when the motion started from features: a redescending loss ignores what
    # it cannot explain, so it needs a start within its basin
    warmup_cauchy: float = 0.0
    sparsity: float | None = None  # separation: override the task's sparsity weight
    exclusion: float | None = None  # separation: override the task's exclusion weight
    interference_options: dict = dc_field(default_factory=dict)  # separation: GridField/Siren options of f2
    interference_density: float = 0.0  # separation: finest cells per pixel of a grid f2 (0: grid_density)
    # separation: "none": the interference is f2(x, y, t) in frame coordinates (the paper); "homography": plus a
    # layer that moves rigidly by homographies of its own (separate.SeparationModel), started at the warm-up's
    # end from the residuals; "auto": that layer only where the residuals show one (score >= rigid_layer_score)
    interference_motion: str = "none"
    rigid_layer_score: float = 10.0  # peak-to-noise of the residuals' phase correlation (separate.py has figures)
    interference_free: float = 0.5  # with a rigid layer: weight of the L1 of what the free part adds to it
    interference_free_start: float = 0.65  # with a rigid layer: fraction of the run before the free part starts
    occlusion_cells: int = 16  # cells along w of the occlusion model's 3-D canonical
    # occlusion model (grid motion): the first part of the run fits the homography alone, every pixel at w = 0,
    # with the robust loss: the background; then pixels the background cannot explain (moving objects) start at
    # w = occlusion_seed_w, so the canonical's w = 0 slice keeps the background and objects get a slice of their
    # own. Occlusion sample (7 x 128^2), canonical vs true background: 16.6 dB without, 29.3 dB with.
    # (The paper preset's SIREN motion has no such start: these two are unused there.)
    occlusion_warmup: float = 0.5
    occlusion_seed_w: float = 0.5
    value_range: tuple[float, float] = (0.0, 1.0)  # intensities the network sees (paper: [-1, 1])
    init: str = "auto"  # "auto" | "features" | "identity"
    feature_prefilter: int = 0  # median filter (pixels) on the frames before feature matching; 0: none
    working_size: int = 0  # fit on frames downscaled so the longer side is at most this (0: no limit)
    preview_every: int = 50
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> "FitConfig":
        """Raise ValueError/TypeError naming any option with an impossible value; returns self."""
        def need(ok: bool, name: str, value, fix: str, exc=ValueError):
            if not ok:
                raise exc(f"option {name}={value!r} is invalid: {fix}")

        for name in ("lr_field", "lr_motion"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool), name, v, "give a number", TypeError)
            need(math.isfinite(v) and v > 0, name, v, "use a finite learning rate > 0 (e.g. 0.02 or 1e-4)")
        need(self.loss in ("l1", "mse"), "loss", self.loss, "use 'l1' or 'mse'")
        need(self.interference_motion in ("none", "homography", "auto"), "interference_motion",
             self.interference_motion, "use 'none' (an interference free in every frame), 'homography' (plus a "
             "layer moving rigidly) or 'auto' (that layer where the burst shows one)")
        if self.interference_motion != "none":
            need(self.field == "grid", "interference_motion", self.interference_motion,
                 "a rigid interference layer needs field='grid' (the fast preset); use interference_motion='none'")
            need(self.scene_warmup > 0, "interference_motion", self.interference_motion,
                 "a rigid interference layer starts from the scene warm-up's residuals: give scene_warmup > 0 "
                 "(e.g. 0.3)")
        for name in ("rigid_layer_score", "interference_free"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0, name, v,
                 "use a number >= 0")
        need(self.init in ("auto", "features", "identity"), "init", self.init, "use 'auto', 'features' or 'identity'")
        need(self.flow_base in ("homography", "none"), "flow_base", self.flow_base, "use 'homography' or 'none'")
        lo_hi = tuple(self.value_range) if isinstance(self.value_range, (tuple, list)) else ()
        need(len(lo_hi) == 2 and all(map(math.isfinite, lo_hi)) and lo_hi[0] < lo_hi[1], "value_range",
             self.value_range, "give (low, high) with low < high, e.g. (0, 1)")
        need(isinstance(self.exposure, bool), "exposure", self.exposure, "use True or False", TypeError)
        need(isinstance(self.warmup_cauchy, (int, float)) and math.isfinite(self.warmup_cauchy)
             and self.warmup_cauchy >= 0, "warmup_cauchy", self.warmup_cauchy, "use a scale >= 0 (0: off), e.g. 0.05")
        need(isinstance(self.interference_density, (int, float)) and math.isfinite(self.interference_density)
             and self.interference_density >= 0, "interference_density", self.interference_density,
             "use a density >= 0 in cells per pixel (0: the scene's grid_density)")
        for name in ("grid_density", "flow_coarsest", "flow_finest"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, name, v, "use a number > 0")
        for name, low in (("flow_levels", 1), ("occlusion_cells", 1), ("preview_every", 0), ("flow_knots", 0),
                          ("feature_prefilter", 0)):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= low, name, v, f"use a whole number >= {low}")
        for name in ("lr_final_fraction", "coarse_to_fine", "coarse_to_fine_featured", "motion_warmup",
                     "scene_warmup", "occlusion_warmup", "interference_free_start"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1, name, v,
                 "use a fraction between 0 and 1")
        need(self.flow_smoothness >= 0, "flow_smoothness", self.flow_smoothness, "use a weight >= 0")
        need(isinstance(self.occlusion_seed_w, (int, float)) and 0 < abs(self.occlusion_seed_w) < 1,
             "occlusion_seed_w", self.occlusion_seed_w, "use a depth in (-1, 1) other than 0, e.g. 0.5")
        known = {"grid": {"levels", "coarsest", "finest", "features", "hidden", "depth_cells"},
                 "siren": {"width", "hidden_layers", "omega0"}}.get(self.field, set(self.field_options))
        bogus = set(self.field_options) - known
        need(not bogus, "field_options", self.field_options,
             f"unknown key(s) {', '.join(sorted(bogus))}; a {self.field} field takes {', '.join(sorted(known))}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["value_range"] = list(self.value_range)
        return d


def preset_config(motion: str, preset: str, **overrides) -> FitConfig:
    """The configuration of ``preset`` ("fast" or "paper", DESIGN.md section 2) for ``motion``."""
    if preset == "fast":
        config = FitConfig(motion=motion, preset="fast", working_size=1024)
    elif preset == "paper":
        # DESIGN.md section 2: homography (f SIREN 2->C 256x4, g(t) ReLU MLP, MSE, 3000 steps, batch HW/4);
        # flow (g SIREN 3->2, the separation tasks' setting: 3000 steps, batch HW/8, MSE, Jacobian 0.02);
        # occlusion (f and g SIREN 3->3 256x5, L1 + 0.02 Jacobian, 5000 steps, batch HW/32).
        per_motion = {
            "homography": {"steps": 3000, "batch": -4, "loss": "mse", "hidden_layers": 4},
            "flow": {"steps": 3000, "batch": -8, "loss": "mse", "hidden_layers": 4},
            "occlusion": {"steps": 5000, "batch": -32, "loss": "l1", "hidden_layers": 5},
        }.get(motion, {"steps": 3000, "batch": -4, "loss": "mse", "hidden_layers": 4})
        config = FitConfig(
            motion=motion, preset="paper", steps=per_motion["steps"], batch=per_motion["batch"], field="siren",
            field_options={"width": 256, "hidden_layers": per_motion["hidden_layers"], "omega0": 30.0},
            motion_param="mlp", lr_field=1e-4, lr_motion=1e-4, lr_final_fraction=1.0, coarse_to_fine=0.0,
            loss=per_motion["loss"], value_range=(-1.0, 1.0), init="identity", working_size=512, exposure=False,
            flow_base="none", flow_smoothness=0.02,
        )
    else:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def separation_config(task_name: str, preset: str, motion: str | None = None, **overrides) -> FitConfig:
    """The configuration of ``preset`` for a layer-separation task (its motion unless ``motion`` is given)."""
    from .tasks import get_task

    task = get_task(task_name)
    motion = motion or task.default_motion(preset)
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; choose one of {', '.join(MOTIONS)}")
    base = preset_config(motion, preset)
    if preset == "fast":
        defaults = {"steps": 600, "scene_warmup": 0.3, "exposure": False,
                    "flow_smoothness": task.flow_smoothness if motion != "homography" else 0.0}
        config = replace(base, task=task.name, **{**defaults, **task.fast_options})
    else:
        paper = task.paper
        config = replace(base, task=task.name, steps=paper["steps"], batch=paper["batch"], loss=paper["loss"],
                         value_range=(0.0, 1.0), scene_warmup=0.0,
                         field_options={**base.field_options, "omega0": paper["f1_omega0"]})
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class ProgressEvent:
    """One progress report. loss: training loss; psnr: reconstruction PSNR (dB, batch estimate);
    seconds: wall time since the start; preview: (h, w[, C]) float32 working-range canonical view or None."""

    step: int
    total: int
    loss: float
    psnr: float
    seconds: float
    preview: np.ndarray | None = None
    stage: str = "fit"


class FusionModel(nn.Module):
    """I_t(x) = gain_t * f(W_t(x)) + bias_t: canonical field, motion, optional per-frame exposure.

    Coordinates are normalised (see motion.Normaliser). The exposure (per frame and channel) absorbs
    brightness changes between real frames; its gauge is fixed like the motion's (mean log-gain 0, mean
    bias 0), so the canonical view has the burst's average exposure.
    """

    def __init__(self, field_net: nn.Module, motion_net: nn.Module, normaliser: motion_models.Normaliser,
                 domain: tuple[float, float, float, float], n_frames: int, channels: int, exposure: bool):
        super().__init__()
        self.field = field_net
        self.motion = motion_net
        self.normaliser = normaliser
        self.domain = domain
        self.exposure = exposure
        self.feature_started = False  # set by build_model when the motion starts from feature matches
        if exposure:
            self.log_gain = nn.Parameter(torch.zeros(n_frames, channels))
            self.bias = nn.Parameter(torch.zeros(n_frames, channels))

    def forward(self, frame_index: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        values = self.field(self.motion(frame_index, xy).float())
        if self.exposure:
            log_gain = self.log_gain - self.log_gain.mean(0, keepdim=True)
            bias = self.bias - self.bias.mean(0, keepdim=True)
            values = values * torch.exp(log_gain[frame_index]) + bias[frame_index]
        return values

    def motion_parameters(self) -> list[nn.Parameter]:
        extra = [self.log_gain, self.bias] if self.exposure else []
        return list(self.motion.parameters()) + extra

    # -- hooks used by fit_steps (a separation model provides the same four) ------------------------
    def parameter_groups(self, config: "FitConfig") -> list[dict]:
        """Adam groups; the group named "motion" is frozen during ``config.motion_warmup``."""
        return self.field.param_groups(config.lr_field) + [
            {"params": self.motion_parameters(), "lr": config.lr_motion, "name": "motion"}]

    def set_progress(self, progress: float, config: "FitConfig") -> None:
        """Coarse-to-fine schedules of the field and (flow models) the displacement grid."""
        # separation keeps the slow ramp: its weights were measured with it, and the scene warm-up needs it
        featured = self.feature_started and config.motion == "homography" and not config.task
        ramp = config.coarse_to_fine_featured if featured else config.coarse_to_fine
        self.field.set_progress(progress, ramp)
        if hasattr(self.motion, "set_progress"):
            self.motion.set_progress(progress, ramp)
        if self.seeds_occlusion and not config.task:
            self.motion.displacement_on.fill_(0.0 if progress < config.occlusion_warmup else 1.0)

    @property
    def seeds_occlusion(self) -> bool:
        """True for the occlusion model on a displacement grid (the one with a w warm-up and start)."""
        return isinstance(self.motion, motion_models.FlowMotion) and self.motion.outputs == 3

    def seed_occlusion(self, data: torch.Tensor, shape, config: "FitConfig", generator: torch.Generator) -> int:
        """End of the occlusion warm-up: pixels whose residual is an outlier (robust z > 5 and above 8 % of the
        value range) start at w = ``config.occlusion_seed_w``, the rest stays at w = 0. Returns the outliers'
        count. The w output of the displacement grid is regressed onto that map (150 cheap steps).

        data: (T*h*w, C) working frames as fit_steps holds them; shape: (T, h, w, C). Every ``stride``-th pixel
        of every frame is used (at most about 2 M points)."""
        from scipy.ndimage import binary_dilation, gaussian_filter

        from .render import pixel_grid

        t, h, w, c = shape
        device = data.device
        stride = max(1, int(math.ceil(math.sqrt(t * h * w / 2.0e6))))
        rows, cols = np.arange(0, h, stride), np.arange(0, w, stride)
        pix = torch.as_tensor((rows[:, None] * w + cols[None, :]).reshape(-1), device=device)
        xy = torch.as_tensor(pixel_grid(h, w, self.normaliser), device=device)[pix]
        frame_index = torch.arange(t, device=device).repeat_interleave(len(pix))
        with torch.no_grad():
            residual = torch.stack([self(frame_index[:len(pix)] + k, xy) - data[k * h * w + pix] for k in range(t)])
        # smoothed before the test: detail the field has not learnt yet is zero-mean and averages out, an object
        # the background cannot explain is a blob that stays
        signed = residual.cpu().numpy().reshape(t, len(rows), len(cols), c)
        size = np.abs(gaussian_filter(signed, sigma=(0, 2.0 / stride, 2.0 / stride, 0))).mean(-1)
        median = np.median(size)
        spread = 1.4826 * np.median(np.abs(size - median))
        lo, hi = config.value_range
        outlier = size > max(median + 5 * spread, 0.08 * (hi - lo))
        # grow the mask by a pixel or two: an object's soft edge is an outlier only where the contrast is high
        outlier = binary_dilation(outlier, structure=np.ones((1, 3, 3), bool), iterations=max(1, 2 // stride))
        motion = self.motion
        target = torch.as_tensor(np.where(outlier.reshape(-1), math.atanh(config.occlusion_seed_w) / motion.w_gain,
                                          0.0), dtype=torch.float32, device=device)
        xy_all = xy.repeat(t, 1)
        optimiser = torch.optim.Adam(list(motion.grids.parameters()), lr=0.05)
        for _ in range(150):
            pick = torch.randint(len(target), (min(len(target), 16384),), generator=generator).to(device)
            raw = motion.displacement(frame_index[pick], xy_all[pick])[:, 2]
            loss = torch.nn.functional.mse_loss(raw, target[pick])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        return int(outlier.sum())

    def regulariser(self, config: "FitConfig", generator: torch.Generator) -> torch.Tensor | float:
        """The flow prior (mean |Jacobian| of g), zero for homographies."""
        if config.motion != "homography" and config.flow_smoothness > 0:
            return config.flow_smoothness * self.motion.smoothness()
        return 0.0

    def preview(self, config: "FitConfig", device: torch.device) -> np.ndarray:
        from .render import preview_canonical

        return preview_canonical(self, config, device)


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA, then MPS, then CPU. Explicit names are checked and explained when unavailable."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'auto', 'cpu' or 'cuda:0', got {type(device).__name__}")
    name = device.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA GPU is available to torch; "
                             "use device='auto' or 'cpu'")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) present "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        return dev
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ValueError("device 'mps' requested but Apple MPS is not available; use device='auto' or 'cpu'")
        return torch.device("mps")
    raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def working_frames(burst: Burst, working_size: int) -> tuple[np.ndarray, float]:
    """(T, h, w, C) float32 frames for fitting and the factor fit pixels / input pixels (<= 1)."""
    longest = max(burst.H, burst.W)
    if working_size <= 0 or longest <= working_size:
        return burst.data, 1.0
    from skimage.transform import resize

    factor = working_size / longest
    h, w = max(8, round(burst.H * factor)), max(8, round(burst.W * factor))
    frames = np.stack([resize(f, (h, w), order=1, anti_aliasing=True) for f in burst.data]).astype(np.float32)
    return frames, w / burst.W


def initial_homographies(frames: np.ndarray, config: FitConfig, norm: motion_models.Normaliser) -> np.ndarray | None:
    """(T, 3, 3) normalised frame -> canonical start homographies (gauge-centred), or None for identity."""
    if config.init == "identity":
        return None
    if config.feature_prefilter > 1:
        # thin obstructions (fence wires, rain streaks) are high-contrast corners that feature matching would
        # follow instead of the scene; a median filter wider than they are removes them first
        from scipy.ndimage import median_filter

        k = config.feature_prefilter
        frames = median_filter(frames, size=(1, k, k, 1)[:frames.ndim])
    pixel = motion_models.feature_homographies(frames, seed=config.seed)
    if pixel is None:
        if config.init == "features":
            raise ValueError("feature-based initialisation failed: too few keypoint matches between consecutive "
                             "frames; use init='identity' (small motions) or a burst with more texture/overlap")
        return None
    n = norm.matrix
    normalised = np.einsum("ij,tjk,kl->til", n, pixel, np.linalg.inv(n))
    return motion_models.centre_gauge(normalised)


def frame_bounds(matrices: np.ndarray, norm: motion_models.Normaliser) -> tuple[float, float, float, float]:
    """(xmin, xmax, ymin, ymax) of every frame's outline mapped by (T, 3, 3) normalised homographies."""
    hx, hy = norm.half_extent()
    corners = np.array([[-hx, -hy, 1], [hx, -hy, 1], [hx, hy, 1], [-hx, hy, 1]]).T
    pts = np.einsum("tij,jk->tik", matrices, corners)
    pts = pts[:, :2] / pts[:, 2:3]
    return float(pts[:, 0].min()), float(pts[:, 0].max()), float(pts[:, 1].min()), float(pts[:, 1].max())


def build_model(frames: np.ndarray, config: FitConfig, device: torch.device) -> FusionModel:
    """The field and motion networks for (T, h, w, C) working frames, seeded by ``config.seed``.

    The motion starts from features (when ``config.init`` allows and matching succeeds) or the identity;
    the field's domain covers every frame's start outline plus room for the motion still to be learned.
    """
    t, h, w, c = frames.shape
    norm = motion_models.Normaliser(h, w)
    use_homography = config.motion == "homography" or config.flow_base == "homography"
    init = initial_homographies(frames, config, norm) if use_homography else None
    start = init if init is not None else np.repeat(np.eye(3)[None], t, 0)
    xmin, xmax, ymin, ymax = frame_bounds(start, norm)
    margin = 0.15 + (0.25 if init is None else 0.0)
    domain = (xmin - margin, xmax + margin, ymin - margin, ymax + margin)
    lo, hi = config.value_range
    mean = frames.reshape(-1, c).mean(0) * (hi - lo) + lo
    model = make_model(config, (t, h, w, c), domain, init=init, mean=mean).to(device)
    fusion = model.scene if config.task else model
    fusion.feature_started = init is not None
    return model


def make_model(config: FitConfig, shape: tuple[int, int, int, int], domain, *, init=None, mean=None) -> FusionModel:
    """Networks for working frames of ``shape`` (T, h, w, C) over a canonical ``domain``; seeded."""
    t, h, w, c = shape
    norm = motion_models.Normaliser(h, w)
    torch.manual_seed(config.seed)
    mean_t = None if mean is None else torch.as_tensor(np.asarray(mean), dtype=torch.float32)
    occlusion = config.motion == "occlusion"
    if config.field == "grid":
        options = {"finest": config.grid_density * norm.s, **config.field_options}
        if occlusion:
            options.setdefault("depth_cells", config.occlusion_cells)
        field_net = fields.GridField(c, tuple(domain), init_value=mean_t, **options)
    elif config.field == "siren":
        field_net = fields.Siren(3 if occlusion else 2, c, init_value=mean_t, **config.field_options)
    else:
        raise ValueError(f"unknown field {config.field!r}; use 'grid' or 'siren'")
    if config.motion_param == "lie":
        homography = motion_models.LieHomography(t, init=init)
    elif config.motion_param == "mlp":
        homography = motion_models.MLPHomography(t, init=init)
    else:
        raise ValueError(f"unknown motion parameterisation {config.motion_param!r}; use 'lie' or 'mlp'")
    if config.motion == "homography":
        motion_net = homography
    elif config.motion_param == "mlp":  # paper preset: the official SIREN g(x, y, t)
        motion_net = motion_models.SirenFlow(t, occlusion=occlusion, seed=config.seed,
                                             hidden_layers=5 if occlusion else 4)
    else:
        motion_net = motion_models.FlowMotion(
            t, domain, levels=config.flow_levels, coarsest=config.flow_coarsest, finest=config.flow_finest,
            knots=config.flow_knots, base=homography if config.flow_base == "homography" else None,
            occlusion=occlusion)
    model = FusionModel(field_net, motion_net, norm, tuple(float(d) for d in domain), t, c, config.exposure)
    if config.task:
        from .separate import make_separation_model

        return make_separation_model(config, shape, domain, model)
    return model


def fit_steps(model: nn.Module, frames: np.ndarray, config: FitConfig, device: torch.device,
              start: float | None = None):
    """Generator: optimise ``model`` on (T, h, w, C) working frames, yielding ``ProgressEvent``s.

    ``model(frame_index (N,), xy (N, 2)) -> (N, C)`` predicts pixels; it also provides the hooks
    ``parameter_groups``, ``set_progress``, ``regulariser`` and ``preview`` (see FusionModel).
    Stop early by closing the generator (or simply not resuming it): the model keeps its current state.
    start: ``time.perf_counter()`` value that event.seconds count from (default: now); a job passes the time
    before it built the model, so that the feature-based start is included in the reported times.
    """
    t, h, w, c = frames.shape
    lo, hi = config.value_range
    data = torch.as_tensor(frames, device=device).reshape(-1, c) * (hi - lo) + lo
    norm = model.normaliser
    batch = config.batch if config.batch > 0 else max(1024, (h * w) // -config.batch)
    gen = torch.Generator(device="cpu").manual_seed(config.seed + 1)
    # the fused kernel updates each tensor in one pass: the multi-kernel update was 37 % of a step on a large
    # grid (moire's interference at 4 cells per pixel: 60 steps 9.8 -> 7.2 s; 5 x 256^2 reflection 24.7 -> 24.2 s)
    optimiser = torch.optim.Adam(model.parameter_groups(config), fused=device.type in ("cpu", "cuda"))
    base_lrs = [g["lr"] for g in optimiser.param_groups]
    warmup_steps = int(config.motion_warmup * config.steps)
    start = time.perf_counter() if start is None else start
    loss_fn = torch.nn.functional.l1_loss if config.loss == "l1" else torch.nn.functional.mse_loss
    mse_to_unit = 1.0 / (hi - lo) ** 2
    seed_occlusion = isinstance(model, FusionModel) and model.seeds_occlusion and config.occlusion_warmup > 0
    start_interference = getattr(model, "starts_interference_motion", False)
    scene = getattr(model, "scene", model)
    cauchy = config.warmup_cauchy * (hi - lo) if getattr(scene, "feature_started", False) else 0.0
    for step in range(1, config.steps + 1):
        progress = (step - 1) / max(config.steps - 1, 1)
        if seed_occlusion and progress >= config.occlusion_warmup:
            model.set_progress(progress, config)  # the field's and flow's levels as they are now
            model.seed_occlusion(data, (t, h, w, c), config, gen)
            seed_occlusion = False
        if start_interference and progress >= config.scene_warmup:
            model.start_interference_motion(data, (t, h, w, c), config)
            start_interference = False
        decay = config.lr_final_fraction + (1 - config.lr_final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
        for g, base in zip(optimiser.param_groups, base_lrs):
            frozen = g.get("name") == "motion" and step <= warmup_steps
            g["lr"] = 0.0 if frozen else base * decay
        model.set_progress(progress, config)
        flat = torch.randint(t * h * w, (batch,), generator=gen).to(device)
        frame_index = flat // (h * w)
        pix = flat % (h * w)
        xy = torch.stack([((pix % w).float() - norm.cx) / norm.s, ((pix // w).float() - norm.cy) / norm.s], 1)
        pred = model(frame_index, xy)
        target = data[flat]
        if cauchy > 0 and progress < config.scene_warmup:
            data_term = cauchy * torch.log1p(((pred - target) / cauchy) ** 2).mean()
        else:
            data_term = loss_fn(pred, target)
        loss = data_term + model.regulariser(config, gen)
        if not torch.isfinite(loss):
            raise ValueError(f"the fit diverged at step {step} (the loss is {loss.item()}); lower the learning "
                             "rates (lr_field, lr_motion) or use the preset's defaults")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        # yield every step: a consumer cancels by not resuming, so the latency is one step
        with torch.no_grad():
            mse = torch.mean((pred.detach() - target) ** 2).item() * mse_to_unit
        psnr = -10 * math.log10(max(mse, 1e-12))
        preview = None
        if config.preview_every and (step % config.preview_every == 0 or step == config.steps):
            preview = model.preview(config, device)
        yield ProgressEvent(step, config.steps, float(loss.item()), psnr, time.perf_counter() - start, preview)
