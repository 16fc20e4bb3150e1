"""Token sampling: settings, the `Sampler` (C kernel or numpy), and the numpy reference.

Owns: `SamplerSettings` (validated), the seeded PRNG (xoshiro256** seeded by
splitmix64, identical in C), `sample_reference` (the normative numpy definition the C
kernel is tested against, bit for bit) and `Sampler`, which keeps the PRNG state and
dispatches to the C kernel when it is available.

Order of one call: mask -> bias -> penalties -> (temperature 0: argmax) ->
temperature -> top-k -> softmax -> top-p -> min-p -> renormalize -> draw.
docs/SAMPLING.md defines the arithmetic (30-bit fixed-point probabilities, exact
integer sums, a fixed exp2).

Does not do yet: typical-p, mirostat, DRY or XTC samplers, batched sampling, or logit
soft-capping (the model graph applies that).
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import os
import weakref
from collections.abc import Mapping, Sequence

import numpy as np

from edgeslm import _kernel
from edgeslm.errors import KernelError

__all__ = [
    "MAX_VOCAB",
    "Sampler",
    "SamplerSettings",
    "mask_words",
    "rng_next",
    "rng_seed",
    "sample_reference",
]

MAX_VOCAB = 1 << 22
_M64 = (1 << 64) - 1
_Q_ONE = 1 << 30
_LOG2E = float.fromhex("0x1.71547652b82fep+0")
_F32 = np.float32
_F32_DTYPE = np.dtype(np.float32)
_T_CLAMP = _F32(-32.0)
_ROUND_MAGIC = _F32(12582912.0)  # 1.5 * 2**23
# exp2(f) on [-0.5, 0.5]; c0 = 1. Keep equal to ESL_P1..ESL_P5 in kernels/sampler.c.
_EXP2_POLY = tuple(
    _F32(float.fromhex(h))
    for h in ("0x1.62e426p-1", "0x1.ebf9b6p-3", "0x1.c6baaap-5", "0x1.3cec16p-7")
    + ("0x1.5a8502p-10",)
)
_TEMPERATURE_RANGE = (1e-6, 1e6)
_REPETITION_RANGE = (1e-3, 1e3)
_ADDITIVE_PENALTY_LIMIT = 100.0


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """How tokens are chosen; every field is checked when the object is made.

    Attributes:
        temperature: 0 = greedy argmax (no random draw); else in [1e-6, 1e6].
        top_k: Keep the k most likely tokens; 0 = off.
        top_p: Keep the smallest most-likely set with this much probability; 1 = off.
        min_p: Drop tokens below min_p times the top probability; 0 = off.
        repetition_penalty: 1 = off; recent tokens' positive logits are divided by it
            and negative ones multiplied (in [1e-3, 1e3]).
        frequency_penalty: Subtracted once per occurrence in the window ([-100, 100]).
        presence_penalty: Subtracted once if the token is in the window ([-100, 100]).
        penalty_window: How many of the most recent tokens the penalties look at;
            0 = all tokens passed to `Sampler.sample`.
        seed: PRNG seed in [0, 2**64); None draws one from the OS.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_window: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        """Validates every field.

        Raises:
            TypeError: A field has the wrong type.
            ValueError: A field is outside its range; the message names it.
        """
        t = _check_real("temperature", self.temperature)
        lo, hi = _TEMPERATURE_RANGE
        if not (t == 0.0 or lo <= t <= hi):
            raise ValueError(
                f"temperature must be 0 (greedy) or in [{lo:g}, {hi:g}], got {t!r}"
            )
        k = _check_int("top_k", self.top_k)
        if not 0 <= k <= MAX_VOCAB:
            raise ValueError(f"top_k must be in [0, {MAX_VOCAB}] (0 = off), got {k}")
        p = _check_real("top_p", self.top_p)
        if not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        mp = _check_real("min_p", self.min_p)
        if not 0.0 <= mp <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {mp!r}")
        rp = _check_real("repetition_penalty", self.repetition_penalty)
        lo, hi = _REPETITION_RANGE
        if not lo <= rp <= hi:
            raise ValueError(
                f"repetition_penalty must be in [{lo:g}, {hi:g}] (1 = off), got {rp!r}"
            )
        limit = _ADDITIVE_PENALTY_LIMIT
        for name in ("frequency_penalty", "presence_penalty"):
            v = _check_real(name, getattr(self, name))
            if not -limit <= v <= limit:
                raise ValueError(
                    f"{name} must be in [{-limit:g}, {limit:g}], got {v!r}"
                )
        w = _check_int("penalty_window", self.penalty_window)
        if not 0 <= w <= 2**31 - 1:
            raise ValueError(f"penalty_window must be in [0, 2**31 - 1], got {w}")
        if self.seed is not None:
            s = _check_int("seed", self.seed)
            if not 0 <= s <= _M64:
                raise ValueError(f"seed must be in [0, 2**64) or None, got {s}")

    @property
    def penalties_active(self) -> bool:
        """True when any of the three penalties changes logits."""
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


# ------------------------------------------------------------------------------
# PRNG: xoshiro256**, state = 4 x uint64, seeded with splitmix64 (same as the C kernel).


def rng_seed(seed: int) -> np.ndarray:
    """Returns a fresh PRNG state for `seed`.

    Args:
        seed: Integer in [0, 2**64).

    Returns:
        A (4,) uint64 array; `Sampler` and `sample_reference` advance it in place.
    """
    x = seed & _M64
    out = []
    for _ in range(4):
        x = (x + 0x9E3779B97F4A7C15) & _M64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        out.append(z ^ (z >> 31))
    return np.array(out, dtype=np.uint64)


def _rotl(v: int, k: int) -> int:
    return ((v << k) | (v >> (64 - k))) & _M64


def rng_next(state: np.ndarray) -> int:
    """Advances `state` (a (4,) uint64 array) one step and returns the 64-bit output."""
    s0, s1, s2, s3 = (int(v) for v in state)
    out = (_rotl((s1 * 5) & _M64, 7) * 9) & _M64
    t = (s1 << 17) & _M64
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = _rotl(s3, 45)
    state[:] = (s0, s1, s2, s3)
    return out


# ------------------------------------------------------------------------------
# The numpy reference.


def mask_words(vocab_size: int) -> int:
    """Returns how many uint32 words a token mask for `vocab_size` tokens has."""
    return (vocab_size + 31) // 32


def _q_of_t(t: np.ndarray) -> np.ndarray:
    """Fixed-point masses rint(exp2(t) * 2**30) of float32 scaled logits t <= 0.

    t is clamped at -32 first (also catches -inf); every t < -31 gives 0.
    """
    t = np.maximum(t, _T_CLAMP)
    kf = (t + _ROUND_MAGIC) - _ROUND_MAGIC
    f = t - kf
    p1, p2, p3, p4, p5 = _EXP2_POLY
    p = p5 * f + p4
    p = p * f + p3
    p = p * f + p2
    p = p * f + p1
    p = p * f + _F32(1.0)
    k = kf.astype(np.int32)
    bits = p.view(np.int32) + (k + np.int32(30)) * np.int32(1 << 23)
    q = np.rint(bits.view(np.float32)).astype(np.uint32)
    return np.minimum(q, np.uint32(_Q_ONE))


def _check_mask(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    words = mask_words(vocab_size)
    if not isinstance(mask, np.ndarray) or mask.dtype != np.uint32 or mask.ndim != 1:
        raise ValueError(
            f"mask must be a 1-D uint32 numpy array of {words} words, got "
            f"{type(mask).__name__} {getattr(mask, 'dtype', '')}"
        )
    if mask.shape[0] != words:
        raise ValueError(
            f"mask must have {words} uint32 words for vocab {vocab_size}, "
            f"got {mask.shape[0]}"
        )
    return np.ascontiguousarray(mask)


def _bias_arrays(
    bias: Mapping[int, float] | None, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    if not bias:
        return np.empty(0, np.int32), np.empty(0, np.float32)
    ids = np.fromiter((int(k) for k in bias.keys()), dtype=np.int64, count=len(bias))
    vals = np.fromiter((float(v) for v in bias.values()), np.float64, len(bias))
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise ValueError(
            f"bias token ids must be in [0, {vocab_size}), got {int(ids[bad][0])}"
        )
    return ids.astype(np.int32), vals.astype(np.float32)


def _window(recent: Sequence[int] | np.ndarray, window: int, vocab: int) -> np.ndarray:
    n = len(recent)
    start = n - window if 0 < window < n else 0
    w = np.asarray(recent[start:], dtype=np.int64).reshape(-1)
    if w.size and (int(w.min()) < 0 or int(w.max()) >= vocab):
        bad = w[(w < 0) | (w >= vocab)][0]
        raise ValueError(f"recent_tokens must be in [0, {vocab}), got {int(bad)}")
    return w


def _check_logits(logits: np.ndarray, vocab_size: int) -> None:
    shape = getattr(logits, "shape", None)
    if shape != (vocab_size,):
        raise ValueError(f"logits must have shape ({vocab_size},), got {shape}")


def sample_reference(
    logits: np.ndarray,
    settings: SamplerSettings,
    rng_state: np.ndarray,
    *,
    recent_tokens: Sequence[int] | np.ndarray = (),
    mask: np.ndarray | None = None,
    bias: Mapping[int, float] | None = None,
) -> int:
    """Picks one token in pure numpy: the definition the C kernel reproduces exactly.

    Args:
        logits: (vocab,) scores; not modified (the C path works in place).
        settings: Sampling settings (the seed field is ignored: the state is explicit).
        rng_state: (4,) uint64 PRNG state from `rng_seed`; advanced one step unless
            temperature is 0 or an error is raised.
        recent_tokens: Previously generated token ids, oldest first (for penalties).
        mask: Packed allowed-token bitmask: (ceil(vocab/32),) uint32, bit i % 32 of
            word i // 32 set = token i allowed.
        bias: Token id -> value added to its logit (float32 arithmetic).

    Returns:
        The chosen token id.

    Raises:
        ValueError: Bad shapes or token ids out of range.
        KernelError: NaN or +inf logits after mask/bias/penalties, or all masked.
    """
    vocab = int(np.shape(logits)[0]) if np.ndim(logits) == 1 else -1
    _check_logits(logits, vocab)
    x = np.array(logits, dtype=np.float32, copy=True)
    ids, vals = _bias_arrays(bias, vocab)
    window = (
        _window(recent_tokens, settings.penalty_window, vocab)
        if settings.penalties_active
        else np.empty(0, np.int64)
    )
    if mask is not None:
        bits = np.unpackbits(
            _check_mask(mask, vocab).astype("<u4").view(np.uint8), bitorder="little"
        )
        x[~bits[:vocab].astype(bool)] = -np.inf
    if ids.size:
        x[ids] += vals
    if window.size:
        uniq, counts = np.unique(window, return_counts=True)
        v = x[uniq]
        rep = _F32(settings.repetition_penalty)
        with np.errstate(invalid="ignore", over="ignore"):
            v = np.where(v > 0, v / rep, v * rep).astype(np.float32)
            pen = counts.astype(np.float64) * settings.frequency_penalty
            v = v - (pen + settings.presence_penalty).astype(np.float32)
        x[uniq] = v
    if np.isnan(x).any() or np.isposinf(x).any():
        raise KernelError("logits contain NaN or +inf after mask, bias and penalties")
    m = x.max()
    if m == -np.inf:
        raise KernelError("every token is masked out")
    if settings.temperature == 0.0:
        return int(np.argmax(x))

    if 0 < settings.top_k < vocab:
        finite = np.flatnonzero(x > -np.inf)
        if finite.size > settings.top_k:
            order = np.lexsort((finite, -x[finite]))  # logit desc, then id asc
            cand = np.sort(finite[order[: settings.top_k]])
        else:
            cand = finite
    else:
        cand = np.arange(vocab)
    c = _F32(_LOG2E / settings.temperature)
    q = _q_of_t((x[cand] - m) * c).astype(np.uint64)
    keep = np.ones(cand.size, dtype=bool)
    if settings.top_p < 1.0:
        target = settings.top_p * float(int(q.sum()))
        order = np.lexsort((cand, -q.astype(np.int64)))  # mass desc, then id asc
        before = np.cumsum(q[order]) - q[order]
        keep[:] = False
        keep[order[before.astype(np.float64) < target]] = True
    if settings.min_p > 0.0:
        keep &= q >= math.ceil(settings.min_p * _Q_ONE)
    kept, qk = cand[keep], q[keep]
    total = int(qk.sum())
    r = (rng_next(rng_state) * total) >> 64
    return int(kept[int(np.searchsorted(np.cumsum(qk), r, side="right"))])


# ------------------------------------------------------------------------------
# The Sampler.


def _address(a: np.ndarray) -> int:
    """Data address of a C-contiguous array (fast path for writable buffers)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError):  # read-only or empty
        return a.ctypes.data


class Sampler:
    """Chooses tokens with fixed settings and its own reproducible PRNG stream.

    The C kernel and the numpy reference give the same token for the same logits,
    settings and PRNG state; `backend` says which one runs.
    """

    def __init__(
        self, settings: SamplerSettings, vocab_size: int, *, backend: str = "auto"
    ) -> None:
        """Makes a sampler for one vocabulary size.

        Args:
            settings: Validated settings; its seed starts the PRNG stream.
            vocab_size: Number of logits per call, in [1, 2**22].
            backend: "auto" (C if available, else numpy; EDGESLM_KERNEL overrides),
                "c" (raise if the C kernel is missing) or "numpy".

        Raises:
            TypeError: settings is not a SamplerSettings.
            ValueError: vocab_size or backend out of range.
            KernelError: backend "c" requested but the kernel is not available.
        """
        if not isinstance(settings, SamplerSettings):
            raise TypeError(
                f"settings must be a SamplerSettings, got {type(settings).__name__}"
            )
        v = _check_int("vocab_size", vocab_size)
        if not 1 <= v <= MAX_VOCAB:
            raise ValueError(f"vocab_size must be in [1, {MAX_VOCAB}], got {v}")
        self._settings = settings
        self._vocab = v
        self.backend: str = _kernel.resolve_backend(backend)
        seed = settings.seed
        if seed is None:  # os.urandom: `secrets` would load OpenSSL (3.5 MB RSS)
            seed = int.from_bytes(os.urandom(8), "little")
        self._state = rng_seed(seed)
        self._penalties = settings.penalties_active
        self._handle: ctypes.c_void_p | None = None
        if self.backend == "c":
            self._init_c()

    def _init_c(self) -> None:
        lib = _kernel.require()
        handle = ctypes.c_void_p()
        _kernel.check(
            lib.esl_sampler_init(self._vocab, ctypes.byref(handle)), "esl_sampler_init"
        )
        self._handle = handle
        self._finalizer = weakref.finalize(self, lib.esl_sampler_free, handle)
        s = self._settings
        self._params = _kernel.SamplerParams(
            temperature=s.temperature,
            top_p=s.top_p,
            min_p=s.min_p,
            repetition_penalty=s.repetition_penalty,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
            top_k=s.top_k,
            penalty_window=s.penalty_window,
        )
        self._out = ctypes.c_int32(-1)
        self._fn = lib.esl_sampler_sample
        self._fixed = (
            handle.value,
            ctypes.addressof(self._params),
            _address(self._state),
            ctypes.addressof(self._out),
        )

    @property
    def settings(self) -> SamplerSettings:
        """The settings this sampler was made with."""
        return self._settings

    @property
    def vocab_size(self) -> int:
        """Number of logits each call expects."""
        return self._vocab

    @property
    def rng_state(self) -> np.ndarray:
        """A copy of the (4,) uint64 PRNG state (save it to resume the stream)."""
        return self._state.copy()

    @rng_state.setter
    def rng_state(self, state: np.ndarray) -> None:
        arr = np.asarray(state)
        if arr.shape != (4,) or arr.dtype != np.uint64:
            raise ValueError(
                f"rng_state must be a (4,) uint64 array, got {arr.dtype} {arr.shape}"
            )
        self._state[:] = arr

    def sample(
        self,
        logits: np.ndarray,
        *,
        recent_tokens: Sequence[int] | np.ndarray = (),
        mask: np.ndarray | None = None,
        bias: dict[int, float] | None = None,
    ) -> int:
        """Picks the next token.

        Args:
            logits: (vocab_size,) scores. With the C backend a C-contiguous float32
                array is modified in place (mask, bias and penalties are applied to
                it); other arrays are copied first.
            recent_tokens: Previously generated ids, oldest first; only the last
                `penalty_window` are read. An int32 numpy array avoids a copy.
            mask: Packed allowed-token bitmask, (ceil(vocab/32),) uint32.
            bias: Token id -> value added to its logit.

        Returns:
            The chosen token id.

        Raises:
            ValueError: Bad shapes, or a token id outside [0, vocab_size) in bias or
                (when a penalty is on) in the penalty window of recent_tokens.
            KernelError: NaN or +inf logits (after mask, bias and penalties), or every
                token masked out.
        """
        if self.backend == "numpy":
            _check_logits(logits, self._vocab)
            return sample_reference(
                logits,
                self._settings,
                self._state,
                recent_tokens=recent_tokens,
                mask=mask,
                bias=bias,
            )
        vocab = self._vocab
        x = logits
        if not (
            type(x) is np.ndarray
            and x.dtype is _F32_DTYPE
            and x.flags.c_contiguous
            and x.flags.writeable
        ):
            x = np.array(x, dtype=np.float32, order="C")
        if x.shape != (vocab,):
            raise ValueError(f"logits must have shape ({vocab},), got {x.shape}")
        mask_ptr = None
        if mask is not None:
            mask = _check_mask(mask, vocab)
            mask_ptr = _address(mask)
        n_bias = 0
        ids_ptr = vals_ptr = None
        if bias:
            ids, vals = _bias_arrays(bias, vocab)
            n_bias, ids_ptr, vals_ptr = ids.size, _address(ids), _address(vals)
        recent_ptr = None
        n_recent = 0
        if self._penalties and len(recent_tokens):
            recent = self._recent_array(recent_tokens)
            n_recent, recent_ptr = recent.size, _address(recent)
        handle, params, state, out = self._fixed
        status = self._fn(
            handle,
            params,
            _address(x),
            mask_ptr,
            ids_ptr,
            vals_ptr,
            n_bias,
            recent_ptr,
            n_recent,
            state,
            out,
        )
        if status != _kernel.OK:
            if status == _kernel.ERR_TOKEN_RANGE:
                _window(recent_tokens, self._settings.penalty_window, vocab)
            _kernel.check(status, "sampling")
        return self._out.value

    def _recent_array(self, recent: Sequence[int] | np.ndarray) -> np.ndarray:
        """The penalty window as a contiguous int32 array (no copy when possible)."""
        w = self._settings.penalty_window
        n = len(recent)
        if 0 < w < n:
            recent = recent[n - w :]
        if isinstance(recent, np.ndarray) and recent.dtype == np.int32:
            return np.ascontiguousarray(recent)
        arr = np.asarray(recent, dtype=np.int64).reshape(-1)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self._vocab):
            _window(arr, 0, self._vocab)  # raises with the offending id
        return arr.astype(np.int32)
