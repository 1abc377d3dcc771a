"""The import contracts (.importlinter, run by scripts/layers) forbid each back-edge
issue 12 found: add one such import to a copy of the tree and import-linter fails,
naming the contract it breaks. The tree itself passes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("core", "adapters", "pipelines", "mappings", "workbench", "sandbox", "bench")
FOLDERS += ("evaluation",)
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
LAYERS = "layers point one way"
IO = "third-party I/O"
FACADE = "the facade (ehrbridge/__init__.py)"
FACADE_IO = "the facade's modules reach"

# (file, the import added to it, the contract that must break): the back-edges of issue 12.
BACK_EDGES = [
    ("pipelines/process.py", "import ehrbridge.adapters.inference_client", LAYERS),
    ("pipelines/writeback.py", "import ehrbridge.adapters.mllp_sink", LAYERS),
    ("mappings/schema.py", "import ehrbridge.pipelines.facts", LAYERS),
    ("mappings/loader.py", "import ehrbridge.config", LAYERS),  # the config <-> mappings cycle
    ("ehrbridge/config.py", "import ehrbridge.runtime", LAYERS),  # config is the bottom
    ("ehrbridge/config.py", "import ehrbridge.pipelines.records", LAYERS),
    ("pipelines/observation.py", "import ehrbridge", FACADE),  # for __version__
    ("pipelines/writeback.py", "import ehrbridge.fhir_api", LAYERS),  # runtime <-> api cycle
    ("ehrbridge/api.py", "import ehrbridge.runtime", LAYERS),
    ("sandbox/run.py", "import ehrbridge.cli", LAYERS),  # the cli <-> sandbox.run cycle
    ("ehrbridge/runtime.py", "import ehrbridge.sandbox.run", LAYERS),
    ("ehrbridge/runtime.py", "import ehrbridge.bench.pipeline", LAYERS),
    ("pipelines/results.py", "import sqlite3", IO),
    ("pipelines/process.py", "import httpx", IO),
    ("pipelines/transport.py", "import kafka", IO),
    ("mappings/lint.py", "import hl7apy", IO),
    ("ehrbridge/cds_hooks.py", "import httpx", FACADE_IO),  # reads Patient via adapters/
    ("ehrbridge/stores.py", "import sqlite3", FACADE_IO),
    ("core/contracts.py", "import ehrbridge.pipelines.transport", LAYERS),
]


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over ``tree`` laid out as the installed package (see scripts/layers)."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(ROOT / ".importlinter")],
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )


def installed_layout(tmp_path: Path, changed: str | None = None) -> Path:
    """``tmp_path/ehrbridge``: the facade folder with the source folders inside, linked.

    The folder holding ``changed`` is copied instead, so the change stays in the copy.
    """
    package = tmp_path / "ehrbridge"
    shutil.copytree(ROOT / "ehrbridge", package, ignore=shutil.ignore_patterns("__pycache__"))
    changed_folder = changed.split("/")[0] if changed else None
    for folder in FOLDERS:
        if folder == changed_folder:
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(ROOT / folder, package / folder, ignore=ignore)
        else:
            (package / folder).symlink_to(ROOT / folder)
    return tmp_path


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = lint(installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("path", "statement", "contract"), BACK_EDGES)
def test_each_back_edge_breaks_a_contract(
    tmp_path: Path, path: str, statement: str, contract: str
) -> None:
    tree = installed_layout(tmp_path, path)
    target = tree / "ehrbridge" / path.removeprefix("ehrbridge/")
    target.write_text(target.read_text() + f"\n{statement}  # a back-edge\n")
    result = lint(tree)
    assert result.returncode != 0, f"{path}: `{statement}` passed the contracts"
    words = " ".join(result.stdout.split())  # import-linter wraps long names
    assert contract in words.partition("Broken contracts")[2], result.stdout
