"""The docs generated from the task table are up to date."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_task_docs_match_the_task_table():
    spec = importlib.util.spec_from_file_location("gen_task_docs", ROOT / "scripts" / "gen_task_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "tasks.md").read_text() == module.render(), \
        "docs/tasks.md is stale: run python scripts/gen_task_docs.py"
