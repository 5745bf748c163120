"""One-way layering of the package: every import (module level or inside a function) goes to a
lower layer or stays inside its own package, so no cycle between packages can exist.

    cli -> launch / nemo_native / demo -> recipes -> train -> peft / prune / inference
        -> model / losses -> data -> convert -> checkpoint -> config -> dist -> compat
        -> lifecycle / tokenizer -> errors

A new import that goes up (say ``convert`` importing ``model``) fails here with the file and the
import named: move the code to the layer where it belongs instead of hiding the import in a
function.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "nemo_minitron")

LAYERS = [
    ["errors", "__init__"],
    ["lifecycle", "tokenizer"],
    ["compat"],
    ["dist"],
    ["config"],
    ["checkpoint"],
    ["convert"],
    ["data"],
    ["model", "losses"],
    ["peft", "prune", "inference"],
    ["train"],
    ["recipes"],
    ["launch", "nemo_native", "demo"],
    ["cli"],
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(module: str) -> str:
    """The package (``nemo_minitron.convert.mapping`` -> ``convert``) or top-level module of a
    dotted name inside nemo_minitron (``nemo_minitron.__version__``: the package's own
    ``__init__``)."""
    parts = module.split(".")
    if len(parts) == 1 or not (os.path.isdir(os.path.join(PACKAGE, parts[1]))
                               or os.path.isfile(os.path.join(PACKAGE, parts[1] + ".py"))):
        return "__init__"
    return parts[1]


def _imports(path: str):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "nemo_minitron":  # from nemo_minitron import lifecycle
                names = [f"nemo_minitron.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "nemo_minitron" or name.startswith("nemo_minitron."):
                yield node.lineno, name


def _edges():
    for directory, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(directory, f)
            rel = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
            if rel.endswith(".__init__"):
                rel = rel[:-len(".__init__")]
            src = _unit(rel)
            for line, name in _imports(path):
                dst = _unit(name)
                if dst != src:
                    yield os.path.relpath(path, ROOT), line, src, dst, name


def test_every_package_has_a_layer():
    units = {n[:-len(".py")] if n.endswith(".py") else n for n in os.listdir(PACKAGE)
             if n.endswith(".py") or os.path.isfile(os.path.join(PACKAGE, n, "__init__.py"))}
    missing = sorted(u for u in units if u not in RANK)
    assert not missing, f"give these a layer in tests/test_layering.py: {missing}"


def test_imports_only_go_down():
    upward = [f"{path}:{line}: {src} imports {name} ({dst} is not below {src})"
              for path, line, src, dst, name in _edges()
              if RANK.get(dst, -1) >= RANK.get(src, len(LAYERS))]
    assert not upward, "\n".join(upward)
