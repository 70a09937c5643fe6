"""The project's modules import one another without a circle: each top-level .py, read as source (its imports
anywhere, those inside functions too), is a node, and `import x` / `from x import y` of another top-level module an
edge. A circle works only as long as some import stays inside a function, and breaks with the next refactoring.

    python -m pytest tests/test_imports.py -q
"""
import ast

from conftest import REPO


def import_graph():
    """{module: {the project's modules it imports, at the top or inside functions}} over the top-level .py files."""
    modules = {path.stem: path for path in REPO.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def find_circle(graph):
    """A list of modules [a, b, ..., a] that import one another in a circle, or None."""
    state, path = {}, []  # state: 1 on the current path, 2 done

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        state[node] = 2
        path.pop()
        return None

    return next((c for node in sorted(graph) if node not in state and (c := visit(node))), None)


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_finder_finds_a_circle_through_a_function_level_import():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    source = "import os\n\ndef f():\n    from detect import load_model\n    import eval as e\n"
    tree = ast.parse(source)
    found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert found == {"os", "detect", "eval"}  # ast.walk reaches the imports inside functions


def test_the_project_imports_without_a_circle():
    graph = import_graph()
    assert {"detect", "export", "exported", "tiling", "files", "misc", "utils", "model"} <= set(graph)
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))
    # the writer of exports sits above detect.py; what detect.py, eval.py and train.py load is the reader
    assert "exported" in graph["detect"] and "detect" in graph["export"]
    for script in ("detect", "eval", "train"):
        assert "export" not in reachable(graph, script) | {script}, script
