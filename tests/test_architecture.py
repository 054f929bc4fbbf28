"""The layering as tests: no import cycle anywhere in the package, and every registered stage is
under the import-linter contract that keeps stages from importing each other (`make test` runs
`lint-imports` on the contracts in pyproject.toml)."""

from __future__ import annotations

import sys
from pathlib import Path

import grimp

from selftrain.stages import REGISTRY

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_no_import_cycles():
    graph = grimp.build_graph("selftrain", cache_dir=None)
    cycles = []
    for importer in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(importer):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back:
                cycles.append(" -> ".join((importer, *back)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_stage_is_under_the_independence_contract():
    """The contract covers ``selftrain.stages.*``: a stage module anywhere else would escape it."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    independent = next(c["modules"] for c in contracts if c["type"] == "independence")
    assert independent == ["selftrain.stages.*"]
    for name, cls in REGISTRY.items():
        if cls.__module__.startswith("selftrain."):
            assert cls.__module__.split(".")[:2] == ["selftrain", "stages"] and cls.__module__.count(".") >= 2, (
                f"stage {name} lives in {cls.__module__}, outside selftrain.stages.*")
