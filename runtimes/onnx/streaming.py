"""Incremental detokenisation and stop strings for one generated sequence."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Turns generated token ids into text deltas, holding back what may still change.

    Decoding token by token breaks multi-byte characters split over tokens and tokenizers
    that merge pieces (sentencepiece's leading spaces), so each push decodes a short window
    of ids and emits the growth of its text (the scheme vLLM uses); a window ending in
    U+FFFD waits for the next token. Text that could be the start of a stop string is held
    back until it is known not to be one, so the streamed text always equals ``text``.
    """

    def __init__(
        self, tokenizer: Any, stop: list[str] | tuple[str, ...] = (), lazy: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.lazy = lazy and not any(stop)  # nobody reads the text before the end
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now final (maybe empty)."""
        self.ids.append(token_id)
        if self.lazy:
            return ""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        window = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(window) > len(prefix) and not window.endswith("\ufffd"):
            start = len(self.text)
            self.text += window[len(prefix) :]
            self._prefix, self._read = self._read, len(self.ids)
            if self.stop and self._cut_stop(start):
                return self._take(len(self.text))
        return self._take(len(self.text) - self._holdback())

    def flush(self) -> str:
        """The rest of the text, once the sequence has ended."""
        if self.lazy:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._take(len(self.text))

    def _cut_stop(self, start: int) -> bool:
        """Truncate ``text`` before the first stop string that ends in the new text."""
        longest = max(map(len, self.stop))
        lo = max(0, start - longest + 1)
        hits = [i for s in self.stop if (i := self.text.find(s, lo)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
        return self.stopped

    def _holdback(self) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        piece, self.emitted = self.text[self.emitted : upto], upto
        return piece
