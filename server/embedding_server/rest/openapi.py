"""The OpenAPI 3.1 document served at ``/openapi.json``.

Written by hand for readability, but every list of names and choices comes
from ``schema.py``, the module that validates requests, so the document says
exactly what the shim accepts (a test checks each property both ways).
"""

from __future__ import annotations

from typing import Any

from .schema import BOOL_FIELDS, EMBEDDING_TYPES, ENCODING_FORMATS, FIELDS, PRIORITIES, TASKS, UINT32_MAX

ERROR_STATUSES = {
    "400": "Invalid JSON, a wrong type, an unknown field, token ids, or a value the model refuses",
    "401": "Auth is on and the bearer key is missing or wrong",
    "404": "Unknown model (code model_not_found)",
    "413": "Body over the size limit",
    "429": "The server's queue is full; retry later",
    "503": "The server is starting up or shutting down",
    "504": "The request expired in the server's queue",
}

_BOOL_DOCS = {
    "late_chunking": "Treat the inputs as consecutive chunks of one document: one vector per chunk, pooled "
    "from token states that saw the whole document (a document longer than the model's window runs as "
    "overlapping windows, up to the model's `max_document_tokens`; models with token states only).",
    "truncate": "Cut an input longer than the model's window instead of refusing it. Absent: the server's "
    "default (refuse, unless it was started with --auto-truncate).",
    "return_dense": "Return the dense vector in `embedding` (default true).",
    "return_sparse": "Also return lexical weights in `sparse_embedding` (bge-m3).",
    "return_colbert": "Also return one vector per token in `colbert_embedding` (bge-m3).",
}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "type": [schema["type"], "null"]}


def request_schema() -> dict[str, Any]:
    properties: dict[str, Any] = {
        "input": {
            "description": "A text or an array of texts. Token-id arrays are refused with 400: the server "
            "tokenizes text itself.",
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
            ],
        },
        "model": _nullable(
            {"type": "string", "description": "A served model; empty or absent: the default."}
        ),
        "encoding_format": _nullable(
            {
                "type": "string",
                "enum": [*ENCODING_FORMATS, None],
                "default": "float",
                "description": "`base64`: little-endian float32 bytes, base64-encoded (the openai client's "
                "default). Ignored when `embedding_type` is given.",
            }
        ),
        "dimensions": _nullable(
            {
                "type": "integer",
                "minimum": 1,
                "maximum": UINT32_MAX,
                "description": "Matryoshka size: truncate, then normalize. Absent: full size.",
            }
        ),
        "user": _nullable({"type": "string", "description": "Accepted and ignored."}),
        "task": _nullable(
            {
                "type": "string",
                "enum": [*TASKS, None],
                "description": "The task adapter (jina-v3); models without tasks ignore it.",
            }
        ),
        "embedding_type": _nullable(
            {
                "type": "string",
                "enum": [*EMBEDDING_TYPES, None],
                "description": "`binary` / `ubinary`: sign bits packed MSB first, as int8 / uint8 arrays. "
                "Wins over `encoding_format`.",
            }
        ),
        "priority": _nullable(
            {
                "type": "string",
                "enum": [*PRIORITIES, None],
                "default": "interactive",
                "description": "`interactive` (queries) runs ahead of `batch` (bulk indexing), which is "
                "shared fairly between clients.",
            }
        ),
    }
    for field in BOOL_FIELDS:
        properties[field] = _nullable({"type": "boolean", "description": _BOOL_DOCS[field]})
    assert tuple(properties) == FIELDS, "openapi.py and schema.py disagree on the fields"
    return {
        "type": "object",
        "required": ["input"],
        "additionalProperties": False,
        "description": "Unknown fields are refused (400, code unknown_parameter). `null` means not given.",
        "properties": properties,
    }


def _response_schemas() -> dict[str, Any]:
    number_array = {"type": "array", "items": {"type": "number"}}
    return {
        "Embedding": {
            "type": "object",
            "required": ["object", "index"],
            "properties": {
                "object": {"const": "embedding"},
                "index": {"type": "integer"},
                "embedding": {
                    "description": "float: numbers; base64: a string; binary/ubinary: int8/uint8 integers. "
                    "Absent when return_dense is false.",
                    "oneOf": [
                        number_array,
                        {"type": "string"},
                        {"type": "array", "items": {"type": "integer"}},
                    ],
                },
                "sparse_embedding": {"type": "object", "additionalProperties": {"type": "number"}},
                "colbert_embedding": {"type": "array", "items": number_array},
            },
        },
        "EmbeddingsResponse": {
            "type": "object",
            "required": ["object", "data", "model", "usage"],
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": {"$ref": "#/components/schemas/Embedding"}},
                "model": {"type": "string"},
                "usage": {
                    "type": "object",
                    "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}},
                },
            },
        },
        "ModelList": {
            "type": "object",
            "properties": {
                "object": {"const": "list"},
                "data": {"type": "array", "items": {"type": "object"}},
            },
        },
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["message", "type", "param", "code"],
                    "properties": {
                        "message": {"type": "string"},
                        "type": {"type": "string"},
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                }
            },
        },
    }


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def document(auth: bool) -> dict[str, Any]:
    """The document; ``auth``: whether bearer keys are required (all but /health and this document)."""
    errors = {status: _json("Error", text) for status, text in ERROR_STATUSES.items()}
    embeddings = {
        "summary": "Create embeddings (OpenAI-compatible)",
        "operationId": "createEmbedding",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingsRequest"}}},
        },
        "responses": {"200": _json("EmbeddingsResponse", "The embeddings, in input order"), **errors},
    }
    models = {
        "summary": "List the served models",
        "operationId": "listModels",
        "responses": {
            "200": _json("ModelList", "The models"),
            "401": errors["401"],
            "503": errors["503"],
        },
    }
    health = {
        "summary": "Readiness: 200 when serving, 503 while starting or draining (no auth)",
        "operationId": "health",
        "security": [],
        "responses": {"200": {"description": "Serving"}, "503": {"description": "Not serving"}},
    }
    spec_route = {
        "summary": "This document (no auth)",
        "operationId": "openapi",
        "security": [],
        "responses": {"200": {"description": "OpenAPI 3.1"}},
    }
    schemas = {"EmbeddingsRequest": request_schema(), **_response_schemas()}
    security: dict[str, list[dict[str, list[str]]]] = {"security": [{"bearer": []}]} if auth else {}
    return {
        "openapi": "3.1.0",
        "info": {"title": "embedding-server REST shim", "version": "1"},
        "paths": {
            "/v1/embeddings": {"post": embeddings},
            "/embeddings": {"post": {**embeddings, "operationId": "createEmbeddingAlias"}},
            "/v1/models": {"get": models},
            "/models": {"get": {**models, "operationId": "listModelsAlias"}},
            "/health": {"get": health},
            "/openapi.json": {"get": spec_route},
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        **security,
    }
