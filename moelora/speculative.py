"""N-gram speculative decoding for the engine (vLLM's ``speculative_config={"method": "ngram", ...}``).

Each decoding step, every running request may propose up to ``num_speculative_tokens`` draft
tokens by prompt lookup: the longest suffix of its prompt + output (``prompt_lookup_max`` down to
``prompt_lookup_min`` tokens) that occurred earlier in it, most recent occurrence first, and the
tokens that followed it there (when they run into the end of the sequence, the repetition is
continued with its period: a loop of p tokens is drafted in full). The engine feeds each row its last token and its drafts in one
forward (rows padded to the longest draft) and then samples position by position exactly as a
plain step would, with the request's own filters, penalties, guide and generator, while the
sampled token equals the draft: a draft is accepted when the model would have produced it anyway.
So the output is the one without speculation, greedy or seeded sampling alike (for sampling,
accepting a deterministic draft with probability p(draft) and otherwise sampling from p without it
is vLLM's rejection sampler for a one-hot draft distribution; sampling from p and comparing does
both at once and draws the generator exactly as plain decoding does). Only floating-point
differences between a one-token and a multi-token forward can change a token.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

__all__ = ["SpeculativeConfig", "NgramProposer"]


@dataclass
class SpeculativeConfig:
    num_speculative_tokens: int = 4
    # vLLM's defaults: both unset -> 5 and 5; one set -> the other equal to it
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    disable_by_batch_size: int | None = None  # vLLM's: no speculation while more requests than this run
    adaptive: bool = True  # each request's draft length follows its acceptance, with a backoff (see NgramProposer)
    method: str = "ngram"

    @classmethod
    def from_dict(cls, spec: dict) -> SpeculativeConfig:
        """Validate vLLM's ``speculative_config`` dictionary (``method`` ``"ngram"`` only)."""
        if not isinstance(spec, dict):
            raise ValueError(f"the speculative config must be a JSON object, got {type(spec).__name__}")
        unknown = sorted(set(spec) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown speculative config key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        method = spec.get("method", "ngram")
        if method != "ngram":
            raise ValueError(f"speculative method {method!r} is not supported: only 'ngram' (prompt lookup, no "
                             "draft model)")
        if "num_speculative_tokens" not in spec:
            raise ValueError("the speculative config needs num_speculative_tokens (draft tokens per step)")
        cfg = cls(**spec)
        cfg.validate()
        return cfg

    def __post_init__(self) -> None:
        if self.prompt_lookup_max is None and self.prompt_lookup_min is None:
            self.prompt_lookup_max = self.prompt_lookup_min = 5
        elif self.prompt_lookup_min is None:
            self.prompt_lookup_min = self.prompt_lookup_max
        elif self.prompt_lookup_max is None:
            self.prompt_lookup_max = self.prompt_lookup_min

    def validate(self) -> None:
        for key in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 64:
                raise ValueError(f"speculative {key} must be an integer in [1, 64], got {v!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative adaptive must be true or false, got {self.adaptive!r}")
        d = self.disable_by_batch_size
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise ValueError(f"speculative disable_by_batch_size must be a positive integer or null, got {d!r}")


class NgramProposer:
    """One request's token history and its prompt-lookup drafts. The history is kept as packed
    32-bit ids so that a lookup is one C-level ``bytes.rfind`` (plus rare misaligned retries)
    rather than a Python scan of the sequence."""

    def __init__(self, prompt: list[int], k: int) -> None:
        self.tokens: list[int] = list(prompt)
        self.buf = bytearray(array("i", self.tokens).tobytes())
        self.k = k  # the draft length now (adaptive: moved by ``accepted``)
        self.backoff = 0  # adaptive: steps without drafts after the last rejection of a one-token draft
        self.pause = 0  # ... of which this many are left

    def accepted(self, cfg: SpeculativeConfig, proposed: int, accepted: int) -> None:
        """The adaptive schedule: transformers' heuristic (every draft accepted, two more next time, up to
        ``num_speculative_tokens``; a rejection, one fewer) and, when a one-token draft is rejected, no
        drafts for the next 1, 2, 4, ... 16 steps (reset by a draft accepted): verifying a token costs
        about as much as decoding one where the forward is compute-bound (a CPU), so text that does not
        repeat itself should not pay for drafts that keep failing."""
        if not cfg.adaptive or not proposed:
            return
        if accepted == proposed:
            self.k, self.backoff = min(cfg.num_speculative_tokens, self.k + 2), 0
        elif self.k == 1 and not accepted:
            self.backoff = min(16, 2 * self.backoff or 1)
            self.pause = self.backoff
        else:
            self.k = max(1, self.k - 1)
            self.backoff = 0 if accepted else self.backoff

    def extend(self, new: list[int]) -> None:
        """Append tokens to the history."""
        if new:
            self.tokens.extend(new)
            self.buf += array("i", new).tobytes()

    def propose(self, cfg: SpeculativeConfig, limit: int) -> list[int]:
        """Up to ``min(limit, num_speculative_tokens)`` tokens that followed the most recent earlier
        occurrence of the longest matching suffix (``prompt_lookup_max`` down to ``_min`` tokens)."""
        if self.pause:
            self.pause -= 1
            return []
        k = min(limit, self.k)
        n_tok = len(self.tokens)
        if k <= 0 or n_tok < 2:
            return []
        buf, end = self.buf, len(self.buf) - 4  # a match must end before the last token: something follows
        for n in range(min(cfg.prompt_lookup_max, n_tok - 1), cfg.prompt_lookup_min - 1, -1):
            pat = bytes(buf[-4 * n:])
            pos = buf.rfind(pat, 0, end)
            while pos > 0 and pos % 4:  # a match across token boundaries: look further left
                pos = buf.rfind(pat, 0, pos + 4 * n - 1)
            if pos >= 0 and pos % 4 == 0:
                start = pos // 4 + n  # <= n_tok - 1
                out = self.tokens[start : start + k]
                while len(out) < k:  # the copy reaches the end: the sequence repeats with its period
                    out.append(out[start + len(out) - n_tok])
                return out
        return []
