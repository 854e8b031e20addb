"""No module but mpkv/naming.py spells an OS name: the objects of an instance in /dev/shm, process titles, log
directories. A name spelled in two places is two names the day one of them changes (the reference system's own
bug: a role recomputed in several places); this test reads every module's source and finds such spellings."""

from __future__ import annotations

import ast
import pathlib
import re

import mpkv

PACKAGE = pathlib.Path(mpkv.__file__).parent
# The literal beginnings of the names naming.py builds.
OS_NAME = re.compile(
    r"^(tasks\.|done\.|pool\.(dev|host)|mpkv::|mpkv-logs|mpkv-bench|/dev/shm|/tmp/|/mpkv\.|mpkv\.u\d|mpkv\.\{|\.log$)"
)
NAME_TAKERS = {"name_of", "object_name", "create_segment", "create_signals", "create_ring", "create_barrier"}


def _literal_prefix(node: ast.expr) -> str | None:
    """The constant text a string expression starts with (an f-string's leading literal part), if any."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def _spellings(path: pathlib.Path, root: pathlib.Path = PACKAGE.parent) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    inner = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}  # an f-string's parts
    found = []
    for node in ast.walk(tree):
        if id(node) in inner:
            continue
        if isinstance(node, (ast.Constant, ast.JoinedStr)):
            text = _literal_prefix(node)
            if text is not None and OS_NAME.match(text):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {text!r}")
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name)):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            # A benchmark's scratch registry holds objects one function makes and opens; an instance's objects
            # are opened by several processes, each of which must take the name from naming.py.
            shared = "bench" not in path.relative_to(root).parts
            for arg in node.args[:2] if called in NAME_TAKERS and shared else ():
                text = _literal_prefix(arg)
                if text is not None:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {called}({text!r})")
    return found


def test_only_naming_spells_os_names() -> None:
    offenders = [s for p in sorted(PACKAGE.rglob("*.py")) if p.name != "naming.py" for s in _spellings(p)]
    assert not offenders, "OS names spelled outside mpkv/naming.py (add a function there):\n" + "\n".join(offenders)


def test_the_check_finds_a_spelling(tmp_path: pathlib.Path) -> None:
    """The check itself can fail: each kind of spelling it looks for is found in a module that has one."""
    bad = tmp_path / "module.py"
    bad.write_text('x = f"tasks.{r}"\ny = inst.name_of("status")\nz = "mpkv::worker"\nok = "status"\n')
    assert [s.split(":")[1] for s in _spellings(bad, tmp_path)] == ["1", "2", "3"]
