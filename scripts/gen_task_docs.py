"""Write docs/tasks.md from the task table (napari_nir.core.tasks.TASKS) and the motion/preset tables.

Run: python scripts/gen_task_docs.py  (tests/test_docs.py checks the committed file is up to date).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render() -> str:
    from napari_nir.core.fit import MOTIONS, PRESETS
    from napari_nir.core.tasks import TASKS

    lines = ["# Tasks, motion models and presets", "",
             "_Generated from `napari_nir.core.tasks.TASKS` by `scripts/gen_task_docs.py`; do not edit by hand._", "",
             "## Layer separation tasks", "",
             "| task | what it removes | formation | scene motion (fast / paper) | output layers | sparsity | "
             "exclusion | zero-mean interference | fast preset | paper preset |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in TASKS.values():
        paper = ", ".join(f"batch H*W/{-v}" if k == "batch" and v < 0 else f"{k} {v}" for k, v in t.paper.items())
        formation = t.description.split(": ", 1)[-1]
        fast = ", ".join(f"{k} {v}" for k, v in t.fast_options.items()) or "defaults"
        lines.append(f"| `{t.name}` | {t.title} | {formation} | {t.default_motion('fast')} / {t.motion} | {', '.join(t.layers)} "
                     f"| {t.sparsity} | {t.exclusion} | {t.zero_mean or '-'} | {fast} | {paper} |")
    lines += ["", "Python: `napari_nir.separate(burst, task=NAME)`; command line: "
              "`napari-nir separate BURST --task NAME -o OUTDIR`; napari: the *Separate layers* widget.", "",
              "## Fusion motion models", "", f"`napari_nir.fuse(burst, motion)` with motion one of "
              f"{', '.join(f'`{m}`' for m in MOTIONS)}; presets {', '.join(f'`{p}`' for p in PRESETS)}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    (ROOT / "docs" / "tasks.md").write_text(render())
    print(f"wrote {ROOT / 'docs' / 'tasks.md'}")
