"""A row's tokens turned into text as they come, with stop strings found and partial ones held back."""

from __future__ import annotations

from collections.abc import Sequence


class Detokenizer:
    """A row's tokens turned into text incrementally: each token decodes a window of a few tokens,
    never the whole answer, and stop strings are searched in the new text only, so the work per
    token does not grow with the answer. Text that might still become a stop string (or half of a
    multi-byte character) is held back.

    The window stays short whatever the tokens: special tokens (which decode to nothing) never
    enter it, and once ``MAX_PENDING`` tokens have made no text, all but the last
    ``UTF8_BYTES`` are settled as they decode (a broken character as U+FFFD, as a whole decode
    gives it), so a model repeating such tokens costs the same per token as one writing text."""

    MAX_PENDING = 8  # tokens without text before the older ones are settled
    UTF8_BYTES = 4  # a character spans at most this many tokens (of at least one byte): kept unsettled
    KEPT_IDS = 64  # ids before the window are dropped once this many pile up

    def __init__(self, tokenizer, stops: Sequence[str], silent: frozenset[int] = frozenset(),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.stops, self.silent = tokenizer, list(stops), silent
        self.skip_special_tokens = skip_special_tokens
        self.longest = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to the text's last settled piece
        self.text = ""
        self.searched = 0
        self.sent = 0

    def add(self, token: int) -> tuple[str, bool]:
        """(newly released text, whether a stop string ended the row)."""
        if token in self.silent:
            return "", False
        self.ids.append(token)
        length = len(self.text)
        if len(self.ids) - self.read > self.MAX_PENDING:
            self._settle(len(self.ids) - self.UTF8_BYTES)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        if len(self.text) == length:
            return "", False
        self._forget_old_ids()
        start = max(0, self.searched - self.longest + 1)
        self.searched = len(self.text)
        cuts = [i for i in (self.text.find(stop, start) for stop in self.stops) if i >= 0]
        if cuts:
            return self._release(min(cuts)), True
        return self._release(len(self.text) - self._held()), False

    def rest(self) -> str:
        return self._release(len(self.text))

    def _settle(self, cut: int) -> None:
        """Take what ids[read:cut] decode to as final, complete or not."""
        before = self._decode(self.ids[self.prefix : self.read])
        settled = self._decode(self.ids[self.prefix : cut])
        self.text += settled[len(before) :]
        self.prefix, self.read = self.read, cut

    def _forget_old_ids(self) -> None:
        if self.prefix >= self.KEPT_IDS:
            del self.ids[: self.prefix]
            self.prefix, self.read = 0, self.read - self.prefix

    def _held(self) -> int:
        """Length of the longest end of the text that begins a stop string."""
        held = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:n]):
                    held = n
                    break
        return held

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def _release(self, end: int) -> str:
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece


def silent_ids(tokenizer) -> frozenset[int]:
    """The special tokens that decoding with ``skip_special_tokens`` drops (each checked to
    decode to nothing alone): a row's text ignores them without decoding them."""
    candidates = set(getattr(tokenizer, "all_special_ids", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    candidates.update(i for i, token in added.items() if getattr(token, "special", False))
    return frozenset(i for i in candidates if tokenizer.decode([i], skip_special_tokens=True) == "")
