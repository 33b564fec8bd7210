"""Incremental detokenization and stop strings.

`IncrementalDetokenizer` turns a growing list of token ids into text pieces without
ever splitting a UTF-8 character: byte-level tokens that end inside a character decode
to U+FFFD, and such a piece is held until the next token completes it (the
prefix/read-offset technique of text-generation-inference and vLLM).

`StopStringBuffer` holds back the end of the text while it could still be the start of
a stop string, and cuts the text before the first stop string found; the stop string
itself is never returned.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """`tokenizer` is a `tokenizers.Tokenizer` (anything with decode(ids, skip_special_tokens))."""

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None, context: int = 4,
                 skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        # A few prompt tokens as context, so a piece's leading space decodes as it would
        # mid-text (SentencePiece tokenizers strip it at the start of a decode).
        self.ids: list[int] = list(prompt_ids[-context:]) if prompt_ids else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> str:
        """Add one token; return the new complete text (possibly empty)."""
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):] if len(text) > len(prefix) else ""


class StopStringBuffer:
    """Feed text pieces; get back what is safe to send and whether a stop string ended it."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.pending += text
        # Everything before `pending` was sent only once no suffix of it could start a
        # stop string, so a stop string can only begin inside `pending`.
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """At the end of generation the held text was not a stop string after all."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
