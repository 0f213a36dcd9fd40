"""Validating the JSON body of ``POST /v1/embeddings`` into an :class:`EmbeddingsRequest`.

Only shapes and types are checked here; the values (is the model served, is
``dimensions`` in range, is the input too long) are the gRPC server's to judge,
so the shim cannot disagree with it. Every failure is a 400 that names the
field; nothing a client sends can make this module raise anything else.

Rules also published in ``/openapi.json`` (see ``openapi.py``, built from the
tables below so the two cannot drift apart):

- unknown fields are refused (like OpenAI's API), so a typo such as
  ``dimension`` is not silently ignored;
- ``null`` means "not given" for every field except ``input``;
- ``embedding_type`` wins over ``encoding_format`` when both are given, because
  the ``openai`` client always sends ``encoding_format`` (``base64`` unless told).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embedding_client.enums import TASK_NAMES

from .errors import bad_request

#: REST task names (jina's adapter names) → embedding.v1.Task values: the client's one table.
TASKS: dict[str, int] = {name: int(task) for name, task in TASK_NAMES.items()}
#: REST priority names → embedding.v1.Priority values (absent: interactive, like Embed).
PRIORITIES: dict[str, int] = {"interactive": 1, "batch": 2}
ENCODING_FORMATS = ("float", "base64")
EMBEDDING_TYPES = ("float", "base64", "binary", "ubinary")
BOOL_FIELDS = ("late_chunking", "truncate", "return_dense", "return_sparse", "return_colbert")
STRING_FIELDS = ("model", "user")
UINT32_MAX = 2**32 - 1
#: Every accepted field; anything else is a 400 ``unknown_parameter``.
FIELDS = (
    "input",
    "model",
    "encoding_format",
    "dimensions",
    "user",
    "task",
    "embedding_type",
    "priority",
    *BOOL_FIELDS,
)

TOKEN_IDS_MESSAGE = (
    "input: token-id arrays are not supported; this server tokenizes text itself, so send the text "
    "as a string or an array of strings (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))"
)


@dataclass(frozen=True)
class EmbeddingsRequest:
    """A body that passed the shape checks; defaults filled in."""

    inputs: list[str]
    model: str = ""
    embedding_type: str = "float"  # float | base64 | binary | ubinary (encoding_format folded in)
    dimensions: int = 0
    task: int = 0
    late_chunking: bool = False
    truncate: bool | None = None  # absent: the server's default (--auto-truncate)
    return_dense: bool = True
    return_sparse: bool = False
    return_colbert: bool = False
    embedding_type_given: bool = False  # which field chose the dense kind, for error messages
    priority: int = PRIORITIES["interactive"]


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_inputs(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise bad_request(
            f"input: expected a string or an array of strings, got {_type_name(value)}",
            "input",
            "invalid_type",
        )
    if value and (_is_int(value[0]) or (isinstance(value[0], list) and all(map(_is_int, value[0])))):
        raise bad_request(TOKEN_IDS_MESSAGE, "input", "token_ids_not_supported")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise bad_request(
                f"input[{index}]: expected a string, got {_type_name(item)}", "input", "invalid_type"
            )
    return value


def _choice(body: dict[str, Any], field: str, choices: tuple[str, ...] | dict[str, int]) -> Any:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or value not in choices:
        shown = value if isinstance(value, str) else _type_name(value)
        raise bad_request(f"{field}: {shown!r} is not one of {', '.join(map(repr, choices))}", field)
    return value


def parse_body(body: object) -> EmbeddingsRequest:
    """Check the decoded JSON body; raises RestError (400) naming the first bad field."""
    if not isinstance(body, dict):
        raise bad_request(
            f"request body: expected a JSON object, got {_type_name(body)}", None, "invalid_type"
        )
    for field in body:
        if field not in FIELDS:
            raise bad_request(
                f"{field}: unknown parameter (accepted: {', '.join(FIELDS)})", field, "unknown_parameter"
            )
    if body.get("input") is None:
        raise bad_request("input: required, a string or an array of strings", "input", "missing_required")
    inputs = parse_inputs(body["input"])

    for field in STRING_FIELDS:
        value = body.get(field)
        if value is not None and not isinstance(value, str):
            raise bad_request(f"{field}: expected a string, got {_type_name(value)}", field, "invalid_type")
    flags: dict[str, bool] = {}
    for field in BOOL_FIELDS:
        value = body.get(field)
        if value is not None and not isinstance(value, bool):
            raise bad_request(
                f"{field}: expected true or false, got {_type_name(value)}", field, "invalid_type"
            )
        if value is not None:
            flags[field] = value

    dimensions = body.get("dimensions")
    if isinstance(dimensions, float) and dimensions.is_integer():
        dimensions = int(dimensions)  # JSON Schema's "integer" includes 8.0
    if dimensions is not None:
        if not _is_int(dimensions):
            raise bad_request(
                f"dimensions: expected an integer, got {_type_name(dimensions)}", "dimensions", "invalid_type"
            )
        if not 1 <= dimensions <= UINT32_MAX:
            raise bad_request(
                f"dimensions: {dimensions} must be a positive integer (leave it out for the full size)",
                "dimensions",
            )

    task = _choice(body, "task", TASKS)
    encoding_format = _choice(body, "encoding_format", ENCODING_FORMATS)
    embedding_type = _choice(body, "embedding_type", EMBEDDING_TYPES)
    priority = _choice(body, "priority", PRIORITIES)
    request = EmbeddingsRequest(
        inputs=inputs,
        model=body.get("model") or "",
        embedding_type=embedding_type or encoding_format or "float",
        dimensions=dimensions or 0,
        task=TASKS[task] if task else 0,
        embedding_type_given=embedding_type is not None,
        priority=PRIORITIES[priority or "interactive"],
        **flags,
    )
    if not (request.return_dense or request.return_sparse or request.return_colbert):
        raise bad_request(
            "return_dense: nothing to return; set one of return_dense, return_sparse, return_colbert",
            "return_dense",
        )
    return request
