"""Incremental detokenization with stop strings.

Text is emitted only when it is final: never half a UTF-8 character (a trailing U+FFFD means
the bytes are incomplete) and never the start of what may become a stop string.
"""

from __future__ import annotations

PROMPT_CONTEXT_TOKENS = 5  # decode new tokens after a few prompt tokens so leading spaces survive


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # everything decoded so far (stop string and beyond cut off once found)
        self.stop_hit: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def append(self, new_ids: list[int]) -> None:
        """Add generated tokens; afterwards ``stop_hit`` names the stop string if one appeared."""
        if self.stop_hit is not None:
            return
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        hits = [(self.text.find(stop, start), stop) for stop in self.stop]
        hits = [(index, stop) for index, stop in hits if index != -1]
        if hits:
            index, self.stop_hit = min(hits)
            self.text = self.text[:index]

    def emittable(self, finished: bool) -> str:
        """Text safe to show: all of it when finished, else without a tail that may start a stop string."""
        if finished or not self.stop:
            return self.text
        hold = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(self.text)), 0, -1):
                if self.text.endswith(stop[:length]):
                    hold = max(hold, length)
                    break
        return self.text[: len(self.text) - hold]
