"""The REST shim's pure parts: body validation, JSON↔protobuf translation, error mapping, OpenAPI.

The translation tests build gRPC replies by hand (sparse and ColBERT included,
which the default model does not produce) and check the JSON against numbers
computed here with numpy, not by the code under test.
"""

from __future__ import annotations

import base64

import grpc
import jsonschema
import numpy as np
import orjson
import pytest
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.errors import Code, ServiceError
from embedding_server.grpc_api.status import to_rpc_status
from embedding_server.rest import errors, openapi, schema, translate
from embedding_server.rest.errors import RestError
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# --- schema -------------------------------------------------------------------------------------


def parse(**body: object) -> schema.EmbeddingsRequest:
    return schema.parse_body(body)


def refused(body: object) -> RestError:
    with pytest.raises(RestError) as caught:
        schema.parse_body(body)
    assert caught.value.status == 400
    return caught.value


def test_string_input_becomes_one_input():
    assert parse(input="hello").inputs == ["hello"]
    assert parse(input=["a", "b"]).inputs == ["a", "b"]


def test_defaults_and_null_mean_absent():
    request = parse(input="x", model=None, dimensions=None, task=None, encoding_format=None, user=None)
    assert (request.model, request.dimensions, request.task, request.embedding_type) == ("", 0, 0, "float")
    assert (request.return_dense, request.return_sparse, request.return_colbert) == (True, False, False)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ([1, 2], None, "invalid_type"),
        ({}, "input", "missing_required"),
        ({"input": None}, "input", "missing_required"),
        ({"input": 3}, "input", "invalid_type"),
        ({"input": [1, 2, 3]}, "input", "token_ids_not_supported"),
        ({"input": [[1, 2], [3]]}, "input", "token_ids_not_supported"),
        ({"input": ["a", 2]}, "input", "invalid_type"),
        ({"input": "a", "dimensions": "8"}, "dimensions", "invalid_type"),
        ({"input": "a", "dimensions": 8.5}, "dimensions", "invalid_type"),
        ({"input": "a", "dimensions": True}, "dimensions", "invalid_type"),
        ({"input": "a", "dimensions": 0}, "dimensions", "invalid_value"),
        ({"input": "a", "dimensions": 2**32}, "dimensions", "invalid_value"),
        ({"input": "a", "encoding_format": "hex"}, "encoding_format", "invalid_value"),
        ({"input": "a", "embedding_type": "int4"}, "embedding_type", "invalid_value"),
        ({"input": "a", "task": "query"}, "task", "invalid_value"),
        ({"input": "a", "task": 1}, "task", "invalid_value"),
        ({"input": "a", "model": 7}, "model", "invalid_type"),
        ({"input": "a", "user": ["u"]}, "user", "invalid_type"),
        ({"input": "a", "truncate": "yes"}, "truncate", "invalid_type"),
        ({"input": "a", "late_chunking": 1}, "late_chunking", "invalid_type"),
        ({"input": "a", "dimension": 8}, "dimension", "unknown_parameter"),
        ({"input": "a", "return_dense": False}, "return_dense", "invalid_value"),
    ],
)
def test_bad_bodies_name_the_field(body, param, code):
    error = refused(body)
    assert (error.param, error.code) == (param, code)
    if param:
        assert error.message.startswith(param)


def test_token_ids_message_says_text_is_required():
    message = refused({"input": [101, 2023]}).message
    assert "token-id arrays are not supported" in message and "string" in message


def test_embedding_type_wins_over_encoding_format():
    assert parse(input="a", encoding_format="base64").embedding_type == "base64"
    request = parse(input="a", encoding_format="base64", embedding_type="ubinary")
    assert request.embedding_type == "ubinary" and request.embedding_type_given


def test_task_names_map_to_proto_enum():
    for name, value in schema.TASKS.items():
        assert parse(input="a", task=name).task == value
        assert pb.Task.Name(value) == "TASK_" + name.upper().replace(".", "_").replace("-", "_")


# --- translation: request -----------------------------------------------------------------------


def test_request_maps_every_field():
    request = parse(
        input=["a", "b"],
        model="m",
        dimensions=64,
        task="retrieval.passage",
        late_chunking=True,
        truncate=True,
        embedding_type="binary",
        return_sparse=True,
        return_colbert=True,
    )
    message, fields = translate.to_embed_request(request)
    assert list(message.inputs) == ["a", "b"] and message.model == "m"
    assert message.dimensions == 64 and message.task == pb.TASK_RETRIEVAL_PASSAGE
    assert message.late_chunking and message.truncate
    assert list(message.outputs) == [pb.OUTPUT_TYPE_BINARY, pb.OUTPUT_TYPE_SPARSE, pb.OUTPUT_TYPE_COLBERT]
    assert fields == ["embedding_type", "return_sparse", "return_colbert"]


def test_request_without_dense():
    message, fields = translate.to_embed_request(parse(input="a", return_dense=False, return_sparse=True))
    assert list(message.outputs) == [pb.OUTPUT_TYPE_SPARSE] and fields == ["return_sparse"]


def test_lone_surrogate_is_a_400_not_a_crash():
    with pytest.raises(RestError) as caught:
        translate.to_embed_request(parse(input=["ok", "bad \ud800"]))
    assert caught.value.status == 400 and caught.value.param == "input"


# --- translation: response ----------------------------------------------------------------------


def roundtrip(response: pb.EmbedResponse, request: schema.EmbeddingsRequest) -> dict:
    """Through orjson as the app sends it, and back."""
    body = translate.to_embeddings_response(response, request)
    return orjson.loads(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))


def test_dense_float_and_base64_are_the_float32_values():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2, 5)).astype(np.float32)
    response = pb.EmbedResponse(
        model="m",
        embeddings=[pb.Embedding(index=i, dense=pb.DenseVector(values=v)) for i, v in enumerate(vectors)],
        usage=pb.Usage(prompt_tokens=7, total_tokens=7),
    )
    floats = roundtrip(response, parse(input=["a", "b"]))
    assert floats["object"] == "list" and floats["model"] == "m"
    assert floats["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [item["index"] for item in floats["data"]] == [0, 1]
    assert all(item["object"] == "embedding" for item in floats["data"])
    assert np.array_equal(np.array([item["embedding"] for item in floats["data"]], dtype=np.float32), vectors)

    encoded = roundtrip(response, parse(input=["a", "b"], encoding_format="base64"))
    for item, vector in zip(encoded["data"], vectors, strict=True):
        raw = base64.b64decode(item["embedding"])
        assert raw == vector.astype("<f4").tobytes()  # little-endian float32, as the openai client reads it


def test_binary_as_int8_and_uint8():
    dense = np.array([0.5, -1, 2, -3, 0.1, 0.2, -0.3, 0.4, -0.9, 1.0], dtype=np.float32)
    bits = np.packbits(dense > 0)  # MSB first
    response = pb.EmbedResponse(
        embeddings=[pb.Embedding(index=0, binary=pb.BinaryVector(bits=bits.tobytes(), dimensions=10))]
    )
    unsigned = roundtrip(response, parse(input="a", embedding_type="ubinary"))["data"][0]["embedding"]
    signed = roundtrip(response, parse(input="a", embedding_type="binary"))["data"][0]["embedding"]
    assert unsigned == [int(b) for b in bits] == [0b10101101, 0b01000000]
    assert signed == [b - 256 if b > 127 else b for b in unsigned]


def test_sparse_and_colbert_items():
    colbert = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    response = pb.EmbedResponse(
        model="bge",
        embeddings=[
            pb.Embedding(index=0, dense=pb.DenseVector(values=[0.6, 0.8])),
            pb.Embedding(index=0, sparse=pb.SparseVector(indices=[5, 900], values=[0.25, 0.5])),
            pb.Embedding(index=0, colbert=pb.MultiVector(dimensions=4, values=colbert.ravel().tolist())),
            pb.Embedding(index=1, dense=pb.DenseVector(values=[1.0, 0.0])),
            pb.Embedding(index=1, sparse=pb.SparseVector()),
            pb.Embedding(index=1, colbert=pb.MultiVector(dimensions=4, values=colbert[:1].ravel().tolist())),
        ],
    )
    data = roundtrip(response, parse(input=["a", "b"], return_sparse=True, return_colbert=True))["data"]
    assert len(data) == 2
    assert data[0]["sparse_embedding"] == {"5": 0.25, "900": 0.5}
    assert data[1]["sparse_embedding"] == {}
    assert np.allclose(data[0]["colbert_embedding"], colbert) and len(data[0]["colbert_embedding"]) == 3
    assert np.allclose(data[1]["colbert_embedding"], colbert[:1])
    assert np.allclose(data[0]["embedding"], [0.6, 0.8])


def test_sparse_only_item_has_no_dense_field():
    response = pb.EmbedResponse(
        embeddings=[pb.Embedding(index=0, sparse=pb.SparseVector(indices=[3], values=[1.5]))]
    )
    item = roundtrip(response, parse(input="a", return_dense=False, return_sparse=True))["data"][0]
    assert "embedding" not in item and item["sparse_embedding"] == {"3": 1.5}


def test_models_list_shape():
    response = pb.ListModelsResponse(
        models=[
            pb.ModelInfo(
                name="jina",
                family="jina-v3",
                dimensions=1024,
                max_tokens=8192,
                tasks=[pb.TASK_RETRIEVAL_QUERY, pb.TASK_TEXT_MATCHING],
                outputs=[pb.OUTPUT_TYPE_DENSE, pb.OUTPUT_TYPE_BINARY],
                matryoshka_dimensions=[32, 64],
                is_default=True,
            )
        ]
    )
    [model] = translate.to_models_response(response)["data"]
    assert model["id"] == "jina" and model["object"] == "model"
    assert model["tasks"] == ["retrieval.query", "text-matching"]
    assert model["outputs"] == ["dense", "binary"]
    assert model["matryoshka_dimensions"] == [32, 64] and model["is_default"] is True


INVALID = grpc.StatusCode.INVALID_ARGUMENT

# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_grpc_code_to_http_status(code, status):
    error = errors.from_grpc(service_status(code, "something", reason="SOME_REASON"))
    assert error.status == status
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}


def service_status(
    code: grpc.StatusCode,
    message: str,
    reason: str | None = None,
    field: str | None = None,
    index: int | None = None,
) -> status_pb2.Status:
    """A status as the server sends it (grpc_api/status.py), or without details when ``reason`` is None."""
    if reason is None:
        return status_pb2.Status(code=code.value[0], message=message)
    error = ServiceError(message, reason=reason, field=field, index=index)
    error.code = Code[code.name]  # type: ignore[misc]  # one instance of any status code
    return to_rpc_status(error, request_id="r")


def test_not_found_is_model_not_found():
    error = errors.from_grpc(service_status(grpc.StatusCode.NOT_FOUND, "whatever", "UNKNOWN_MODEL", "model"))
    assert (error.status, error.code, error.param) == (404, "model_not_found", "model")


def test_resource_exhausted_without_service_details_is_413():
    """gRPC's own size limit sends no ErrorInfo; the service's QUEUE_FULL does (429)."""
    error = errors.from_grpc(service_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "any words at all"))
    assert error.status == 413
    error = errors.from_grpc(
        service_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max", "QUEUE_FULL")
    )
    assert error.status == 429


@pytest.mark.parametrize(
    "message",
    ["inputs[3]: must not be empty", "a wording nobody parses", "outputs[1]: inputs[3]: dimensions:", ""],
)
def test_rest_param_comes_from_the_details_not_the_message(message):
    error = errors.from_grpc(service_status(INVALID, message, "EMPTY_INPUT", "inputs", 3))
    assert (error.param, error.code) == ("input", "invalid_value")
    error = errors.from_grpc(
        service_status(INVALID, message, "UNSUPPORTED_OUTPUT", "outputs", 1),
        ["return_dense", "return_sparse"],
    )
    assert error.param == "return_sparse"
    error = errors.from_grpc(service_status(INVALID, message, "BAD_DIMENSIONS", "dimensions"))
    assert error.param == "dimensions"
    error = errors.from_grpc(service_status(INVALID, message, "INPUT_TOO_LONG", "inputs", 0))
    assert (error.param, error.code) == ("input", "context_length_exceeded")
    error = errors.from_grpc(service_status(INVALID, message))  # no details: no param, whatever the text
    assert error.param is None and error.message == (message or "INVALID_ARGUMENT")


def test_grpc_field_names_become_rest_names():
    error = errors.from_grpc(
        service_status(INVALID, "inputs[3]: must not be empty", "EMPTY_INPUT", "inputs", 3)
    )
    assert (error.message, error.param) == ("input[3]: must not be empty", "input")
    error = errors.from_grpc(
        service_status(INVALID, "outputs[1]: model m does not produce X", "UNSUPPORTED_OUTPUT", "outputs", 1),
        ["return_dense", "return_sparse"],
    )
    assert error.param == "return_sparse" and error.message.startswith("return_sparse:")
    error = errors.from_grpc(
        service_status(INVALID, "dimensions: 9999 is out of range", "BAD_DIMENSIONS", "dimensions")
    )
    assert error.param == "dimensions" and error.message.startswith("dimensions:")


# --- OpenAPI matches the validation -------------------------------------------------------------

REQUEST_SCHEMA = openapi.request_schema()
VALIDATOR = jsonschema.Draft202012Validator(REQUEST_SCHEMA)


def test_openapi_lists_exactly_the_accepted_fields():
    assert tuple(REQUEST_SCHEMA["properties"]) == schema.FIELDS
    assert REQUEST_SCHEMA["required"] == ["input"] and REQUEST_SCHEMA["additionalProperties"] is False
    jsonschema.Draft202012Validator.check_schema(REQUEST_SCHEMA)
    document = openapi.document(auth=True)
    assert document["components"]["schemas"]["EmbeddingsRequest"] == REQUEST_SCHEMA
    assert document["paths"]["/health"]["get"]["security"] == []
    assert "security" not in openapi.document(auth=False)


def _sample_values(prop: dict) -> list[object]:
    """Valid values for one property, read from its schema (every enum member, both booleans, bounds)."""
    types = prop.get("type", [])
    if "enum" in prop:
        return list(prop["enum"])
    if "boolean" in types:
        return [True, False, None]
    if "integer" in types:
        return [prop["minimum"], prop["maximum"], None]
    if "string" in types:
        return ["x", "", None]
    return ["text", ["a", "b"], []]  # input


@pytest.mark.parametrize("field", schema.FIELDS)
def test_every_documented_value_is_accepted(field):
    prop = REQUEST_SCHEMA["properties"][field]
    for value in _sample_values(prop):
        body = {"input": "a", field: value}
        if field == "return_dense" and value is False:
            body["return_sparse"] = True  # something must be returned (a value rule, documented)
        VALIDATOR.validate(body)
        schema.parse_body(body)


JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
JSON_SCALARS |= st.text()
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
FIELD_VALUES = {
    "input": st.text() | st.lists(st.text(), max_size=3) | JSON_VALUES,
    "dimensions": st.integers(-2, 2**33) | JSON_VALUES,
    "encoding_format": st.sampled_from([*schema.ENCODING_FORMATS, "hex"]) | JSON_VALUES,
    "embedding_type": st.sampled_from([*schema.EMBEDDING_TYPES, "int8"]) | JSON_VALUES,
    "task": st.sampled_from([*schema.TASKS, "query"]) | JSON_VALUES,
}
BODIES = st.lists(st.sampled_from([*schema.FIELDS, "foo", "dimension"]), unique=True, max_size=6).flatmap(
    lambda keys: st.fixed_dictionaries({key: FIELD_VALUES.get(key, JSON_VALUES) for key in keys})
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BODIES)
def test_schema_and_validation_agree_on_any_body(body):
    """Valid per /openapi.json ⇔ accepted by the shim (except the documented 'nothing to return' rule)."""
    schema_valid = VALIDATOR.is_valid(body)
    try:
        schema.parse_body(body)
        accepted = True
    except RestError as error:
        assert error.status == 400 and error.message
        accepted = False
        if schema_valid:
            assert error.param == "return_dense", error.message
            return
    assert accepted == schema_valid, body
