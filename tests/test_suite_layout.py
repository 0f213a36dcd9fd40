"""The suite's own layout (issue 22 item 7): test modules share nothing by importing each other.

Shared fixtures live in tests/conftest.py and shared helpers in tests/support/. A test module
that imports another one drags that module's fixtures in under names its tests then shadow, which
is what ruff's F811 ("redefinition of unused name") reports; silencing F811 hid that.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

TESTS = Path(__file__).resolve().parent
_TEST_MODULE = re.compile(r"test_\w+")
_NOQA = re.compile(r"noqa\s*:\s*(?P<codes>[A-Z]+[0-9]+(?:[\s,]+[A-Z]+[0-9]+)*)", re.IGNORECASE)
_IMPORTERS = {"import_module", "__import__"}


def _is_test_module(dotted: str) -> bool:
    """tests.test_x (or a name under it), tests.conftest, or a bare test_x (the rootdir on sys.path)."""
    parts = dotted.split(".")
    if parts[0] == "tests":
        return len(parts) > 1 and (_TEST_MODULE.fullmatch(parts[1]) is not None or parts[1] == "conftest")
    return _TEST_MODULE.fullmatch(parts[0]) is not None or parts[0] == "conftest"


def _package(path: Path) -> list[str]:
    return ["tests", *path.relative_to(TESTS).parent.parts]


def imported_test_modules(source: str, path: Path) -> list[str]:
    """``line: name`` for each import of a test module (or the conftest) in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            package = _package(path)
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if called in _IMPORTERS and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        elif isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "pytest_plugins" for t in node.targets
        ):
            names = [c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)]
        found += [
            f"{node.lineno}: {name}" for name in names if isinstance(name, str) and _is_test_module(name)
        ]
    return found


def f811_suppressions(source: str) -> list[str]:
    """``line: comment`` for each comment whose noqa codes include F811."""
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        for match in _NOQA.finditer(token.string):
            if "F811" in re.split(r"[\s,]+", match["codes"].upper()):
                found.append(f"{token.start[0]}: {token.string}")
    return found


def test_no_test_module_imports_another_and_no_f811_is_silenced():
    # The checks catch what they are for (else an empty result below would prove nothing).
    here = TESTS / "test_example.py"
    bad = "from tests.test_client import sentence  # noqa: F401,F811\nimport tests.test_batching\n"
    assert imported_test_modules(bad, here) == [
        "1: tests.test_client",
        "1: tests.test_client.sentence",
        "2: tests.test_batching",
    ]
    assert f811_suppressions(bad) == ["1: # noqa: F401,F811"]
    relative = "from .test_x import y\nfrom . import conftest\nfrom tests import test_y\n"
    assert imported_test_modules(relative, here) == [
        "1: tests.test_x",
        "1: tests.test_x.y",
        "2: tests.conftest",
        "3: tests.test_y",
    ]
    assert imported_test_modules('pytest_plugins = ["tests.test_x"]\n', here) == ["1: tests.test_x"]
    fine = 'from tests.support.texts import sentence  # noqa: F401\ntext = "# noqa: F811"\n'
    assert imported_test_modules(fine, here) == [] and f811_suppressions(fine) == []

    files = sorted(TESTS.rglob("*.py"))
    assert TESTS / "test_client.py" in files and TESTS / "conftest.py" in files
    problems = []
    for path in files:
        source = path.read_text()
        relative = path.relative_to(TESTS.parent).as_posix()
        problems += [
            f"{relative}:{hit} (import a test module)" for hit in imported_test_modules(source, path)
        ]
        problems += [f"{relative}:{hit} (F811 silenced)" for hit in f811_suppressions(source)]
    assert not problems, (
        "share fixtures through tests/conftest.py and helpers through tests/support/:\n" + "\n".join(problems)
    )
