"""What `compress` is given, checked: the model, the context (text, ids, a batch), the method, the window."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .attention import UnsupportedModelError
from .models import attention_modules
from .prompt import Prompt


class ContextTooLongError(ValueError):
    """The context does not fit in the model's window."""


def check_fits(model, n_tokens: int) -> None:
    window = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if window is not None and n_tokens > window:
        raise ContextTooLongError(f"the context has {n_tokens} tokens, more than the model's window of {window}; "
                                  "shorten it (or use a model with a longer window)")


def pad_id(model, tokenizer) -> int:
    for source in (tokenizer, model.generation_config, model.config.get_text_config()):
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(source, name, None)
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int):
                return value
    return 0


def context_rows(model, tokenizer, context, chat_template: bool = True, check_window: bool = True
                 ) -> tuple[Prompt | None, list[torch.Tensor]]:
    """(the prompt layout, one row of token ids per context) for what `compress` is given: a text, token ids
    ([n], or [batch, n]: one row per context) or a list of them. Checks the model, the ids and the window."""
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(f"kvsqueeze compresses transformers models; got {type(model).__name__}")
    attention_modules(model)  # raises if nothing can be hooked
    prompt = Prompt.for_tokenizer(tokenizer, chat_template) if tokenizer is not None else None
    if isinstance(context, (list, tuple)) and context and all(isinstance(i, int) for i in context):
        contexts = [context]  # one context's token ids
    elif isinstance(context, (list, tuple)):
        contexts = list(context)
    elif isinstance(context, torch.Tensor) and context.dim() == 2:
        contexts = list(context)  # [batch, n]: one context per row
    else:
        contexts = [context]
    if not contexts:
        raise ValueError("no context to compress: the list is empty")
    rows = [context_ids(prompt, text) for text in contexts]
    vocabulary = model.get_input_embeddings().num_embeddings
    for row in rows:
        if len(row) and (int(row.min()) < 0 or int(row.max()) >= vocabulary):
            raise ValueError(f"token ids must be in [0, {vocabulary}) for this model; got ids from {int(row.min())} "
                             f"to {int(row.max())}")
    if check_window:
        check_fits(model, max(len(row) for row in rows))
    return prompt, rows


def context_ids(prompt: Prompt | None, context) -> torch.Tensor:
    """One context's token ids, 1-D: a text through the prompt layout, or ids ([n] or [1, n]) as they are."""
    if isinstance(context, str):
        if prompt is None:
            raise ValueError("a text context needs a tokenizer")
        if not context.strip():
            raise ValueError("the context is empty (only whitespace)")
        return prompt.context_ids(context).reshape(-1)
    if not isinstance(context, (torch.Tensor, list, tuple)):
        raise TypeError(f"a context is a text, token ids (a tensor or a list of ints) or a list of them; got "
                        f"{type(context).__name__}")
    ids = torch.as_tensor(context)
    if ids.dim() > 2 or (ids.dim() == 2 and ids.shape[0] != 1):
        raise ValueError(f"one context's token ids are [n] or [1, n]; got shape {list(ids.shape)}")
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"token ids are integers; got {ids.dtype}")
    ids = ids.reshape(-1).long()
    if len(ids) == 0:
        raise ValueError("the context is empty")
    return ids


def as_method(method):
    """A method given as an instance, a registry name or a class (built with its defaults); None stays None."""
    from .methods import Method, method as by_name  # the methods import the pipeline for their calibration

    if method is None or isinstance(method, Method):
        return method
    if isinstance(method, str):
        return by_name(method)
    if isinstance(method, type) and issubclass(method, Method):
        return method()
    raise TypeError(f"a method is a kvsqueeze Method, a registry name (see kvsqueeze.available()) or a Method class; "
                    f"got {type(method).__name__}")
