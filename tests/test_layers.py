"""The package's folders are its layers (docs/architecture.md): a module imports only from its own folder or
from folders below it, so the tree can be read bottom-up and has no import cycles."""
import ast
import pathlib

import kbatch

ROOT = pathlib.Path(kbatch.__file__).parent

#: bottom -> top; a module may import from its own layer and the layers before it
LAYERS = [
    {"kbatch.config", "kbatch.storage", "kbatch.schema"},  # foundation: settings, fsspec I/O, the data model
    {"kbatch.output"},  # formats, the commit protocol, the lease, reading outputs back
    {"kbatch.plan"},  # manifest -> validated rows -> batches; the resume scan
    {"kbatch.models"},  # what runs inside actors: predictors, weights, the Ray wrappers
    {"kbatch.cluster"},  # many runs on one cluster: the coordinator, allotments, a run's seat
    {"kbatch.run"},  # one run on Ray: runner, driver, pools, policies, status
    {"kbatch.api", "kbatch.cli", "kbatch.demo", "kbatch.rayjob", "kbatch"},  # what a user calls
]


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in (2, 1):
        name = ".".join(parts[:n])
        for i, group in enumerate(LAYERS):
            if name in group:
                return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: pathlib.Path, module: str):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("kbatch"):
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("kbatch"):
                for a in node.names:  # `from kbatch.output import writer` imports kbatch.output.writer
                    yield node.lineno, f"{target}.{a.name}" if target.count(".") < 2 else target


def test_every_import_goes_down_the_layers():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        module = module_name(path)
        mine = layer_of(module)
        for line, target in imports(path, module):
            if target.split(".")[:2] == module.split(".")[:2]:
                continue  # its own folder
            if layer_of(target) > mine:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target} (a layer above)")
    assert not wrong, "\n".join(wrong)


def test_no_module_left_at_the_top_but_the_entry_points():
    top = sorted(p.stem for p in ROOT.glob("*.py"))
    assert top == ["__init__", "api", "cli", "config", "demo", "rayjob"]
