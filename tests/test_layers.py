"""The shape of the code stays as docs/architecture.md draws it: layers, no circles, the picture true."""

import re
from pathlib import Path

import pytest

from tests.layers import LAYERS, circles, layer_violations, project_imports, room_dependencies, room_of

ROOT = Path(__file__).resolve().parent.parent
BOTTOM = LAYERS[-1]
OUTSIDE_THE_PRODUCT = {"bench", "tests"}


@pytest.fixture(scope="module")
def edges():
    return project_imports(ROOT)


def test_every_room_imports_only_lower_layers(edges):
    assert len(edges) > 100  # the scan found the project's imports
    assert [str(edge) for edge in layer_violations(edges)] == []


def test_no_module_reaches_itself_through_its_imports(edges):
    assert circles(edges) == []


def test_bottom_modules_import_nothing_of_ours(edges):
    assert [str(e) for e in edges if room_of(e.importer) in BOTTOM] == []


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_check_catches_an_upward_import_a_sibling_import_and_a_circle(tmp_path):
    write(tmp_path, {
        "cache/__init__.py": "",
        "cache/store.py": "def lazy():\n    from runtime.engine import Runtime\n",
        "runtime/__init__.py": "",
        "runtime/engine.py": "from cache.store import lazy\nfrom ..runtime.chat import tools\n",
        "runtime/chat/__init__.py": "",
        "runtime/chat/tools.py": "from runtime.cpu import ops\n",
        "runtime/cpu/__init__.py": "",
        "runtime/cpu/ops.py": "import errors\n",
        "errors.py": "from settings import Settings\n",
        "settings.py": "",
    })
    edges = project_imports(tmp_path)
    found = {(e.importer, e.imported) for e in layer_violations(edges)}
    assert found == {("cache.store", "runtime.engine"), ("runtime.chat.tools", "runtime.cpu"),
                     ("runtime.chat.tools", "runtime.cpu.ops"),
                     ("errors", "settings")}
    assert circles(edges) == [["cache.store", "runtime.engine"]]


def diagram(text: str) -> tuple[set[str], set[tuple[str, str]]]:
    """The nodes and arrows of the first mermaid block."""
    block = re.search(r"```mermaid\n(.*?)```", text, re.S).group(1)
    arrows = set(re.findall(r"^\s*(\w+)(?:\[[^\]]*\])?\s*-->\s*(\w+)", block, re.M))
    return {node for arrow in arrows for node in arrow}, arrows


def node_of(room: str) -> str:
    return "bottom" if room in BOTTOM else room.replace(".", "_")


def rooms_of(node: str) -> tuple[str, ...]:
    return BOTTOM if node == "bottom" else (node.replace("_", "."),)


def test_the_architecture_picture_names_real_rooms_and_draws_every_import_between_them(edges):
    nodes, arrows = diagram((ROOT / "docs" / "architecture.md").read_text())
    for room in [room for node in nodes for room in rooms_of(node)]:
        path = ROOT / room.replace(".", "/")
        assert path.is_dir() or path.with_suffix(".py").is_file(), f"the picture names {room}, which is not there"
    real = {(node_of(a), node_of(b)) for a, b in room_dependencies(edges) if a not in OUTSIDE_THE_PRODUCT}
    assert arrows == real, f"imported but not drawn: {real - arrows}; drawn but not imported: {arrows - real}"
