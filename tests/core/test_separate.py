"""Layer separation: the task table, outputs, presets and a small quality check."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import napari_nir as nir
from napari_nir._sample_data import homography_burst, separation_burst
from napari_nir.core import tasks
from napari_nir.core.burst import prepare_burst
from napari_nir.core.presets import separation_config


@pytest.mark.parametrize("task", list(nir.TASKS))
def test_every_task_returns_its_layers(task):
    s = separation_burst(task, 3, (32, 32), seed=0)
    burst = (s.frames * 255).round().clip(0, 255).astype(np.uint8)
    before = burst.copy()
    sep = nir.separate(burst, task, steps=12, device="cpu")
    layers = sep.layers()
    assert tuple(layers) == nir.TASKS[task].layers
    for name in ("scene", "interference"):
        assert layers[name].shape == burst.shape and layers[name].dtype == np.uint8
    if "alpha" in layers:
        assert layers["alpha"].shape == burst.shape[:3] and layers["alpha"].dtype == np.float32
        assert 0 <= layers["alpha"].min() and layers["alpha"].max() <= 1
    assert sep.canonical().ndim == 3 and sep.frames().shape == burst.shape
    assert sep.provenance()["task"] == f"separate:{task}"
    assert np.array_equal(burst, before)


def test_unknown_task_and_motion_are_explained():
    frames = separation_burst("rain", 2, (16, 16)).frames
    with pytest.raises(ValueError, match="unknown task"):
        nir.separate(frames, "snow")
    with pytest.raises(ValueError, match="unknown motion"):
        nir.separate(frames, "rain", motion="warp")


def test_motion_override_and_save_load(tmp_path):
    frames = separation_burst("reflection", 3, (32, 32)).frames
    sep = nir.separate(frames, "reflection", motion="homography", steps=10, device="cpu")
    assert sep.config.motion.model == "homography" and sep.homographies.shape == (3, 3, 3)
    sep.save(tmp_path / "sep.npz")
    loaded = nir.load(tmp_path / "sep.npz")
    assert isinstance(loaded, nir.SeparationResult) and loaded.task == "reflection"
    np.testing.assert_array_equal(loaded.layers(networks_only=True)["interference"], sep.layers()["interference"])


def test_adding_a_task_is_one_entry(monkeypatch):
    """A new task (say, a semi-transparent watermark) needs nothing but a table entry."""
    watermark = tasks.Task(
        name="watermark", title="Watermark removal", description="I = (1 - a) scene + a mark",
        motion="homography", interference_channels=lambda c: c + 1, interference_init=-4.0,
        compose=tasks.TASKS["fence"].compose, sparse_of=lambda layers: layers["alpha"], sparsity=0.01,
        layers=("scene", "interference", "alpha"), paper=tasks.TASKS["fence"].paper)
    monkeypatch.setitem(tasks.TASKS, "watermark", watermark)
    frames = separation_burst("fence", 2, (24, 24)).frames
    sep = nir.separate(frames, "watermark", steps=5, device="cpu")
    assert set(sep.layers()) == {"scene", "interference", "alpha"}


def test_compose_formation_models():
    scene = torch.full((4, 3), 0.5)
    image, layers = tasks.TASKS["fence"].compose(scene, torch.tensor([[0.0, 0, 0, 100.0]] * 4))
    torch.testing.assert_close(image, torch.full((4, 3), 0.5))  # alpha 1, colour sigmoid(0) = 0.5
    image, layers = tasks.TASKS["rain"].compose(scene, torch.full((4, 1), -100.0))
    torch.testing.assert_close(image, scene)  # no rain: the scene
    image, layers = tasks.TASKS["moire"].compose(scene, torch.full((4, 3), -0.1))
    torch.testing.assert_close(image, torch.full((4, 3), 0.4))


@pytest.mark.parametrize("task", list(nir.TASKS))
def test_paper_preset_follows_the_official_configuration(task):
    cfg = separation_config(task, "paper")
    paper = nir.TASKS[task].paper
    assert (cfg.steps, cfg.get("batch"), cfg.get("loss")) == (paper["steps"], paper["batch"], paper["loss"])
    assert cfg.field.kind == "siren" and cfg.get("field_options")["omega0"] == paper["f1_omega0"]
    assert cfg.motion.model == nir.TASKS[task].motion
    frames = separation_burst(task, 2, (16, 16)).frames
    sep = nir.separate(frames, task, preset="paper", steps=2, device="cpu")
    assert len(sep.history) == 2


@pytest.mark.slow  # 300-step fit (~12 s); the 96 x 96 reflection check below is slow too
def test_reflection_scene_is_cleaner_than_the_input():
    # a small regression guard, not the goal (see the benchmark for the 256 x 256 figures)
    s = separation_burst("reflection", 5, (64, 64), seed=1)
    sep = nir.separate(s.frames, "reflection", steps=300, device="cpu")
    scene = sep.layers(dtype="float32")["scene"]
    inner = (slice(None), slice(6, -6), slice(6, -6))

    def psnr(a):
        return -10 * np.log10(((a[inner] - s.clean[inner]) ** 2).mean())

    assert psnr(scene) > psnr(s.frames) + 1.0


@pytest.mark.parametrize("task", list(nir.TASKS))
def test_presets_choose_their_own_scene_motion_and_options(task):
    entry = nir.TASKS[task]
    fast, paper = separation_config(task, "fast"), separation_config(task, "paper")
    assert fast.motion.model == entry.default_motion("fast") and paper.motion.model == entry.motion
    for key, value in entry.fast_options.items():
        assert fast.get(key) == value
    assert separation_config(task, "fast", "flow").motion.model == "flow"  # an explicit motion wins


def test_moire_scene_is_band_limited_in_the_fast_preset():
    assert separation_config("moire", "fast").get("grid_density") < 1.0
    assert separation_config("rain", "fast").get("grid_density") == 1.0


@pytest.mark.slow  # two default fits (~50 s on 2 cores): over the suite's budget; benchmarks/separation.py reports
@pytest.mark.parametrize("task", ["rain", "fence"])  # these tasks on three seeds at 256^2
def test_scene_beats_the_input_by_5_db_on_a_small_crop(task):
    """Issue 4's goal on a 5 x 96 x 96 crop, default fast preset (at 5 x 256 x 256 the benchmark measures
    rain +14.1 dB, fence +8.4 dB)."""
    s = separation_burst(task, 5, (96, 96), seed=0)
    scene = nir.separate(s.frames, task, device="cpu").layers(dtype="float32")["scene"]
    inner = (slice(None), slice(6, -6), slice(6, -6))

    def psnr(a):
        return -10 * np.log10(((a[inner] - s.clean[inner]) ** 2).mean())

    assert psnr(scene) > psnr(s.frames) + 5.0


@pytest.mark.slow  # 300-step fit (~12 s); at 150 steps all frames' interference means were still equal: no test
def test_moire_interference_is_held_to_zero_mean_per_frame():
    """The moire grating oscillates about the scene: its layer's mean per frame stays near 0 (the offset
    between the layers is otherwise free: it drifted by up to 0.016 at 256 x 256)."""
    assert nir.TASKS["moire"].zero_mean > 0 and nir.TASKS["reflection"].zero_mean == 0
    s = separation_burst("moire", 5, (64, 64), seed=1)
    interference = nir.separate(s.frames, "moire", steps=300, device="cpu").layers(dtype="float32")["interference"]
    black = prepare_burst(s.frames).lo  # layers() gives additive interference on the burst's black level
    means = interference.mean(axis=(1, 2)) - black
    print("per-frame means", means.round(4).tolist())
    assert np.abs(means).max() < 0.004


def test_zero_mean_prior_is_not_in_the_paper_preset():
    """The paper preset is the official configuration: the fast preset's zero-mean prior stays out of it."""
    from napari_nir.core.build import build_model

    frames = separation_burst("moire", 3, (24, 24), seed=0).frames
    terms = {}
    for preset in ("fast", "paper"):
        config = separation_config("moire", preset).replace(sparsity=0.0, exclusion=0.0, init="identity")
        model = build_model(frames, config, torch.device("cpu"))
        model._last = {"interference": torch.full((4, 3), 0.5)}  # a layer far from zero mean
        model._last_frames = torch.tensor([0, 1, 2, 0])
        terms[preset] = float(model.regulariser(config, torch.Generator().manual_seed(0)))
    assert terms["fast"] == pytest.approx(0.5) and terms["paper"] == 0.0, terms


def test_frame_means_average_each_frames_points():
    from napari_nir.core.models import SeparationModel

    model = SeparationModel.__new__(SeparationModel)
    torch.nn.Module.__init__(model)
    model.n_frames = 3
    model._last_frames = torch.tensor([0, 0, 2, 2, 2])
    values = torch.tensor([[1.0], [3.0], [4.0], [5.0], [6.0]])
    np.testing.assert_allclose(model.frame_means(values).numpy(), [[2.0], [0.0], [5.0]])


def test_cauchy_warm_up_is_the_fence_fast_presets_only_and_validated():
    """The fence's warm-up uses a Cauchy loss in the fast preset; the paper preset keeps the official loss."""
    assert separation_config("fence", "fast").get("warmup_cauchy") > 0
    assert separation_config("fence", "paper").get("warmup_cauchy") == 0
    assert separation_config("rain", "fast").get("warmup_cauchy") == 0
    frames = separation_burst("fence", 2, (24, 24)).frames
    with pytest.raises(ValueError, match="warmup_cauchy"):
        nir.separate(frames, "fence", steps=2, device="cpu", warmup_cauchy=-0.1)


def test_moire_interference_grid_is_finer_than_the_scene_and_capped_on_large_frames():
    """Moire's interference grid has 4 cells per pixel (it must hold a near-Nyquist grating the band-limited
    scene cannot), fewer on large frames so that its dense update stays bounded; other tasks keep the scene's."""
    from napari_nir.core.build import build_model
    from napari_nir.core.models import MAX_INTERFERENCE_NODES, interference_density

    moire = separation_config("moire", "fast")
    assert interference_density(moire, 256, 256) == 4.0
    assert (1024 * interference_density(moire, 1024, 1024)) ** 2 <= MAX_INTERFERENCE_NODES * 1.0001
    assert interference_density(moire, 4096, 4096) == moire.get("grid_density")  # never coarser than the scene
    assert interference_density(separation_config("reflection", "fast"), 256, 256) == 1.0
    frames = separation_burst("moire", 3, (32, 32), seed=0).frames
    model = build_model(frames, moire.replace(init="identity"), torch.device("cpu"))
    finest_cells = model.interference.grids[-1].shape[-1] - 1
    assert 4 * 32 <= finest_cells <= 4 * 32 * 1.05, finest_cells
    with pytest.raises(ValueError, match="interference_density"):
        nir.separate(frames, "moire", steps=2, device="cpu", interference_density=-1.0)


@pytest.mark.slow  # a default fit (~30 s on 2 cores): over the suite's budget; benchmarks/separation.py reports it
def test_reflection_rigid_layer_beats_input_and_aligned_baselines_on_a_small_crop():
    """Issue 4's reflection goal (+5 dB over the input, +1 dB over the best aligned baseline) on a 5 x 96 x 96
    crop, default fast preset: the reflection gets a rigid layer of its own (measured 23.4 dB against the input's
    16.6 and the aligned minimum's 17.7; the free per-frame interference alone left the reflection's lower
    envelope in the scene)."""
    from skimage.transform import ProjectiveTransform, warp

    from napari_nir.core.motion import feature_homographies

    s = separation_burst("reflection", 5, (96, 96), seed=0)
    sep = nir.separate(s.frames, "reflection", device="cpu")
    assert sep._model.start_report["rigid"] and float(sep._model.rigid_on) == 1.0
    scene = sep.layers(dtype="float32")["scene"]
    inner = (slice(None), slice(6, -6), slice(6, -6))

    def psnr(a):
        return -10 * np.log10(((a[inner] - s.clean[inner]) ** 2).mean())

    # aligned temporal minimum and median like the benchmark's (ORB + RANSAC onto each frame; borders here
    # take the nearest pixel where the benchmark takes the frame's own value)
    homs = feature_homographies(s.frames)
    stacks = [np.stack([np.stack([warp(s.frames[j][..., c], ProjectiveTransform(np.linalg.inv(homs[j]) @ homs[t]),
                                       order=1, mode="edge") for c in range(3)], -1) for j in range(5)])
              for t in range(5)]
    best_baseline = max(psnr(np.stack([st.min(0) for st in stacks])),
                        psnr(np.stack([np.median(st, 0) for st in stacks])))
    assert psnr(scene) > psnr(s.frames) + 5.0
    assert psnr(scene) > best_baseline + 1.0
    # the reflection fused in its own coordinates, seen through each frame's homography, is that frame's
    # interference (the free part adds little): the two APIs agree on their conventions
    reflection = sep.interference_canonical(dtype="float32")
    interference = sep.layers(dtype="float32")["interference"]
    assert reflection.shape == (96, 96, 3)
    for t, h in enumerate(sep.interference_homographies):
        seen = np.stack([warp(reflection[..., c], ProjectiveTransform(h), order=1, cval=np.nan) for c in range(3)], -1)
        inside = np.isfinite(seen).all(-1)
        inside[:6], inside[-6:], inside[:, :6], inside[:, -6:] = False, False, False, False
        error = np.sqrt(np.mean((seen[inside] - interference[t][inside]) ** 2))
        assert error < 0.02, (t, error)


def test_auto_rigid_layer_is_left_off_when_the_interference_does_not_move_rigidly():
    """New rain streaks every frame: no single layer moves rigidly through them, so "auto" keeps the paper's
    free interference f2(x, y, t) alone (score measured 6.4)."""
    s = separation_burst("rain", 4, (48, 48), seed=0)
    sep = nir.separate(s.frames, "reflection", steps=200, device="cpu")
    assert sep.config.separation.interference_motion == "auto"
    assert not sep._model.start_report["rigid"] and sep._model.start_report["score"] < 10
    assert sep.interference_homographies is None


def test_rigid_layer_survives_save_and_load(tmp_path):
    s = separation_burst("reflection", 3, (40, 40), seed=0)
    sep = nir.separate(s.frames, "reflection", steps=30, device="cpu", interference_motion="homography",
                       interference_free_start=0.8)
    assert sep.interference_homographies.shape == (3, 3, 3)
    sep.save(tmp_path / "rigid.npz")
    loaded = nir.load(tmp_path / "rigid.npz")
    np.testing.assert_array_equal(loaded.layers(networks_only=True)["interference"], sep.layers()["interference"])
    np.testing.assert_allclose(loaded.interference_homographies, sep.interference_homographies)


def test_rigid_layer_options_are_validated():
    frames = separation_burst("reflection", 2, (16, 16)).frames
    with pytest.raises(ValueError, match="interference_motion"):
        nir.separate(frames, "reflection", interference_motion="affine")
    with pytest.raises(ValueError, match="field='grid'"):
        nir.separate(frames, "reflection", preset="paper", interference_motion="auto")
    with pytest.raises(ValueError, match="scene_warmup"):
        nir.separate(frames, "reflection", scene_warmup=0.0)
    with pytest.raises(ValueError, match="interference_free_start"):
        nir.separate(frames, "reflection", interference_free_start=1.5)
    assert separation_config("reflection", "paper").get("interference_motion") == "none"  # the official model


def test_the_papers_model_keeps_its_saved_state_without_rigid_layer_entries():
    """Results saved before the rigid layer existed load strictly: a model without one saves exactly what it
    saved then (no rigid-layer buffers), and the derived start value is never saved."""
    frames = separation_burst("reflection", 2, (16, 16)).frames
    free = nir.separate(frames, "reflection", steps=2, device="cpu", interference_motion="none")
    keys = set(free._model.state_dict())
    assert not {k for k in keys if k.startswith(("moving_", "rigid_", "free_"))}
    rigid = nir.separate(frames, "reflection", steps=2, device="cpu", interference_motion="homography")
    assert {"rigid_on", "free_on", "rigid_score"} <= set(rigid._model.state_dict())
    assert "free_init" not in rigid._model.state_dict()


# -- do no harm and the verdict (issue 13): small crops, both directions ------------------------------------
def _psnr(a, b, additive: bool) -> float:
    """PSNR dB; additive tasks leave a constant free between the layers, so their scene is DC-matched per frame and
    channel first (benchmarks/separation_corpus.py scores the same way)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if additive:
        a = a - a.mean(axis=(1, 2), keepdims=True) + b.mean(axis=(1, 2), keepdims=True)
    return float(-10 * np.log10(np.mean((a - b) ** 2)))


@functools.cache
def _clean_burst_separated(task):
    """A 4 x 40 x 40 burst with nothing to remove (1 % noise), separated by ``task`` with 100 steps (fewer than the
    preset: the promise must not rest on a long fit): (scene PSNR, input PSNR, diagnostics) against the noiseless
    frames."""
    sample = homography_burst(4, (40, 40), seed=5, noise=0.01, translation=0.04, rotation_deg=2, scale=0.02,
                              perspective=0.01)
    sep = nir.separate(sample.frames, task, steps=100, seed=0, preview_every=0)
    scene = sep.layers(dtype="float32")["scene"]
    additive = task in ("reflection", "moire")
    return _psnr(scene, sample.clean, additive), _psnr(sample.frames, sample.clean, additive), sep.diagnostics()


@pytest.mark.xfail(strict=True, reason="not met (issue 13): at 48^2 (150 steps) every task's scene read 31.6-34.4 "
                                       "dB against the noisy input's 40.0 dB with the verdict ok (40^2, 100 steps, "
                                       "here: the same): the interference takes "
                                       "scattered scene detail (rain: alpha mean 0.036 on a burst without rain), "
                                       "which no check of the layers alone can tell from interference; "
                                       "benchmarks/RESULTS.md's corpus section has the full-size figures")
@pytest.mark.parametrize("task", ["rain"])  # one task: the suite's budget (all four fail the same way, see the reason)
def test_a_burst_without_interference_is_never_made_worse_silently(task):
    """Do no harm, the brief's form: a scene worse than the input (by more than 0.5 dB against the noiseless
    frames) carries a doubtful verdict that says so; the issue's form (>= input - 0.5 dB and ok) implies it."""
    ours, given, found = _clean_burst_separated(task)
    assert found["residual"].shape == (4, 40, 40)
    assert ours >= given - 0.5 or found.verdict == "doubtful", (ours, given, found.reasons)


@pytest.mark.parametrize("task", ["reflection", "rain"])  # an additive and an alpha task: the suite's budget
def test_frames_of_independent_noise_are_doubtful(task):
    """No scene at all (every frame independent noise): whatever the layers take, the verdict says it is not a
    separation."""
    frames = np.random.default_rng(1).uniform(0, 1, (3, 24, 24)).astype(np.float32)
    found = nir.separate(frames, task, steps=40, seed=0, preview_every=0).diagnostics()
    assert found.verdict == "doubtful" and found.reasons


def test_an_obstruction_that_covers_the_view_is_doubtful():
    """Layers mixed up on purpose: the "obstruction" is a second photograph covering the whole view (alpha 0.7),
    moving differently from the scene. A fence fit either takes it as a dense alpha or cannot explain it."""
    rng = np.random.default_rng(2)
    scene = homography_burst(4, (48, 48), seed=2, translation=0.03).frames
    cover = homography_burst(4, (48, 48), image="coffee", seed=3, translation=0.12).frames
    frames = (0.3 * scene + 0.7 * cover + rng.normal(0, 0.005, scene.shape)).astype(np.float32)
    found = nir.separate(frames, "fence", steps=150, seed=0, preview_every=0).diagnostics()
    assert found.verdict == "doubtful", found.summary()["checks"]


def test_detail_transfer_gives_back_what_the_networks_miss(tmp_path):
    """layers(networks_only=True) is the networks' own scene; with detail_transfer 1 (and no other rule) the scene
    adds the gated residual, so the scene of a short fit is closer to the frames; a loaded result keeps no input
    and says so."""
    sample = homography_burst(3, (40, 40), seed=1, translation=0.03)
    sep = nir.separate(sample.frames, "rain", steps=40, seed=0, preview_every=0, detail_transfer=1.0,
                       scene_consensus=False, thick_alpha_guard=False)
    networks = sep.layers(dtype="float32", networks_only=True)["scene"]
    given_back = sep.layers(dtype="float32")["scene"]
    assert np.abs(given_back - sample.frames).mean() < 0.5 * np.abs(networks - sample.frames).mean()
    with pytest.raises(ValueError, match="detail_transfer"):
        nir.separate(sample.frames, "rain", steps=2, detail_transfer=1.5)
    sep.save(tmp_path / "sep.npz")
    loaded = nir.load(tmp_path / "sep.npz")
    with pytest.raises(ValueError, match="loaded from a file"):
        loaded.layers()
    assert np.allclose(loaded.layers(dtype="float32", networks_only=True)["scene"], networks, atol=1e-5)


def test_the_thick_alpha_guard_keeps_blobs_not_wires():
    """core/guard.py: thin wires of any width common to the burst are not kept; a blob far thicker is, with its
    margin."""
    from napari_nir.core import guard

    alpha = np.zeros((2, 80, 80), np.float32)
    alpha[:, :, ::10] = 1.0   # 1-px wires
    alpha[:, :, 1::10] = 1.0  # ... 2 px wide
    alpha[1, 30:50, 30:50] = 0.9  # a 20 x 20 blob in frame 1
    kept, radius = guard.thick_alpha(alpha)
    assert radius == guard.MIN_RADIUS
    assert not kept[0].any()
    assert kept[1, 30:50, 30:50].all() and kept[1, 28, 40] and not kept[1, 5:25, 5:25].any()
    wide = np.zeros((1, 120, 120), np.float32)
    wide[:, :, np.arange(120) % 20 < 6] = 1.0  # 6-px wires: the radius grows with them, so they are not kept
    kept, radius = guard.thick_alpha(wide)
    assert radius > guard.MIN_RADIUS and not kept.any()


def test_the_scene_consensus_gives_back_only_what_every_frame_removes_alike():
    """core/guard.py: a removal that sits at the same scene point in every frame is scene; one that does not is
    interference and stays removed."""
    from napari_nir.core import guard

    shifts = np.repeat(np.eye(3)[None], 3, 0)
    shifts[:, 0, 2] = [0.0, 2.0, 4.0]  # frame t pixel -> reference pixel: x + 2t
    removed = np.zeros((3, 20, 30, 1), np.float32)
    for t in range(3):
        removed[t, 8:12, 14 - 2 * t:18 - 2 * t] = 0.2  # the same scene point in every frame
    removed[1, 2, 3] = 0.5  # a streak in frame 1 only
    back = guard.scene_consensus(removed, shifts)
    assert np.allclose(back[1, 8:12, 12:16], 0.2) and back[1, 2, 3] == 0
