"""The shape of the code: imports flow one way, util is a leaf, no function needs a scroll, --help says what it
means."""

import ast
from pathlib import Path

import pytest

import parser as prgs_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
# function -> why it may be longer than MAX_FUNCTION_LINES (none today)
LONG_FUNCTIONS_ALLOWED: dict[str, str] = {}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project (not tests, benchmarks or the virtual env)."""
    modules = {}
    for path in sorted(REPO_ROOT.rglob("*.py")):
        relative = path.relative_to(REPO_ROOT)
        if relative.parts[0] in ("tests", "benchmarks", ".venv", "data", "logs") or relative.parts[0].startswith("."):
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(tree: ast.AST, known: set[str]) -> list[tuple[str, ast.stmt, bool]]:
    """(project module imported, the statement, whether it sits inside a function) for every import in ``tree``."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                # "from places import toy_world" imports the submodule places.toy_world
                names = [child.module] + [f"{child.module}.{alias.name}" for alias in child.names]
            else:
                names = []
            for name in names:
                if name in known:
                    found.append((name, child, in_function))
            visit(child, inside)

    visit(tree, False)
    return found


@pytest.fixture(scope="module")
def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        graph[name] = {imported for imported, _, _ in imported_modules(tree, set(modules)) if imported != name}
        # a submodule import runs its package's __init__ too, unless the importer lives in that package: Python has
        # run the package's __init__ before the importer itself
        packages = {imported.rsplit(".", 1)[0] for imported in graph[name] if "." in imported}
        graph[name] |= {package for package in packages if not name.startswith(package + ".")} - {name}
    return graph


def test_the_project_has_the_modules_the_design_names(import_graph):
    for name in (
        "util",
        "runs",
        "distributed",
        "parser",
        "config",
        "datasets_ws",
        "test",
        "train_reranking",
        "pre_compute_mining",
        "evaluation",
        "extraction",
        "retrieval",
        "reranking",
        "metrics",
        "outputs",
        "training",
        "losses",
        "training_state",
        "training_report",
        "model.checkpoint",
        "model.network",
        "places.index",
        "places.msls",
        "places.msls_protocol",
        "places.vg",
        "places.toy_world",
        "places.folders",
        "places.geodesy",
        "api",
        "hubconf",
        "report",
        "retrievers",
        "candidates",
        "suite",
    ):
        assert name in import_graph, name


def test_no_import_cycle(import_graph):
    """Depth-first search for a cycle; the message shows it."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for imported in sorted(import_graph.get(module, ())):
            if state.get(imported) == "open":
                cycle = stack[stack.index(imported) :] + [imported]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported)
        stack.pop()
        state[module] = "done"

    for module in sorted(import_graph):
        if module not in state:
            visit(module)


def test_util_and_the_place_index_are_leaves(import_graph):
    assert import_graph["util"] == set()
    # util is the bottom and knows nothing of a run: the run life cycle (and the names of what a run writes) is
    # runs.py's (its folder and manifest run_folder.py's), which asks distributed who this process is; distributed
    # never imports runs
    util_names = {node.name for node in ast.parse(project_modules()["util"].read_text()).body if hasattr(node, "name")}
    assert not util_names & {"Run", "start_run", "run_entry_point", "setup_logging", "make_output_folder"}
    assert "results.json" not in project_modules()["util"].read_text()
    assert import_graph["distributed"] <= {"util"}
    assert import_graph["runs"] <= {"util", "distributed", "run_folder"}
    assert import_graph["run_folder"] <= {"util"}
    assert import_graph["places.index"] <= {"util"}
    readers = {"places.vg", "places.msls", "places.toy_world", "places.folders"}
    for module, imported in import_graph.items():  # a reader, or a module of a reader that is a package
        reader = next((r for r in readers if module == r or module.startswith(r + ".")), None)
        if reader is not None:
            assert not imported & ((readers - {reader}) | {"datasets_ws"}), module
    for module, imported in import_graph.items():
        if module.startswith("model"):
            assert all(i.startswith("model") or i == "util" for i in imported), (module, imported)


@pytest.mark.parametrize("stage", ["training", "evaluation"])
def test_the_parser_defines_flags_without_importing_a_stage(import_graph, stage):
    assert stage not in import_graph["parser"]


def test_config_turns_flags_into_settings_without_the_parser_or_a_stage(import_graph):
    assert not import_graph["config"] & {"parser", "evaluation", "training", "test", "train_reranking"}


def test_the_api_and_hub_stay_light(import_graph):
    """torch.hub imports hubconf for list() and help(): it loads the API, which needs only the model, the image
    preprocessing and util, not the evaluation, training or data pipelines."""
    assert import_graph["hubconf"] == {"api"}
    assert import_graph["api"] <= {"util", "places", "places.images"} | {
        m for m in import_graph if m.startswith("model")
    }


def test_no_function_level_import_of_a_project_module():
    modules = project_modules()
    offenders = []
    for path in modules.values():
        for imported, node, in_function in imported_modules(ast.parse(path.read_text()), set(modules)):
            if in_function:
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} imports {imported}")
    assert not offenders, offenders


def test_no_function_needs_a_scroll():
    too_long = []
    for path in [*project_modules().values(), *REPO_ROOT.glob("benchmarks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and node.name not in LONG_FUNCTIONS_ALLOWED:
                    too_long.append(f"{path.relative_to(REPO_ROOT)}::{node.name} has {length} lines")
    assert not too_long, too_long


@pytest.mark.parametrize("build", ["test_parser", "train_parser", "mining_parser"])
def test_help_explains_every_flag_without_default_none(build):
    text = getattr(prgs_parser, build)().format_help()
    assert "(default: None)" not in text
    lines = text.splitlines()
    flags = [line.split()[0] for line in lines if line.startswith("  --")]
    assert len(flags) > 10, text
    for number, line in enumerate(lines):
        if line.startswith("  --") and line.split()[0] != "--help":
            following = line.split(maxsplit=2)[2:] or [lines[number + 1].strip()]
            assert following[0], f"{build}: {line.split()[0]} has no help text"
