"""The house rules of the package, checked on its source: no import cycle among tapml's modules (lazy imports
inside functions included; TYPE_CHECKING blocks and the named deliberate edges aside), the CLI is imported by
nobody, test tooling never by the core, the store's layout names never outside the store, and `import tapml` stays
light."""

import ast
import subprocess
import sys
from pathlib import Path

import tapml

SRC = Path(tapml.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every tapml module `path` imports, at module level or lazily inside a function (a lazy import is still a
    dependency: a cycle through one is a tangle the first caller unknots at run time), except under
    `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()

    def module_of(base: str, name: str) -> str:
        sub = f"{base}.{name}"  # `from tapml.store import _files` imports a submodule
        as_path = SRC.parent / sub.replace(".", "/")
        return sub if as_path.with_suffix(".py").exists() or (as_path / "__init__.py").exists() else base

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" in ast.unparse(node.test):
                for n in node.orelse:
                    self.visit(n)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names if a.name.startswith("tapml"))

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("tapml"):
                found.update(module_of(base, a.name) for a in node.names)

    Visitor().visit(tree)
    return found


# Deliberate lazy edges, each with its reason; everything else must be acyclic.
ALLOWED_LAZY = {
    ("tapml.workload", "tapml.zoo"): "a model name resolves through the zoo, whose entries build Workloads",
}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name and (name, m) not in ALLOWED_LAZY}
            for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = dfs(n)
            if found:
                return found
    return None


def test_no_import_cycle_inside_tapml():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    edges = {(n, m) for n, path in ((_module_name(p), p) for p in SRC.rglob("*.py")) for m in _imports(path)}
    assert set(ALLOWED_LAZY) <= edges, "an allowed edge no longer exists: drop it from ALLOWED_LAZY"


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_layering_rules():
    graph = _graph()
    importers_of = {m: {n for n, deps in graph.items() if m in deps} for m in graph}
    assert not importers_of["tapml.cli"], "the CLI is a skin: nothing imports it"
    core = [n for n in graph if not n.startswith(("tapml.testing", "tapml.cli"))]
    assert not [n for n in core if any(d.startswith("tapml.testing") for d in graph[n])], \
        "the core must not import test tooling"
    for path in SRC.rglob("*.py"):
        if "store" in path.relative_to(SRC).parts:
            continue
        text = path.read_text()
        assert "cases.sqlite" not in text and "carve.lock" not in text, f"{path} knows the store's layout"


def test_the_front_door_is_lazy_and_complete():
    code = ("import sys, tapml; heavy = [m for m in ('torch', 'tapml.recorder', 'tapml.store') if m in sys.modules];"
            "print(heavy); names = [tapml.carve, tapml.run_tests, tapml.migrate, tapml.debug, tapml.CaseStore,"
            " tapml.open_backend, tapml.Placement, tapml.TapmlError, tapml.Workload, tapml.load_workload];"
            "print(all(callable(x) for x in names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    heavy, complete = out.stdout.splitlines()
    assert heavy == "[]"  # nothing heavy until a name is used
    assert complete == "True"
    import tapml.recorder  # a submodule import must not shadow the function of the same name

    assert callable(tapml.carve) and tapml.carve is tapml.recorder.carve
