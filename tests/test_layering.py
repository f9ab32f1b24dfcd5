"""The package's floors, checked on its source: low floors never import high ones, and no module uses
another module's private names.

Floors, lowest first: ``graph`` → ``objectives`` / ``relocation`` → ``analysis`` / ``compression`` →
``training`` → ``experiments`` → ``cli`` / ``report``. The check reads every import in the AST,
including the ones inside functions (a lazy import is still a dependency), and resolves relative
imports. A private name (leading underscore) is one module's business: importing it, or reading
``obj._name`` where ``_name`` belongs to another topotorch module, couples the two behind the public
API's back. Private *modules* (``layers/_cpu_kernel.py``) are private to their package.

Each checker is first run on a tiny synthetic source, so a checker that silently finds nothing
fails here rather than passing the real package vacuously.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from torch import nn

ROOT = Path(__file__).resolve().parents[1] / "topotorch"

# floor -> the higher floors it must never import (the issue names training, cli and report;
# experiments and the FFF trainer sit above training too)
HIGH = ("topotorch.training", "topotorch.training_fff", "topotorch.experiments", "topotorch.cli", "topotorch.report")
LOW = ("topotorch.graph", "topotorch.objectives", "topotorch.compression")
# attributes every nn.Module has (torch's own privates, not a topotorch module's)
TORCH_NAMES = set(dir(nn.Module())) | set(vars(nn.Module()))


def module_sources() -> dict[str, str]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p.read_text()
    return out


def _is_package(module: str, sources: dict[str, str] | None = None) -> bool:
    if sources is not None:
        return any(k.startswith(module + ".") for k in sources)
    return (ROOT.parent / module.replace(".", "/") / "__init__.py").exists()


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str, str | None]]:
    """Every import in ``source`` (inside functions too): (line, absolute module, imported name or None)."""
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            out += [(node.lineno, base, a.name) for a in node.names]
    return out


def layer_violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Imports of a higher floor from a low one (``from topotorch import cli`` counts as importing cli)."""
    if not module.startswith(LOW):
        return []
    bad = []
    for line, mod, name in imports(source, module, is_package):
        targets = [mod] + ([f"{mod}.{name}"] if name else [])
        hit = next((t for t in targets if any(t == h or t.startswith(h + ".") for h in HIGH)), None)
        if hit is not None:
            bad.append(f"{module}:{line} imports {hit}")
    return bad


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def defined_privates(source: str) -> set[str]:
    """Private names a module defines: functions, classes, module/class variables, ``self._x`` attributes."""
    out = set()
    for n in ast.walk(ast.parse(source)):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(n.name):
            out.add(n.name)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) and _private(n.id):
            out.add(n.id)
        elif (
            isinstance(n, ast.Attribute)
            and isinstance(n.ctx, ast.Store)
            and isinstance(n.value, ast.Name)
            and n.value.id in ("self", "cls")
            and _private(n.attr)
        ):
            out.add(n.attr)
    return out


def private_violations(sources: dict[str, str]) -> list[str]:
    """Private names used outside the module that defines them (see the module docstring)."""
    owners: dict[str, set[str]] = {}
    for mod, src in sources.items():
        for name in defined_privates(src):
            owners.setdefault(name, set()).add(mod)
    bad = []
    for mod, src in sources.items():
        package = mod if _is_package(mod, sources) else mod.rpartition(".")[0]
        aliases = {}  # local name -> topotorch module it stands for
        for line, base, name in imports(src, mod, _is_package(mod, sources)):
            if not base.startswith("topotorch"):
                continue
            full = f"{base}.{name}" if name else base
            # a private module, or a private name of one, is usable inside the package that holds it
            private_parts = [i for i, p in enumerate(full.split(".")) if _private(p)]
            for i in private_parts:
                owner_pkg = ".".join(full.split(".")[:i])
                if name is not None and full.split(".")[i] == name and f"{base}.{name}" not in sources:
                    owner_pkg = base  # a private name defined in module ``base``: only ``base`` may use it
                    if owner_pkg != mod:
                        bad.append(f"{mod}:{line} imports private {name!r} from {base}")
                    break
                if not (package == owner_pkg or package.startswith(owner_pkg + ".")):
                    bad.append(f"{mod}:{line} imports {full}, private to {owner_pkg}")
                    break
            if name and full in sources:
                aliases[name] = full
        for n in ast.walk(ast.parse(src)):
            if not (isinstance(n, ast.Attribute) and _private(n.attr)) or n.attr in TORCH_NAMES:
                continue
            if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
                continue
            if isinstance(n.value, ast.Call) and isinstance(n.value.func, ast.Name) and n.value.func.id == "super":
                continue
            if isinstance(n.value, ast.Name) and n.value.id in aliases:
                bad.append(f"{mod}:{n.lineno} uses {aliases[n.value.id]}.{n.attr}")
            elif n.attr in owners and mod not in owners[n.attr]:
                bad.append(f"{mod}:{n.lineno} uses {ast.unparse(n)}, private to {', '.join(sorted(owners[n.attr]))}")
    return bad


# -- the checkers catch what they should --------------------------------------------------------------


def test_layer_checker_finds_imports_anywhere_in_a_module():
    src = "import torch\n\ndef f():\n    from topotorch.training import train\n    return train\n"
    assert layer_violations(src, "topotorch.compression.x") == ["topotorch.compression.x:4 imports topotorch.training"]
    assert layer_violations("from topotorch import cli, graph\n", "topotorch.graph.y") == [
        "topotorch.graph.y:1 imports topotorch.cli"
    ]
    relative = "from ...report import write_report\n"  # from topotorch.objectives.deep.z: topotorch.report
    assert layer_violations(relative, "topotorch.objectives.deep.z") == [
        "topotorch.objectives.deep.z:1 imports topotorch.report"
    ]
    assert layer_violations("from ..graph import SpatialGraph\n", "topotorch.objectives.z") == []
    assert (
        layer_violations("from topotorch.training import train\n", "topotorch.experiments.sweep") == []
    )  # a high floor may


def test_private_checker_finds_imports_and_attributes():
    sources = {
        "topotorch.graph.core": "class SpatialGraph:\n    def __init__(self):\n        self._cache = {}\n"
        "    def cached(self, k):\n        return self._cache.get(k)\n",
        "topotorch.relocation": "def _aggregate_abs(w):\n    return w\n",
        "topotorch.analysis.a": "from topotorch.relocation import _aggregate_abs\n\ndef f(graph, w):\n"
        "    graph._cache.clear()\n    return _aggregate_abs(w)\n",
        "topotorch.analysis.b": "from topotorch import relocation\n\ndef g(w):\n"
        "    return relocation._aggregate_abs(w)\n",
        "topotorch.layers": "",
        "topotorch.layers._kern": "ACT = 1\n",
        "topotorch.layers.fff": "from topotorch.layers import _kern\nfrom topotorch.layers._kern import ACT\n",
        "topotorch.sae.x": "from topotorch.layers._kern import ACT\n",
        "topotorch.ok": "import torch\n\ndef h(m):\n    return m._parameters, super()._apply\n",
    }
    bad = private_violations(sources)
    assert bad == [
        "topotorch.analysis.a:1 imports private '_aggregate_abs' from topotorch.relocation",
        "topotorch.analysis.a:4 uses graph._cache, private to topotorch.graph.core",
        "topotorch.analysis.b:4 uses topotorch.relocation._aggregate_abs",
        "topotorch.sae.x:1 imports topotorch.layers._kern.ACT, private to topotorch.layers",
    ], bad


# -- the package obeys -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
    return module_sources()


def test_low_floors_never_import_training_cli_or_report(sources):
    assert any(m.startswith("topotorch.compression.") for m in sources)  # the walk found the package
    bad = [v for mod, src in sources.items() for v in layer_violations(src, mod, _is_package(mod, sources))]
    assert bad == []


def test_no_private_name_is_used_outside_its_module(sources):
    assert private_violations(sources) == []
