"""Every example in README.md runs as printed, or says which test covers it, so the README cannot drift.

The examples are the fenced blocks tagged ``sh``, ``bash``, ``console`` or ``python`` (``json``,
``text`` and untagged fences are prose: response shapes, the layout tree). Each one is, by the
line right above its opening fence (blank lines between are allowed):

- ``<!-- covered-by: tests/test_x.py::test_a [tests/test_y.py::test_b ...] -->``: the named tests
  check what the block does; here we check only that each named test exists.
- ``<!-- install-test: client|server ... -->``: tests/test_install.py runs the block as printed in
  a fresh virtual environment (it finds the block by this marker); here we check that it does.
- ``<!-- not-run: why -->``: the block cannot run here (a Docker engine, a cluster, the real
  Hugging Face hub, minutes of benchmark). Keep these few and honest.
- no marker: the block is RUN here. A block with no marker that does not run as printed fails.

How a block runs (the substitutions below are the only edits made to its text):

- One live server for the module (tests/support/server.py): gRPC and REST on free loopback ports,
  serving the built-in ``all-minilm-l6-v2`` (the default) and tiny synthetic models of the other
  families under the README's names ``jina-v3`` and ``bge-m3`` (tests/support/synthetic.py).
- ``localhost:50051`` becomes the live gRPC address and ``localhost:8000`` the live REST address;
  ``EMBEDDING_TARGET`` names the live server (for commands that use their default target) and
  ``PATH`` starts with the virtual environment's ``bin`` (``grpcurl``, ``embedding-*``).
- The working directory is a scratch directory holding the files the examples name
  (``corpus.txt``, ``ca.pem``) and ``.venv``, a link to the running environment.
- ``sh`` / ``bash``: the block runs with ``bash -euo pipefail`` and must exit 0.
- ``console``: each ``$ `` line (with ``\\`` continuations) runs in bash and must exit 0, unless
  its expected output starts with ``ERROR:`` (grpcurl's report of an error status). The lines after
  it, up to the next ``$``, are its expected output, compared with what it printed (stdout, then
  stderr) ignoring whitespace, ``...`` matching anything; a command with no lines after it is not
  compared.
- ``python``: the python blocks under one heading run in order in one interpreter, so a later block
  may use what an earlier one defined, as a reader would. First, ``PRELUDE`` defines the
  placeholders the README's fragments take as given: ``client`` (an ``EmbeddingClient`` on the live
  server), ``texts`` and ``chunks``; a block's own definitions replace them.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.certs import make_pki
from tests.support.server import RunningServer, start_server
from tests.support.synthetic import make_bge_m3_baai, make_jina_v3

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LANGUAGES = ("sh", "bash", "console", "python")
MARKER = re.compile(r"<!--\s*(covered-by|not-run|install-test):\s*(.*?)\s*-->")
GRPC_ADDRESS = "localhost:50051"
REST_ADDRESS = "localhost:8000"
TIMEOUT = 120  # seconds per block: far beyond what any example needs; reaching it is a hang

PRELUDE = """\
from embedding_client import EmbeddingClient

client = EmbeddingClient("localhost:50051")
texts = ["first text", "second text", "a third, somewhat longer text about embeddings"]
chunks = ["The Dutch East India Company was a trading company.", "It was founded in 1602."]
"""


@dataclass
class Block:
    language: str
    line: int  # 1-based line of the opening fence
    heading: str
    text: str
    marker: str | None = None  # "covered-by" | "not-run" | "install-test" | None (run)
    argument: str = ""


@dataclass
class Unit:
    """What one parametrized test runs: a shell or console block, or a heading's python blocks."""

    language: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def name(self) -> str:
        first = self.blocks[0]
        return f"L{first.line}-{self.language}"


def parse_blocks(markdown: str) -> list[Block]:
    """Every fenced block of the README's example languages, with its heading and marker."""
    blocks: list[Block] = []
    lines = markdown.splitlines()
    heading = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        fence = re.match(r"^(\s*)```(\S*)\s*$", line)
        if not fence:
            i += 1
            continue
        indent, language = fence.groups()
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise ValueError(f"README.md:{i + 1}: the fence is never closed")
        body = "\n".join(
            text[len(indent) :] if text.startswith(indent) else text for text in lines[i + 1 : end]
        )
        if language in LANGUAGES:
            block = Block(language, i + 1, heading, body + "\n")
            above = i - 1
            while above >= 0 and not lines[above].strip():
                above -= 1
            comment = lines[above].strip() if above >= 0 else ""
            if comment.startswith("<!--"):
                marker = MARKER.fullmatch(comment)
                if marker is None:
                    raise ValueError(f"README.md:{above + 1}: unknown marker {comment!r}")
                block.marker, block.argument = marker.groups()
            blocks.append(block)
        i = end + 1
    return blocks


def run_units(blocks: list[Block]) -> list[Unit]:
    units: list[Unit] = []
    python_by_heading: dict[str, Unit] = {}
    for block in blocks:
        if block.marker is not None:
            continue
        if block.language == "python":
            unit = python_by_heading.get(block.heading)
            if unit is None:
                unit = python_by_heading[block.heading] = Unit("python")
                units.append(unit)
            unit.blocks.append(block)
        else:
            units.append(Unit(block.language, [block]))
    return units


BLOCKS = parse_blocks(README.read_text())
UNITS = run_units(BLOCKS)


# --- what a console block expects --------------------------------------------------------------


@dataclass
class Command:
    command: str
    expected: str | None  # None: nothing shown after the command, so nothing to compare


def console_commands(text: str) -> list[Command]:
    commands: list[Command] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            if lines[i].strip():
                raise ValueError(f"console block: output before any command: {lines[i]!r}")
            i += 1
            continue
        command = [lines[i][2:]]
        while command[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            command.append(lines[i])
        i += 1
        output: list[str] = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        shown = "\n".join(output).strip()
        commands.append(Command("\n".join(command), shown or None))
    return commands


def output_matches(expected: str, actual: str) -> bool:
    """``actual`` is ``expected`` ignoring whitespace, where ``...`` stands for anything."""
    squeeze = "".join
    pieces = [re.escape(squeeze(part.split())) for part in expected.split("...")]
    return re.fullmatch(".*?".join(pieces), squeeze(actual.split()), re.DOTALL) is not None


def test_output_matching_can_fail():
    shown = '{ "status": "SERVING" }'
    assert output_matches(shown, '{\n  "status": "SERVING"\n}\n')
    assert not output_matches(shown, '{\n  "status": "NOT_SERVING"\n}\n')
    assert output_matches(
        '"values": [ -0.0904..., 0.04..., ... ]', '"values": [\n -0.09047618,\n 0.04, 1, 2\n]'
    )
    assert not output_matches('"values": [ -0.0904..., ... ]', '"values": [ 0.0904, 1 ]')
    assert not output_matches("a", "a b")  # the whole output, not a part of it


def test_console_commands_split_with_continuations_and_outputs():
    block = "$ one \\\n    --flag\nout 1\n\nout 2\n$ two\n"
    assert console_commands(block) == [Command("one \\\n    --flag", "out 1\n\nout 2"), Command("two", None)]


def test_parser_reads_markers_headings_and_languages():
    markdown = (
        "## A\n<!-- not-run: no engine -->\n\n```sh\ndocker build .\n```\n"
        "```json\n{}\n```\n### B\n<!-- covered-by: tests/x.py::test_y -->\n```python\nx = 1\n```\n"
        "```console\n$ ls\n```\n"
    )
    blocks = parse_blocks(markdown)
    assert [(b.language, b.heading, b.marker, b.argument) for b in blocks] == [
        ("sh", "A", "not-run", "no engine"),
        ("python", "B", "covered-by", "tests/x.py::test_y"),
        ("console", "B", None, ""),
    ]
    with pytest.raises(ValueError, match="unknown marker"):
        parse_blocks("<!-- skip: x -->\n```sh\nls\n```\n")


# --- markers -----------------------------------------------------------------------------------


def test_the_readme_has_examples_of_every_kind():
    """A parser that found nothing would pass everything: the README's kinds are all there."""
    assert {b.language for b in BLOCKS} >= {"sh", "console", "python"}
    assert {u.language for u in UNITS} >= {"sh", "console", "python"}
    assert len(UNITS) >= 8


def defined_tests(path: Path) -> set[str]:
    """``test_x`` and ``Class::test_x`` names defined in a test file."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {
                f"{node.name}::{item.name}"
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
            }
    return names


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.marker == "covered-by"], ids=lambda b: f"L{b.line}-{b.language}"
)
def test_covered_blocks_name_tests_that_exist(block: Block):
    node_ids = block.argument.split()
    assert node_ids, f"README.md:{block.line}: covered-by names no test"
    for node_id in node_ids:
        path, _, name = node_id.partition("::")
        assert (ROOT / path).is_file(), f"README.md:{block.line}: no test file {path}"
        assert name in defined_tests(ROOT / path), f"README.md:{block.line}: {path} has no test {name}"


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.marker == "install-test"], ids=lambda b: f"L{b.line}-{b.language}"
)
def test_install_blocks_are_run_by_the_install_test(block: Block):
    install_test = (ROOT / "tests" / "test_install.py").read_text()
    name = block.argument.split()[0]
    assert block.language == "sh", f"README.md:{block.line}: the install test runs sh blocks"
    runs = "install_by_readme" in install_test and f'"{name}"' in install_test
    assert runs, f"README.md:{block.line}: tests/test_install.py never installs by the {name!r} block"


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.marker == "not-run"], ids=lambda b: f"L{b.line}-{b.language}"
)
def test_not_run_blocks_say_why(block: Block):
    assert len(block.argument.split()) >= 3, f"README.md:{block.line}: say why the block cannot run"


# --- the live server and the scratch directory -------------------------------------------------


@dataclass
class Live:
    server: RunningServer
    workdir: Path
    env: dict[str, str]

    def substitute(self, text: str) -> str:
        return text.replace(GRPC_ADDRESS, self.server.target).replace(
            REST_ADDRESS, self.server.rest_url.removeprefix("http://")
        )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    models = tmp_path_factory.mktemp("models")
    make_jina_v3(models / "jina-v3")
    make_bge_m3_baai(models / "bge-m3")
    server = start_server(
        "--model",
        "all-minilm-l6-v2",
        "--model",
        f"jina-v3={models / 'jina-v3'}",
        "--model",
        f"bge-m3={models / 'bge-m3'}",
        # At the default --memory-limit: the two tiny models take a small share of it (model_shares).
        rest=True,
    )
    workdir = tmp_path_factory.mktemp("readme")
    (workdir / "corpus.txt").write_text("".join(f"line {i} of a small corpus\n" for i in range(100)))
    (workdir / "ca.pem").write_bytes(make_pki(tmp_path_factory.mktemp("pki")).ca.cert.read_bytes())
    (workdir / ".venv").symlink_to(Path(sys.executable).parent.parent)
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "EMBEDDING_TARGET": server.target,
    }
    try:
        yield Live(server, workdir, env)
    finally:
        server.stop()


def run(live: Live, command: list[str], where: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            command, cwd=live.workdir, env=live.env, capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"{where} did not finish in {TIMEOUT} s: a command that runs until stopped (a server) "
            "needs a not-run or covered-by marker"
        )


def run_bash(live: Live, script: str, where: str) -> subprocess.CompletedProcess[str]:
    return run(live, ["bash", "-euo", "pipefail", "-c", live.substitute(script)], where)


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_readme_example_runs_as_printed(live: Live, unit: Unit):
    where = ", ".join(f"README.md:{b.line}" for b in unit.blocks)
    if unit.language == "python":
        script = PRELUDE + "".join(f"\n# {where}\n{b.text}" for b in unit.blocks)
        result = run(live, [sys.executable, "-c", live.substitute(script)], where)
        assert result.returncode == 0, f"{where} failed:\n{result.stdout}\n{result.stderr}"
    elif unit.language == "console":
        commands = console_commands(unit.blocks[0].text)
        assert commands, f"{where}: a console block without a $ command"
        for command in commands:
            result = run_bash(live, command.command, where)
            shown = result.stdout + result.stderr
            failing = command.expected is not None and command.expected.startswith("ERROR:")
            assert (result.returncode != 0) == failing, f"{where}: $ {command.command}\n{shown}"
            if command.expected is not None:
                assert output_matches(command.expected, shown), (
                    f"{where}: $ {command.command}\nREADME shows:\n{command.expected}\nit printed:\n{shown}"
                )
    else:
        result = run_bash(live, unit.blocks[0].text, where)
        assert result.returncode == 0, f"{where} failed:\n{result.stdout}\n{result.stderr}"
