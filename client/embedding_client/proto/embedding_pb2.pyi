from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_RETRIEVAL_QUERY: _ClassVar[Task]
    TASK_RETRIEVAL_PASSAGE: _ClassVar[Task]
    TASK_SEPARATION: _ClassVar[Task]
    TASK_CLASSIFICATION: _ClassVar[Task]
    TASK_TEXT_MATCHING: _ClassVar[Task]

class OutputType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTPUT_TYPE_UNSPECIFIED: _ClassVar[OutputType]
    OUTPUT_TYPE_DENSE: _ClassVar[OutputType]
    OUTPUT_TYPE_SPARSE: _ClassVar[OutputType]
    OUTPUT_TYPE_COLBERT: _ClassVar[OutputType]
    OUTPUT_TYPE_BINARY: _ClassVar[OutputType]

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_INTERACTIVE: _ClassVar[Priority]
    PRIORITY_BATCH: _ClassVar[Priority]
TASK_UNSPECIFIED: Task
TASK_RETRIEVAL_QUERY: Task
TASK_RETRIEVAL_PASSAGE: Task
TASK_SEPARATION: Task
TASK_CLASSIFICATION: Task
TASK_TEXT_MATCHING: Task
OUTPUT_TYPE_UNSPECIFIED: OutputType
OUTPUT_TYPE_DENSE: OutputType
OUTPUT_TYPE_SPARSE: OutputType
OUTPUT_TYPE_COLBERT: OutputType
OUTPUT_TYPE_BINARY: OutputType
PRIORITY_UNSPECIFIED: Priority
PRIORITY_INTERACTIVE: Priority
PRIORITY_BATCH: Priority

class EmbedRequest(_message.Message):
    __slots__ = ("request_id", "model", "inputs", "task", "dimensions", "late_chunking", "outputs", "truncate", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    LATE_CHUNKING_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    task: Task
    dimensions: int
    late_chunking: bool
    outputs: _containers.RepeatedScalarFieldContainer[OutputType]
    truncate: bool
    priority: Priority
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., task: _Optional[_Union[Task, str]] = ..., dimensions: _Optional[int] = ..., late_chunking: _Optional[bool] = ..., outputs: _Optional[_Iterable[_Union[OutputType, str]]] = ..., truncate: _Optional[bool] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("request_id", "model", "embeddings", "usage", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    usage: Usage
    error: _status_pb2.Status
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("index", "dense", "sparse", "colbert", "binary")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    COLBERT_FIELD_NUMBER: _ClassVar[int]
    BINARY_FIELD_NUMBER: _ClassVar[int]
    index: int
    dense: DenseVector
    sparse: SparseVector
    colbert: MultiVector
    binary: BinaryVector
    def __init__(self, index: _Optional[int] = ..., dense: _Optional[_Union[DenseVector, _Mapping]] = ..., sparse: _Optional[_Union[SparseVector, _Mapping]] = ..., colbert: _Optional[_Union[MultiVector, _Mapping]] = ..., binary: _Optional[_Union[BinaryVector, _Mapping]] = ...) -> None: ...

class DenseVector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class SparseVector(_message.Message):
    __slots__ = ("indices", "values")
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, indices: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class MultiVector(_message.Message):
    __slots__ = ("dimensions", "values")
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    dimensions: int
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, dimensions: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class BinaryVector(_message.Message):
    __slots__ = ("bits", "dimensions")
    BITS_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    bits: bytes
    dimensions: int
    def __init__(self, bits: _Optional[bytes] = ..., dimensions: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    total_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "dimensions", "max_tokens", "tasks", "outputs", "matryoshka_dimensions", "is_default", "max_document_tokens", "precision", "engine")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MATRYOSHKA_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    MAX_DOCUMENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    dimensions: int
    max_tokens: int
    tasks: _containers.RepeatedScalarFieldContainer[Task]
    outputs: _containers.RepeatedScalarFieldContainer[OutputType]
    matryoshka_dimensions: _containers.RepeatedScalarFieldContainer[int]
    is_default: bool
    max_document_tokens: int
    precision: str
    engine: str
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., dimensions: _Optional[int] = ..., max_tokens: _Optional[int] = ..., tasks: _Optional[_Iterable[_Union[Task, str]]] = ..., outputs: _Optional[_Iterable[_Union[OutputType, str]]] = ..., matryoshka_dimensions: _Optional[_Iterable[int]] = ..., is_default: _Optional[bool] = ..., max_document_tokens: _Optional[int] = ..., precision: _Optional[str] = ..., engine: _Optional[str] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("model", "inputs", "task")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    task: Task
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., task: _Optional[_Union[Task, str]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TokenizedInput]
    def __init__(self, results: _Optional[_Iterable[_Union[TokenizedInput, _Mapping]]] = ...) -> None: ...

class TokenizedInput(_message.Message):
    __slots__ = ("ids", "tokens")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...
