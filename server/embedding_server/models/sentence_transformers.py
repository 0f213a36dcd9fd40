"""sentence-transformers models exported to ONNX (BERT-like, e.g. all-MiniLM-L6-v2).

Pooling comes from ``1_Pooling/config.json``, normalization from a Normalize
module in ``modules.json``, the max length from ``sentence_bert_config.json``.
A model whose ``config_sentence_transformers.json`` has ``query`` / ``passage``
prompts maps the two retrieval tasks to them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import ModelLoadError
from .base import RowRequest, TokenStatesModel, pooled_or_states
from .family import SENTENCE_TRANSFORMERS
from .limits import sentence_transformers_max_tokens
from .pooling import cls_pool, max_pool, mean_pool, mean_sqrt_len_pool
from .tokenization import TextTokenizer
from .types import ModelDescription, Output, SequenceVectors, Task

TOKEN_STATE_OUTPUTS = ("last_hidden_state", "token_embeddings")
POOLING_MODES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "pooling_mode_cls_token": cls_pool,
    "pooling_mode_mean_tokens": mean_pool,
    "pooling_mode_max_tokens": max_pool,
    "pooling_mode_mean_sqrt_len_tokens": mean_sqrt_len_pool,
}
PROMPT_TASKS = {"query": Task.RETRIEVAL_QUERY, "passage": Task.RETRIEVAL_PASSAGE}


class SentenceTransformersModel(TokenStatesModel):
    family = SENTENCE_TRANSFORMERS

    def _configure(self) -> None:
        outputs = self.signature.outputs
        named = [name for name in TOKEN_STATE_OUTPUTS if name in outputs]
        rank3 = [name for name, shape in outputs.items() if len(shape) == 3]
        if not (named or rank3):
            raise ModelLoadError(f"{self.files.onnx}: no token-state output (last_hidden_state) in the graph")
        self._output = (named or rank3)[0]
        self._poolers = self._read_pooling()
        modules = self.files.config("modules.json") or []
        self._normalize = any(
            str(m.get("type", "")).endswith("Normalize") for m in modules if isinstance(m, dict)
        )
        st_config = self.files.config("config_sentence_transformers.json") or {}
        prompts = st_config.get("prompts") if isinstance(st_config, dict) else None
        prompts = prompts if isinstance(prompts, dict) else {}
        self._prompts = {task: str(prompts[key]) for key, task in PROMPT_TASKS.items() if key in prompts}
        # sentence-transformers applies default_prompt_name when no prompt is asked for.
        default_name = st_config.get("default_prompt_name") if isinstance(st_config, dict) else None
        self._default_prompt = str(prompts.get(default_name, "")) if default_name else ""

    def _read_pooling(self) -> list[Callable[[np.ndarray, np.ndarray], np.ndarray]]:
        config = self.files.config("1_Pooling/config.json")
        if not isinstance(config, dict):
            return [mean_pool]  # sentence-transformers' own default
        poolers = [pool for key, pool in POOLING_MODES.items() if config.get(key)]
        if not poolers:
            raise ModelLoadError(
                f"{self.files.path('1_Pooling/config.json')}: no supported pooling mode is on"
            )
        return poolers

    def _load_tokenizer(self) -> TextTokenizer:
        return TextTokenizer(self.files.path("tokenizer.json"), sentence_transformers_max_tokens(self.files))

    def _declared_width(self) -> int:
        """The token-state width the configs declare, for a graph whose output shape leaves it open."""
        pooling = self.files.config("1_Pooling/config.json")
        config = self.files.config("config.json")
        width = (pooling.get("word_embedding_dimension") if isinstance(pooling, dict) else None) or (
            config.get("hidden_size") if isinstance(config, dict) else None
        )
        if not isinstance(width, int):
            raise ModelLoadError(
                f"{self.files.onnx}: the output width is dynamic and neither 1_Pooling/config.json's "
                "word_embedding_dimension nor config.json's hidden_size gives it"
            )
        return width

    def _describe(self) -> ModelDescription:
        width = self.signature.outputs[self._output][-1]
        if not isinstance(width, int):
            width = self._declared_width()
        return ModelDescription(
            name=self.name,
            family=self.family,
            dimensions=width * len(self._poolers),
            max_tokens=self.tokenizer.max_tokens,
            tasks=tuple(sorted(self._prompts)),
            outputs=(Output.DENSE, Output.BINARY),
        )

    @property
    def normalizes(self) -> bool:
        return self._normalize

    def prefix(self, task: Task) -> str:
        return self._prompts.get(task, self._default_prompt)

    def feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray, task: Task) -> dict[str, np.ndarray]:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.signature.inputs:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        return feeds

    def postprocess(
        self,
        outputs: dict[str, np.ndarray],
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        rows: list[RowRequest],
    ) -> list[SequenceVectors]:
        states = self.token_states(outputs)
        pooled = np.concatenate([pool(states, attention_mask) for pool in self._poolers], axis=-1)
        return pooled_or_states(states, pooled, rows)
