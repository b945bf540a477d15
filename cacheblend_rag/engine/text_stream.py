"""Generated token ids turned into text pieces as they come: unfinished characters held back, stop strings cut."""

from __future__ import annotations


class TextStreamer:
    """Turns generated token ids into text pieces, holding back bytes of unfinished characters and any
    tail that could still become a stop string; ``done`` once a stop string appeared."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.done = False

    def push(self, token: int) -> str:
        """Add one token; return the text that became final."""
        self.token_ids.append(token)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = self._stop_index()
        if cut is not None:
            self.text = self.text[:cut]
            self.done = True
            return self._emit(len(self.text))
        end = len(self.text)
        if self.text.endswith("\ufffd"):
            end -= 1
        end -= self._held_tail(self.text[:end])
        return self._emit(max(end, self.emitted))

    def finish(self) -> str:
        """The rest of the text once generation ended."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        piece = self.text[self.emitted : end]
        self.emitted = end
        return piece

    def _stop_index(self) -> int | None:
        if not self.stop:
            return None
        start = max(0, self.emitted - max(len(s) for s in self.stop))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
