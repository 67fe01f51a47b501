"""Write docs/tasks.md from the core's tables: tasks, motion models, presets, options and artefacts.

Run: python scripts/gen_task_docs.py  (tests/test_docs.py checks the committed file is up to date).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render() -> str:
    from napari_nir.core.config import PRESET_OPTIONS, PRESETS, options
    from napari_nir.core.motions import MOTIONS
    from napari_nir.core.presets import SEPARATION_PRESET_OPTIONS
    from napari_nir.core.result import ARTEFACTS
    from napari_nir.core.tasks import TASKS

    lines = ["# Tasks, motion models, presets, options and outputs", "",
             "_Generated from the core's tables (`napari_nir.core.tasks.TASKS`, `motions.MOTIONS`, `config`, "
             "`presets`, `result.ARTEFACTS`) by `scripts/gen_task_docs.py`; do not edit by hand._", "",
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
              "## Motion models", "",
              "| motion | what it models | alignment reported | depth (w) | outputs it adds | paper preset |",
              "|---|---|---|---|---|---|"]
    for m in MOTIONS.values():
        paper = ", ".join(f"{k} {v}" for k, v in m.presets.get("paper", {}).items()) or "-"
        lines.append(f"| `{m.name}` | {m.description} | {m.alignment} | {'yes' if m.depth else 'no'} | "
                     f"{', '.join(m.artefacts) or '-'} | {paper} |")
    lines += ["", f"`napari_nir.fuse(burst, motion)`; presets {', '.join(f'`{p}`' for p in PRESETS)}.", "",
              "## Presets", "", "Each preset is the defaults below plus these values, then the motion's and (separation) "
              "the task's; the caller's options come last.", "", "| preset | options | separation adds |", "|---|---|---|"]
    for name in PRESETS:
        values = ", ".join(f"{k} {v}" for k, v in PRESET_OPTIONS[name].items()) or "defaults"
        separation = ", ".join(f"{k} {v}" for k, v in SEPARATION_PRESET_OPTIONS[name].items())
        lines.append(f"| `{name}` | {values} | {separation} |")
    lines += ["", "## Options", "", "Every option by its name in `fuse(..., name=value)`, `--set name=value` and "
              "provenance records; `FitConfig.section.attribute` in code.", "",
              "| option | section.attribute | type | default | meaning |", "|---|---|---|---|---|"]
    for opt in options().values():
        kind = " \\| ".join(repr(c) for c in opt.choices) if opt.choices else \
            str(opt.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "").replace("|", "\\|")
        meaning = opt.doc.replace("|", "\\|")
        lines.append(f"| `{opt.flat}` | {opt.path} | {kind} | `{opt.default!r}` | {meaning} |")
    lines += ["", "## Outputs", "", "`result.artefacts()`; the CLI writes the files, napari shows the layers.", "",
              "| output | kind | file | napari layer | convention |", "|---|---|---|---|---|"]
    for a in ARTEFACTS.values():
        lines.append(f"| {a.role} | {a.kind} | {a.file or '-'} | {a.layer or '-'} | {a.description} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    (ROOT / "docs" / "tasks.md").write_text(render())
    print(f"wrote {ROOT / 'docs' / 'tasks.md'}")
