"""The `kvsqueeze-text-generation` transformers pipeline task, registered when kvsqueeze is imported.

    pipe = transformers.pipeline("kvsqueeze-text-generation", model=model, tokenizer=tokenizer)
    pipe(context, question="...", method=kvsqueeze.SnapKV(ratio=0.5))             # {"answer": ...}
    pipe(context, questions=["...", "..."], method=...)                          # {"answers": [...]}

The context is compressed once; every question is asked on it, restored between questions.
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .pipeline import compress

TASK = "kvsqueeze-text-generation"


class KVSqueezeTextGenerationPipeline(Pipeline):
    _load_tokenizer = True

    def _sanitize_parameters(self, question=None, questions=None, method=None, answer_prefix="", max_new_tokens=128,
                             **generate_kwargs):
        if question is not None and questions is not None:
            raise ValueError("give either question= or questions=, not both")
        preprocess = {"questions": [question or ""] if questions is None else list(questions), "method": method}
        forward = {"answer_prefix": answer_prefix, "generate_kwargs": {"max_new_tokens": max_new_tokens}
                   | generate_kwargs}
        postprocess = {"single": questions is None}
        return preprocess, forward, postprocess

    def preprocess(self, context, questions, method):
        return {"context": context, "questions": questions, "method": method}

    def _forward(self, inputs, answer_prefix, generate_kwargs):
        ctx = compress(self.model, self.tokenizer, inputs["context"], inputs["method"])
        answers = ctx.ask_many(inputs["questions"], answer_prefix, **generate_kwargs)
        return {"answers": answers, "stats": ctx.stats}

    def postprocess(self, outputs, single):
        if single:
            return {"answer": outputs["answers"][0], "stats": outputs["stats"]}
        return outputs


PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=KVSqueezeTextGenerationPipeline,
                                    pt_model=AutoModelForCausalLM)
