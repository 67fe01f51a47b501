"""The ``napari-nir`` command (also ``python -m napari_nir``).

    napari-nir fuse BURST -o OUTDIR [--motion ...] [--preset ...] [--steps N] [--device ...] [--seed S]
                                    [--extent union|first] [--scale F] [--overwrite] [--quiet]
    napari-nir demo [-o OUTDIR] [--steps N] [--device ...] [--overwrite]

Outputs (written only after the fit succeeded, all at once, never half): canonical.tif, frames.tif,
homographies.json (homography motion) or flow.tif and flow.png (flow motions; occlusion also occlusion_w.tif),
side_by_side.png, provenance.json; the demo
adds input.tif. Exit codes: 0 done; 2 bad input or arguments (one line on stderr); 130 cancelled (Ctrl-C);
1 an unexpected error (with a traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

PROG = "napari-nir"
# The choices offered on the command line come from the core's tables (motions, presets, tasks).
from .core.fit import MOTIONS, PRESETS  # noqa: E402
from .core.tasks import TASKS  # noqa: E402

EXTENTS = ("union", "first")
DEVICES_HELP = "auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps"
EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
               NotADirectoryError)

INTERFERENCE_HOMOGRAPHY_CONVENTION = (
    "the interference's rigid layer (a reflection), if 'found': homographies[t] maps a pixel (col, row, 1) of input "
    "frame t to the pixel (col, row, w) of that layer's own frame-sized view (divide by w); frame t -> frame s is "
    "inv(H[s]) @ H[t]; 'score' is how far the residuals' correlation peak stood out, in standard deviations (>= rigid_layer_score, 10 by default: found)")
HOMOGRAPHY_CONVENTION = (
    "homographies[t] is a 3x3 matrix mapping a pixel (col, row, 1) of input frame t to the pixel (col, row, w) of "
    "the canonical view described under 'canonical' (divide by w); pixel centres are at integer coordinates, "
    "(0, 0) is the centre of the top-left pixel; frame t -> frame s is inv(H[s]) @ H[t]"
)
OCCLUSION_W_CONVENTION = ("occlusion_w.tif is (T, H, W) float32 in [-1, 1]: each frame pixel's depth coordinate w in "
                          "the occlusion model's 3-D canonical; the background sits at 0, moving objects elsewhere")
FLOW_CONVENTION = ("flow.tif is (T, H, W, 2) float32: the displacement (d_row, d_col) in pixels from each frame "
                   "pixel to the canonical view")


class CLIError(Exception):
    """A user error found by the command itself (message printed as one line, exit 2)."""


# -- arguments --------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 such as 1 or 2, got {text!r}") from None
    if not math.isfinite(value) or value <= 0 or value > 16:
        raise argparse.ArgumentTypeError(f"expected a number > 0 and <= 16 such as 1 or 2, got {text!r}")
    return value


def _add_fit_options(p: argparse.ArgumentParser, *, full: bool) -> None:
    p.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                   help="optimisation steps (default: the preset's; fewer is faster and blurrier)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help=f"where to fit: {DEVICES_HELP} (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs already in OUTDIR (refused otherwise)")
    if full:
        p.add_argument("--seed", type=_nonnegative_int, default=0, metavar="S",
                       help="random seed; the same seed, input and device give the same result (default: 0)")
        p.add_argument("--extent", choices=EXTENTS, default="union",
                       help="canonical.tif covers every frame (union, default) or frame 0's field of view (first)")
        p.add_argument("--scale", type=_positive_float, default=1.0, metavar="F",
                       help="canonical.tif pixels per input pixel; 2 renders it at twice the resolution (default: 1)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``napari-nir`` command (subcommands ``fuse`` and ``demo``)."""
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fuse a burst of images of one scene into one canonical view with neural image "
                    "representations (Nam et al., ECCV 2022). Outputs are TIFF files with provenance.",
        epilog=f"'{PROG} COMMAND --help' describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    fuse = sub.add_parser(
        "fuse", help="fuse a burst (multi-page TIFF or folder of frames) into OUTDIR",
        description="Fuse a burst into one canonical view aligned by a learned motion model, and write "
                    "canonical.tif, frames.tif, homographies.json (homography) or flow.tif and flow.png (flow, "
                    "occlusion; occlusion also occlusion_w.tif, each pixel's depth slice), "
                    "side_by_side.png and provenance.json into OUTDIR.",
        epilog=f"motion models: {', '.join(MOTIONS)}; presets: {', '.join(PRESETS)}. Example: "
               f"{PROG} fuse burst.tif -o out/ --motion homography --steps 400",
    )
    fuse.add_argument("burst", metavar="BURST",
                      help="a multi-page TIFF (T, H, W[, C]), a .npy array, or a folder of frames "
                           "(.png, .jpg, .tif; sorted naturally: frame2 before frame10)")
    fuse.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the outputs (created)")
    fuse.add_argument("--motion", choices=MOTIONS, default="homography",
                      help="motion model: homography (one 3x3 per frame: rotations, pans, flat scenes), flow "
                           "(non-rigid per-pixel flow), occlusion (flow that lets objects hide the background) "
                           "(default: homography)")
    fuse.add_argument("--preset", choices=PRESETS, default="fast",
                      help="fast (multiresolution grid field, seconds to minutes on a CPU) or paper (the official "
                           "SIREN configuration, slow; a GPU is advised) (default: fast)")
    _add_fit_options(fuse, full=True)
    fuse.set_defaults(handler=_cmd_fuse)

    demo = sub.add_parser(
        "demo", help="fuse the built-in sample burst (no download) and write the results",
        description="Generate the built-in sample burst (a photograph seen through 9 known homographies), fuse it "
                    "with motion=homography, and write input.tif plus the fuse outputs into OUTDIR.",
        epilog=f"motion models of 'fuse': {', '.join(MOTIONS)}.",
    )
    demo.add_argument("-o", "--output", default="nir-demo", metavar="OUTDIR",
                      help="folder for the outputs (default: ./nir-demo)")
    _add_fit_options(demo, full=False)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_cmd_demo, motion="homography", preset="fast", seed=0, extent="union", scale=1.0)

    task_lines = "; ".join(f"{t.name}: {t.description}" for t in TASKS.values())
    separate = sub.add_parser(
        "separate", help="split a burst into a scene and an interference layer (" + ", ".join(TASKS) + ")",
        description="Separate a burst into the scene (following the motion model) and an interference layer, and "
                    "write scene.tif, interference.tif, alpha.tif (fence, rain), canonical.tif (the scene fused), "
                    "side_by_side.png and provenance.json into OUTDIR; reflection (fast preset) also "
                    "interference_homographies.json and, where the reflection moves rigidly, "
                    "interference_canonical.tif (the reflection fused).",
        epilog=f"tasks: {task_lines}",
    )
    separate.add_argument("burst", metavar="BURST", help="a multi-page TIFF, a .npy array, or a folder of frames")
    separate.add_argument("--task", required=True, choices=tuple(TASKS), help="what to remove")
    separate.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="folder for the outputs (created)")
    separate.add_argument("--motion", choices=MOTIONS, default=None,
                          help="the scene's motion model (default: the task's)")
    separate.add_argument("--preset", choices=PRESETS, default="fast", help="fast or paper (default: fast)")
    _add_fit_options(separate, full=True)
    separate.set_defaults(handler=_cmd_separate)
    return parser


# -- entry point ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse already printed
        return int(exc.code or 0) if isinstance(exc.code, (int, type(None))) else EXIT_USAGE
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: choose a command: fuse, separate or demo (see '{PROG} --help')", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"{PROG}: cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except (CLIError, *USER_ERRORS) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# -- commands ---------------------------------------------------------------------------------------

def _cmd_fuse(args) -> int:
    from . import io

    outdir = Path(args.output)
    names = _output_names(args.motion, demo=False)
    _check_outputs(outdir, names, args.overwrite)
    burst = io.read_burst(args.burst)
    _check_burst_shape(burst, args.burst)
    fit = _fit(burst, args)
    files = _render_outputs(fit, burst, args, source=os.fspath(args.burst))
    written = _write_all(outdir, files, args.overwrite)
    _report(fit, written, outdir)
    return EXIT_OK


def _cmd_demo(args) -> int:
    from ._sample_data import homography_burst

    outdir = Path(args.output)
    names = _output_names(args.motion, demo=True)
    _check_outputs(outdir, names, args.overwrite)
    sample = homography_burst()
    burst = sample.frames
    fit = _fit(burst, args)
    files = _render_outputs(fit, burst, args, source="napari_nir._sample_data.homography_burst()")
    error = _corner_error(fit.homographies, sample.homographies, burst.shape[1:3])
    prov = files["provenance.json"][1]
    if error is not None:
        prov["ground_truth"] = {"mean_corner_error_px": round(error, 4),
                                "definition": "mean distance between the corners of every frame mapped to frame 0 "
                                              "by the fitted and by the true homographies, in input pixels"}
    files["input.tif"] = ("tiff", burst, {"output": "input", "source": prov["source"],
                                          "ground_truth_homographies": np.asarray(sample.homographies).tolist(),
                                          "ground_truth_convention": "frame-t pixel (col, row, 1) -> world pixel"},
                          burst.ndim == 4)
    prov["outputs"] = sorted(files)
    written = _write_all(outdir, files, args.overwrite)
    _report(fit, written, outdir)
    if error is not None:
        print(f"alignment error against the ground truth: {error:.3f} px (mean frame-corner distance)")
    print(f"open them in napari: napari {outdir / 'input.tif'} {outdir / 'canonical.tif'}")
    return EXIT_OK


def _output_names(motion: str, *, demo: bool) -> list[str]:
    alignment = ["homographies.json"] if motion == "homography" else ["flow.tif", "flow.png"]
    alignment += ["occlusion_w.tif"] if motion == "occlusion" else []
    names = ["canonical.tif", "frames.tif", *alignment, "side_by_side.png", "provenance.json"]
    return names + ["input.tif"] if demo else names


def _cmd_separate(args) -> int:
    from . import io
    from .core.fit import separation_config
    from .core.tasks import get_task

    task = get_task(args.task)
    outdir = Path(args.output)
    names = [f"{layer}.tif" for layer in task.layers] + ["canonical.tif", "side_by_side.png", "provenance.json"]
    rigid_layer = separation_config(task.name, args.preset, args.motion).interference_motion != "none"
    if rigid_layer:
        names += ["interference_homographies.json", "interference_canonical.tif"]
    _check_outputs(outdir, names, args.overwrite)
    burst = io.read_burst(args.burst)
    _check_burst_shape(burst, args.burst)
    sep = _fit(burst, args, task=task.name)
    prov = dict(sep.provenance())
    channels = np.ndim(burst) == 4
    layers = sep.layers()
    files = {f"{name}.tif": ("tiff", layers[name], {**prov, "output": name}, channels and name != "alpha")
             for name in task.layers}
    canonical = sep.canonical(extent=args.extent, scale=args.scale)
    files["canonical.tif"] = ("tiff", canonical, {**prov, "output": "canonical", "extent": args.extent,
                                                  "scale": args.scale}, channels)
    if rigid_layer:
        matrices = sep.interference_homographies
        files["interference_homographies.json"] = ("json", {
            "convention": INTERFERENCE_HOMOGRAPHY_CONVENTION, **sep.rigid_layer(),
            "homographies": None if matrices is None else matrices.tolist()}, None, None)
        if matrices is not None:
            files["interference_canonical.tif"] = ("tiff", sep.interference_canonical(),
                                                   {**prov, "output": "interference canonical"}, channels)
        elif args.overwrite:  # a stale one from an earlier run would contradict the JSON
            (outdir / "interference_canonical.tif").unlink(missing_ok=True)
    files["side_by_side.png"] = ("png", io.side_by_side([np.asarray(burst[0]), layers["scene"][0],
                                                         layers["interference"][0]]), None, None)
    files["provenance.json"] = ("json", {**prov, "source": os.fspath(args.burst), "command": [PROG, *_argv_used(args)],
                                         "outputs": sorted(files) + ["provenance.json"],
                                         "history": list(sep.history)}, None, None)
    written = _write_all(outdir, files, args.overwrite)
    _report(sep, written, outdir)
    return EXIT_OK


def _check_outputs(outdir: Path, names: list[str], overwrite: bool) -> None:
    """Refuse early (before any reading or fitting) to clobber outputs or to write into a file."""
    if outdir.exists() and not outdir.is_dir():
        raise CLIError(f"output folder {outdir} is a file; choose a folder with -o")
    present = [n for n in names if (outdir / n).exists()]
    if present and not overwrite:
        raise CLIError(f"{outdir} already holds {', '.join(present)}; pass --overwrite to replace "
                       f"{'it' if len(present) == 1 else 'them'}, or choose another folder with -o")


def _check_burst_shape(burst: np.ndarray, source) -> None:
    if burst.ndim < 3 or burst.shape[0] < 2:
        what = (f"a single {burst.ndim}-D image" if burst.ndim < 3
                else f"{burst.shape[0]} frame{'s' if burst.shape[0] != 1 else ''}")
        raise CLIError(f"{source} holds {what} (shape {burst.shape}), not a burst; a burst needs at least 2 frames: "
                       "a multi-page TIFF (T, H, W[, C]) or a folder with one image per frame")


def _fit(burst, args, task: str | None = None):
    """Run napari_nir.fuse (or separate, given a task) with a tqdm progress bar on stderr (unless --quiet)."""
    import napari_nir

    bar = None

    def progress(event):
        nonlocal bar
        if args.quiet:
            return None
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=event.total, desc="fusing", unit="step", file=sys.stderr, dynamic_ncols=True)
        if bar.total != event.total:
            bar.total = event.total
        bar.set_postfix(loss=f"{event.loss:.4g}", psnr=f"{event.psnr:.2f} dB", refresh=False)
        bar.update(max(0, int(event.step) - bar.n))
        return None

    try:
        if task is not None:
            return napari_nir.separate(burst, task, motion=args.motion, preset=args.preset, steps=args.steps,
                                       device=args.device, seed=args.seed, callback=progress)
        return napari_nir.fuse(burst, args.motion, preset=args.preset, steps=args.steps, device=args.device,
                               seed=args.seed, callback=progress)
    finally:
        if bar is not None:
            bar.close()


def _render_outputs(fit, burst, args, *, source: str) -> dict:
    """{file name: (kind, payload, metadata, channels)} for every output; nothing is written here."""
    from . import io

    prov = dict(fit.provenance())
    channels = np.ndim(burst) == 4
    canonical = fit.canonical(extent=args.extent, scale=args.scale)
    frames = fit.frames()
    view = {"extent": args.extent, "scale": args.scale, "shape": list(np.shape(canonical))}
    files = {
        "canonical.tif": ("tiff", canonical, {**prov, "output": "canonical", **view}, channels),
        "frames.tif": ("tiff", frames, {**prov, "output": "frames"}, channels),
    }
    if args.motion == "homography":
        matrices, target = _canonical_homographies(fit, args.extent, args.scale)
        files["homographies.json"] = ("json", {"convention": HOMOGRAPHY_CONVENTION, "canonical": target,
                                               "homographies": matrices.tolist()}, None, None)
    else:
        flow = np.asarray(fit.flow(), dtype=np.float32)
        files["flow.tif"] = ("tiff", flow, {**prov, "output": "flow", "convention": FLOW_CONVENTION}, True)
        from .core.render import flow_to_rgb

        files["flow.png"] = ("png", io.side_by_side([flow_to_rgb(f, max_magnitude=np.abs(flow).max() + 1e-6)
                                                    for f in flow]), None, None)
    if fit.motion == "occlusion":
        files["occlusion_w.tif"] = ("tiff", fit.occlusion_w(), {**prov, "output": "occlusion_w",
                                                                 "convention": OCCLUSION_W_CONVENTION}, False)
    files["side_by_side.png"] = ("png", io.side_by_side([np.asarray(burst[0]), canonical]), None, None)
    prov_doc = {**prov, "source": source, "command": [PROG, *_argv_used(args)],
                "outputs": sorted(set(files) | {"provenance.json"}), "canonical": view,
                "history": list(getattr(fit, "history", []))}
    files["provenance.json"] = ("json", prov_doc, None, None)
    return files


def _canonical_homographies(fit, extent: str, scale: float):
    """(T, 3, 3) frame pixel -> pixel of the canonical.tif written, and a description of that target."""
    matrices = np.asarray(fit.homographies, dtype=np.float64)
    target = {"file": "canonical.tif", "extent": extent, "scale": scale}
    if (extent, scale) != ("union", 1.0):
        if hasattr(fit, "canonical_transform"):
            to_written = np.linalg.inv(np.asarray(fit.canonical_transform(extent, scale), dtype=np.float64))
            from_union = np.asarray(fit.canonical_transform("union", 1.0), dtype=np.float64)
            matrices = np.einsum("ij,jk,tkl->til", to_written, from_union, matrices)
            matrices = matrices / matrices[:, 2:3, 2:3]
        else:  # a result without the transform: the matrices stay in the union view at scale 1
            target = {"file": None, "extent": "union", "scale": 1.0}
    return matrices, target


def _argv_used(args) -> list[str]:
    if args.command == "demo":
        out = ["demo", "-o", str(args.output)]
    elif args.command == "separate":
        out = ["separate", str(args.burst), "--task", args.task, "-o", str(args.output), "--preset", args.preset,
               "--seed", str(args.seed)] + (["--motion", args.motion] if args.motion else [])
    else:
        out = ["fuse", str(args.burst), "-o", str(args.output), "--motion", args.motion, "--preset", args.preset,
               "--seed", str(args.seed), "--extent", args.extent, "--scale", f"{args.scale:g}"]
    if args.steps is not None:
        out += ["--steps", str(args.steps)]
    return out + ["--device", args.device]


def _write_all(outdir: Path, files: dict, overwrite: bool) -> list[Path]:
    """Write every output into a hidden staging folder inside ``outdir``, then move them in; all or nothing
    (an error or Ctrl-C while writing leaves ``outdir`` as it was, apart from its creation)."""
    from . import io

    outdir.mkdir(parents=True, exist_ok=True)
    _check_outputs(outdir, list(files), overwrite)
    staging = Path(tempfile.mkdtemp(prefix=".napari-nir-", dir=outdir))
    try:
        for name, (kind, payload, meta, channels) in files.items():
            target = staging / name
            if kind == "tiff":
                io.write_tiff(target, payload, meta, channels=channels)
            elif kind == "png":
                io.write_png(target, payload)
            else:
                io.write_json(target, payload)
        written = []
        for name in files:
            os.replace(staging / name, outdir / name)
            written.append(outdir / name)
        return written
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)


def _report(fit, written: list[Path], outdir: Path) -> None:
    prov = fit.provenance()
    psnr = prov.get("final_psnr_db")
    seconds = prov.get("seconds")
    params = prov.get("parameters", {})
    verb = f"separated (task={params['task']})" if params.get("task") else "fused"
    parts = [f"{verb} with motion={params.get('motion', '?')}"]
    if psnr is not None:
        parts.append(f"reconstruction PSNR {psnr:.2f} dB")
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    print(", ".join(parts))
    print(f"wrote {len(written)} files to {outdir}{os.sep}:")
    for path in written:
        print(f"  {path}")


def _corner_error(fitted, truth, shape) -> float | None:
    """Mean corner distance (pixels) between frame -> frame 0 maps of fitted and true homographies, or None."""
    if fitted is None or truth is None:
        return None
    fitted, truth = np.asarray(fitted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if fitted.shape != truth.shape or fitted.ndim != 3:
        return None
    h, w = shape
    corners = np.array([[0, 0, 1], [w - 1, 0, 1], [w - 1, h - 1, 1], [0, h - 1, 1]], dtype=np.float64).T
    errors = []
    for t in range(1, len(fitted)):
        a = np.linalg.inv(fitted[0]) @ fitted[t] @ corners
        b = np.linalg.inv(truth[0]) @ truth[t] @ corners
        errors.append(np.linalg.norm(a[:2] / a[2] - b[:2] / b[2], axis=0).mean())
    return float(np.mean(errors)) if errors else None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
