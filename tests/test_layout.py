"""The architecture rule of the developers' guide, checked: imports point one way (no cycles, also
through imports inside functions), and only the entry points import the command line."""

from __future__ import annotations

import ast

from tskit import REPO

PACKAGES = ("edge", "export", "training")


def module_imports() -> dict[str, set[str]]:
    """Each of our modules -> the modules of ours it imports, wherever in the file."""
    modules = {f"{path.parent.name}.{path.stem}".removesuffix(".__init__"): path
               for package in PACKAGES for path in (REPO / package).glob("*.py")}
    imports = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from training import data` imports the module training.data; `from edge import __version__`, edge
                found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                          for alias in node.names}
        imports[name] = {module for module in found if module in modules and module != name}
    return imports


def cycles(imports: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(imports[module]):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [module, target])
            elif target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(imports):
        if module not in state:
            visit(module, [])
    return found


def test_imports_point_one_way():
    imports = module_imports()
    assert len(imports) >= 30 and "edge.service" in imports["edge.cli"] | {m for s in imports.values() for m in s}
    assert cycles(imports) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_only_the_entry_point_imports_the_command_line():
    imports = module_imports()
    assert sorted(m for m, targets in imports.items() if "edge.cli" in targets) == ["edge.__main__"]


def test_the_edge_stages_never_import_training_or_export():
    """The daemon's install has no TensorFlow: of edge's modules only the entry point (cli.py, which dispatches
    the train extra's commands) may import training or export; the bench is given export's checkpoint loader."""
    imports = module_imports()
    reaching = sorted(module for module, targets in imports.items() if module.startswith("edge.")
                      and any(t.split(".")[0] in ("training", "export") for t in targets))
    assert reaching == ["edge.cli"]


def test_the_config_schema_loads_no_runtime():
    """config.py named the detector variants and age tiers through detect.py and tiers.py, and so loaded OpenCV,
    NumPy and ONNX Runtime: 0.4 s of every `tillsight config check`, `status` and `pos`. It names them from
    catalog.py, which imports none of them."""
    import subprocess
    import sys
    loaded = subprocess.run([sys.executable, "-c", "import sys, edge.config; "
                             "print(sorted({'cv2', 'numpy', 'onnxruntime', 'onnx'} & set(sys.modules)))"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
