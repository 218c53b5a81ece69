"""Splitting a chat prompt so that only the context is compressed.

With a chat template, the user turn is `context + question`. Everything up to the end of the context
(system prompt, user header, context) is prefilled and compressed; the question, the end of the
user turn, the assistant header and an optional answer prefix never are. Without a template (base
models, tiny test models) the context is tokenised with the tokenizer's special tokens and the
question is appended as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PLACEHOLDER = "<<kvsqueeze:context>>"


@dataclass(frozen=True)
class Prompt:
    tokenizer: object
    prefix: str  # what comes before the context in the user turn
    suffix: str  # what comes after the question: end of turn + assistant header

    @classmethod
    def for_tokenizer(cls, tokenizer, chat_template: bool = True) -> "Prompt":
        if not chat_template or getattr(tokenizer, "chat_template", None) is None:
            return cls(tokenizer, "", "")
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": PLACEHOLDER}],
                                                 add_generation_prompt=True, tokenize=False)
        prefix, suffix = rendered.split(PLACEHOLDER)
        return cls(tokenizer, prefix, suffix)

    @property
    def templated(self) -> bool:
        return bool(self.prefix or self.suffix)

    def context_ids(self, context: str) -> torch.Tensor:
        if self.templated:
            return self._ids(self.prefix + context, special=False)
        return self._ids(context, special=True)

    def question_ids(self, question: str, answer_prefix: str = "") -> torch.Tensor:
        if question and not question[0].isspace():
            question = "\n\n" + question
        ids = self._ids(question + self.suffix + answer_prefix, special=False)
        if ids.shape[1] == 0:
            raise ValueError("nothing to ask: give a question (the model has no chat template to add a turn)")
        return ids

    def _ids(self, text: str, special: bool) -> torch.Tensor:
        return self.tokenizer(text, add_special_tokens=special, return_tensors="pt").input_ids
