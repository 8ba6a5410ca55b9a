"""A sequence's text as its tokens arrive: UTF-8-safe, cut at the first stop string."""
from __future__ import annotations

from ..tokenizer import StreamDecoder, Tokenizer


class TextStream:
    """A sequence's text as tokens arrive: UTF-8-safe, cut at the first stop string, and
    holding back any tail that could still become one."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.decoder = StreamDecoder(tokenizer)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.pending = ""

    def push(self, token: int) -> tuple[str, str | None]:
        """-> (text now safe to show, the stop string that ended it, or None)."""
        if not self.stop:                 # nothing held back: the decoded characters are safe
            return self.decoder.push(token), None
        self.pending += self.decoder.push(token)
        return self._emit(final=False)

    def flush(self) -> str:
        self.pending += self.decoder.flush()
        return self._emit(final=True)[0]

    def _emit(self, final: bool) -> tuple[str, str | None]:
        found = [(i, s) for s in self.stop if (i := self.pending.find(s)) >= 0]
        if found:
            cut, stop = min(found, key=lambda f: f[0])      # the earliest in the text ends it
            text, self.pending = self.pending[:cut], ""
            return text, stop
        keep = 0 if final else self.hold
        n = max(len(self.pending) - keep, 0)
        text, self.pending = self.pending[:n], self.pending[n:]
        return text, None
