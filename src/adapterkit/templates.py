"""Prompt templates: the format in which an adapter's task puts a text to the model.

A template is text with one ``{prompt}`` slot ("English: {prompt}\\nGerman:"), or ``"chat"``: the
text is the user's message, rendered by the tokenizer's chat template. An adapter records the
template it was trained with, so that ``generate``, ``eval`` and the server put new text into the
same format.
"""

from __future__ import annotations

from .errors import ConfigError

SLOT = "{prompt}"
CHAT = "chat"


def check_template(template: object, where: str = "prompt template") -> str | None:
    """``template`` if it is None, "chat" or text holding ``{prompt}``, else a clear error."""
    if template is None or template == CHAT or (isinstance(template, str) and SLOT in template):
        return template
    raise ConfigError(f"{where} must be text holding {SLOT} (e.g. 'English: {SLOT}\\nGerman:') or {CHAT!r}, "
                      f"got {template!r}")


def render_prompt(template: str | None, text: str, tokenizer=None) -> str:
    """``text`` put into ``template`` (None: the text itself). Text already in a text template's
    format (it begins with what comes before ``{prompt}`` and ends with what follows) is left as it
    is, so that a prompt written out by hand is not wrapped twice."""
    if template is None:
        return text
    if template == CHAT:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    before, _, after = template.partition(SLOT)
    if len(text) >= len(before) + len(after) and text.startswith(before) and text.endswith(after):
        return text
    return template.replace(SLOT, text)


def shared_template(templates: list[str | None]) -> str | None:
    """The template all of ``templates`` are, or None when they differ (or there are none)."""
    distinct = set(templates)
    return distinct.pop() if len(distinct) == 1 else None
