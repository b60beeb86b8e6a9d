"""A batched multi-tenant inference engine: many adapters of any method on one frozen base model.

One decoding step is one forward for every running request, whatever adapter each uses (the
model's mixed-batch path, ``adapter_names=``): the frozen weights are read once for all rows, each
row gets its own adapter's deltas, MiLoRA rows route once at prefill and reuse their gates while
decoding, MixLoRA rows route per token.

- **Continuous batching.** ``step()`` first admits waiting requests, in arrival order (up to
  ``max_batch`` running, and as many as keep the prefill's padded size, rows x longest prompt,
  within ``max_prefill_tokens``, vLLM's ``max_num_batched_tokens``): they are prefilled together
  (left-padded, mixed adapters) and their caches join the running batch; then every running
  request decodes one token. Finished requests leave at once.
- **Chunked prefill** (vLLM's, on by default: ``chunked_prefill``). A prompt that does not fit the
  budget left starts anyway and is prefilled a chunk per step, each chunk on top of the keys and
  values of the ones before (and of the prefix cache's blocks it starts from), while the running
  requests keep decoding; its last chunk samples its first token and it joins the batch. One such
  prompt at a time; what waits behind it waits (first come, first served). Not for MiLoRA (its
  routers read the whole prompt before any token is computed) nor for ``prompt_logprobs``
  requests: those go in alone when the budget is untouched, however long.
- **KV cache.** ``KVStore``: per layer one preallocated ``(rows, kv_heads, capacity, head_dim)``
  buffer that grows by doubling (rows and columns) and is compacted in place; rows are
  right-aligned (left padding), so a decoding step writes one column for all rows. Within
  ``kv_cache_bytes``, requests are admitted by what they hold now, and when the running ones
  outgrow it the last to arrive is preempted and later recomputed (vLLM's recompute preemption:
  its prompt and output so far prefilled again, its sampling state kept, so its output does not
  change); ``preemption=False`` instead admits only what fits to the end of every request.
- **Prefix caching.** ``PrefixCache`` (vLLM's automatic prefix caching, per adapter): the keys and
  values of prompts' full 16-token blocks (and of prompt + output when a request finishes) stay
  over a byte budget, and a prompt that starts with blocks already seen under the same adapter
  weights (a shared system prompt, a chat's earlier turns) prefills only the rest. Not for MiLoRA
  adapters, whose routing of every prompt token depends on the whole prompt, nor for requests that
  ask for the prompt's log-probabilities.
- **Speculative decoding** (``speculative=``, vLLM's n-gram ``speculative_config``; see
  ``moelora.speculative``): requests draft tokens by prompt lookup in their own text; one forward
  verifies every row's drafts and each row samples position by position as a plain step would, so
  outputs do not change. Rejected drafts leave holes in the ``KVStore`` (masked columns), aligned
  away now and then, and after every step for sliding-window models.
- **Adapter pool.** ``AdapterPool``: adapters are registered by name and directory, loaded on first
  use, kept resident up to a byte budget, and the least recently used one that no running request
  needs is evicted.
- **Sampling.** Greedy (``temperature = 0``) or temperature / min-p / top-k / top-p sampling with
  one seeded generator per request, so a request's output does not depend on what it is batched
  with; OpenAI's presence and frequency penalties (on the output's tokens) and logit bias; the
  repetition penalty of ``transformers`` and vLLM (on the prompt's and the output's tokens); vLLM's
  ``min_tokens``, ``stop_token_ids``, ``ignore_eos`` and ``include_stop_str_in_output``; guided
  decoding (``json_object``: one JSON object; ``guided_regex``; ``guided_choice``; ``guided_grammar``: see
  ``moelora.structured``). Stop sequences are cut
  from the text (or kept, with the last option); streaming text never splits a UTF-8 character or
  shows the start of a stop sequence that may still complete.

The engine is single-threaded: the HTTP server (``moelora.server``) drives it from one thread.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .config import MiLoraConfig
from .speculative import NgramProposer, SpeculativeConfig
from .structured import GrammarPrefix, JsonPrefix, RegexPrefix, check_guides, guide_for

__all__ = ["SamplingParams", "StepOutput", "TokenLogprob", "QueueFull", "Engine", "AdapterPool", "KVStore",
           "PrefixCache", "ADAPTER_NAME"]

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # no dots, slashes: never a path
MAX_LOGPROBS = 20  # top alternatives per output token (vLLM's default limit)
JSON_MAX_WS = 64  # JSON mode: whitespace characters in a row (none before the object)


class QueueFull(Exception):
    """More requests are waiting than the engine accepts (``max_queue``)."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_k: int = 0  # 0: off; k: sample among the k most likely tokens
    presence_penalty: float = 0.0  # OpenAI's: subtracted from the logit of every token already in the output
    frequency_penalty: float = 0.0  # OpenAI's: times the number of times the token is in the output
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: token id -> added to its logit
    logprobs: int | None = None  # None: none; k: each output token's log-probability and the top k
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (with the first step's output)
    repetition_penalty: float = 1.0  # transformers'/vLLM's: a logit of a prompt or output token: > 0 -> /p, < 0 -> *p
    min_p: float = 0.0  # sampling: drop tokens less likely than min_p x the most likely one (after temperature)
    min_tokens: int = 0  # no EOS, stop token or stop sequence ends the output before this many tokens
    stop_token_ids: list[int] = field(default_factory=list)  # end the output like EOS (their text is not in it)
    ignore_eos: bool = False  # keep generating after EOS (up to max_tokens; stop_token_ids still stop)
    include_stop_str_in_output: bool = False  # keep the stop sequence that ended the output in its text
    json_object: bool = False  # JSON mode: the output is one JSON object (moelora.structured), then it ends
    guided_regex: str | None = None  # the output must match this regular expression entirely (``regex`` syntax)
    guided_choice: list[str] | None = None  # the output must be one of these strings
    guided_grammar: str | None = None  # the output must be a sentence of this GBNF grammar (moelora.grammar)
    priority: int = 0  # vLLM's: with scheduling_policy="priority", lower values are admitted first
    allowed_token_ids: list[int] | None = None  # vLLM's: only these tokens may be sampled (EOS too, if listed)
    skip_special_tokens: bool = True  # vLLM's: False keeps special tokens' text in the output (not the ending one)
    bad_words_ids: list[list[int]] = field(default_factory=list)  # token sequences that must not appear (vLLM's
    # bad_words, tokenized): the last token of one is masked where the output ends with the ones before it

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        for key in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not -2 <= v <= 2:
                raise ValueError(f"{key} must be a number in [-2, 2], got {v!r}")
        if not isinstance(self.logit_bias, dict) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 and isinstance(v, (int, float))
                and not isinstance(v, bool) and -100 <= v <= 100 for t, v in self.logit_bias.items()):
            raise ValueError("logit_bias must map token ids >= 0 to numbers in [-100, 100]")
        for key in ("logprobs", "prompt_logprobs"):
            k = getattr(self, key)
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{key} must be None or an integer in [0, {MAX_LOGPROBS}], got {k!r}")
        rp = self.repetition_penalty
        if not isinstance(rp, (int, float)) or isinstance(rp, bool) or not 0 < rp <= 10:
            raise ValueError(f"repetition_penalty must be a number in (0, 10] (1: off), got {rp!r}")
        if not isinstance(self.min_p, (int, float)) or isinstance(self.min_p, bool) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        m = self.min_tokens
        if not isinstance(m, int) or isinstance(m, bool) or not 0 <= m <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {m!r}")
        if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of token ids >= 0, got {self.stop_token_ids!r}")
        for key in ("ignore_eos", "include_stop_str_in_output", "json_object", "skip_special_tokens"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        check_guides(self.json_object, self.guided_regex, self.guided_choice, self.guided_grammar)
        ids = self.allowed_token_ids
        if ids is not None and (not isinstance(ids, list) or not ids or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
            raise ValueError(f"allowed_token_ids must be a non-empty list of token ids >= 0, got {ids!r}")
        if not isinstance(self.bad_words_ids, list) or not all(
                isinstance(w, list) and w and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in w)
                for w in self.bad_words_ids):
            raise ValueError("bad_words_ids must be a list of non-empty token id lists")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool) or abs(self.priority) > 2**31:
            raise ValueError(f"priority must be an integer, got {self.priority!r}")


@dataclass
class TokenLogprob:
    """One output token: its text in the output (the characters it adds to the decoded text; a token
    that ends inside a UTF-8 character adds none, the one completing it adds the character), its offset
    in the output text, its log-probability under the model (raw logits: before logit_bias, penalties,
    temperature, top-k and top-p),
    and the ``k`` most likely tokens at that position as ``(token id, token text alone, log-probability)``.
    Prompt tokens (``prompt_logprobs``) are the same within the prompt's text; the first one has no
    log-probability (``None``) and no alternatives."""

    token_id: int
    token: str
    offset: int
    logprob: float | None
    top: list[tuple[int, str, float]]


@dataclass
class StepOutput:
    request_id: str
    token_ids: list[int]  # tokens produced this step
    text: str  # text produced this step
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    prompt_tokens: int
    completion_tokens: int  # so far
    logprobs: list[TokenLogprob] | None = None  # with params.logprobs: the tokens whose text is released here
    prompt_logprobs: list[TokenLogprob] | None = None  # with params.prompt_logprobs: on the first output
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache (first output)


@dataclass
class _Request:
    id: str
    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    generator: torch.Generator | None
    arrival: float
    output: list[int] = field(default_factory=list)
    text: str = ""  # decoded output, stop sequence cut
    sent: int = 0  # characters of ``text`` already streamed
    ends: list[int] = field(default_factory=list)  # decoded length after each output token (uncut)
    lps: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # with logprobs: per token
    lp_sent: int = 0  # output tokens whose logprobs were already emitted
    gates: dict[int, torch.Tensor] | None = None  # MiLoRA: layer -> (E,) gates from prefill
    gate_any: dict[int, list[bool]] | None = None  # the same, as host booleans (selected or not)
    finish_reason: str | None = None
    scope: tuple | None = None  # prefix cache: its adapter's scope at prefill (None: not cached)
    guide: JsonPrefix | RegexPrefix | GrammarPrefix | None = None  # guided decoding: the output's state
    stop_from: int = 0  # stop sequences count only where they end after this offset of ``text`` (min_tokens)
    done: int = 0  # chunked prefill: prompt tokens whose keys and values are computed
    partial: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # ... those keys and values, per layer
    chain: list | None = None  # ... the prefix cache's blocks it started from
    proposer: NgramProposer | None = None  # speculative decoding: its token history

    @property
    def feed(self) -> list[int]:
        """The tokens a prefill computes keys and values for: the prompt or, for a request preempted and
        resumed by recomputation, its prompt and its output but the last token (the next step feeds it)."""
        return self.prompt + self.output[:-1] if self.output else self.prompt


# ---------------------------------------------------------------------------------------------
# KV cache


class _StoreLayer(DynamicLayer):
    """One layer's view of the ``KVStore``: writes the new columns, returns the live rows."""

    def __init__(self, store: KVStore, index: int) -> None:
        super().__init__()
        self.store, self.index = store, index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.store.write(self.index, key_states, value_states)

    def get_seq_length(self) -> int:
        return self.store.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.length + query_length, 0


class KVStore:
    """Preallocated, right-aligned key/value buffers for the running rows of every layer.

    Rows ``[0, rows)`` are live; columns ``[0, length)`` hold their tokens, each row's last token
    in column ``length - 1`` and its left padding masked out by ``mask``. Buffers grow by doubling
    and are compacted (dropping columns that are padding for every row) before growing.
    """

    def __init__(self, num_layers: int, limit: int | None = None) -> None:
        self.num_layers = num_layers
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask: torch.Tensor | None = None  # (row capacity, column capacity) long
        self.rows = 0
        self.length = 0
        self.limit = limit  # at most this many slots (row capacity x column capacity); None: no limit
        self.holes = False  # speculation left masked columns between some row's tokens

    def cache(self) -> Cache:
        return Cache(layers=[_StoreLayer(self, i) for i in range(self.num_layers)])

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[-2]
        self.keys[layer][: self.rows, :, self.length : self.length + T] = k
        self.values[layer][: self.rows, :, self.length : self.length + T] = v
        end = self.length + T
        return self.keys[layer][: self.rows, :, :end], self.values[layer][: self.rows, :, :end]

    @property
    def capacity(self) -> tuple[int, int]:
        return (0, 0) if self.mask is None else tuple(self.mask.shape)

    def _ensure(self, rows: int, cols: int, like: list[torch.Tensor]) -> None:
        """Room for ``rows x cols``: reallocate (doubling) keeping the live data, if needed."""
        cap_rows, cap_cols = self.capacity
        if rows <= cap_rows and cols <= cap_cols:
            return
        need_rows, need_cols = rows, cols
        rows = max(rows, 2 * cap_rows) if rows > cap_rows else cap_rows  # a dimension that grows doubles
        cols = max(cols, 2 * cap_cols, 16) if cols > cap_cols else cap_cols
        if self.limit is not None:  # ... up to the limit (rows may shrink to the live ones; never below the need)
            rows = max(need_rows, min(rows, self.limit // max(need_cols, 1)))
            cols = max(need_cols, min(cols, self.limit // max(rows, 1)))

        def grow(old: torch.Tensor | None, proto: torch.Tensor) -> torch.Tensor:
            new = torch.zeros((rows, proto.shape[1], cols, proto.shape[3]), dtype=proto.dtype, device=proto.device)
            if old is not None:
                new[: self.rows, :, : self.length] = old[: self.rows, :, : self.length]
            return new

        self.keys = [grow(self.keys[i] if self.keys else None, like[i]) for i in range(self.num_layers)]
        self.values = [grow(self.values[i] if self.values else None, like[i]) for i in range(self.num_layers)]
        mask = torch.zeros(rows, cols, dtype=torch.long, device=like[0].device)
        if self.mask is not None:
            mask[: self.rows, : self.length] = self.mask[: self.rows, : self.length]
        self.mask = mask

    def _shift_right(self, by: int) -> None:
        """Move the live columns ``by`` to the right (new left padding for every row)."""
        L, n = self.length, self.rows
        for buf in (*self.keys, *self.values):
            buf[:n, :, by : by + L] = buf[:n, :, :L].clone()
            buf[:n, :, :by] = 0
        self.mask[:n, by : by + L] = self.mask[:n, :L].clone()
        self.mask[:n, :by] = 0
        self.length += by

    def compact(self) -> None:
        """Drop the columns that are padding in every live row."""
        if self.rows == 0:
            self.length = 0
            return
        live = self.mask[: self.rows, : self.length].any(0).nonzero()
        first = int(live[0]) if live.numel() else self.length
        if first == 0:
            return
        L, n = self.length - first, self.rows
        for buf in (*self.keys, *self.values):
            buf[:n, :, :L] = buf[:n, :, first : first + L].clone()
        self.mask[:n, :L] = self.mask[:n, first : first + L].clone()
        self.length = L

    def append(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add prefilled rows (``cache`` of a left-padded batch with 2-D ``mask``), right-aligned."""
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        new, width = mask.shape
        self.compact()
        if width > self.length:  # the new rows are longer: pad the live rows on the left
            self._ensure(self.rows, width, keys)
            self._shift_right(width - self.length)
        self._ensure(self.rows + new, self.length, keys)
        off, rows = self.length - width, slice(self.rows, self.rows + new)
        for i in range(self.num_layers):
            self.keys[i][rows, :, :off] = 0
            self.values[i][rows, :, :off] = 0
            self.keys[i][rows, :, off : self.length] = keys[i]
            self.values[i][rows, :, off : self.length] = values[i]
        self.mask[rows, :off] = 0
        self.mask[rows, off : self.length] = mask
        self.rows += new

    def keep(self, rows: list[int]) -> None:
        """Keep only these live rows, in this order."""
        if rows == list(range(self.rows)):
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        n = len(rows)
        for buf in (*self.keys, *self.values):
            buf[:n, :, : self.length] = buf[idx, :, : self.length]
        self.mask[:n, : self.length] = self.mask[idx, : self.length]
        self.rows = n
        self.compact()

    def step_mask(self, valid: list[int] | None = None, width: int = 1) -> torch.Tensor:
        """The attention mask of one decoding step: the live columns plus ``width`` new ones (row ``i``'s
        first ``valid[i]`` of them; all of them by default)."""
        if self.length + width > self.capacity[1]:
            self.compact()
            if self.holes and self.limit is not None and self.rows * (self.length + width) > self.limit:
                self.align()  # within the limit without the holes
            self._ensure(self.rows, self.length + width, self.keys)
        new = self.mask[: self.rows, self.length : self.length + width]
        if valid is None:
            new.fill_(1)
        else:
            new.copy_(torch.arange(width) < torch.tensor(valid)[:, None])
        return self.mask[: self.rows, : self.length + width]

    def reject(self, keep: list[int], width: int) -> None:
        """After a speculative step of ``width`` columns: row ``i`` keeps the first ``keep[i]`` of them,
        the others become holes (masked out; ``align`` removes them)."""
        new = self.mask[: self.rows, self.length : self.length + width]
        new.copy_(torch.arange(width) < torch.tensor(keep)[:, None])
        self.length += width
        self.holes = self.holes or min(keep) < width

    def row_columns(self, row: int, n: int) -> torch.Tensor:
        """The columns of row ``row``'s last ``n`` tokens (holes left by speculation skipped)."""
        return self.mask[row, : self.length].nonzero().squeeze(1)[-n:]

    def align(self) -> None:
        """Remove holes: every row's tokens contiguous and right-aligned again (column distances are
        token distances, as sliding-window attention needs)."""
        if self.rows == 0:
            self.length = 0
            return
        L, n = self.length, self.rows
        mask = self.mask[:n, :L]
        width = int(mask.sum(1).max())
        order = mask.argsort(dim=1, stable=True)[:, L - width :]  # each row's padding first, then its tokens in order
        for buf in (*self.keys, *self.values):
            at = order[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[3])
            buf[:n, :, :width] = buf[:n, :, :L].gather(2, at)
        self.mask[:n, :width] = mask.gather(1, order)
        self.length = width
        self.holes = False


# ---------------------------------------------------------------------------------------------
# Prefix cache


@dataclass
class _Block:
    id: int
    scope: tuple  # (adapter name or "", its load serial, its weights' state)
    keys: list[torch.Tensor]  # per layer (kv_heads, block, head_dim)
    values: list[torch.Tensor]
    nbytes: int
    key: tuple = ()  # its key in ``PrefixCache.entries``


class PrefixCache:
    """The keys and values of full ``block``-token blocks of prompts, LRU over a byte budget.

    A block is found by what determines its keys and values: the adapter (``scope``: its name, load
    and the state of its weights) and every token up to the block's end, as a chain
    ``(parent block's id, this block's tokens)`` whose root is the scope (exact keys, no hashes).
    Chains are touched child first, so a parent is always more recent than its children and LRU
    eviction shortens chains from their end rather than orphaning their tails.
    """

    def __init__(self, budget_bytes: int, block: int = 16) -> None:
        if block < 1 or budget_bytes < 0:
            raise ValueError(f"need block >= 1 and budget_bytes >= 0, got {block}, {budget_bytes}")
        self.budget, self.block = budget_bytes, block
        self.entries: OrderedDict[tuple, _Block] = OrderedDict()
        self.bytes = 0
        self._ids = 0
        self.queries = self.hits = 0  # prompt tokens looked up / found (vLLM's prefix_cache_queries/hits)

    def _key(self, scope: tuple, parent: _Block | None, tokens: list[int], j: int) -> tuple:
        return (scope if parent is None else parent.id, tuple(tokens[j * self.block : (j + 1) * self.block]))

    def lookup(self, scope: tuple, tokens: list[int], limit: int) -> list[_Block]:
        """The cached blocks that start ``tokens``, covering at most its first ``limit`` tokens."""
        chain: list[_Block] = []
        for j in range(limit // self.block):
            hit = self.entries.get(self._key(scope, chain[-1] if chain else None, tokens, j))
            if hit is None:
                break
            chain.append(hit)
        self._touch(chain)
        return chain

    def add(self, scope: tuple, tokens: list[int], chain: list[_Block], keys: list[torch.Tensor],
            values: list[torch.Tensor]) -> bool:
        """Cache the block after ``chain`` (``keys``/``values`` per layer); False if it cannot fit."""
        key = self._key(scope, chain[-1] if chain else None, tokens, len(chain))
        if key in self.entries:
            chain.append(self.entries[key])
            return True
        nbytes = sum(t.numel() * t.element_size() for t in (*keys, *values))
        if nbytes > self.budget:
            return False
        self._ids += 1
        chain.append(_Block(self._ids, scope, keys, values, nbytes, key))
        self.entries[key] = chain[-1]
        self.bytes += nbytes
        self._touch(chain)
        while self.bytes > self.budget:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
        return all(self.entries.get(b.key) is b for b in chain)  # the chain survived its own eviction

    def _touch(self, chain: list[_Block]) -> None:
        for b in reversed(chain):  # child first: each parent ends up more recent than its children
            self.entries.move_to_end(b.key)

    def drop(self, name: str) -> None:
        """Forget every block of adapter ``name`` (unloaded)."""
        for key in [k for k, b in self.entries.items() if b.scope[0] == name]:
            self.bytes -= self.entries.pop(key).nbytes

    def reset(self) -> None:
        self.entries.clear()
        self.bytes = 0


# ---------------------------------------------------------------------------------------------
# Adapter pool


def adapter_bytes(model: nn.Module, name: str) -> int:
    from .inject import adapter_of

    return sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if adapter_of(n) == name
    )


class AdapterPool:
    """Adapters by name: registered with a directory, loaded on demand, LRU-evicted over a budget."""

    def __init__(self, model: nn.Module, budget_bytes: int | None = None) -> None:
        self.model = model
        self.budget = budget_bytes
        self.paths: dict[str, Path | None] = {}  # None: attached in memory by ``adopt``
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recent first
        self.loads = 0  # loads from disk (for tests and stats)
        self.serial: dict[str, int] = {}  # name -> a number new at each load or adoption (prefix cache scope)
        self._serials = 0

    @staticmethod
    def check_name(name: str) -> None:
        if not isinstance(name, str) or not ADAPTER_NAME.match(name):
            raise ValueError(
                f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit"
            )

    def register(self, name: str, path: str | Path) -> None:
        """Register (and load once, to validate) the adapter in directory ``path`` (or a hub id) as ``name``."""
        self.check_name(name)
        if name in self.paths:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")
        where = Path(path)
        if not where.is_dir():
            from .checkpoint import is_hub_id, resolve_adapter_dir

            if not is_hub_id(path):
                raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
            where = resolve_adapter_dir(path)  # a hub id: downloaded once; reloads read that copy
        self.paths[name] = where
        try:
            self.ensure(name, pinned=set())
        except Exception:
            del self.paths[name]
            raise

    def adopt(self, name: str) -> None:
        """Register an adapter already attached to the model (no directory: never evicted)."""
        self.check_name(name)
        if name in self.paths:
            raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")
        self.paths[name] = None
        self.resident[name] = adapter_bytes(self.model, name)
        self._serials += 1
        self.serial[name] = self._serials

    def unregister(self, name: str) -> None:
        if name not in self.paths:
            raise KeyError(f"no adapter named {name!r}")
        self._evict(name)
        del self.paths[name]

    def ensure(self, name: str, pinned: set[str]) -> None:
        """Make ``name`` resident (most recently used), evicting others not in ``pinned``."""
        from .checkpoint import load_adapter

        if name in self.resident:
            self.resident.move_to_end(name)
        else:
            load_adapter(self.model, self.paths[name], adapter_name=name)
            self.loads += 1
            self._serials += 1
            self.serial[name] = self._serials
            self.model.eval()
            self.resident[name] = adapter_bytes(self.model, name)
        if self.budget is not None:
            for victim in list(self.resident):
                if sum(self.resident.values()) <= self.budget:
                    break
                if victim != name and victim not in pinned and self.paths[victim] is not None:
                    self._evict(victim)

    def _evict(self, name: str) -> None:
        from .inject import detach

        if name in self.resident:
            detach(self.model, name)
            del self.resident[name]


# ---------------------------------------------------------------------------------------------
# Engine


class Engine:
    """Continuous batching over one base model and an adapter pool (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        max_batch: int = 32,
        max_queue: int = 1024,
        max_model_len: int | None = None,
        adapter_budget_bytes: int | None = None,
        base_name: str | None = None,
        prefix_cache_bytes: int = 256 * 2**20,
        max_prefill_tokens: int = 8192,
        chunked_prefill: bool = True,
        scheduling_policy: str = "fcfs",
        speculative: SpeculativeConfig | dict | None = None,
        kv_cache_bytes: int | None = None,
        preemption: bool = True,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        if not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be a positive integer, got {max_prefill_tokens!r}")
        self.max_prefill_tokens = max_prefill_tokens  # vLLM's max_num_batched_tokens, for admissions
        self.chunked_prefill = chunked_prefill  # vLLM's enable_chunked_prefill: longer prompts in chunks
        if scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {scheduling_policy!r}")
        self.scheduling_policy = scheduling_policy  # vLLM's: the waiting queue's order
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        if max_model_len is not None and not 2 <= max_model_len <= limit:
            raise ValueError(f"max_model_len must be between 2 and the model's {limit} positions, got {max_model_len}")
        self.max_model_len = max_model_len or limit
        self.base_name = base_name or Path(str(getattr(model.config, "_name_or_path", "") or "base")).name or "base"
        self.pool = AdapterPool(model, adapter_budget_bytes)
        self.device = next(model.parameters()).device
        self.num_layers = model.config.num_hidden_layers
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        if eos is None:
            eos = getattr(tokenizer, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.prefilling: list[_Request] = []  # long prompts prefilled a chunk per step (first: the current one)
        self.ids: set[str] = set()
        cfg = model.config
        heads = getattr(cfg, "num_attention_heads", 1)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        dtype = getattr(model, "dtype", None) or torch.float32
        # keys and values of one token of one row, every layer
        self.kv_bytes_per_token = 2 * self.num_layers * (getattr(cfg, "num_key_value_heads", None) or heads) \
            * head_dim * torch.empty((), dtype=dtype).element_size()
        if kv_cache_bytes is not None and (isinstance(kv_cache_bytes, bool) or not isinstance(kv_cache_bytes, int)
                                           or kv_cache_bytes < self.kv_bytes_per_token):
            raise ValueError(f"kv_cache_bytes must be an integer of at least one token's keys and values "
                             f"({self.kv_bytes_per_token} bytes here), got {kv_cache_bytes!r}")
        self.kv_slots = None if kv_cache_bytes is None else kv_cache_bytes // self.kv_bytes_per_token  # rows x columns
        self.store = KVStore(self.num_layers, self.kv_slots)
        # within kv_cache_bytes: admit by what requests hold now and preempt when they outgrow it (vLLM's
        # recompute preemption), or (False) admit only what fits to the end of every running request
        self.preemption = preemption
        self.num_preemptions = 0
        self.pending: list[StepOutput] = []  # aborts to report at the next step
        self.steps = 0
        self.prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None  # 0: off
        self._adapter_params: dict[str, tuple[int, list[torch.Tensor]]] = {}  # name -> (ctx epoch, params)
        if isinstance(speculative, dict):
            speculative = SpeculativeConfig.from_dict(speculative)
        elif speculative is not None:
            speculative.validate()
        self.speculative = speculative  # n-gram speculative decoding (None: off)
        self.spec_stats = {"steps": 0, "drafts": 0, "proposed": 0, "accepted": 0}
        types = getattr(cfg, "layer_types", None)
        # sliding-window attention counts distances in cache columns: speculation's holes are removed every step
        self._sliding = bool(getattr(cfg, "sliding_window", None)) and (types is None or "sliding_attention" in types)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | None,
        adapters: dict[str, str] | None = None,
        *,
        device: str | None = None,
        dtype: str = "auto",
        **kwargs,
    ) -> Engine:
        """Load a base model (``None``: the embedded default) and register ``adapters`` (name -> dir)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .embedded import resolve_model

        path = resolve_model(model_dir)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(dev)
        engine = cls(model, tokenizer, **kwargs)
        for name, adapter_dir in (adapters or {}).items():
            engine.load_adapter(name, adapter_dir)
        return engine

    # -- adapters --------------------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        return list(self.pool.paths)

    def load_adapter(self, name: str, path: str) -> None:
        if name == self.base_name:
            raise ValueError(f"adapter name {name!r} is the base model's name")
        self.pool.register(name, path)

    def add_attached(self, name: str) -> None:
        """Serve an adapter already attached to ``self.model`` (``moelora.attach``); never evicted."""
        if name == self.base_name:
            raise ValueError(f"adapter name {name!r} is the base model's name")
        residual = getattr(getattr(self.model, "_moelora_ctx", None), "residual_base", None)
        if residual is not None:
            raise ValueError(f"adapter {residual!r} is PiSSA: the base weights hold its residual, so this model cannot "
                             "serve the base or other adapters; save it (a plain LoRA) and load that "
                             "(engine.load_adapter)")
        self.pool.adopt(name)
        self.model.eval()

    def unload_adapter(self, name: str) -> None:
        users = [r.id for r in (*self.running, *self.prefilling, *self.waiting) if r.adapter == name]
        if users:
            raise ValueError(f"adapter {name!r} is in use by {len(users)} request(s); retry when they finish")
        self.pool.unregister(name)
        self._adapter_params.pop(name, None)
        if self.prefix is not None:
            self.prefix.drop(name)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt block (needed after editing the *base* weights in place; edits of
        adapter weights and adapter (re)loads are noticed without it)."""
        if self.prefix is not None:
            self.prefix.reset()

    # -- requests --------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], adapter: str | None, params: SamplingParams) -> None:
        if request_id in self.ids:
            raise ValueError(f"request id {request_id!r} is already in use")
        if adapter == self.base_name:
            adapter = None
        if adapter is not None and adapter not in self.pool.paths:
            raise KeyError(f"unknown adapter {adapter!r} (loaded: {self.adapter_names()})")
        params.validate()
        vocab = self.model.config.vocab_size
        if any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be < {vocab}")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be < {vocab}")
        if any(t >= vocab for t in params.allowed_token_ids or ()) or any(t >= vocab for w in params.bad_words_ids
                                                                          for t in w):
            raise ValueError(f"allowed_token_ids and bad words must be token ids < {vocab}")
        if not prompt_ids or not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"the prompt must be a non-empty list of token ids in [0, {vocab})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {self.max_model_len} tokens"
            )
        if self.kv_slots is not None and self._reserve(len(prompt_ids), params) > self.kv_slots:
            raise ValueError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) needs "
                f"{self._reserve(len(prompt_ids), params)} token slots of KV cache, more than the engine's "
                f"kv_cache_bytes hold ({self.kv_slots} slots of {self.kv_bytes_per_token} bytes)")
        if params.priority and self.scheduling_policy != "priority":
            raise ValueError("priority is only used with scheduling_policy 'priority' (serve --scheduling-policy "
                             "priority); this engine admits in arrival order")
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting (max_queue={self.max_queue})")
        gen = None
        if params.temperature > 0:
            gen = torch.Generator()
            gen.manual_seed(params.seed if params.seed is not None else int(torch.randint(2**62, ()).item()))
        req = _Request(request_id, list(prompt_ids), adapter, params, gen, time.monotonic(),
                       guide=guide_for(params.json_object, params.guided_regex, params.guided_choice, JSON_MAX_WS,
                                       params.guided_grammar))
        if self.scheduling_policy == "priority":  # before the first waiting request of a higher value
            at = next((i for i, w in enumerate(self.waiting) if w.params.priority > params.priority), len(self.waiting))
            self.waiting.insert(at, req)
        else:
            self.waiting.append(req)
        self.ids.add(request_id)

    def abort(self, request_id: str) -> None:
        r = next((q for q in self.prefilling if q.id == request_id), None)
        if r is not None:
            self.prefilling.remove(r)
            self.ids.discard(request_id)
            self.pending.append(StepOutput(r.id, [], "", True, "abort", len(r.prompt), 0))
            return
        for i, r in enumerate(self.running):
            if r.id == request_id:
                self.running.pop(i)
                with torch.inference_mode():  # the store's buffers are inference tensors
                    self.store.keep([j for j in range(self.store.rows) if j != i])
                break
        else:
            r = next((q for q in self.waiting if q.id == request_id), None)
            if r is None:
                return
            self.waiting.remove(r)
        self.ids.discard(request_id)
        self.pending.append(StepOutput(r.id, [], "", True, "abort", len(r.prompt), len(r.output)))

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self.pending)

    # -- the loop --------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Prefill the next chunk of a long prompt, admit waiting requests (prefill, first token) within
        what is left of ``max_prefill_tokens``, then decode one token for every running request."""
        outputs: list[StepOutput] = []
        budget = self.max_prefill_tokens
        with torch.inference_mode():
            if self.kv_slots is not None and self.preemption:
                self._preempt()
            if self.prefilling:
                budget, outputs = self._prefill_chunk(budget)
        admitted, budget = self._admit(budget)  # outside inference mode: loaded adapters stay normal parameters
        with torch.inference_mode():
            if admitted:
                outputs += self._prefill(admitted)
            if self.prefilling and self.prefilling[0].done == 0 and self.prefilling[0].partial is None:
                outputs += self._prefill_chunk(budget)[1]  # one started in this step: its first chunk now
            if self.running:
                outputs += self._decode()
        self.steps += 1
        outputs, self.pending = self.pending + outputs, []  # aborts and failed loads first
        return outputs

    def _admit(self, budget: int) -> tuple[list[_Request], int]:
        """Waiting requests to prefill now, in arrival order, and the prefill budget left after them
        (rows x longest prompt). The first one that does not fit waits, and nothing overtakes it,
        unless it can be prefilled in chunks (it then starts, taking what is left, and goes on over
        the next steps) or nothing was prefilled in this step (it then goes in alone, however long)."""
        admitted: list[_Request] = []
        in_use = {r.adapter for r in self.running + self.prefilling if r.adapter is not None}
        width = 0  # the prefill's padded size is rows x the longest prompt: at most the budget
        while self.waiting and len(self.running) + len(self.prefilling) + len(admitted) < self.max_batch:
            req = self.waiting[0]
            if not self._kv_fits([*self.running, *self.prefilling, *admitted, req], admission=True):
                break  # it waits for running requests to finish (first come, first served)
            fits = (len(admitted) + 1) * max(width, len(req.feed)) <= budget
            alone = not admitted and budget == self.max_prefill_tokens  # nothing else prefills in this step
            if not fits and (self.prefilling or budget - len(admitted) * width <= 0):
                break  # the next step admits it (first come, first served: no overtaking)
            if req.adapter is not None:
                try:
                    self.pool.ensure(req.adapter, pinned=in_use)
                except Exception as e:  # the adapter could not be (re)loaded: fail this request only
                    self.waiting.popleft()
                    self.ids.discard(req.id)
                    self.pending.append(StepOutput(req.id, [], f"[error: {e}]", True, "error", len(req.prompt),
                                                   len(req.output)))
                    continue
                in_use.add(req.adapter)
            if not fits and self._chunkable(req):  # a long prompt: prefilled a chunk per step from now on
                self.prefilling.append(self.waiting.popleft())
                self._start_chunks(req)
                break
            if not fits and not alone:
                break
            admitted.append(self.waiting.popleft())
            width = max(width, len(req.feed))
        return admitted, budget - len(admitted) * width

    def _reserve(self, prompt_len: int, params: SamplingParams) -> int:
        """The KV store columns a request may take by its end (its prompt, its output but the last token,
        and a speculative step's columns)."""
        spec = self.speculative.num_speculative_tokens + 1 if self.speculative is not None else 0
        return prompt_len + params.max_tokens + spec

    def _kv_fits(self, reqs: list[_Request], admission: bool = False) -> bool:
        """Whether these requests together fit in ``kv_cache_bytes`` (the store holds rows x columns).
        With preemption: at their next decoding step (each row's prompt and output so far, and at least
        one token), a newcomer only with 1% of the budget to spare (vLLM's watermark: it is not preempted
        at once) unless it would run alone. Without: to their ends (each row's reservation)."""
        if self.kv_slots is None or not reqs:
            return True
        if not self.preemption:
            return len(reqs) * max(self._reserve(len(r.prompt), r.params) for r in reqs) <= self.kv_slots
        spare = self.kv_slots // 100 if admission and len(reqs) > 1 else 0
        return len(reqs) * max(len(r.prompt) + max(len(r.output), 1) for r in reqs) <= self.kv_slots - spare

    def _preempt(self) -> None:
        """Recompute preemption (vLLM's): while the running requests' next step would not fit in
        ``kv_cache_bytes``, the last to arrive (with ``scheduling_policy="priority"``: the one of the
        highest priority value, then the last) gives its keys and values up and goes back to the head of
        the queue. Readmitted, its prompt and output are prefilled again (from the prefix cache's blocks,
        where its own were just cached) and it goes on where it stopped: sampling state, penalties,
        guides and MiLoRA gates are kept, so its output does not change."""
        while self.running and not self._kv_fits([*self.running, *self.prefilling]):
            victims = [*self.running, *self.prefilling]
            r = max(victims, key=lambda q: (q.params.priority, q.arrival))
            if r in self.prefilling:
                self.prefilling.remove(r)
                r.done, r.partial, r.chain = 0, None, None
            else:
                i = self.running.index(r)
                if self.prefix is not None:
                    self._remember_row(i, r)
                self.running.pop(i)
                self.store.keep([j for j in range(self.store.rows) if j != i])
            r.scope = None
            at = next((k for k, w in enumerate(self.waiting)
                       if (w.params.priority, w.arrival) > (r.params.priority, r.arrival)), len(self.waiting))
            self.waiting.insert(at, r)
            self.num_preemptions += 1

    def _chunkable(self, req: _Request) -> bool:
        """Whether a prompt can be prefilled in chunks: not for MiLoRA (its routers read the whole
        prompt before any token is computed) nor for the prompt's log-probabilities."""
        ctx = getattr(self.model, "_moelora_ctx", None)
        milora = ctx is not None and isinstance(ctx.configs.get(req.adapter), MiLoraConfig)
        return self.chunked_prefill and req.params.prompt_logprobs is None and not milora

    def _start_chunks(self, r: _Request) -> None:
        r.scope = self._prefix_scope(r.adapter) if self.prefix is not None else None
        r.chain = self.prefix.lookup(r.scope, r.feed, len(r.feed) - 1) if r.scope is not None else []
        if r.scope is not None:
            self.prefix.queries += len(r.feed)
            self.prefix.hits += len(r.chain) * self.prefix.block
        r.done, r.partial = 0, None

    def _prefill_chunk(self, budget: int) -> tuple[int, list[StepOutput]]:
        """The next chunk (up to ``budget`` tokens) of the first long prompt being prefilled, on top of
        its earlier chunks (and the prefix cache's blocks it started from). The last chunk samples
        the first token and joins the running batch. Returns the budget left and the outputs."""
        r = self.prefilling[0]
        if budget <= 0:
            return budget, []
        if r.partial is None and r.chain:  # the cached blocks it starts from
            r.partial = [(torch.cat([b.keys[i] for b in r.chain], 1)[None], torch.cat([b.values[i] for b in r.chain], 1)[None])
                         for i in range(self.num_layers)]
            r.done = len(r.chain) * self.prefix.block
        P, feed = r.done, r.feed
        S = min(budget, len(feed) - P)
        cache = DynamicCache()  # full layers, as every prefill: sliding windows come from the mask
        for layer, (k, v) in enumerate(r.partial or []):
            cache.update(k, v, layer)
        out = self.model(
            input_ids=torch.tensor([feed[P : P + S]], device=self.device),
            attention_mask=torch.ones(1, P + S, dtype=torch.long, device=self.device),
            position_ids=torch.arange(P, P + S, device=self.device)[None],
            past_key_values=cache,
            cache_position=torch.arange(P, P + S, device=self.device),
            use_cache=True,
            logits_to_keep=1,
            **self._adapter_kwargs([r]),
        )
        r.done = P + S
        if r.done < len(feed):
            r.partial = [(la.keys, la.values) for la in cache.layers]
            return budget - S, []
        self.prefilling.pop(0)
        r.partial = None
        outputs = [o for o in self._sample_first([r], out.logits[:, -1]) if o is not None]
        if outputs:
            outputs[0].cached_tokens = len(r.chain) * self.prefix.block if r.chain else 0
        self._remember(feed, r.scope, r.chain or [], [la.keys for la in cache.layers],
                       [la.values for la in cache.layers], 0, 0)
        r.chain = None
        self._join([r], cache, torch.ones(1, len(feed), dtype=torch.long, device=self.device))
        return budget - S, outputs

    def _adapter_kwargs(self, reqs: list[_Request]) -> dict:
        if getattr(self.model, "_moelora_ctx", None) is None:
            return {}
        return {"adapter_names": [r.adapter for r in reqs]}

    def _prefix_scope(self, adapter: str | None) -> tuple | None:
        """What a cached block's keys and values depend on besides its tokens, for requests on
        ``adapter`` (None: not cacheable). The adapter's weights count by storage and in-place version,
        so an edit or a reload is a new scope; the base weights are taken as frozen."""
        if adapter is None:
            return ("", 0)
        ctx = self.model._moelora_ctx
        if isinstance(ctx.configs.get(adapter), MiLoraConfig):
            return None  # its routing of every prompt token depends on the whole prompt
        known = self._adapter_params.get(adapter)
        if known is None or known[0] != ctx.adapter_epoch:
            from .inject import adapter_of

            known = (ctx.adapter_epoch, [q for n, q in self.model.named_parameters() if adapter_of(n) == adapter])
            self._adapter_params[adapter] = known
        state = hash(tuple((q.data_ptr(), q._version) for q in known[1]))
        return (adapter, self.pool.serial.get(adapter, 0), state)

    def _prefill(self, reqs: list[_Request]) -> list[StepOutput]:
        """Prefill the admitted requests: those whose prompt starts with cached blocks in one forward
        that continues from them, the others in one forward from scratch. A request whose next
        uncached block another admitted request is about to compute (the same system prompt
        arriving in a burst, ``n`` copies of a prompt) waits for it, in a second round. Preempted
        MiLoRA requests are recomputed in a forward of their own that reuses their gates."""
        rerouted = [r for r in reqs if r.output and r.gates is not None]
        outputs: list[StepOutput] = []
        if rerouted:
            reqs = [r for r in reqs if not (r.output and r.gates is not None)]
            ctx = self.model._moelora_ctx
            self._load_gates(rerouted)
            ctx.reuse_routing = True
            try:
                self._prefill_cold(rerouted, [None] * len(rerouted))
            finally:
                ctx.reuse_routing = False
            if not reqs:
                return outputs
        if self.prefix is None:
            return self._prefill_cold(reqs, [None] * len(reqs))
        B = self.prefix.block
        by_adapter = {a: self._prefix_scope(a) for a in {r.adapter for r in reqs}}  # once per adapter, not per row
        scopes = [by_adapter[r.adapter] if r.params.prompt_logprobs is None or r.output else None for r in reqs]
        while reqs:
            chains = [self.prefix.lookup(sc, r.feed, len(r.feed) - 1) if sc is not None else []
                      for r, sc in zip(reqs, scopes)]
            lead: list[int] = []
            later: list[int] = []
            for i, (r, sc, c) in enumerate(zip(reqs, scopes, chains)):
                need = (len(c) + 1) * B  # its next block, if an earlier request computes it now
                if sc is not None and len(r.feed) > need and any(
                        scopes[j] == sc and reqs[j].feed[:need] == r.feed[:need] for j in lead):
                    later.append(i)
                    continue
                lead.append(i)
                if sc is not None:
                    self.prefix.queries += len(r.feed)
                    self.prefix.hits += len(c) * B
            cold = [i for i in lead if not chains[i]]
            warm = [i for i in lead if chains[i]]
            if cold:
                outputs += self._prefill_cold([reqs[i] for i in cold], [scopes[i] for i in cold])
            if warm:
                outputs += self._prefill_warm([reqs[i] for i in warm], [scopes[i] for i in warm],
                                              [chains[i] for i in warm])
            reqs, scopes = [reqs[i] for i in later], [scopes[i] for i in later]
        return outputs

    def _remember(self, tokens: list[int], scope: tuple | None, chain: list[_Block], keys: list[torch.Tensor],
                  values: list[torch.Tensor], row: int, col0: int | torch.Tensor) -> None:
        """Cache the full blocks of ``tokens`` after ``chain`` from per-layer ``keys``/``values`` (row
        ``row``, the first token in column ``col0``, or token ``t`` in column ``col0[t]``)."""
        if scope is None:
            return
        B, chain = self.prefix.block, list(chain)
        for j in range(len(chain), len(tokens) // B):
            cols = slice(col0 + j * B, col0 + (j + 1) * B) if isinstance(col0, int) else col0[j * B : (j + 1) * B]
            if not self.prefix.add(scope, tokens, chain, [k[row, :, cols].clone() for k in keys],
                                   [v[row, :, cols].clone() for v in values]):
                break

    def _remember_finished(self, reqs: list[_Request]) -> None:
        """Cache the blocks of finished rows' prompt + output, so a chat's next turn, which repeats them,
        reuses them too."""
        B = self.prefix.block
        for i, r in enumerate(reqs):
            if r.finish_reason is not None and (len(r.prompt) + len(r.output) - 1) // B > len(r.prompt) // B:
                self._remember_row(i, r)

    def _remember_row(self, i: int, r: _Request) -> None:
        """Cache the blocks of running row ``i``'s prompt + output (all but the last token, never fed)."""
        tokens = r.feed
        if r.scope is None or self._prefix_scope(r.adapter) != r.scope:  # its adapter changed while it decoded
            return
        chain = self.prefix.lookup(r.scope, tokens, len(r.prompt) // self.prefix.block * self.prefix.block)
        cols = self.store.row_columns(i, len(tokens)) if self.speculative is not None else self.store.length - len(tokens)
        self._remember(tokens, r.scope, chain, self.store.keys, self.store.values, i, cols)

    def _prefill_cold(self, reqs: list[_Request], scopes: list[tuple | None]) -> list[StepOutput]:
        feeds = [r.feed for r in reqs]
        width = max(len(f) for f in feeds)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(reqs), width, dtype=torch.long)
        for i, f in enumerate(feeds):
            ids[i, width - len(f) :] = torch.tensor(f)
            mask[i, width - len(f) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()  # full layers: the store keeps every column (sliding windows via the mask)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if any(r.params.prompt_logprobs is not None and not r.output for r in reqs) else 1,  # 0: all
            **self._adapter_kwargs(reqs),
        )
        self._save_gates(reqs)
        outputs = self._sample_first(reqs, out.logits[:, -1])
        for i, (r, f) in enumerate(zip(reqs, feeds)):
            if outputs[i] is not None and r.params.prompt_logprobs is not None:
                outputs[i].prompt_logprobs = self._prompt_logprobs(r, out.logits[i, width - len(r.prompt):])
            r.scope = scopes[i]
            self._remember(f, r.scope, [], [la.keys for la in cache.layers], [la.values for la in cache.layers],
                           i, width - len(f))
        self._join(reqs, cache, mask)
        return [o for o in outputs if o is not None]

    def _prefill_warm(self, reqs: list[_Request], scopes: list[tuple], chains: list[list[_Block]]) -> list[StepOutput]:
        """Prefill the prompts' uncached rest on top of their cached blocks. Each row is contiguous,
        ``[padding][cached prefix][rest][padding]`` (so sliding windows see true distances), and is
        moved right-aligned into the store afterwards."""
        B, n = self.prefix.block, len(reqs)
        feeds = [r.feed for r in reqs]
        pre = [len(c) * B for c in chains]
        rest = [len(f) - p for f, p in zip(feeds, pre)]
        P, S = max(pre), max(rest)
        ids = torch.full((n, S), self.pad_id, dtype=torch.long)
        mask = torch.zeros(n, P + S, dtype=torch.long)
        pos = torch.zeros(n, S, dtype=torch.long)
        for i, (f, p, s) in enumerate(zip(feeds, pre, rest)):
            ids[i, :s] = torch.tensor(f[p:])
            mask[i, P - p : P + s] = 1
            pos[i] = (p + torch.arange(S)).clamp(max=p + s - 1)  # right padding: the last position again
        cache = DynamicCache()
        for layer in range(self.num_layers):
            proto = chains[0][0].keys[layer]
            past = [torch.zeros((n, proto.shape[0], P, proto.shape[2]), dtype=proto.dtype, device=proto.device)
                    for _ in range(2)]
            for i, (c, p) in enumerate(zip(chains, pre)):
                past[0][i, :, P - p :] = torch.cat([b.keys[layer] for b in c], 1)
                past[1][i, :, P - p :] = torch.cat([b.values[layer] for b in c], 1)
            cache.update(past[0], past[1], layer)
        last = sorted({s - 1 for s in rest})
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            cache_position=torch.arange(P, P + S, device=self.device),
            use_cache=True,
            logits_to_keep=torch.tensor(last, device=self.device),
            **self._adapter_kwargs(reqs),
        )
        logits = out.logits[torch.arange(n), [last.index(s - 1) for s in rest]]
        outputs = self._sample_first(reqs, logits)
        for i, (r, f, c, p) in enumerate(zip(reqs, feeds, chains, pre)):
            if outputs[i] is not None:
                outputs[i].cached_tokens = p
            r.scope = scopes[i]
            self._remember(f, r.scope, c, [la.keys for la in cache.layers], [la.values for la in cache.layers],
                           i, P - p)
        if S > min(rest):  # right-align every row: column c takes column c - (S - rest) (mod the width)
            W = P + S
            shift = torch.tensor([S - s for s in rest], device=self.device)
            idx = (torch.arange(W, device=self.device) - shift[:, None]) % W
            for layer in cache.layers:
                at = idx[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys, layer.values = layer.keys.gather(2, at), layer.values.gather(2, at)
            mask = mask.gather(1, idx)
        self._join(reqs, cache, mask)
        return [o for o in outputs if o is not None]

    def _join(self, reqs: list[_Request], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Move the prefilled rows still running into the store (right-aligned ``cache`` and ``mask``)."""
        alive = [i for i, r in enumerate(reqs) if r.finish_reason is None]
        if alive:
            if len(alive) < len(reqs):
                cache.batch_select_indices(torch.tensor(alive, device=self.device))
                mask = mask[alive]
            self.store.append(cache, mask)
            self.running.extend(reqs[i] for i in alive)

    def _save_gates(self, reqs: list[_Request]) -> None:
        """Keep each MiLoRA request's prefill gates (its decoding steps reuse them)."""
        ctx = getattr(self.model, "_moelora_ctx", None)
        if ctx is None:
            return
        for name, group in _by_adapter(reqs).items():  # the context's grouping: first appearance
            if name is not None and isinstance(ctx.configs.get(name), MiLoraConfig):
                layers = list(ctx.gates[name])
                # the host copy of which modules each request selected: one transfer for the group
                # (one per request and layer was 32 host syncs per MiLoRA request at a 7B shape)
                selected = (torch.stack([ctx.gates[name][li] for li in layers], 1) > 0).tolist()  # (B, L, E)
                for j, r in enumerate(group):
                    r.gates = {li: ctx.gates[name][li][j] for li in layers}
                    r.gate_any = dict(zip(layers, selected[j]))

    def _load_gates(self, reqs: list[_Request]) -> None:
        ctx = getattr(self.model, "_moelora_ctx", None)
        if ctx is None:
            return
        for name, group in _by_adapter(reqs).items():
            if group[0].gates is not None:
                ctx.gates[name] = {li: torch.stack([r.gates[li] for r in group]) for li in group[0].gates}
                ctx.gate_any[name] = {li: [any(col) for col in zip(*(r.gate_any[li] for r in group))]
                                      for li in group[0].gates}

    def _decode(self) -> list[StepOutput]:
        """Feed every running row its last token (not yet cached) and sample the next one (or, with
        speculation and drafts, its last token and its drafts: ``_decode_speculative``)."""
        reqs = self.running
        spec = self.speculative
        if spec is not None and (spec.disable_by_batch_size is None or len(reqs) <= spec.disable_by_batch_size):
            drafts = [d[: r.params.max_tokens - len(r.output) - 1] for r, d in zip(reqs, self._drafts(reqs))]
            if any(drafts) and self.kv_slots is not None and len(reqs) * (
                    max(len(r.prompt) + len(r.output) for r in reqs) + max(map(len, drafts))) > self.kv_slots:
                drafts = []  # the drafts' columns would not fit in kv_cache_bytes: a plain step
            if any(drafts):
                return self._decode_speculative(reqs, drafts)
        last = torch.tensor([[r.output[-1]] for r in reqs], dtype=torch.long, device=self.device)
        positions = torch.tensor([[len(r.prompt) + len(r.output) - 1] for r in reqs], device=self.device)
        mask = self.store.step_mask()
        self._load_gates(reqs)
        out = self.model(
            input_ids=last,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self.store.cache(),
            cache_position=torch.tensor([self.store.length], device=self.device),
            use_cache=True,
            **self._adapter_kwargs(reqs),
        )
        self.store.length += 1
        outputs = self._sample(reqs, out.logits[:, -1])
        self._leave(reqs)
        return outputs

    def _leave(self, reqs: list[_Request]) -> None:
        """Drop the finished rows (their prompt + output goes to the prefix cache first)."""
        keep = [i for i, r in enumerate(reqs) if r.finish_reason is None]
        if len(keep) < len(reqs):
            if self.prefix is not None:
                self._remember_finished(reqs)
            self.store.keep(keep)
            self.running = [reqs[i] for i in keep]

    def _drafts(self, reqs: list[_Request]) -> list[list[int]]:
        """Each running request's n-gram drafts (at most the tokens it may still produce, less one: a
        step also samples one token after its accepted drafts)."""
        drafts = []
        for r in reqs:
            if r.proposer is None:
                r.proposer = NgramProposer(r.prompt, self.speculative.num_speculative_tokens)
            r.proposer.extend(r.output[len(r.proposer.tokens) - len(r.prompt):])
            drafts.append(r.proposer.propose(self.speculative, r.params.max_tokens - len(r.output) - 1))
        return drafts

    def _decode_speculative(self, reqs: list[_Request], drafts: list[list[int]]) -> list[StepOutput]:
        """One forward over every row's last token and drafts (padded to the longest), then each row
        samples position by position as a plain step would, going on while the sampled token is the
        draft there; rejected drafts' columns become holes in the store (see ``moelora.speculative``)."""
        K = 1 + max(len(d) for d in drafts)
        ids = torch.full((len(reqs), K), self.pad_id, dtype=torch.long)
        for i, (r, d) in enumerate(zip(reqs, drafts)):
            ids[i, : 1 + len(d)] = torch.tensor([r.output[-1], *d])
        start = torch.tensor([len(r.prompt) + len(r.output) - 1 for r in reqs])
        positions = start[:, None] + torch.arange(K)
        mask = self.store.step_mask([1 + len(d) for d in drafts], K)
        self._load_gates(reqs)
        L = self.store.length
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask,
            position_ids=positions.to(self.device),
            past_key_values=self.store.cache(),
            cache_position=torch.arange(L, L + K, device=self.device),
            use_cache=True,
            **self._adapter_kwargs(reqs),
        )
        fed = torch.tensor([1 + len(d) for d in drafts])
        logits = out.logits[(torch.arange(K) < fed[:, None]).to(self.device)].float().cpu()  # fed positions only
        first = (fed.cumsum(0) - fed).tolist()  # row i's positions start at logits[first[i]]
        outputs, keep = [], []
        st = self.spec_stats
        st["steps"] += 1
        for i, (r, d) in enumerate(zip(reqs, drafts)):
            steps = []
            for j in range(len(d) + 1):
                steps += self._sample([r], logits[first[i] + j : first[i] + j + 1])
                if r.finish_reason is not None or j == len(d) or r.output[-1] != d[j]:
                    break
            keep.append(len(steps))  # the last token and the accepted drafts are cached
            if r.proposer is not None:
                r.proposer.accepted(self.speculative, len(d), len(steps) - 1)
            st["drafts"] += bool(d)
            st["proposed"] += len(d)
            st["accepted"] += len(steps) - 1
            outputs.append(_merge(steps))
        self.store.reject(keep, K)
        self._leave(reqs)
        if self._sliding or self.store.length > 2 * max((len(r.prompt) + len(r.output) for r in self.running), default=0) + 64:
            self.store.align()  # true distances for sliding windows; otherwise when holes take too much room
        return outputs

    # -- sampling and text -----------------------------------------------------------------

    def _sample_first(self, reqs: list[_Request], logits: torch.Tensor) -> list[StepOutput | None]:
        """A prefill's first token for each new request (``logits[i]``: row ``i``'s last position);
        ``None`` for a resumed one (its next token is already chosen: the next step feeds it)."""
        fresh = [i for i, r in enumerate(reqs) if not r.output]
        got = dict(zip(fresh, self._sample([reqs[i] for i in fresh], logits[fresh]) if fresh else []))
        return [got.get(i) for i in range(len(reqs))]

    def _sample(self, reqs: list[_Request], logits: torch.Tensor) -> list[StepOutput]:
        logits = logits.float().cpu()
        outputs = []
        for i, r in enumerate(reqs):
            p = r.params
            scores = logits[i]
            if p.logit_bias:
                scores = scores.index_put((torch.tensor(list(p.logit_bias)),),
                                          torch.tensor(list(p.logit_bias.values()), dtype=scores.dtype), accumulate=True)
            if p.allowed_token_ids is not None:  # every other token masked
                keep = torch.tensor(p.allowed_token_ids)
                scores = torch.full_like(scores, float("-inf")).index_copy(0, keep, scores[keep])
            if p.bad_words_ids:  # the last token of a bad word whose start the output ends with
                bad = [w[-1] for w in p.bad_words_ids if len(w) == 1 or r.output[len(r.output) - len(w) + 1:] == w[:-1]]
                if bad:
                    scores = scores.index_fill(0, torch.tensor(bad), float("-inf"))
            if len(r.output) < p.min_tokens:  # nothing that would end the output may come yet
                ends = [*p.stop_token_ids, *(() if p.ignore_eos else self.eos)]
                if ends:
                    scores = scores.index_fill(0, torch.tensor(ends), float("-inf"))
            if p.repetition_penalty != 1:  # transformers' and vLLM's: on every token of the prompt and output
                seen = torch.tensor(r.prompt + r.output).unique()
                v = scores[seen]
                scores = scores.index_put((seen,), torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty))
            if (p.presence_penalty or p.frequency_penalty) and r.output:  # OpenAI's penalties, on the output
                seen, counts = torch.tensor(r.output).unique(return_counts=True)
                scores = scores.index_put((seen,), scores[seen] - (p.frequency_penalty * counts + p.presence_penalty))
            if p.temperature == 0:
                token = int(scores.argmax()) if r.guide is None else self._guided_token(r, scores, logits[i], None)
            else:
                scores = scores / p.temperature
                if p.min_p > 0:
                    probs = scores.softmax(-1)
                    scores = scores.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
                if 0 < p.top_k < scores.numel():
                    scores = scores.masked_fill(scores < scores.topk(p.top_k).values[-1], float("-inf"))
                if p.top_p < 1:
                    sorted_scores, order = scores.sort(descending=True)
                    cum = sorted_scores.softmax(-1).cumsum(-1)
                    drop = cum - sorted_scores.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
                    scores = scores.index_fill(0, order[drop], float("-inf"))
                if r.guide is None:
                    token = int(torch.multinomial(scores.softmax(-1), 1, generator=r.generator))
                else:
                    token = self._guided_token(r, scores, logits[i], r.generator)
            if p.logprobs is not None:
                lsm = logits[i].log_softmax(-1)
                top = lsm.topk(p.logprobs) if p.logprobs else None
                r.lps.append((float(lsm[token]), [] if top is None else
                              list(zip(top.indices.tolist(), top.values.tolist()))))
            outputs.append(self._emit(r, token))
        return outputs

    def _guided_token(self, r: _Request, scores: torch.Tensor, raw: torch.Tensor, gen: torch.Generator | None) -> int:
        """Guided decoding: the best (``gen`` None) or a sampled token among those that keep the output
        a valid prefix for ``r.guide`` (end tokens: once it is complete), from ``scores`` (after the
        request's filters), checking candidates lazily; a ``final`` guide (a closed JSON object) ends
        the output at once. If the filters left no valid token, the most likely valid one under the
        raw logits; if none is valid at all, an end token. The guide reads the output's text without
        a last U+FFFD (a multi-byte character maybe incomplete: a token that only adds one passes if
        the guide takes such a character there, and it is checked once the next token comes)."""
        p = r.params
        ends = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos)
        if r.guide.final:
            allowed = [t for t in sorted(ends) if scores[t] > float("-inf")]
            if allowed:
                return allowed[0]
        window = r.output[-4:]
        before = _pending_cut(self.tokenizer.decode(window, skip_special_tokens=True))
        full = None
        complete = None

        def advance(t: int) -> JsonPrefix | RegexPrefix | None:
            nonlocal full, complete
            if t in ends:
                complete = r.guide.complete if complete is None else complete
                return r.guide if complete else None
            after = self.tokenizer.decode(window + [t], skip_special_tokens=True)
            if after.startswith(before):
                added = after[len(before):]
            else:  # a tokenizer whose windowed decoding is not a prefix: decode the whole output
                full = full if full is not None else _pending_cut(self.tokenizer.decode(r.output, skip_special_tokens=True))
                added = self.tokenizer.decode(r.output + [t], skip_special_tokens=True)[len(full):]
            nxt, stable = r.guide.copy(), _pending_cut(added)
            if not added or (stable and not nxt.feed(stable)):  # a token adding no text never moves on
                return None
            if stable != added and not nxt.copy().feed("\ufffd"):  # room for the pending character
                return None
            return nxt

        def first_valid(order: list[int], limit: torch.Tensor) -> int | None:
            for t in order:
                if limit[t] == float("-inf"):
                    return None
                nxt = advance(t)
                if nxt is not None:
                    r.guide = nxt
                    return t
            return None

        if gen is None:  # the best few first: a full sort of the vocabulary only if none of them is valid
            top = scores.topk(min(32, scores.numel())).indices.tolist()
            token = first_valid(top, scores)
            if token is None and len(top) < scores.numel() and scores[top[-1]] > float("-inf"):
                token = first_valid(scores.argsort(descending=True).tolist()[len(top):], scores)
        else:
            probs, token = scores.softmax(-1), None
            while token is None and probs.sum() > 0:
                t = int(torch.multinomial(probs, 1, generator=gen))
                token = first_valid([t], scores)
                probs[t] = 0
        if token is None:
            token = first_valid(raw.argsort(descending=True).tolist(), raw)
        if token is None:  # a dead end (no token continues the guide): end here rather than break it
            token = min(ends) if ends else int(scores.argmax())
        return token

    def _prompt_logprobs(self, r: _Request, logits: torch.Tensor) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the tokens before it (the first has none), its text
        decoded in context (the difference of two short windows' decodings), offsets within the prompt."""
        lsm = logits[:-1].float().cpu().log_softmax(-1)
        k = r.params.prompt_logprobs
        chosen = lsm.gather(1, torch.tensor(r.prompt[1:], dtype=torch.long).unsqueeze(1)).squeeze(1).tolist()
        tops = lsm.topk(k) if k else None
        out, offset = [], 0
        for j, t in enumerate(r.prompt):
            a = max(0, j - 6)
            before = self.tokenizer.decode(r.prompt[a:j], skip_special_tokens=True) if j else ""
            after = self.tokenizer.decode(r.prompt[a:j + 1], skip_special_tokens=True)
            text = after[len(before):] if after.startswith(before) else self.tokenizer.decode([t])
            top = [] if j == 0 or tops is None else [
                (i, self.tokenizer.decode([i]), v)
                for i, v in zip(tops.indices[j - 1].tolist(), tops.values[j - 1].tolist())]
            out.append(TokenLogprob(t, text, offset, None if j == 0 else chosen[j - 1], top))
            offset += len(text)
        return out

    def _release_logprobs(self, r: _Request, upto: int, eos: bool, cut: bool) -> list[TokenLogprob] | None:
        """The logprobs of the output tokens whose text is released: while decoding, those whose text lies
        within the first ``upto`` characters streamed; once finished, every token (an EOS never has an
        entry; the last one also takes an incomplete UTF-8 character left at the end), except after a stop
        sequence's cut, where a token counts if its text starts before the cut (its text is cut there)."""
        if r.params.logprobs is None:
            return None
        n = len(r.output) - (1 if eos else 0)
        done = r.finish_reason is not None
        out = []
        while r.lp_sent < n:
            k = r.lp_sent
            start, end = (r.ends[k - 1] if k else 0), r.ends[k]
            if done and cut:
                if start >= len(r.text):
                    break
                end = min(end, len(r.text))
            elif done:
                end = len(r.text) if k == n - 1 else end
            elif end > upto:
                break
            lp, top = r.lps[k]
            out.append(TokenLogprob(r.output[k], r.text[start:end], start, lp,
                                    [(t, self.tokenizer.decode([t]), v) for t, v in top]))
            r.lp_sent += 1
        return out

    def _ends(self, r: _Request, token: int) -> bool:
        """Whether ``token`` ends ``r``'s output as EOS does (its text is not part of the output)."""
        return (token in self.eos and not r.params.ignore_eos) or token in r.params.stop_token_ids

    def _emit(self, r: _Request, token: int) -> StepOutput:
        r.output.append(token)
        finished = None
        ends = self._ends(r, token)
        if ends:
            finished = "stop"
            ids = r.output[:-1]
        else:
            ids = r.output
        text = self.tokenizer.decode(ids, skip_special_tokens=r.params.skip_special_tokens)
        if r.params.logprobs is not None:
            r.ends.append(len(text.rstrip("\ufffd")))  # an incomplete UTF-8 character belongs to the next token
        if len(r.output) < r.params.min_tokens:  # stop sequences do not count yet, nor those ending here
            cut, r.stop_from = None, len(text)
        else:
            cut = _first_stop(text, r.params.stop, r.stop_from)
        if cut is not None:
            text, finished = text[:cut[1] if r.params.include_stop_str_in_output else cut[0]], "stop"
        elif finished is None and len(r.output) >= r.params.max_tokens:
            finished = "length"
        r.text = text
        if finished is None:
            safe = len(text) - _held_back(text, r.params.stop)
        else:
            safe = len(text)
        delta = text[r.sent : safe] if safe > r.sent else ""
        r.sent = max(r.sent, safe)
        if finished is not None:
            r.finish_reason = finished
            self.ids.discard(r.id)
        lps = self._release_logprobs(r, r.sent, eos=ends, cut=cut is not None)
        return StepOutput(r.id, [token], delta, finished is not None, finished, len(r.prompt), len(r.output), lps)

    # -- convenience -----------------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], adapters: list[str | None], params: SamplingParams | list[SamplingParams]
    ) -> list[dict]:
        """Run requests to completion: ``[{"token_ids", "text", "finish_reason", "cached_tokens"}]`` in input
        order (and ``"logprobs"`` and ``"prompt_logprobs"``, lists of :class:`TokenLogprob`, for requests
        that ask; ``cached_tokens``: prompt tokens reused from the prefix cache)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{self.steps}-{i}" for i in range(len(prompts))]
        for rid, prompt, adapter, p in zip(ids, prompts, adapters, plist):
            self.add_request(rid, prompt, adapter, p)
        results = {rid: {"token_ids": [], "text": "", "finish_reason": None, "cached_tokens": 0} for rid in ids}
        for rid, p in zip(ids, plist):
            if p.logprobs is not None:
                results[rid]["logprobs"] = []
            if p.prompt_logprobs is not None:
                results[rid]["prompt_logprobs"] = None
        while any(results[rid]["finish_reason"] is None for rid in ids):
            for o in self.step():
                if o.request_id in results:
                    res = results[o.request_id]
                    res["token_ids"] += o.token_ids
                    res["text"] += o.text
                    res["cached_tokens"] = max(res["cached_tokens"], o.cached_tokens)
                    if o.logprobs is not None:
                        res["logprobs"] += o.logprobs
                    if o.prompt_logprobs is not None:
                        res["prompt_logprobs"] = o.prompt_logprobs
                    if o.finished:
                        res["finish_reason"] = o.finish_reason
        return [results[rid] for rid in ids]


def _merge(steps: list[StepOutput]) -> StepOutput:
    """One request's outputs of a speculative step as one (its tokens and text in order)."""
    if len(steps) == 1:
        return steps[0]
    last = steps[-1]
    lps = [e for o in steps for e in (o.logprobs or [])] if last.logprobs is not None else None
    return StepOutput(last.request_id, [t for o in steps for t in o.token_ids], "".join(o.text for o in steps),
                      last.finished, last.finish_reason, last.prompt_tokens, last.completion_tokens, lps)


def _pending_cut(text: str) -> str:
    """``text`` without its last character if that is U+FFFD: a multi-byte character still incomplete
    (decoding replaces an incomplete sequence by one U+FFFD; earlier ones are final)."""
    return text[:-1] if text.endswith("\ufffd") else text


def _by_adapter(reqs: list[_Request]) -> dict[str | None, list[_Request]]:
    """Requests by adapter in order of first appearance (``AdapterContext.set_groups``'s order)."""
    groups: dict[str | None, list[_Request]] = {}
    for r in reqs:
        groups.setdefault(r.adapter, []).append(r)
    return groups


def _first_stop(text: str, stops: list[str], after: int = 0) -> tuple[int, int] | None:
    """(start, end) in ``text`` of the first stop sequence that ends after offset ``after`` (None: none)."""
    hits = [(i, i + len(s)) for s, i in ((s, text.find(s, max(0, after - len(s) + 1))) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of ``text`` not to stream yet: an incomplete UTF-8 character or the
    beginning of a stop sequence that the next tokens may complete."""
    hold = len(text) - len(text.rstrip("\ufffd"))  # bytes of a character still incomplete
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold
