"""Continuous batching of the decode phase: sequences join after their prefill, leave when they finish or are
cancelled, and every step decodes all of them with one forward.

A ``RunningBatch`` owns a ``KVSlots`` pool and a ``BatchStepper``. ``add`` copies a prefilled cache into a free
slot; ``step`` picks one token for every sequence (each with its own ``Sampler``: greedy rows in one argmax),
turns it into text with the sequence's own ``TextStreamer`` (stop strings), retires the sequences that reached
EOS, a stop string or their token limit, then runs one batched forward for the others. A sequence ends exactly
where ``GenerationStream`` (engine/generation.py) would end it, with the same tokens, text and finish reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..model.forward import ModelForward
from .batch_step import BatchStepper
from .kv_cache import KVCache
from .kv_slots import KVSlots
from .sampling import Sampler, sample_rows
from .text_stream import TextStreamer


@dataclass(eq=False)
class BatchSequence:
    """One sequence of a RunningBatch. tokens: generated so far (EOS excluded); finish_reason: None while it runs,
    then "eos", "stop", "length" or "cancelled"; first_token_at: perf_counter() when its first token was picked."""

    sampler: Sampler
    streamer: TextStreamer
    max_new_tokens: int
    eos_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_at: float | None = None
    logits: torch.Tensor | None = field(default=None, repr=False)  # [vocab] float32: the next token's

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The text so far (the final text once done: cut at the stop string)."""
        return self.streamer.text


class RunningBatch:
    """Decodes up to ``slots`` sequences together, each of at most ``capacity`` rows (prompt and new tokens).

    fwd: the forward every sequence decodes with (one backend for the batch). graphs: on CUDA, one CUDA graph per
    batch-size bucket (engine/batch_step.py); on_graph_failure(exc): called if a capture fails.
    """

    def __init__(
        self,
        fwd: ModelForward,
        slots: int,
        capacity: int,
        *,
        graphs: bool = False,
        on_graph_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.fwd = fwd
        self.slots = KVSlots.for_model(fwd, slots, capacity)
        self.stepper = BatchStepper(fwd, self.slots, graphs=graphs, on_graph_failure=on_graph_failure)
        self._seqs: list[BatchSequence] = []  # sequence i occupies slot i
        self._sampled = False  # tokens were picked and not fed yet (sample, then forward)

    def __len__(self) -> int:
        return len(self._seqs)

    @property
    def sequences(self) -> list[BatchSequence]:
        """The running sequences, in slot order."""
        return list(self._seqs)

    @property
    def free_slots(self) -> int:
        return self.slots.slots - len(self._seqs)

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        """Whether a sequence of this size could join now (a free slot, and room for it in one)."""
        return self.free_slots > 0 and prompt_tokens + max_new_tokens - 1 <= self.slots.capacity

    def add(
        self,
        cache: KVCache,
        logits: torch.Tensor,
        sampler: Sampler,
        streamer: TextStreamer,
        max_new_tokens: int,
        eos_ids: frozenset[int],
    ) -> BatchSequence:
        """A prefilled sequence joins: ``cache`` (its prompt's KV, copied into a slot; the caller may drop it) and
        ``logits`` [vocab] (its first new token's, from the prefill). It gets its first token at the next step."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.slots.add(cache, room=max_new_tokens - 1)  # the last token is picked, never fed back
        seq = BatchSequence(sampler, streamer, max_new_tokens, frozenset(eos_ids), logits=logits)
        self._seqs.append(seq)
        return seq

    def adopt(self, seq: BatchSequence, cache: KVCache) -> None:
        """Take in a running ``seq`` of another batch with its KV ``cache`` (e.g. that batch's ``slots.cache(i)``:
        a pool made again larger); it goes on from where it was."""
        if seq.done:
            raise ValueError(f"a finished sequence ({seq.finish_reason}) cannot join a batch")
        self.slots.add(cache, room=seq.max_new_tokens - 1 - len(seq.tokens))
        self._seqs.append(seq)

    def cancel(self, seq: BatchSequence) -> None:
        """Stop ``seq`` now (its slot is freed); a finished or unknown sequence is left as it is."""
        if seq.done or seq not in self._seqs:
            return
        seq.finish_reason = "cancelled"
        self._leave([self._seqs.index(seq)])

    def step(self) -> list[tuple[BatchSequence, str]]:
        """One token for every running sequence (``sample`` then ``forward``). Returns the text pieces that became
        final, in order, as (sequence, piece); a sequence that finished this step has ``finish_reason`` set and has
        left the batch (its last piece, the rest of its text, is among them)."""
        events = self.sample()
        self.forward()
        return events

    def sample(self) -> list[tuple[BatchSequence, str]]:
        """The first half of ``step``: pick every sequence's token and retire those that finished; their pieces can
        be sent before ``forward`` computes the next logits. Call ``forward`` before the next ``sample`` or ``add``."""
        if not self._seqs:
            return []
        seqs = self._seqs
        tokens = sample_rows([s.sampler for s in seqs], [s.logits for s in seqs])
        now = time.perf_counter()
        events: list[tuple[BatchSequence, str]] = []
        finished = []
        for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
            if seq.first_token_at is None:
                seq.first_token_at = now
            reason = self._take(seq, token, events)
            if reason is not None:
                seq.finish_reason = reason
                seq.logits = None
                rest = seq.streamer.finish()
                if rest:
                    events.append((seq, rest))
                finished.append(i)
        self._leave(finished)
        for seq in self._seqs:
            seq.logits = None  # until forward
        self._sampled = bool(self._seqs)
        return events

    def forward(self) -> None:
        """The second half of ``step``: one batched forward of every sequence's last token, for its next logits."""
        if not self._sampled:
            return  # nothing sampled since the last forward
        self._sampled = False
        with torch.inference_mode():
            logits = self.stepper([s.tokens[-1] for s in self._seqs])
        for i, seq in enumerate(self._seqs):
            seq.logits = logits[i]

    @staticmethod
    def _take(seq: BatchSequence, token: int, events: list) -> str | None:
        """Add ``token`` to ``seq`` (its text piece to ``events``); the finish reason if it ends here."""
        if token in seq.eos_ids:
            return "eos"
        seq.tokens.append(token)
        piece = seq.streamer.push(token)
        if piece:
            events.append((seq, piece))
        if seq.streamer.done:
            return "stop"
        if len(seq.tokens) == seq.max_new_tokens:
            return "length"
        return None

    def _leave(self, indices: list[int]) -> None:
        """Free the slots of the sequences at ``indices`` (the last sequence moves into each freed slot)."""
        for i in sorted(indices, reverse=True):
            self.slots.remove(i)
            last = self._seqs.pop()
            if i < len(self._seqs):
                self._seqs[i] = last
