"""The fidelity task every system module shares: greedy tokens and forced top-1.

For each prompt of the spec a system produces its greedy continuation
(`n_decode + 1` tokens, EOS ignored) and, when asked, its top-1 next-token
prediction at every position of a *forced* sequence: the reference's prompt and
continuation fed token by token whatever the system itself would have chosen.
The orchestrator compares both with the fp32 reference (`_report`).

Standard library only: the system modules that import this may run in another
virtual environment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Greedy = Callable[[list[int], int], list[int]]
Forced = Callable[[list[int]], list[int]]


def run_fidelity(spec: dict[str, Any], greedy: Greedy, forced: Forced | None) -> dict:
    """Greedy tokens per prompt, and forced argmaxes when `spec["forced"]` asks.

    `spec["forced"]` is None (no forced pass), "own" (force the prompt and this
    system's own continuation: the reference does this) or a list with one
    sequence per prompt. `greedy(ids, n)` returns n tokens after `ids`;
    `forced(seq)` returns the argmax after each of `seq`'s tokens.
    """
    n = int(spec["n_decode"]) + 1
    want = spec.get("forced")
    tokens, argmax = [], []
    for i, ids in enumerate(spec["prompts"]):
        out = greedy(list(ids), n)
        tokens.append(out)
        if want is None or forced is None:
            continue
        seq = list(ids) + out[:-1] if want == "own" else list(want[i])
        argmax.append(forced(seq))
    return {"tokens": tokens, "argmax": argmax if argmax else None}
