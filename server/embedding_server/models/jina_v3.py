"""jina-embeddings-v3: XLM-R with task LoRA adapters, mean pooling, Matryoshka.

The ONNX graph takes ``task_id`` (one value for the whole batch, so a run
cannot mix tasks) and returns token states ``text_embeds`` [B,T,1024]. The
reference ``encode()`` prepends a task instruction to every text and
mean-pools over all tokens, special tokens and instruction included.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelLoadError
from .base import RowRequest, TokenStatesModel, pooled_or_states
from .family import JINA_V3
from .limits import xlm_roberta_max_tokens
from .pooling import mean_pool
from .refusals import UnsupportedTask
from .tokenization import TextTokenizer
from .types import TASK_NAMES, ModelDescription, Output, SequenceVectors, Task

DEFAULT_TASK = Task.RETRIEVAL_QUERY
DEFAULT_MATRYOSHKA = (32, 64, 128, 256, 512, 768, 1024)


class JinaV3Model(TokenStatesModel):
    family = JINA_V3

    def _configure(self) -> None:
        config = self.files.config("config.json") or {}
        assert isinstance(config, dict)
        self._adapters: list[str] = list(config.get("lora_adaptations") or [])
        self._instructions: dict[str, str] = dict(config.get("task_instructions") or {})
        self._matryoshka = tuple(int(d) for d in config.get("matryoshka_dimensions") or DEFAULT_MATRYOSHKA)
        self._task_ids = {
            task: self._adapters.index(name) for task, name in TASK_NAMES.items() if name in self._adapters
        }
        if "task_id" not in self.signature.inputs:
            raise ModelLoadError(f"{self.files.onnx}: jina-v3 graph has no task_id input")
        # models.md: task_id is 0-d in the official export, [1] in others; read it.
        self._task_id_rank = len(self.signature.inputs["task_id"])
        self._output = self._pick_output()

    def _load_tokenizer(self) -> TextTokenizer:
        return TextTokenizer(self.files.path("tokenizer.json"), xlm_roberta_max_tokens(self.files))

    def _pick_output(self) -> str:
        if "text_embeds" in self.signature.outputs:
            return "text_embeds"
        rank3 = [name for name, shape in self.signature.outputs.items() if len(shape) == 3]
        if not rank3:
            raise ModelLoadError(f"{self.files.onnx}: no token-state output (text_embeds) in the graph")
        return rank3[0]

    def _describe(self) -> ModelDescription:
        width = self.signature.outputs[self._output][-1]
        config = self.files.config("config.json") or {}
        assert isinstance(config, dict)
        dimensions = width if isinstance(width, int) else int(config.get("hidden_size", 1024))
        return ModelDescription(
            name=self.name,
            family=self.family,
            dimensions=dimensions,
            max_tokens=self.tokenizer.max_tokens,
            tasks=tuple(sorted(self._task_ids)),
            outputs=(Output.DENSE, Output.BINARY),
            matryoshka_dimensions=tuple(d for d in self._matryoshka if d <= dimensions),
        )

    def resolve(self, task: Task) -> Task:
        return DEFAULT_TASK if task == Task.UNSPECIFIED else task

    def check_task(self, task: Task) -> None:
        if self.resolve(task) not in self._task_ids:
            raise UnsupportedTask(task.name, tuple(self._adapters))

    def prefix(self, task: Task) -> str:
        return self._instructions.get(TASK_NAMES[self.resolve(task)], "")

    def batch_key(self, task: Task) -> int:
        return self._task_ids[self.resolve(task)]

    def feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray, task: Task) -> dict[str, np.ndarray]:
        task_id = np.array(self.batch_key(task), dtype=np.int64)
        if self._task_id_rank == 1:
            task_id = task_id.reshape(1)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "task_id": task_id}

    def postprocess(
        self,
        outputs: dict[str, np.ndarray],
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        rows: list[RowRequest],
    ) -> list[SequenceVectors]:
        states = self.token_states(outputs)
        return pooled_or_states(states, mean_pool(states, attention_mask), rows)
