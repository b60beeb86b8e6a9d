"""Benchmark every contender of issue 4 in one run and print ratios.

Contenders (all on the same random Llama-shaped base model, rebuilt from the same seed for each):

- ``peft_lora_r16``, ``peft_lora_r80``, ``peft_dora_r16``: PEFT, all 7 projections, alpha = 2r;
- ``ours_lora_r16``: ``moelora.LoraConfig(r=16)``;
- ``ours_mixlora_naive`` / ``ours_mixlora_fast`` / ``ours_mixlora_dense``: ``moelora.MixLoraConfig``
  (8 experts, top-2, r=16, all 7 projections) with ``set_backend(model, "reference")`` (per-expert
  loop) / the device's default backend (``grouped`` on the CPU, ``torch`` on a GPU) / the masked
  dense ``torch`` backend; "fast" and "dense" run the fast form of METHODS.md section 1;
- ``ours_milora_r16``: ``moelora.MiLoraConfig(r=16, lora_alpha=32)`` (r=16, not the paper's default
  r=32, for a same-rank comparison with LoRA r=16);
- ``ours_mixlora_compiled``: an experiment, ``ours_mixlora_fast`` with its expert part compiled by
  ``torch.compile`` (``compile_experts``; in CPU mode only when named in ``--contenders``).

The official MoE-PEFT 2.0.2 is not measured here: it needs ``transformers<4.47`` in its own environment.

Figures per contender: training step (forward + backward + AdamW step on the adapter parameters)
time and tokens/s, peak memory (GPU only: ``torch.cuda.max_memory_allocated`` over the training
steps), prefill time (batch 1), decode ms per generated token at batch 1 and 32 (greedy
``generate``, KV cache on, ``min_new_tokens = max_new_tokens``; the whole ``generate`` call divided
by the number of new tokens, prefill of the short prompt included, nothing subtracted), and the
batch-1 memory-bandwidth floor (bytes of weights read per token / measured copy bandwidth).

Before timing, a correctness gate: MixLoRA fast vs naive logits, and our LoRA vs PEFT LoRA loading
the same weights, must agree (atol 1e-4, float32); the script aborts otherwise.

Usage: ``python benchmarks/bench.py --mode cpu --output results.json``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py
import transformers  # noqa: E402
from common import FIGURES, GATE_ATOL, TARGETS, Shape, _fmt, _free, _sync, finish, shape_for, timed  # noqa: E402, F401

import moelora  # noqa: E402
from moelora.train import enable_gradient_checkpointing  # noqa: E402

BASELINE = "peft_lora_r16"
CONTENDERS = [  # in priority order: with --budget, the last ones are skipped first
    "peft_lora_r16",
    "ours_lora_r16",
    "ours_mixlora_fast",
    "ours_milora_r16",
    "ours_mixlora_triton",
    "ours_mixlora_naive",
    "peft_dora_r16",
    "peft_lora_r80",
    "ours_mixlora_dense",
    "ours_mixlora_compiled",
]


def build_base(shape: Shape, seed: int = 0, layers: int | None = None, dtype: torch.dtype | None = None):
    torch.manual_seed(seed)
    with torch.device(shape.device):
        model = transformers.AutoModelForCausalLM.from_config(shape.config(layers), dtype=dtype or shape.dtype)
    return model.eval()


def randomize(model: torch.nn.Module, seed: int = 1, scale: float = 0.02) -> None:
    """Non-zero adapter weights (a fresh LoRA has B = 0); DoRA magnitudes and MiLoRA's activation kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not p.requires_grad or "magnitude" in n or "activation" in n:
                continue
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p))


def _unwrap(model):
    """The bare base model again after a contender (``--reuse-base``): adapters removed."""
    if hasattr(model, "_moelora_ctx"):
        moelora.detach(model)
    elif hasattr(model, "unload"):  # a PeftModel
        model = model.unload()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return model.eval()


def make_contender(name: str, shape: Shape, base=None):
    model = base if base is not None else build_base(shape)
    if name.startswith("peft_"):
        import peft

        r = 80 if name == "peft_lora_r80" else 16
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=TARGETS,
                              use_dora=name == "peft_dora_r16", task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
    elif name == "ours_lora_r16":
        moelora.attach(model, moelora.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    elif name.startswith("ours_mixlora"):
        cfg = moelora.MixLoraConfig(num_experts=8, top_k=2, r=16, lora_alpha=32, lora_dropout=0.05,
                                    target_modules=TARGETS, router_aux_loss_coef=0.001)
        moelora.attach(model, cfg)
        if name.endswith("naive"):
            moelora.set_backend(model, "reference")
        elif name.endswith("dense"):
            moelora.set_backend(model, "torch")
        elif name.endswith("triton"):
            moelora.set_backend(model, "triton")
        elif name.endswith("compiled"):  # an experiment, not a library option (yet): see compile_experts
            compile_experts(model)
        # "fast": the device's default backend (grouped on the CPU, the masked dense form on a GPU)
    elif name == "ours_milora_r16":
        moelora.attach(model, moelora.MiLoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    else:
        raise ValueError(name)
    randomize(model)
    return model.eval()


def compile_experts(model) -> None:
    """``ours_mixlora_compiled``: each MixLoRA FFN's expert part (the expert deltas on the base
    gate/up outputs, the activation, the weighted mix, the down-projection delta: elementwise
    passes over ``(tokens, k, I)`` tensors that the H100 profile puts at about a third of MixLoRA's
    GPU time) compiled by ``torch.compile`` with dynamic shapes, so inductor can fuse them. The
    backward recomputation still applies (same gradients: checked on the CPU, 1e-8). One
    compilation serves every layer (no recompile per module). Measure it before it becomes a library option."""
    from moelora.methods.mixlora import MixLoraExperts

    for m in model.modules():
        if isinstance(m, MixLoraExperts):
            m._experts = torch.compile(m._experts, dynamic=True)


# ---------------------------------------------------------------------------------------------
# correctness gate


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def correctness_gate(shape: Shape, names: list[str] = ()) -> dict:
    """float32; on GPU the benchmark's layer shapes with 2 layers (a float32 7B would not be cheap).
    With the ``ours_mixlora_compiled`` experiment among ``names``, its logits are checked too."""
    layers = None if shape.device == "cpu" else 2
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, shape.vocab, (2, min(64, shape.train_len)), generator=g).to(shape.device)
    out = {}

    model = make_contender("ours_mixlora_fast", shape, build_base(shape, layers=layers, dtype=torch.float32))
    fast = _logits(model, ids)
    moelora.set_backend(model, "reference")
    naive = _logits(model, ids)
    out["mixlora_fast_vs_naive_max_abs_diff"] = (fast - naive).abs().max().item()
    if "ours_mixlora_compiled" in names:
        from moelora.kernels import default_backend

        moelora.set_backend(model, default_backend(torch.device(shape.device)))  # back to "fast"
        compile_experts(model)
        out["mixlora_compiled_vs_fast_max_abs_diff"] = (_logits(model, ids) - fast).abs().max().item()
    del model

    import peft

    base = build_base(shape, layers=layers, dtype=torch.float32)
    base_logits = _logits(base, ids)
    model = make_contender("ours_lora_r16", shape, base)
    ours = _logits(model, ids)
    out["lora_vs_base_max_abs_diff_(adapter_effect)"] = (ours - base_logits).abs().max().item()
    with tempfile.TemporaryDirectory() as tmp:
        moelora.save_adapter(model, tmp)
        theirs_model = peft.PeftModel.from_pretrained(build_base(shape, layers=layers, dtype=torch.float32), tmp).eval()
        theirs = _logits(theirs_model, ids)
    out["ours_lora_vs_peft_lora_max_abs_diff"] = (ours - theirs).abs().max().item()
    out["logit_abs_max"] = ours.abs().max().item()
    del model, theirs_model
    _free(shape)
    out["atol"] = GATE_ATOL
    out["passed"] = all(v <= GATE_ATOL for k, v in out.items() if k.endswith("_diff"))
    return out


# ---------------------------------------------------------------------------------------------
# timing


def measure_bandwidth(shape: Shape) -> float:
    """Bytes per second of a large tensor copy (read + write counted)."""
    n = (64 if shape.device == "cpu" else 1024) * 2**20 // 4
    a = torch.empty(n, dtype=torch.float32, device=shape.device).normal_()
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), shape, 2, 5)
    return 2 * n * 4 / t


def weight_bytes_per_token(name: str, model) -> int:
    """Bytes of weights one decoded token reads: every parameter but the input embedding table,
    with MixLoRA's unselected experts left out (activated adapter parameters, float32)."""
    total = 0
    for n, p in model.named_parameters():
        if "embed_tokens" in n or p.requires_grad:
            continue
        total += p.numel() * p.element_size()
    if name.startswith("ours_"):
        adapter = moelora.count_parameters(model)["activated"]
    else:
        adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total + adapter * 4


def bench_contender(name: str, shape: Shape, warmup: int, repeats: int, bandwidth: float, base=None,
                    compiled_decode: bool = False, checkpointing: bool = False, profile: str | None = None,
                    skip_train: bool = False, train_only: bool = False, autocast: bool = False) -> dict:
    t_build = time.perf_counter()
    model = make_contender(name, shape, base)
    if checkpointing:  # every contender alike: transformers' non-reentrant activation checkpointing
        enable_gradient_checkpointing(model.get_base_model() if hasattr(model, "get_base_model") else model)
    _sync(shape)
    print(f"    {name}: built in {time.perf_counter() - t_build:.1f} s", flush=True)
    try:
        return _bench(name, model, shape, warmup, repeats, bandwidth, compiled_decode, profile, skip_train,
                      train_only, autocast)
    finally:
        if checkpointing:
            (model.get_base_model() if hasattr(model, "get_base_model") else model).gradient_checkpointing_disable()
        if base is not None:
            _unwrap(model)


def kept_activation_bytes(model, step) -> int:
    """Bytes autograd keeps for the backward of one training step: the distinct storages its
    saved tensors hold, the model's own weights excluded. The activation-memory figure on any
    device (on the CPU the only one: ``peak_memory_mb`` is CUDA's allocator statistic)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            kept[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(kept.values())


def _phase(name: str, what: str, t0: float) -> None:
    """Where a contender's time goes (printed as it happens: a run killed at its limit still tells)."""
    print(f"    {name}: {what} in {time.perf_counter() - t0:.1f} s", flush=True)


def compiled_decode_kwargs(shape: Shape, model, max_cache_len: int) -> Callable[[], dict]:
    """``generate`` arguments for compiled decoding, one call's worth per call of the result: a static
    KV cache, with which transformers ``torch.compile``s every decoding step (on CUDA: inductor + CUDA
    graphs, ``reduce-overhead``; on the CPU, where transformers does not compile by default: inductor,
    default mode). The cache is made once and reset before each call, as a server keeps its cache:
    given ``cache_implementation="static"`` transformers makes a new one per call, whose new
    addresses make CUDA graphs record the step again (the KV tensors are static inputs), so every
    timed call of every contender would pay a recording."""
    cfg = transformers.CompileConfig(mode="reduce-overhead" if shape.device == "cuda" else "default")
    cfg._compile_all_devices = True
    cache = transformers.StaticCache(config=model.config, max_cache_len=max_cache_len)

    def kwargs() -> dict:
        cache.reset()
        return {"past_key_values": cache, "compile_config": cfg}

    return kwargs


def profile_to(path: str | None, title: str, fn: Callable[[], object], shape: Shape) -> None:
    """Append the profiler's table of one call of ``fn`` (top ops by device time, host total too)."""
    if not path:
        return
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if shape.device == "cuda" else [])
    _sync(shape)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        _sync(shape)
    wall = time.perf_counter() - t0
    key = "self_cuda_time_total" if shape.device == "cuda" else "self_cpu_time_total"
    ev = prof.key_averages()
    dev_total = sum(getattr(e, "self_device_time_total", 0) for e in ev) / 1e3
    with open(path, "a") as f:
        f.write(f"\n===== {title}: wall {wall * 1e3:.1f} ms (profiled), device self time {dev_total:.1f} ms, "
                f"{sum(e.count for e in ev)} op calls =====\n")
        f.write(ev.table(sort_by=key, row_limit=25, max_name_column_width=60))


def _bench(name: str, model, shape: Shape, warmup: int, repeats: int, bandwidth: float,
           compiled_decode: bool = False, profile: str | None = None, skip_train: bool = False,
           train_only: bool = False, autocast: bool = False) -> dict:
    dev = shape.device
    g = torch.Generator().manual_seed(11)
    res: dict = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}

    if skip_train:
        return _decode(name, model, shape, warmup, repeats, bandwidth, compiled_decode, profile, res, g)

    # training step
    ids = torch.randint(3, shape.vocab, (shape.train_batch, shape.train_len), generator=g).to(dev)
    mask = torch.ones_like(ids)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    t = timed(step, shape, warmup, repeats)
    res["train_step_ms"] = t * 1e3
    _phase(name, "training steps", t0)
    if train_only:
        res["train_tokens_per_s"] = shape.train_batch * shape.train_len / t
        res["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
        profile_to(profile, f"{name} training step{' (autocast)' if autocast else ''}", step, shape)
        return res
    res["train_tokens_per_s"] = shape.train_batch * shape.train_len / t
    res["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
    res["activations_mb"] = kept_activation_bytes(model, step) / 2**20
    profile_to(profile, f"{name} training step", step, shape)
    opt = None  # free the optimizer state before inference
    for p in params:
        p.grad = None
    model.eval()
    _free(shape)

    # prefill, batch 1
    pre = torch.randint(3, shape.vocab, (1, shape.prefill_len), generator=g).to(dev)

    @torch.no_grad()
    def prefill():
        model(input_ids=pre, attention_mask=torch.ones_like(pre), use_cache=True)

    t0 = time.perf_counter()
    res["prefill_ms"] = timed(prefill, shape, warmup, repeats) * 1e3
    _phase(name, "prefill", t0)
    return _decode(name, model, shape, warmup, repeats, bandwidth, compiled_decode, profile, res, g)


def _decode(name, model, shape, warmup, repeats, bandwidth, compiled_decode, profile, res, g) -> dict:
    dev = shape.device
    n_new = shape.decode_new_tokens
    for bsz in shape.decode_batches:
        prompt = torch.randint(3, shape.vocab, (bsz, shape.decode_prompt_len), generator=g).to(dev)
        decode_kwargs = compiled_decode_kwargs(shape, model, shape.decode_prompt_len + n_new) if compiled_decode \
            else dict

        def gen(prompt=prompt, decode_kwargs=decode_kwargs):
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=n_new, min_new_tokens=n_new, use_cache=True, pad_token_id=0,
                                 **decode_kwargs())
            assert out.shape[1] == prompt.shape[1] + n_new

        t0 = time.perf_counter()
        res[f"decode_b{bsz}_ms_per_token"] = timed(gen, shape, min(1, warmup), max(1, min(repeats, 3))) * 1e3 / n_new
        _phase(name, f"decode b{bsz}", t0)
        if bsz == shape.decode_batches[0] and compiled_decode:  # eager: ~0.5M op events, a minute to tabulate
            profile_to(profile, f"{name} generate, batch 1, {n_new} new tokens", gen, shape)
        _free(shape)
    res["decode_b1_floor_ms_per_token"] = weight_bytes_per_token(name, model) / bandwidth * 1e3
    return res


# ---------------------------------------------------------------------------------------------
# report


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def ratios(results: dict) -> dict:
    if BASELINE not in results:
        return {}
    base = results[BASELINE]
    keys = ["train_step_ms", "peak_memory_mb", "activations_mb", "prefill_ms", "decode_b1_ms_per_token", "decode_b32_ms_per_token"]
    return {name: {k: _ratio(r.get(k), base.get(k)) for k in keys} for name, r in results.items()}


def targets(results: dict) -> list[dict]:
    def r_(name: str, key: str):
        return results.get(name, {}).get(key)

    rows = [
        ("MixLoRA fast train step / PEFT LoRA r16", r_("ours_mixlora_fast", "train_step_ms"), r_(BASELINE, "train_step_ms"), 1.25),
        ("MixLoRA fast peak memory / PEFT LoRA r16", r_("ours_mixlora_fast", "peak_memory_mb"), r_(BASELINE, "peak_memory_mb"), 1.15),
        ("MixLoRA fast activations kept / PEFT LoRA r16", r_("ours_mixlora_fast", "activations_mb"), r_(BASELINE, "activations_mb"), None),
        ("MiLoRA r16 train step / PEFT LoRA r16", r_("ours_milora_r16", "train_step_ms"), r_(BASELINE, "train_step_ms"), 1.15),
        ("MiLoRA decode b1 / our LoRA r16", r_("ours_milora_r16", "decode_b1_ms_per_token"), r_("ours_lora_r16", "decode_b1_ms_per_token"), 1.05),
        ("MixLoRA fast decode b1 / our LoRA r16", r_("ours_mixlora_fast", "decode_b1_ms_per_token"), r_("ours_lora_r16", "decode_b1_ms_per_token"), 1.3),
        ("MiLoRA decode b1 / bandwidth floor", r_("ours_milora_r16", "decode_b1_ms_per_token"), r_("ours_milora_r16", "decode_b1_floor_ms_per_token"), 1.5),
        ("MixLoRA fast decode b1 / bandwidth floor", r_("ours_mixlora_fast", "decode_b1_ms_per_token"), r_("ours_mixlora_fast", "decode_b1_floor_ms_per_token"), 1.5),
        ("MixLoRA naive / fast train step", r_("ours_mixlora_naive", "train_step_ms"), r_("ours_mixlora_fast", "train_step_ms"), None),
        ("MixLoRA naive / fast decode b1", r_("ours_mixlora_naive", "decode_b1_ms_per_token"), r_("ours_mixlora_fast", "decode_b1_ms_per_token"), None),
        ("MixLoRA naive / fast decode b32", r_("ours_mixlora_naive", "decode_b32_ms_per_token"), r_("ours_mixlora_fast", "decode_b32_ms_per_token"), None),
    ]
    out = []
    for label, a, b, limit in rows:
        ratio = _ratio(a, b)
        met = None if ratio is None or limit is None else ratio <= limit
        out.append({"target": label, "ratio": ratio, "limit": limit, "met": met})
    return out


def print_report(report: dict) -> None:
    res, rat = report["contenders"], report["ratios_vs_" + BASELINE]
    cols = [("train ms", "train_step_ms", 1), ("tok/s", "train_tokens_per_s", 0), ("peak MB", "peak_memory_mb", 0),
            ("kept MB", "activations_mb", 0),
            ("prefill ms", "prefill_ms", 2), ("dec b1 ms/tok", "decode_b1_ms_per_token", 2),
            ("dec b32 ms/tok", "decode_b32_ms_per_token", 2), ("b1 floor ms/tok", "decode_b1_floor_ms_per_token", 3)]
    head = f"{'contender':<20}" + "".join(f"{c:>16}" for c, _, _ in cols)
    print("\nabsolute figures (median of repeats)")
    print(head)
    for name in res:
        print(f"{name:<20}" + "".join(f"{_fmt(res[name].get(k), d):>16}" for _, k, d in cols))
    rcols = [("train", "train_step_ms"), ("peak mem", "peak_memory_mb"), ("kept", "activations_mb"), ("prefill", "prefill_ms"),
             ("dec b1", "decode_b1_ms_per_token"), ("dec b32", "decode_b32_ms_per_token")]
    print(f"\nratios vs {BASELINE} (lower is better)")
    print(f"{'contender':<20}" + "".join(f"{c:>12}" for c, _ in rcols))
    for name in rat:
        print(f"{name:<20}" + "".join(f"{_fmt(rat[name][k], 3):>12}" for _, k in rcols))
    print("\nissue-4 targets (limits are the H100 targets; on CPU a regression check only)")
    for t in report["targets"]:
        met = "" if t["met"] is None else ("  met" if t["met"] else "  NOT met")
        limit = "" if t["limit"] is None else f"  (<= {t['limit']})"
        print(f"  {t['target']:<44} {_fmt(t['ratio'], 3):>8}{limit}{met}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 64: a smoke test, not a benchmark")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2 cpu, 3 gpu, 1 tiny)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls, median reported (default 5 cpu, 10 gpu)")
    ap.add_argument("--contenders", nargs="*", default=None, help=f"subset of {CONTENDERS} (default all)")
    ap.add_argument("--skip-gate", action="store_true", help="skip the correctness gate (not for reported runs)")
    ap.add_argument("--output", default=None, help="write the report as JSON here")
    ap.add_argument("--reuse-base", action="store_true",
                    help="build the base model once and attach/remove each contender's adapter on it")
    ap.add_argument("--budget", type=float, default=0, help="skip the remaining contenders after this many seconds")
    ap.add_argument("--compiled-decode", action="store_true",
                    help="decode with a static cache, each step torch.compiled (CUDA graphs on a GPU); the "
                         "warm-up call pays the compilation")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="train every contender with transformers' (non-reentrant) activation checkpointing")
    ap.add_argument("--profile", default=None, metavar="FILE",
                    help="append the profiler's table of one training step and one batch-1 generate call per contender")
    ap.add_argument("--decode-only", action="store_true", help="time decoding alone (no training step, no prefill)")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=None, help="decode batch sizes (default 1 32)")
    ap.add_argument("--train-only", action="store_true", help="time the training step alone (no prefill, no decode)")
    ap.add_argument("--autocast", action="store_true",
                    help="train under torch.autocast(bfloat16), as `moelora train` (accelerate), HF Trainer and "
                         "LLaMA-Factory do with bf16 on: the float32 adapters' products then run in bf16")
    args = ap.parse_args(argv)

    if args.mode == "gpu" and not torch.cuda.is_available():
        print("error: --mode gpu needs CUDA", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    shape = shape_for(args.mode, args.tiny)
    if args.decode_batches:
        shape.decode_batches = tuple(args.decode_batches)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2 if args.mode == "cpu" else 3)
    repeats = args.repeats if args.repeats is not None else (5 if args.mode == "cpu" else 10)
    names = args.contenders or CONTENDERS
    if not args.decode_only:  # the ratios need them (decode-only runs: the decode targets need our LoRA)
        names = [BASELINE, *names]
    names = ["ours_lora_r16", *names]
    names = [n for n in CONTENDERS if n in names]
    from moelora.kernels import BACKENDS

    if "triton" not in BACKENDS or args.mode == "cpu":  # on the CPU Triton only has its (slow) interpreter
        names = [n for n in names if not n.endswith("triton")]
    if args.mode == "cpu" and not args.contenders:  # compiling needs a C++ compiler: on the CPU when asked for
        names = [n for n in names if not n.endswith("compiled")]
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)

    t_start = time.perf_counter()
    meta = {
        "mode": args.mode, "tiny": args.tiny, "compiled_decode": args.compiled_decode,
        "gradient_checkpointing": args.gradient_checkpointing,
        "autocast": args.autocast, "train_only": args.train_only, "decode_only": args.decode_only, "threads": threads, "warmup": warmup, "repeats": repeats,
        "shape": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(shape).items()},
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name() if shape.device == "cuda" else platform.processor() or platform.machine(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    try:
        import peft

        meta["peft"] = peft.__version__
    except ImportError:
        print("error: PEFT is needed for the baselines (pip install peft)", file=sys.stderr)
        return 2
    print(f"mode {args.mode}{' (tiny)' if args.tiny else ''}, {threads} threads, warmup {warmup}, repeats {repeats}")

    if args.skip_gate:
        gate = {"skipped": True}
    else:
        gate = correctness_gate(shape, names)
        print(f"correctness gate: {gate}")
        if not gate["passed"]:
            print("error: correctness gate failed, not timing (see the diffs above)", file=sys.stderr)
            return 1

    bandwidth = measure_bandwidth(shape)
    meta["copy_bandwidth_gb_s"] = bandwidth / 1e9
    results = {}
    base = build_base(shape) if args.reuse_base else None
    slowest = 0.0  # seconds of the slowest contender so far: one that would overrun the budget is skipped
    for name in names:
        if args.budget and time.perf_counter() - t_start + slowest > args.budget:
            print(f"  {name}: skipped (would end past the --budget of {args.budget} s)", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            results[name] = bench_contender(name, shape, warmup, repeats, bandwidth, base, args.compiled_decode,
                                            args.gradient_checkpointing, args.profile, args.decode_only,
                                            args.train_only, args.autocast)
        except torch.OutOfMemoryError as e:  # e.g. PEFT DoRA's full-weight norms on a 7B shape
            print(f"  {name}: out of memory ({str(e).splitlines()[0]})", flush=True)
            results[name] = {"error": "out of memory"}
        _free(shape)  # the contender's model is gone with bench_contender's frame
        slowest = max(slowest, time.perf_counter() - t0)
        print(f"  {name}: done in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.output and "error" not in results[name]:  # a run killed later keeps what it measured
            with open(args.output + ".partial", "w") as f:
                json.dump({"meta": meta, "gate": gate, "contenders": results}, f, indent=2)
            print(f"  {name}: {json.dumps(results[name])}", flush=True)
    results = {k: v for k, v in results.items() if "error" not in v} | {
        k: v for k, v in results.items() if "error" in v}

    report = {"meta": meta, "gate": gate, "contenders": results}
    report["ratios_vs_" + BASELINE] = ratios(results)
    report["targets"] = targets(results)
    finish(report, print_report, t_start, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
