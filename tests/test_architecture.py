"""The package's shape: layers import only downwards, files stay small, no module reaches into another's
private names, and the public ``__init__`` lists what it exports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hesd

SRC = Path(hesd.__file__).parent

#: Each layer may import from its own layer and those listed before it.
LAYERS = [
    {"errors", "checks", "collectives", "_version", "allocator", "models"},
    {"operators"},
    {"algorithms"},
    {"analysis", "distributed", "training"},
    {"interfaces"},
]


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"hesd.{module} is in no layer of tests/test_architecture.py; add it")


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


def _imports(path: Path, module: str):
    """(imported hesd module, imported names, line) for each import of hesd code in ``path``."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join([*base, node.module] if node.module else base)
            elif node.module and node.module.split(".")[0] == "hesd":
                target = node.module.removeprefix("hesd").lstrip(".")
            else:
                continue
            yield target, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "hesd":
                    yield a.name.removeprefix("hesd").lstrip("."), [], node.lineno


def test_imports_run_down_the_layers_only():
    wrong = []
    for path, module in _modules():
        if not module:
            continue  # hesd/__init__.py gathers the public API from every layer
        own = _layer(module)
        for target, names, line in _imports(path, module):
            if not target:
                wrong.append(f"{module}:{line} imports the hesd package itself ({names})")
                continue
            if _layer(target) > own:
                wrong.append(f"{module}:{line} imports hesd.{target} from a higher layer")
    assert not wrong, "\n".join(wrong)


def test_no_module_reaches_into_another_modules_private_names():
    wrong = []
    for path, module in _modules():
        for target, names, line in _imports(path, module):
            # a package's private helper module serves that package only
            same_package = target.rsplit(".", 1)[0] == module.rsplit(".", 1)[0]
            private_module = [
                p for p in target.split(".") if p.startswith("_") and p != "_version" and not same_package
            ]
            private_names = [n for n in names if n.startswith("_") and n != "__version__"]
            if private_module or private_names:
                wrong.append(f"{module}:{line} imports {private_names or ''} from hesd.{target}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_source_file_is_over_400_lines(path):
    n = len(path.read_text().splitlines())
    assert n <= 400, f"{path.relative_to(SRC)} has {n} lines; split it along a concern"


def test_public_api_is_listed_and_importable():
    for name in hesd.__all__:
        assert getattr(hesd, name) is not None, name
    for sub in (hesd.operators, hesd.algorithms, hesd.analysis):
        for name in sub.__all__:
            assert hasattr(sub, name), f"{sub.__name__}.{name}"
