"""The OpenAI wire format: request models, their checks, errors in OpenAI's shape, and the parts
of an answer (``logprobs``, ``usage``) that do not depend on how the engine ran."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import AdapterkitError
from ..generation import MAX_LOGPROBS, MIN_TEMPERATURE, Detokenizer, Generation, TokenLogprob, check_stops


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}} with a
    status; ``param`` names the request field at fault, when one is."""

    def __init__(self, status: int, message: str, code: str, headers: dict[str, str] | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.param = status, message, code, headers, param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# fields that ask for beam search (vLLM's and HF's names): refused with a pointer to where it runs
BEAM_FIELDS = ("use_beam_search", "num_beams", "length_penalty", "early_stopping")


def beam_search_refused(field: str, value: Any = None) -> ApiError:
    """Beam search is not served: an answer streams token by token as it is picked, and a beam
    search knows its tokens only when it ends. ``adapterkit generate`` and ``eval`` run it."""
    asked = field if value is None else f"{field} = {value}"
    return ApiError(400, f"{asked}: beam search is not served (answers stream token by token, and a beam search "
                         "knows its answer only when it ends); use `adapterkit generate --num-beams N` or "
                         "`adapterkit eval --num-beams N`", "unsupported_field", param=field)


class Body(BaseModel):
    """A request body. A field we do not implement is refused by name; "5" is not a number, true
    not 1; and ``null`` for an optional field is taken as not given, as OpenAI's API takes it
    (clients send ``null`` for whatever they leave unset, fields we do not implement included). A
    required field's ``null`` stays, to be refused as the wrong type rather than as missing."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def null_is_not_given(cls, body: Any) -> Any:
        if not isinstance(body, dict):
            return body
        required = cls.required_fields()
        return {key: value for key, value in body.items() if value is not None or key in required}

    @classmethod
    @functools.cache
    def required_fields(cls) -> frozenset[str]:
        """Found once per model, not once per request (or per chat message)."""
        return frozenset(name for name, field in cls.model_fields.items() if field.is_required())


class StreamOptions(Body):
    include_usage: bool = False  # a last chunk with no choices and the whole request's usage


class Sampled(Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    user: str | None = None  # an end-user id for the caller's own records; it changes nothing here
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def stream_options_need_a_stream(self) -> Sampled:
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options applies to streamed answers only: send stream: true, or drop it",
                           "invalid_request", param="stream_options")
        return self

    @field_validator("temperature")
    @classmethod
    def greedy_or_sampled(cls, temperature: float | None) -> float | None:
        if temperature is not None and 0 < temperature < MIN_TEMPERATURE:
            raise ValueError(f"use 0 for greedy decoding or at least {MIN_TEMPERATURE} (below it, "
                             "logits / temperature overflows)")
        return temperature

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            check_stops(stops)
        except AdapterkitError as error:
            raise ApiError(400, str(error), "invalid_stop") from None
        for stop in stops:
            check_unicode(stop, "a stop string")
        return stops

    def alternatives(self) -> int | None:
        """How many alternatives each scored token reports (0: its own log-probability alone);
        None: no log-probabilities."""
        return None

    def refuse_unsupported(self) -> None:
        if self.n is not None and self.n != 1:
            raise ApiError(400, f"n = {self.n} is not supported: one choice per prompt (send the prompt again, "
                                "with seeds)", "unsupported_field", param="n")
        best_of = getattr(self, "best_of", None)
        if best_of is not None and best_of != 1:
            raise beam_search_refused("best_of", best_of)


class CompletionRequest(Sampled):
    # text, or token ids as OpenAI's API and vLLM take them (lm-evaluation-harness sends ids)
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None

    def alternatives(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, one per choice: texts, or lists of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]
        return self.prompt


class ChatMessage(Body):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None  # a participant's name, as OpenAI takes it; given to the chat template as it is

    @model_validator(mode="before")
    @classmethod
    def as_plain_text(cls, message: Any) -> Any:
        """OpenAI's newer shapes as what they stand for: a list of text parts is their text (joined
        by newlines, as vLLM joins them), and the ``developer`` role is the system's new name."""
        if not isinstance(message, dict):
            return message
        message = dict(message)
        if message.get("role") == "developer":
            message["role"] = "system"
        content = message.get("content")
        if isinstance(content, list):
            kinds = {repr(part.get("type")) if isinstance(part, dict) else type(part).__name__ for part in content
                     if not isinstance(part, dict) or part.get("type") != "text"}  # a type may be any JSON
            if kinds:
                raise ValueError(f"only text content parts are served, not {', '.join(sorted(kinds))}")
            texts = [part.get("text") for part in content]
            if not all(isinstance(text, str) for text in texts):
                raise ValueError("a text content part needs its text as a string: {\"type\": \"text\", \"text\": ...}")
            message["content"] = "\n".join(texts)
        return message


class ChatRequest(Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None  # alternatives per token, with logprobs: true

    def alternatives(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "invalid_request", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.top_logprobs}",
                           "invalid_request", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(Body):
    """vLLM's /tokenize body: a ``prompt`` (TokenizeCompletionRequest) or ``messages``
    (TokenizeChatRequest); ``model`` is optional, as lm-evaluation-harness sends none."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # vLLM's defaults: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool | None = False

    def checked(self) -> TokenizeRequest:
        """Itself, once it holds exactly one of prompt and messages."""
        if (self.prompt is None) == (self.messages is None):
            raise ApiError(400, "give either 'prompt' (text) or 'messages' (a conversation) to tokenize",
                           "invalid_request")
        if self.prompt is not None and "add_generation_prompt" in self.model_fields_set:
            raise ApiError(400, "add_generation_prompt applies to messages only", "invalid_request")
        return self

    def special_tokens(self) -> bool:
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.prompt is not None


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int]


class LoadRequest(Body):
    name: str


def check_unicode(text: str, what: str) -> None:
    """JSON can carry a lone UTF-16 surrogate (\\ud800); it is not text, and tokenizers refuse it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{what} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape); send valid "
                            "Unicode", "invalid_text") from None


def check_token_ids(prompt: list[int], vocabulary: int, what: str = "the prompt",
                    code: str = "invalid_prompt") -> None:
    bad = next((i for i in prompt if not 0 <= i < vocabulary), None)
    if bad is not None:
        raise ApiError(400, f"{what} holds token id {bad}; this model's ids run from 0 to {vocabulary - 1}", code)


def scored_logprobs(prompt_length: int, max_tokens: int, echo: bool, alternatives: int | None) -> int:
    """How many log-probabilities a prompt's answer carries: each scored token's and its alternatives'."""
    if alternatives is None:
        return 0
    return ((prompt_length if echo else 0) + max_tokens) * (1 + alternatives)


def token_texts(tokenizer, entries: list[TokenLogprob]) -> dict[int, str]:
    """Each id scored in ``entries`` (token or alternative) decoded alone, once."""
    ids = sorted({e.token for e in entries} | {t for e in entries for t, _ in e.top})
    return dict(zip(ids, tokenizer.batch_decode([[i] for i in ids])))


class TextOffsets:
    """Where each token's text starts in an answer's text: the length of what the tokens before it
    decode to, as the engine's detokenizer releases text (a few tokens' decode per token), so a
    character split over tokens starts where its first token does. Adding up each token's own
    decode drifts at every such character, one U+FFFD per piece: over 1,741 tokens of German with
    a little Japanese, SmolLM2's pieces add up to 3,360 characters for a text of 2,940."""

    def __init__(self, tokenizer, start: int = 0, skip_special_tokens: bool = True) -> None:
        """``start``: where the tokens' text begins in the answer; ``skip_special_tokens`` as the
        answer's text was decoded."""
        self.decoded, self.start = Detokenizer(tokenizer, (), skip_special_tokens=skip_special_tokens), start

    def __call__(self, tokens: Sequence[int]) -> list[int]:
        """The offsets of ``tokens``, which follow those of the earlier calls."""
        offsets = []
        for token in tokens:
            offsets.append(self.start + len(self.decoded.text))
            self.decoded.add(token)
        return offsets


def logprobs_block(tokenizer, entries: list[TokenLogprob], offsets: list[int]) -> dict[str, Any]:
    """OpenAI's completions ``logprobs``: tokens, their log-probabilities, the top alternatives and
    each token's character offset in the returned text (``TextOffsets``)."""
    text = token_texts(tokenizer, entries)
    return {
        "tokens": [text[e.token] for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [None if e.logprob is None else {text[t]: v for t, v in e.top} for e in entries],
        "text_offset": offsets,
    }


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: each token with its log-probability, its UTF-8 bytes and its
    top alternatives (the token that stops the answer included, as the engine scores it)."""
    text = token_texts(tokenizer, entries)

    def scored(token: int, logprob: float) -> dict[str, Any]:
        return {"token": text[token], "logprob": logprob, "bytes": list(text[token].encode("utf-8"))}

    return {"content": [scored(e.token, e.logprob) | {"top_logprobs": [scored(t, v) for t, v in e.top]}
                        for e in entries], "refusal": None}


def usage(generations: list[Generation]) -> dict[str, int]:
    prompt = sum(len(g.prompt) for g in generations)
    completion = sum(len(g.tokens) for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
