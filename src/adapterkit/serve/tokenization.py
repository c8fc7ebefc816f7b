"""The tokenizer endpoints as vLLM serves them (/tokenize, /detokenize, /tokenizer_info), so that a
client can count and cut prompts with the server's own tokenizer: lm-evaluation-harness's
``local-completions`` finds them through /tokenizer_info and then needs no local copy of the base."""

from __future__ import annotations

from typing import Any

from ..templates import CHAT, render_prompt
from .protocol import ApiError, ChatMessage, check_unicode

CHARS_PER_TOKEN_LIMIT = 32  # text longer than context × this many characters is refused untokenised

# init_kwargs that name files or folders on the server, or how it loaded them: not the client's business
_DROPPED = object()  # what _plain answers for a value JSON cannot hold
LOCAL_FIELDS = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path", "is_local", "local_files_only")


def tokenizer_info(tokenizer, context: int) -> dict[str, Any]:
    """The tokenizer's configuration (its tokenizer_config.json, as vLLM answers it): the special
    tokens as text, the chat template and ``model_max_length`` set to the context this server admits."""
    info = {key: _plain(value) for key, value in (getattr(tokenizer, "init_kwargs", None) or {}).items()
            if key not in LOCAL_FIELDS}
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default one is what chat uses
        template = template.get("default")
    return {key: value for key, value in info.items() if value is not _DROPPED} | {
        "tokenizer_class": type(tokenizer).__name__,
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
        "model_max_length": context, "chat_template": template,
    }


def _plain(value: Any) -> Any:
    """``value`` as JSON: an AddedToken as its text; what JSON cannot hold is dropped."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, (list, tuple)):
        items = [_plain(item) for item in value]
        return [item for item in items if item is not _DROPPED]
    if isinstance(value, dict):
        items = {str(key): _plain(item) for key, item in value.items()}
        return {key: item for key, item in items.items() if item is not _DROPPED}
    return _DROPPED


def check_text_length(characters: int, context: int, what: str) -> None:
    """Refuse, untokenised, text longer than the context could hold at ``CHARS_PER_TOKEN_LIMIT``."""
    if characters > context * CHARS_PER_TOKEN_LIMIT:
        raise ApiError(400, f"{what} has {characters} characters, more than this model's context of {context} "
                            "tokens can hold; shorten it", "context_length_exceeded")


def check_messages(tokenizer, messages: list[ChatMessage], template: str | None, context: int,
                   prompt_route: str | None) -> None:
    """Refuse, untokenised, a conversation that cannot be rendered or cannot fit the context;
    ``prompt_route`` is where the client could send a plain prompt instead (None: /tokenize itself).
    Every message renders as at least its role and content, and at least one token."""
    if template not in (None, CHAT) and [m.role for m in messages] != ["user"]:
        elsewhere = f" (or the filled-in prompt to {prompt_route})" if prompt_route else ""
        raise ApiError(400, f"this adapter answers single prompts in the format {template!r}: send one user message"
                            f"{elsewhere}", "invalid_messages")
    if template in (None, CHAT) and not getattr(tokenizer, "chat_template", None):
        instead = f"use {prompt_route}" if prompt_route else "tokenize a prompt instead"
        raise ApiError(400, f"this base model has no chat template; {instead}", "no_chat_template")
    for message in messages:
        check_unicode(message.content, "a message")
    characters = sum(len(m.role) + len(m.content) for m in messages)
    if len(messages) > context or characters > context * CHARS_PER_TOKEN_LIMIT:
        raise ApiError(400, f"the messages are longer than this model's context of {context} tokens can hold",
                       "context_length_exceeded")


def encode_messages(tokenizer, messages: list[ChatMessage], template: str | None, add_generation_prompt: bool,
                    add_special_tokens: bool) -> list[int]:
    """The conversation's tokens as chat completions feed them: the one user message put into an
    adapter's text template, else the conversation rendered by the tokenizer's chat template."""
    if template not in (None, CHAT):
        text = render_prompt(template, messages[0].content)
    else:
        text = tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in messages], tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def tokenize_answer(tokenizer, ids: list[int], context: int, token_strs: bool) -> dict[str, Any]:
    """vLLM's TokenizeResponse: count, max_model_len, tokens and (when asked) token_strs."""
    strs = tokenizer.convert_ids_to_tokens(ids) if token_strs else None
    return {"count": len(ids), "max_model_len": context, "tokens": ids, "token_strs": strs}
