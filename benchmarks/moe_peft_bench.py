"""Time the official MoE-PEFT 2.0.2 MixLoRA (and its plain LoRA) the way ``bench.py`` times ours.

MoE-PEFT (the reference implementation of the MixLoRA paper, https://github.com/TUDB-Labs/MoE-PEFT)
needs ``transformers<4.47``, so it cannot share ``bench.py``'s environment. This script is standalone
(it does not import ``moelora``) and is run with the old packages shadowing the new ones, e.g.::

    pip install --no-index --no-deps --target /tmp/site .whl_moepeft/*.whl
    PYTHONPATH=/tmp/site python benchmarks/moe_peft_bench.py --mode gpu --output moe_peft.json

Contenders (same random Llama-shaped base model as ``bench.py``, same shapes, same seed):

- ``moe_peft_mixlora``: MoE-PEFT MixLoRA (``routing_strategy="mixlora"``), 8 experts, top-2, r=16,
  alpha=32, dropout 0.05, all 7 projections (attention: one LoRA each; FFN: per-expert LoRAs on
  gate/up/down), router aux loss coefficient 0.001 (MoE-PEFT's default) -- as ``bench.py``'s
  ``ours_mixlora_*``;
- ``moe_peft_lora_r16``: MoE-PEFT plain LoRA r=16, alpha=32, dropout 0.05, same 7 projections
  (a same-environment baseline).

The base model is built in memory (``AutoModelForCausalLM.from_config``) and wrapped with
``moe_peft.models.from_pretrained(llm_model, attn_impl=..., device=...)`` + ``moe_peft.LLMModel``, as
``LLMModel.from_pretrained`` does after loading from disk; nothing is saved or loaded.

Figures (as in ``bench.py``; median of ``repeats`` after ``warmup`` untimed calls, with
``torch.cuda.synchronize``):

- training step: MoE-PEFT's own inputs (``LLMModelInput`` / ``LLMBatchConfig``, tokens, labels and
  an all-ones attention mask as tensors), ``LLMModel.forward``, loss = LM loss + router aux loss as
  ``moe_peft.trainer._compute_loss`` sums them (gradient accumulation 1; its per-step
  ``logging.info(f"... {loss}")`` left out), backward, ``torch.optim.AdamW`` (lr 1e-5, weight decay
  0.01: the trainer's optimizer) on the adapter parameters (``get_adapter_weight_dict``, as the
  trainer), ``zero_grad``. Gradient checkpointing ``none`` by default, as ``bench.py``; note that
  MoE-PEFT's own trainer (its ``Dispatcher``) always uses ``recompute``: pass
  ``--gradient-checkpoint recompute`` to time that (contender names then get a ``_recompute`` suffix);
- train tokens/s, peak memory (``torch.cuda.max_memory_allocated`` over the training steps, GPU only);
- prefill (batch 1, ``LLMModel.forward`` with a dynamic cache, inference mode);
- decode ms per generated token at batch 1 and 32 through ``moe_peft.generate`` (greedy: temperature,
  top-p, top-k and repetition penalty off; KV cache on; the stop token is made unreachable so every
  sequence generates exactly ``decode_new_tokens``); the whole ``generate`` call divided by the
  number of new tokens, prefill of the short prompt included. ``moe_peft.generate`` tokenizes text
  prompts, so a stand-in tokenizer maps space-separated ids to ids (no tokenizer on disk needed).

Attention: MoE-PEFT's Llama supports only ``eager`` and ``flash_attn`` (the latter needs the
``flash-attn`` package), no SDPA; ``--attn auto`` picks ``flash_attn`` when transformers reports
flash-attn 2 available and the device is CUDA, else ``eager``.

Before timing, a sanity gate: MoE-PEFT with a fresh LoRA (B = 0) must reproduce the transformers
model's logits (float32; on GPU the benchmark's layer shapes with 2 layers), atol 1e-4.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/common.py
from common import FIGURES, GATE_ATOL, TARGETS, Shape, _fmt, _free, finish, shape_for, timed  # noqa: E402

CONTENDERS = ["moe_peft_lora_r16", "moe_peft_mixlora"]


def build_base(shape: Shape, seed: int = 0, layers: int | None = None, dtype: torch.dtype | None = None):
    """The transformers model, as bench.py's ``build_base`` (transformers 4.46 spells dtype ``torch_dtype``)."""
    import transformers

    torch.manual_seed(seed)
    with torch.device(shape.device):
        model = transformers.AutoModelForCausalLM.from_config(shape.config(layers), torch_dtype=dtype or shape.dtype)
    return model.eval()


def wrap(base, shape: Shape, attn: str):
    """MoE-PEFT's model around ``base`` without a trip through the disk: what
    ``LLMModel.from_pretrained`` does after its ``AutoModelForCausalLM.from_pretrained``."""
    import moe_peft
    from moe_peft.models import from_pretrained

    base.requires_grad_(False)
    inner = from_pretrained(base, attn_impl=attn, use_sliding_window=False, device=shape.device)
    return moe_peft.LLMModel(inner)


def adapter_config(name: str):
    import moe_peft

    common = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=list(TARGETS), task_name="casual")
    if name.startswith("moe_peft_mixlora"):
        return moe_peft.adapter_factory("MIXLORA", name, routing_strategy="mixlora", num_experts=8, top_k=2,
                                        router_aux_loss_coef=0.001, **common)
    if name.startswith("moe_peft_lora_r16"):
        return moe_peft.adapter_factory("LORA", name, **common)
    raise ValueError(name)


def trainable(model, name: str) -> list[torch.Tensor]:
    """The adapter's parameters, as MoE-PEFT's trainer collects them for its optimizer."""
    return [t for t in model.get_adapter_weight_dict(name).values() if t.requires_grad]


def randomize(params: list[torch.Tensor], seed: int = 1, scale: float = 0.02) -> None:
    """Non-zero adapter weights (a fresh LoRA has B = 0), as bench.py's ``randomize``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p))


def make_contender(name: str, shape: Shape, attn: str, base=None, fresh: bool = False):
    base = base if base is not None else build_base(shape)
    model = wrap(base, shape, attn)
    del base  # MoE-PEFT keeps the weights it needs (and a copy of lm_head)
    model.init_adapter(adapter_config(name))
    if not fresh:
        randomize(trainable(model, name))
    return model


def batch_input(name: str, tokens: torch.Tensor, **kwargs):
    from moe_peft import LLMBatchConfig, LLMModelInput

    cfg = LLMBatchConfig(adapter_name_=name, batch_start_idx_=0, batch_end_idx_=tokens.shape[0])
    return LLMModelInput(batch_configs_=[cfg], batch_tokens_=tokens, **kwargs)


# ---------------------------------------------------------------------------------------------
# sanity gate


def sanity_gate(shape: Shape, attn: str) -> dict:
    """MoE-PEFT with a fresh LoRA (B = 0, so dropout has no effect) vs the transformers model, float32."""
    layers = None if shape.device == "cpu" else 2
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, shape.vocab, (2, min(64, shape.train_len)), generator=g).to(shape.device)
    base = build_base(shape, layers=layers, dtype=torch.float32)
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    model = make_contender("moe_peft_lora_r16", shape, attn, base, fresh=True)
    del base
    with torch.no_grad():
        out = model.forward(batch_input("moe_peft_lora_r16", ids, batch_masks_=torch.ones_like(ids),
                                        inference_mode_=True))[0].logits.float()
    res = {"moe_peft_vs_transformers_max_abs_diff": (out - ref).abs().max().item(),
           "logit_abs_max": ref.abs().max().item(), "atol": GATE_ATOL}
    res["passed"] = res["moe_peft_vs_transformers_max_abs_diff"] <= GATE_ATOL
    del model
    _free(shape)
    return res


# ---------------------------------------------------------------------------------------------
# timing (as bench.py)


class IdTokenizer:
    """Stands in for ``moe_peft.Tokenizer`` (which loads a tokenizer from disk) in ``moe_peft.generate``:
    a prompt is a string of space-separated token ids. Its eos id (-1) is never generated, so every
    sequence runs to ``max_gen_len`` new tokens (bench.py's ``min_new_tokens = max_new_tokens``)."""

    padding_side_ = "right"
    # a moe_peft.Prompter template that leaves the prompt (the ids) as it is
    TEMPLATE = {"description": "token ids", "prompt_input": "{instruction} {input}",
                "prompt_no_input": "{instruction}", "response_split": "|"}

    def __init__(self, pad_id: int = 0):
        self.pad_id_ = pad_id
        self.bos_id_ = 1
        self.eos_id_ = -1
        self.unk_id_ = None

    def encode(self, data, add_special_tokens: bool = True) -> list[int]:
        data = [data] if isinstance(data, str) else data
        return [int(t) for text in data for t in text.split()]

    def decode(self, data) -> str:
        return " ".join(str(t) for t in data)

    def mask_from(self, tokens) -> list[int]:
        return [int(t != self.pad_id_) for t in tokens]


def bench_contender(name: str, shape: Shape, attn: str, checkpoint: str, warmup: int, repeats: int,
                    decode: bool) -> dict:
    import moe_peft
    from moe_peft.common import cache_factory

    adapter = name.removesuffix("_" + checkpoint)
    model = make_contender(adapter, shape, attn)
    dev = shape.device
    g = torch.Generator().manual_seed(11)
    params = trainable(model, adapter)
    res: dict = {k: None for k in FIGURES}
    res["trainable_params"] = sum(p.numel() for p in params)

    # training step
    ids = torch.randint(3, shape.vocab, (shape.train_batch, shape.train_len), generator=g).to(dev)
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    losses = []

    def step():
        # LLMModel.forward consumes (sets to None) the tokens, labels and masks: a fresh input each step
        outputs = model.forward(batch_input(adapter, ids, batch_labels_=ids, batch_masks_=mask,
                                            gradient_checkpoint_=checkpoint))
        total = None
        for out in outputs:  # moe_peft.trainer._compute_loss, accumulation step 1, without its logging
            loss = out.loss
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
            total = loss if total is None else total + loss
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total.detach())

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = timed(step, shape, warmup, repeats)
    res["train_step_ms"] = t * 1e3
    res["train_tokens_per_s"] = shape.train_batch * shape.train_len / t
    res["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
    res["train_loss_first_last"] = [losses[0].item(), losses[-1].item()]
    opt = None  # free the optimizer state before inference
    for p in params:
        p.grad = None
    _free(shape)

    # prefill, batch 1 (MoE-PEFT has no train/eval switch: inference_mode_ turns off router jitter only)
    pre = torch.randint(3, shape.vocab, (1, shape.prefill_len), generator=g).to(dev)

    @torch.no_grad()
    def prefill():
        cache = cache_factory("dynamic", config=model.model_.model_config(), batch_size=1,
                              max_cache_len=shape.prefill_len)
        model.forward(batch_input(adapter, pre, inference_mode_=True), cache)

    res["prefill_ms"] = timed(prefill, shape, warmup, repeats) * 1e3

    # decode through moe_peft.generate
    if decode:
        tok = IdTokenizer()
        n_new = shape.decode_new_tokens
        for bsz in shape.decode_batches:
            prompts = torch.randint(3, shape.vocab, (bsz, shape.decode_prompt_len), generator=g).tolist()
            prompts = [" ".join(map(str, p)) for p in prompts]

            def gen(prompts=prompts, bsz=bsz):
                cfg = moe_peft.GenerateConfig(adapter_name=adapter, prompts=prompts, batch_size=bsz,
                                              prompt_template=IdTokenizer.TEMPLATE, temperature=0, top_p=0, top_k=0, do_sample=False,
                                              repetition_penalty=0)
                out = moe_peft.generate(model, tok, [cfg], max_gen_len=n_new, use_cache=True,
                                        concurrent_jobs=bsz)
                assert len(out[adapter]) == bsz

            res[f"decode_b{bsz}_ms_per_token"] = timed(gen, shape, min(1, warmup), max(1, min(repeats, 3))) * 1e3 / n_new
            _free(shape)
    return res


# ---------------------------------------------------------------------------------------------
# report


def print_report(report: dict) -> None:
    res = report["contenders"]
    cols = [("train ms", "train_step_ms", 1), ("tok/s", "train_tokens_per_s", 0), ("peak MB", "peak_memory_mb", 0),
            ("prefill ms", "prefill_ms", 2), ("dec b1 ms/tok", "decode_b1_ms_per_token", 2),
            ("dec b32 ms/tok", "decode_b32_ms_per_token", 2), ("params", "trainable_params", 0)]
    print("\nabsolute figures (median of repeats)")
    print(f"{'contender':<28}" + "".join(f"{c:>16}" for c, _, _ in cols))
    for name in res:
        print(f"{name:<28}" + "".join(f"{_fmt(res[name][k], d):>16}" for _, k, d in cols))
    names = list(res)
    if len(names) == 2:
        a, b = names[1], names[0]
        print(f"\nratios {a} / {b} (lower is better)")
        for _, k, _ in cols[:-1]:
            if k == "train_tokens_per_s":
                continue
            ra, rb = res[a][k], res[b][k]
            print(f"  {k:<28} {_fmt(None if ra is None or not rb else ra / rb, 3):>8}")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--tiny", action="store_true", help="2 layers, hidden 64: a smoke test, not a benchmark")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2 cpu, 3 gpu, 1 tiny)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls, median reported (default 5 cpu, 10 gpu)")
    ap.add_argument("--contenders", nargs="*", default=None, help=f"subset of {CONTENDERS} (default all)")
    ap.add_argument("--attn", choices=["auto", "eager", "flash_attn"], default="auto",
                    help="MoE-PEFT attention (its Llama has no sdpa): auto = flash_attn if installed on CUDA, else eager")
    ap.add_argument("--gradient-checkpoint", choices=["none", "recompute", "offload"], default="none",
                    help="MoE-PEFT's gradient checkpointing (none = as bench.py; its trainer uses recompute)")
    ap.add_argument("--skip-decode", action="store_true", help="skip the moe_peft.generate decode timings")
    ap.add_argument("--skip-gate", action="store_true", help="skip the sanity gate (not for reported runs)")
    ap.add_argument("--output", default=None, help="write the report as JSON here")
    args = ap.parse_args(argv)

    if args.mode == "gpu" and not torch.cuda.is_available():
        print("error: --mode gpu needs CUDA", file=sys.stderr)
        return 2
    shape = shape_for(args.mode, args.tiny)
    if shape.device == "cpu":
        os.environ.setdefault("MOE_PEFT_EXECUTOR_TYPE", "CPU")  # read when moe_peft is imported
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        import moe_peft
        import transformers
    except Exception as e:
        print(f"error: cannot import moe_peft / transformers ({type(e).__name__}: {e}); this script needs "
              "moe_peft==2.0.2 with transformers<4.47 (see the module docstring)", file=sys.stderr)
        return 2
    transformers.logging.set_verbosity_error()
    moe_peft.setup_logging("ERROR")

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2 if args.mode == "cpu" else 3)
    repeats = args.repeats if args.repeats is not None else (5 if args.mode == "cpu" else 10)
    if args.attn == "auto":
        from transformers.utils import is_flash_attn_2_available

        attn = "flash_attn" if shape.device == "cuda" and is_flash_attn_2_available() else "eager"
    else:
        attn = args.attn
    names = [n for n in CONTENDERS if args.contenders is None or n in args.contenders]
    ckpt = args.gradient_checkpoint
    decode = not args.skip_decode

    t_start = time.perf_counter()
    meta = {
        "mode": args.mode, "tiny": args.tiny, "threads": threads, "warmup": warmup, "repeats": repeats,
        "shape": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(shape).items()},
        "attn_implementation": attn, "gradient_checkpoint": ckpt,
        "efficient_operator": os.getenv("MOE_PEFT_EVALUATE_MODE") is None,
        "moe_peft": _version("moe_peft"), "torch": torch.__version__, "transformers": transformers.__version__,
        "tokenizers": _version("tokenizers"), "huggingface_hub": _version("huggingface_hub"),
        "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name() if shape.device == "cuda" else platform.processor() or platform.machine(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "notes": [
            "MoE-PEFT's Llama supports eager and flash_attn attention only (no sdpa)",
            "loss = LM loss + router aux loss (coef 0.001), as moe_peft.trainer._compute_loss",
            "MoE-PEFT applies LoRA dropout in inference too (no train/eval switch); decode is greedy",
        ],
    }
    if not decode:
        meta["decode_skipped"] = "--skip-decode"
    print(f"mode {args.mode}{' (tiny)' if args.tiny else ''}, {threads} threads, warmup {warmup}, repeats {repeats}, "
          f"attention {attn}, gradient checkpoint {ckpt}, moe_peft {meta['moe_peft']}, "
          f"transformers {transformers.__version__}, torch {torch.__version__}")

    if args.skip_gate:
        gate = {"skipped": True}
    else:
        gate = sanity_gate(shape, attn)
        print(f"sanity gate: {gate}")
        if not gate["passed"]:
            print("error: sanity gate failed, not timing", file=sys.stderr)
            return 1

    results = {}
    for name in names:
        key = name if ckpt == "none" else f"{name}_{ckpt}"
        t0 = time.perf_counter()
        results[key] = bench_contender(key, shape, attn, ckpt, warmup, repeats, decode)
        _free(shape)
        print(f"  {key}: done in {time.perf_counter() - t0:.1f} s", flush=True)
        print(f"  {key}: {json.dumps(results[key])}", flush=True)  # a run killed later still tells

    report = {"meta": meta, "gate": gate, "contenders": results}
    finish(report, print_report, t_start, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
