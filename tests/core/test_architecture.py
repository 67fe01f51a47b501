"""The core's structure (docs/architecture.md): one-way imports, no GUI imports, tables that drive everything."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "src" / "napari_nir" / "core"


def _own_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported core module, at module level?) for every import of a sibling core module in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found += [(name.split(".")[0], id(node) in top_level) for name in names]
    return found


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in CORE.glob("*.py") if p.stem != "__init__"}
    return {m: {name for name, _ in _own_imports(CORE / f"{m}.py") if name in modules} for m in modules}


def test_core_has_no_import_cycle():
    graph = _graph()
    done, path = set(), []

    def visit(node):
        if node in path:
            cycle = path[path.index(node):] + [node]
            pytest.fail("import cycle in napari_nir.core: " + " -> ".join(cycle))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for module in sorted(graph):
        visit(module)


def test_the_documented_module_order_is_the_import_order():
    """docs/architecture.md's table lists every core module, each importing only modules listed above it."""
    import re

    text = (CORE.parents[2] / "docs" / "architecture.md").read_text()
    section = text[text.index("## Modules and their order"):text.index("## The tables")]
    listed = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    graph = _graph()
    assert sorted(listed) == sorted(graph), "the table must list every core module once"
    above: set[str] = set()
    for module in listed:
        assert graph[module] <= above, f"{module} imports {sorted(graph[module] - above)}, listed below it"
        above.add(module)


def test_core_imports_its_own_modules_at_module_level_only():
    hidden = [(p.name, name) for p in CORE.glob("*.py") for name, top in _own_imports(p) if not top]
    assert hidden == [], f"function-level imports of core modules (a cycle being dodged?): {hidden}"


def test_config_needs_no_torch():
    tree = ast.parse((CORE / "config.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert "torch" not in imported and "numpy" not in imported


def test_importing_the_core_loads_no_gui():
    code = ("import sys, napari_nir.core.api, napari_nir.core.provenance; "
            "print(sorted(m for m in ('napari', 'qtpy', 'magicgui', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"napari_nir.core imported GUI packages: {out}"


def test_every_motion_entry_offers_the_interface():
    import torch

    from napari_nir.core.config import PRESETS
    from napari_nir.core.motions import MOTIONS
    from napari_nir.core.presets import preset_config
    from napari_nir.core.result import ARTEFACTS

    for name, entry in MOTIONS.items():
        assert entry.alignment in ("matrices", "flow")
        assert set(entry.artefacts) <= set(ARTEFACTS), f"{name}: unknown artefact roles"
        for preset in PRESETS:
            config = preset_config(name, preset).validate()
            net = entry.build(config, 3, (-1.2, 1.2, -1.2, 1.2), None)
            out = net(torch.zeros(4, dtype=torch.long), torch.zeros(4, 2))
            assert out.shape == (4, 3 if entry.depth else 2)
            assert net.matrices().shape == (3, 3, 3)
            assert len(net.point_floats()) == 2
            net.set_progress(0.5, 0.5)
            smooth = net.smoothness()
            assert (smooth is None) == (entry.alignment == "matrices")


def test_artefacts_follow_the_motion_and_task_tables():
    from napari_nir.core.motions import MOTIONS
    from napari_nir.core.presets import preset_config, separation_config
    from napari_nir.core.result import ARTEFACTS
    from napari_nir.core.tasks import TASKS

    files = [a.file for a in ARTEFACTS.values() if a.file]
    assert len(files) == len(set(files))
    for name, entry in MOTIONS.items():
        config = preset_config(name, "fast")
        assert {r for r, a in ARTEFACTS.items() if a.applies(config)} == {
            "canonical", "frames", "registered", "diagnostics", "residual", *entry.artefacts}
    for task in TASKS.values():
        config = separation_config(task.name, "fast")
        rigid = {"interference canonical", "interference homographies"}
        expected = {"canonical", "frames", "registered", "diagnostics", "residual",
                    *MOTIONS[config.motion.model].artefacts, *task.layers}
        expected |= rigid if config.separation.interference_motion != "none" else set()
        expected |= {"kept frame pixels"} if config.separation.thick_alpha_guard else set()
        assert {r for r, a in ARTEFACTS.items() if a.applies(config)} == expected, task.name
