"""Results of a generation and the text side of the loop: stop strings, streaming.

`TextStream` turns token ids into text chunks as they arrive: it decodes
incrementally (never half a UTF-8 character), watches for stop strings, and holds
back the tail that could still be the start of one, so a streamed chunk is never
taken back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    """Counts and timings of one generation.

    Attributes:
        prompt_tokens: tokens of the prompt.
        reused_tokens: prompt tokens already in the KV cache (not recomputed).
        prompt_seconds: time to process the new prompt tokens.
        generated_tokens: tokens produced.
        decode_seconds: time from the first generated token to the last.
    """

    prompt_tokens: int = 0
    reused_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


@dataclass
class Generation:
    """What `Model.generate` and `Model.chat` return.

    Attributes:
        text: the generated text, stop string excluded.
        tokens: the generated token ids (EOS excluded).
        finish_reason: "eos", "stop" (a stop string), "length" (max_tokens), or
            "cancelled" (the `cancel` option asked to stop).
        stats: counts and timings.
    """

    text: str
    tokens: list[int]
    finish_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)


class TextStream:
    """Incremental text with stop strings.

    Args:
        decoder: an incremental decoder (`add(id) -> str`, `flush() -> str`).
        stop: strings that end the generation; they are not part of the text.
    """

    def __init__(self, decoder, stop: Sequence[str] = ()) -> None:
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self._decoder = decoder
        self._stop = tuple(stop)
        self._pending = ""
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Feed one token; return the text that is now final (maybe empty)."""
        return self._push(self._decoder.add(token_id), final=False)

    def finish(self) -> str:
        """Flush what is left at the end of the generation."""
        return self._push(self._decoder.flush(), final=True)

    def _push(self, piece: str, final: bool) -> str:
        if self.stopped:
            return ""
        self._pending += piece

        # A stop string anywhere in the pending text ends the stream there.
        cut = min(
            (i for i in (self._pending.find(s) for s in self._stop) if i >= 0),
            default=-1,
        )
        if cut >= 0:
            out, self._pending, self.stopped = self._pending[:cut], "", True
        elif final or not self._stop:
            out, self._pending = self._pending, ""
        else:
            # Keep back the longest tail that could still grow into a stop string.
            keep = self._partial_stop(self._pending)
            split = len(self._pending) - keep
            out, self._pending = self._pending[:split], self._pending[split:]
        self.text += out
        return out

    def _partial_stop(self, text: str) -> int:
        longest = min(len(text), max(len(s) for s in self._stop) - 1)
        for n in range(longest, 0, -1):
            if any(s.startswith(text[-n:]) for s in self._stop):
                return n
        return 0
