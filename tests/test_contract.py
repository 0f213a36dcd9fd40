"""The gRPC contract: lint-clean, generated code fresh, and every public name exactly as specified.

The block of the project's contract (docs/contract.md, the repository's copy of the spec) is
parsed and compared with the descriptor of the generated code, so a renamed, renumbered or
retyped field fails here.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from embedding_client.proto import embedding_pb2
from google.protobuf.descriptor import FieldDescriptor

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "protos" / "embedding" / "v1" / "embedding.proto"
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
PACKAGE = "embedding.v1"
CONTRACT_DOC = ROOT / "docs" / "contract.md"
NOT_PROTO = shutil.ignore_patterns("*.py", "__pycache__")


def contract_block() -> str:
    """The first fenced block of docs/contract.md: the service, enums and messages."""
    text = CONTRACT_DOC.read_text()
    match = re.search(r"```\n(service EmbeddingService.*?)```", text, re.S)
    assert match, f"{CONTRACT_DOC}: no fenced block starting with the service"
    return match.group(1)


SCALARS = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_DOUBLE: "double",
}


# --- a parser for the contract's proto subset --------------------------------------------


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    number: int
    repeated: bool
    oneof: str | None


@dataclass
class Contract:
    rpcs: dict[str, tuple[str, bool, str, bool]]  # name -> (input, client streams, output, server streams)
    enums: dict[str, dict[str, int]]
    messages: dict[str, dict[str, Field]]


def parse_contract(text: str) -> Contract:
    text = re.sub(r"//[^\n]*", "", text)
    tokens = re.findall(r"[A-Za-z_][\w.]*|\d+|[{}=;()]", text)
    contract = Contract({}, {}, {})
    pos = 0

    def take(expected: str | None = None) -> str:
        nonlocal pos
        token = tokens[pos]
        pos += 1
        if expected is not None and token != expected:
            raise ValueError(f"expected {expected!r}, got {token!r} at token {pos}")
        return token

    def fields_until_close(message: dict[str, Field], oneof: str | None) -> None:
        while tokens[pos] != "}":
            if tokens[pos] == "oneof":
                take("oneof")
                name = take()
                take("{")
                fields_until_close(message, name)
                continue
            repeated = tokens[pos] == "repeated"
            if repeated:
                take()
            kind, name = take(), take()
            take("=")
            number = int(take())
            take(";")
            message[name] = Field(name, kind, number, repeated, oneof)
        take("}")

    while pos < len(tokens):
        keyword, name = take(), take()
        take("{")
        if keyword == "service":
            while tokens[pos] == "rpc":
                take("rpc")
                rpc = take()
                take("(")
                in_stream = tokens[pos] == "stream" and bool(take())
                request = take()
                take(")")
                take("returns")
                take("(")
                out_stream = tokens[pos] == "stream" and bool(take())
                response = take()
                take(")")
                take(";")
                contract.rpcs[rpc] = (request, in_stream, response, out_stream)
            take("}")
        elif keyword == "enum":
            values: dict[str, int] = {}
            while tokens[pos] != "}":
                value = take()
                take("=")
                values[value] = int(take())
                take(";")
            take("}")
            contract.enums[name] = values
        elif keyword == "message":
            contract.messages[name] = {}
            fields_until_close(contract.messages[name], None)
        else:
            raise ValueError(f"unexpected {keyword!r}")
    return contract


def full_name(kind: str) -> str:
    return kind if "." in kind else f"{PACKAGE}.{kind}"


def field_type(field: FieldDescriptor) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return field.message_type.full_name
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.full_name
    return SCALARS[field.type]


@pytest.fixture(scope="module")
def contract() -> Contract:
    return parse_contract(contract_block())


# --- the descriptor against the contract -----------------------------------------------


def test_parser_reads_the_whole_contract(contract):
    assert len(contract.rpcs) == 4
    assert set(contract.enums) == {"Task", "OutputType", "Priority"}
    assert len(contract.messages) == 14
    assert contract.messages["Embedding"]["binary"] == Field("binary", "BinaryVector", 5, False, "vector")


def test_package_and_service(contract):
    assert embedding_pb2.DESCRIPTOR.package == PACKAGE
    assert embedding_pb2.DESCRIPTOR.name == "embedding/v1/embedding.proto"
    service = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"]
    assert service.full_name == "embedding.v1.EmbeddingService"
    methods = {m.name: m for m in service.methods}
    assert set(methods) == set(contract.rpcs)
    for name, (request, in_stream, response, out_stream) in contract.rpcs.items():
        method = methods[name]
        assert method.input_type.full_name == full_name(request), name
        assert method.output_type.full_name == full_name(response), name
        assert method.client_streaming == in_stream, name
        assert method.server_streaming == out_stream, name


def test_enums(contract):
    for name, values in contract.enums.items():
        enum = embedding_pb2.DESCRIPTOR.enum_types_by_name[name]
        assert {v.name: v.number for v in enum.values} == values, name


def test_messages(contract):
    for name, fields in contract.messages.items():
        message = embedding_pb2.DESCRIPTOR.message_types_by_name[name]
        actual = message.fields_by_name
        for field in fields.values():
            assert field.name in actual, f"{name}.{field.name} is missing"
            descriptor = actual[field.name]
            where = f"{name}.{field.name}"
            assert descriptor.number == field.number, where
            assert descriptor.is_repeated == field.repeated, where
            expected = field.type if field.type in SCALARS.values() else full_name(field.type)
            assert field_type(descriptor) == expected, where
            oneof = descriptor.containing_oneof
            assert (oneof.name if oneof else None) == field.oneof, where
        # Fields may be added, but never on a number the contract uses for another field.
        numbers = {f.number: f.name for f in fields.values()}
        for descriptor in message.fields:
            assert numbers.get(descriptor.number, descriptor.name) == descriptor.name, (
                f"{name}: reused number"
            )


def test_contract_check_catches_a_renamed_field(contract):
    """The comparison above is not vacuous: a parsed variant with one change is told apart."""
    changed = parse_contract(contract_block().replace("uint32 dimensions = 5;", "uint32 dims = 5;"))
    assert "dims" in changed.messages["EmbedRequest"]
    assert "dims" not in embedding_pb2.EmbedRequest.DESCRIPTOR.fields_by_name


# --- buf lint ------------------------------------------------------------------------------


def buf_lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    if not BUF.exists():
        pytest.fail(f"{BUF} is missing: run `make setup` (npm install @bufbuild/buf)")
    return subprocess.run([str(BUF), "lint"], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_buf_lint_is_clean():
    result = buf_lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_can_fail(tmp_path):
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(
        ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("*.py", "__pycache__")
    )
    proto = tmp_path / "protos" / "embedding" / "v1" / "embedding.proto"
    proto.write_text(proto.read_text().replace("string request_id = 1;", "string requestId = 1;", 1))
    result = buf_lint(tmp_path)
    assert result.returncode != 0
    assert "requestId" in result.stdout + result.stderr


# --- generated code freshness ----------------------------------------------------------------


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "protos_generate_under_test", ROOT / "protos" / "generate.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_not_stale():
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def run_check(generator: ModuleType, monkeypatch: pytest.MonkeyPatch, protos: Path, target: Path) -> int:
    monkeypatch.setattr(generator, "PROTO_ROOT", protos)
    monkeypatch.setattr(generator, "TARGET", target)
    monkeypatch.setattr(sys, "argv", ["generate.py", "--check"])
    return generator.main()


def test_stale_check_can_fail(tmp_path, monkeypatch):
    """The same --check, pointed at a copy of the proto with one more field, reports stale code."""
    generator = load_generator()
    protos = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", protos, ignore=NOT_PROTO)
    target = tmp_path / "generated"
    shutil.copytree(generator.TARGET, target, ignore=shutil.ignore_patterns("__pycache__"))

    assert run_check(generator, monkeypatch, protos, target) == 0  # an unchanged copy is fresh

    proto = protos / "embedding" / "v1" / "embedding.proto"
    text = proto.read_text()
    marker = "  bool truncate = 8;\n"
    assert marker in text
    proto.write_text(text.replace(marker, marker + "  bool extra_field_for_the_test = 99;\n", 1))
    assert run_check(generator, monkeypatch, protos, target) == 1

    generator.generate(target)  # regenerating makes it fresh again
    assert run_check(generator, monkeypatch, protos, target) == 0
    assert "extra_field_for_the_test" in (target / "embedding_pb2.pyi").read_text()
