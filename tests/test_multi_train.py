"""Several adapters trained together on one base model (issue 5): one batch holds every adapter's
rows, each adapter has its own optimizer, scheduler and checkpoint, and each one's result equals
training it alone with the same data order and seed (dropout off: its masks depend on the order in
which modules draw random numbers, which a joint batch changes)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import TOY

from moelora.config import ConfigError
from moelora.runconfig import load_run_config
from moelora.train import latest_checkpoint, train

ADAPTERS = {
    "plain": {"type": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
    "mix": {"type": "mixlora", "num_experts": 4, "top_k": 2, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
            "expert_lora_dropout": 0.0},
    "mi": {"type": "milora", "r": 4, "lora_alpha": 8, "top_k": 2, "lora_dropout": 0.0},
}


def config(path, model_dir, out, adapters=None, method=None, **train_kw):
    t = {"max_steps": 4, "batch_size": 2, "lr": 1e-3, "save_steps": 2, "cutoff_len": 96, "seed": 5, **train_kw}
    cfg = {"model": str(model_dir), "data": [{"path": str(TOY / "addition" / "train.jsonl")},
                                             {"path": str(TOY / "letters" / "train.jsonl")}],
           "train": t, "output_dir": str(out)}
    if adapters is not None:
        cfg["adapters"] = adapters
    if method is not None:
        cfg["method"] = method
    path.write_text(json.dumps(cfg))
    return load_run_config(path)


def weights(d):
    return load_file(d / "adapter_model.safetensors")


def test_each_adapter_trained_together_equals_it_trained_alone(tmp_path, tiny_model_dir):
    out = train(config(tmp_path / "j.yaml", tiny_model_dir, tmp_path / "joint", ADAPTERS), progress=False)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/plain", "loss/mix", "loss/mi", "router_loss/mix", "router_loss/mi"} <= set(metrics[-1])
    assert any(k.startswith("mix/") for k in metrics[-1]["expert_load"])
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["adapters"] == list(ADAPTERS) and summary["peak_cpu_rss_bytes"] > 0
    for name, block in ADAPTERS.items():
        solo = train(config(tmp_path / f"{name}.yaml", tiny_model_dir, tmp_path / name, method=block), progress=False)
        a, b = weights(out / name), weights(solo)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
        assert json.loads((out / name / "adapter_config.json").read_text())["peft_type"]
        solo_loss = [json.loads(x)["loss"] for x in (solo / "metrics.jsonl").read_text().splitlines()]
        assert [m[f"loss/{name}"] for m in metrics] == pytest.approx(solo_loss, rel=1e-4)


def test_adapters_trained_together_under_gradient_checkpointing(tmp_path, tiny_model_dir):
    """Each decoder layer recomputed in the backward, with every adapter's rows in the batch: the
    same adapters as keeping the activations."""
    plain = train(config(tmp_path / "a.yaml", tiny_model_dir, tmp_path / "a", ADAPTERS, max_steps=2), progress=False)
    ckpt = train(config(tmp_path / "b.yaml", tiny_model_dir, tmp_path / "b", ADAPTERS, max_steps=2,
                        gradient_checkpointing=True), progress=False)
    for name in ADAPTERS:
        a, b = weights(plain / name), weights(ckpt / name)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


def test_multi_adapter_checkpoints_resume_exactly(tmp_path, tiny_model_dir):
    two = {k: ADAPTERS[k] for k in ("plain", "mix")}
    full = train(config(tmp_path / "a.yaml", tiny_model_dir, tmp_path / "a", two), progress=False)
    run_b = config(tmp_path / "b.yaml", tiny_model_dir, tmp_path / "b", two)
    train(run_b, progress=False, _stop_after=3)
    ckpt = latest_checkpoint(tmp_path / "b")
    assert {p.name for p in ckpt.iterdir()} >= {"adapter-plain", "adapter-mix", "optimizer-plain.pt",
                                                 "optimizer-mix.pt", "scheduler-plain.pt", "scheduler-mix.pt"}
    resumed = train(run_b, resume=True, progress=False)
    for name in two:
        a, b = weights(full / name), weights(resumed / name)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_multi_adapter_config_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="either `method`"):
        config(tmp_path / "x.yaml", tiny_model_dir, tmp_path / "x", ADAPTERS, method=ADAPTERS["plain"])
    with pytest.raises(ConfigError, match="invalid adapter name '../evil'"):
        config(tmp_path / "x.yaml", tiny_model_dir, tmp_path / "x", {"../evil": ADAPTERS["plain"]})
    with pytest.raises(ConfigError, match="adapters.bad"):
        config(tmp_path / "x.yaml", tiny_model_dir, tmp_path / "x", {"bad": {"type": "lora", "rr": 4}})
    run = config(tmp_path / "x.yaml", tiny_model_dir, tmp_path / "x", ADAPTERS)
    assert list(run.adapter_configs()) == ["plain", "mix", "mi"]


def test_cli_trains_and_evaluates_every_adapter(tmp_path, tiny_model_dir, capsys):
    from moelora.cli import main as cli

    cfg = {"model": str(tiny_model_dir), "adapters": {k: ADAPTERS[k] for k in ("plain", "mi")},
           "data": [{"path": str(TOY / "addition" / "train.jsonl")}],
           "train": {"max_steps": 2, "batch_size": 2, "cutoff_len": 96, "save_steps": 0},
           "output_dir": str(tmp_path / "run"),
           "eval": {"data": [str(TOY / "addition" / "test.jsonl")], "protocol": "generate", "limit": 4, "max_new_tokens": 4}}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    assert cli(["train", "--config", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "base" in table and "plain" in table and " mi" in table
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert list(results) == ["base", "plain", "mi"]


def test_quantized_base_is_a_clear_error_without_a_gpu(tmp_path, tiny_model_dir, monkeypatch):
    from moelora.train import TrainingError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = config(tmp_path / "q.yaml", tiny_model_dir, tmp_path / "q", method=ADAPTERS["plain"])
    run.quantization = "4bit"
    with pytest.raises(TrainingError, match="4bit base model needs a CUDA GPU"):
        train(run, progress=False)
    assert not (tmp_path / "q" / "adapter_config.json").exists()
    with pytest.raises(ConfigError, match="quantization must be 4bit, 8bit or null"):
        load_run_config(tmp_path / "q.yaml", ["quantization=3bit"])


def test_dora_refuses_a_quantized_base_layer():
    from torch import nn

    from moelora.lora import DoraVariant, LoraWeights

    base = nn.Linear(8, 8)
    base.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match="DoRA needs the base weight's row norms"):
        DoraVariant(base, LoraWeights(8, 8, 2, 1.0, 0.0))
