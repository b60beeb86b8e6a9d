"""Smoke tests of benchmarks/bench.py (the tiny CPU mode runs, passes its gate, and reports everything)
and benchmarks/prefix_bench.py, benchmarks/preemption_bench.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def _load():
    spec = importlib.util.spec_from_file_location("moelora_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_bench_tiny_reports_every_contender_and_figure(tmp_path):
    pytest.importorskip("peft")
    bench = _load()
    out = tmp_path / "bench.json"
    rc = bench.main(["--mode", "cpu", "--tiny", "--repeats", "1", "--warmup", "0", "--threads", "1",
                     "--output", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["gate"]["passed"] is True
    expected = {c for c in bench.CONTENDERS if not c.endswith(("triton", "compiled"))}
    assert set(report["contenders"]) == expected  # the Triton and compiled contenders: GPU (or asked for)
    for name, figures in report["contenders"].items():
        assert set(bench.FIGURES) <= set(figures), name
        for k in bench.FIGURES:
            if k == "peak_memory_mb":
                assert figures[k] is None  # CPU: not measured
            else:
                assert figures[k] > 0, (name, k)
    assert set(report["ratios_vs_peft_lora_r16"]) == expected
    assert report["ratios_vs_peft_lora_r16"]["peft_lora_r16"]["train_step_ms"] == pytest.approx(1.0)
    assert len(report["targets"]) == 11


def test_bench_checkpointed_keeps_fewer_activations(tmp_path):
    """`--gradient-checkpointing` trains every contender with layer recomputation (the base reused
    between contenders, checkpointing switched off again): they keep fewer activation bytes."""
    pytest.importorskip("peft")
    bench = _load()
    kept = {}
    for flag in ([], ["--gradient-checkpointing"]):
        out = tmp_path / f"bench{len(flag)}.json"
        rc = bench.main(["--mode", "cpu", "--tiny", "--repeats", "1", "--warmup", "0", "--threads", "1", "--skip-gate",
                         "--reuse-base", "--contenders", "peft_lora_r16", "ours_lora_r16", "ours_mixlora_fast",
                         "--output", str(out), *flag])
        assert rc == 0
        report = json.loads(out.read_text())
        assert report["meta"]["gradient_checkpointing"] is bool(flag)
        kept[bool(flag)] = {n: c["activations_mb"] for n, c in report["contenders"].items()}
    for name in kept[False]:
        assert kept[True][name] < kept[False][name], name


def test_bench_one_phase_options_and_profile(tmp_path):
    """`--train-only --autocast --profile` times only the training step (profiler table written);
    `--decode-only --decode-batches 1` only batch-1 decoding, our LoRA included for its ratios."""
    pytest.importorskip("peft")
    bench = _load()
    out, prof = tmp_path / "train.json", tmp_path / "prof.txt"
    common = ["--mode", "cpu", "--tiny", "--repeats", "1", "--warmup", "0", "--threads", "1", "--skip-gate", "--reuse-base"]
    assert bench.main([*common, "--train-only", "--autocast", "--profile", str(prof), "--contenders", "ours_milora_r16",
                       "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["autocast"] is True
    assert set(report["contenders"]) == {"peft_lora_r16", "ours_lora_r16", "ours_milora_r16"}
    for figures in report["contenders"].values():
        assert figures["train_step_ms"] > 0 and "prefill_ms" not in figures and "decode_b1_ms_per_token" not in figures
    assert prof.read_text().count("training step (autocast)") == 3
    assert bench.main([*common, "--decode-only", "--decode-batches", "1", "--contenders", "ours_milora_r16",
                       "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["contenders"]) == {"ours_lora_r16", "ours_milora_r16"}
    for figures in report["contenders"].values():
        assert figures["decode_b1_ms_per_token"] > 0 and "train_step_ms" not in figures and "decode_b32_ms_per_token" not in figures
    milora_vs_lora = next(t for t in report["targets"] if t["target"] == "MiLoRA decode b1 / our LoRA r16")
    assert milora_vs_lora["ratio"] > 0


def test_compiled_decoding_reuses_one_static_cache():
    """The compiled-decoding contenders keep one static KV cache per batch size, reset before each call
    (a new cache per call would move the KV tensors, static inputs of the compiled step, and make
    CUDA graphs record the step again at every timed call). Each call still equals a fresh generate.
    (Compilation itself is switched off here: the cache handling is what is tested.)"""
    import torch
    from conftest import batch, randomize_adapters, tiny_model

    import moelora

    bench = _load()
    model = tiny_model("llama")
    moelora.attach(model, moelora.MiLoraConfig(r=4, top_k=2))  # routes at prefill: a stale cache would skip it
    randomize_adapters(model, scale=0.2)
    model.eval()
    make = bench.compiled_decode_kwargs(SimpleNamespace(device="cpu"), model, 6 + 4)
    ptrs = []
    for seed in range(3):
        ids, mask = batch(model, B=2, T=6, seed=seed)
        kw = make()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             disable_compile=True, **kw)
        fresh = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out, fresh), seed
        cache = kw["past_key_values"]
        ptrs.append((id(cache), cache.layers[0].keys.data_ptr()))
    assert ptrs[0] == ptrs[1] == ptrs[2]


def run_tiny(script: str, tmp_path) -> dict:
    """Run ``benchmarks/<script>`` in its tiny mode (it must succeed); its JSON report."""
    spec = importlib.util.spec_from_file_location(f"moelora_{script[:-3]}", BENCH.parent / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / f"{script}.json"
    assert mod.main(["--mode", "tiny", "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_prefix_bench_tiny_checks_outputs_and_reports_hits(tmp_path):
    figures = run_tiny("prefix_bench.py", tmp_path)["figures"]
    assert set(figures) == {f"{m}/{k}" for m in ("lora", "mixlora", "milora") for k in ("batch", "single", "burst")}
    assert figures["lora/single"]["hit_tokens"] > 0 and figures["mixlora/single"]["hit_tokens"] > 0
    assert figures["milora/single"]["hit_tokens"] == 0  # its routing depends on the whole prompt
    assert all(f["off_ms"] > 0 and f["on_ms"] > 0 for f in figures.values())


def test_preemption_bench_tiny_checks_outputs_and_preempts(tmp_path):
    report = run_tiny("preemption_bench.py", tmp_path)
    reserve, preempt = report["figures"]["reserve"], report["figures"]["preempt"]
    assert reserve["preemptions"] == 0 and preempt["preemptions"] > 0 and preempt["recomputed_tokens"] > 0
    assert preempt["mean_running"] > reserve["mean_running"] and reserve["tokens"] == preempt["tokens"]
    assert report["ratio"] == reserve["seconds"] / preempt["seconds"]
