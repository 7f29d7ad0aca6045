"""The layers of the distribution: models (science, no database), etl (moves data into the
database, the command line), service (reads). Checked on every module's imports, those
inside functions included."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "etl", "service")
# What the read-only service may use of etl: the one schema, the settings, and the
# database helpers (engines, positional SQL) that both sides share, and the one rule for
# opening a spectrum file under the spectra root (the spectrum pages draw the file), and
# the VOTable writer of the schema's columns (the release export writes the same VOTable),
# and the histogram bins and cells that estimate_cells counts (its triggers and the
# histograms the service adds up must bin alike), and the command line's option types
# (``lamost-vac serve`` is one of its commands).
SERVICE_MAY_IMPORT = {"etl", "etl.schema", "etl.settings", "etl.db", "etl.spectrum_files",
                      "etl.votable", "etl.histogram_cells", "etl.commands"}


def module_name(path):
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules():
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "migrations" not in path.parts:
                found[module_name(path)] = path
    return found


def imports_of(name, path, known):
    """Project modules imported by module ``name`` (absolute and relative imports)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t.split(".")[0] in PACKAGES}
    return out


GRAPH = {name: imports_of(name, path, set(modules())) for name, path in modules().items()}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_module_respects_the_layers(name):
    layer = name.split(".")[0]
    for target in GRAPH[name]:
        other = target.split(".")[0]
        if layer == "models":
            assert other == "models", f"{name} (science) imports {target}"
        elif layer == "etl":
            assert other != "service", f"{name} imports {target}: etl never imports service"
        elif layer == "service" and other == "etl":
            assert target in SERVICE_MAY_IMPORT, f"{name} imports {target} (writer side)"


def test_no_import_cycle():
    visiting, done, cycles = set(), set(), []

    def visit(node, trail):
        if node in done:
            return
        if node in visiting:
            cycles.append(trail[trail.index(node):] + [node])
            return
        visiting.add(node)
        for target in sorted(GRAPH.get(node, ())):
            if target in GRAPH and target != node:
                visit(target, trail + [node] if not trail or trail[-1] != node else trail)
        visiting.discard(node)
        done.add(node)

    for name in sorted(GRAPH):
        visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
