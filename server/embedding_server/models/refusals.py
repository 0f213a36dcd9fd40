"""What a model cannot take, as facts about the input: the engine names the request's field.

The model layer knows tokens, tasks and chunks, not requests: these types carry
the numbers, and ``engine/validation.py`` ``model_refusals`` turns each into
the ``InvalidArgument`` (field, index, reason) the APIs map to a status.
"""

from __future__ import annotations


class ModelRefusal(Exception):
    """An input the model cannot run (not a fault of the model or the server)."""


class UnsupportedTask(ModelRefusal):
    def __init__(self, task_name: str, adapters: tuple[str, ...]) -> None:
        super().__init__(f"{task_name} is not one of this model's adapters {list(adapters)}")
        self.task_name = task_name
        self.adapters = adapters


class InputTooLong(ModelRefusal):
    def __init__(self, index: int, tokens: int, max_tokens: int) -> None:
        super().__init__(f"input {index}: {tokens} tokens, over {max_tokens}")
        self.index = index
        self.tokens = tokens
        self.max_tokens = max_tokens


class DocumentTooLong(ModelRefusal):
    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"the document has {tokens} tokens, over {limit}")
        self.tokens = tokens
        self.limit = limit


class EmptyChunk(ModelRefusal):
    def __init__(self, index: int) -> None:
        super().__init__(f"chunk {index} has no tokens of its own")
        self.index = index
