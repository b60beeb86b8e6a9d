"""`train.packing`: several examples per row, each attending to itself only."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers
from conftest import COMMON, randomize_adapters
from safetensors.torch import load_file

import moelora
from moelora.config import ConfigError
from moelora.data import DataError, DataSource, TrainData, collate, collate_packed, pack_lengths
from moelora.runconfig import load_run_config
from moelora.train import TrainingError, check_packing, train

TOY = Path(__file__).resolve().parents[1] / "examples" / "toy"


def test_pack_lengths_puts_every_item_once_within_the_capacity():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (500,), generator=g).tolist()
    bins = pack_lengths(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) <= 1.1 * sum(lengths) / 64 + 1  # best-fit decreasing: close to the bound
    assert pack_lengths(lengths, 64) == bins
    assert pack_lengths([5, 5, 5], 10) == [[0, 1], [2]]
    with pytest.raises(DataError, match="an example of 65 tokens does not fit a packed row of 64"):
        pack_lengths([3, 65], 64)


def test_packed_order_holds_each_example_of_the_epoch_once(tiny_model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    data = TrainData([DataSource(str(TOY / "addition" / "train.jsonl")),
                      DataSource(str(TOY / "letters" / "train.jsonl"), weight=0.5)], tok, 512, seed=0)
    for epoch in (0, 1):
        rows = data.packed_order(epoch)
        assert Counter(i for r in rows for i in r) == Counter(data.epoch_order(epoch))
        assert all(sum(len(data[i]["input_ids"]) for i in r) <= 512 for r in rows)  # examples: 119-130 tokens
        assert len(rows) < len(data.epoch_order(epoch)) / 3  # short examples: several per row
    assert data.packed_order(0) != data.packed_order(1)
    assert data.packed_order(0) == data.packed_order(0)


def test_collate_packed_layout():
    a = {"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7], "prompt_length": 2}
    b = {"input_ids": [8, 9, 10], "labels": [8, 9, 10], "prompt_length": 0}  # `text`: labels on every token
    out = collate_packed([[a, b], [b]], pad_token_id=0)
    assert out["input_ids"].tolist() == [[1, 5, 6, 7, 8, 9, 10], [8, 9, 10, 0, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 6, 7, -100, 9, 10], [-100, 9, 10, -100, -100, -100, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3]]
    assert out["token_mask"].tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    assert "attention_mask" not in out


def _model(arch: str):
    if arch == "gemma2":  # sliding window of 4 on every other layer: packing must keep it per example
        cfg = transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=4, attn_implementation="eager")
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**COMMON, sliding_window=4)
    else:
        cfg = transformers.LlamaConfig(**COMMON)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _loss_and_grads(model, batch):
    labels = batch.pop("labels")
    out = model(**batch, use_cache=False)
    targets = labels[:, 1:]
    keep = targets != -100
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1][keep], targets[keep])
    loss = lm + getattr(out, "router_loss", 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    router = getattr(out, "router_loss", None)
    return out.logits, lm.detach(), 0.0 if router is None else float(router.detach()), grads


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
@pytest.mark.parametrize("method", ["lora", "dora", "mixlora", "milora"])
def test_a_packed_batch_trains_exactly_as_the_same_examples_unpacked(arch, method):
    """Per-token logits, LM loss, router loss and every adapter gradient: packed rows = padded rows."""
    model = _model(arch)
    cfg = {"lora": moelora.LoraConfig(r=4, lora_dropout=0.0), "dora": moelora.LoraConfig(r=4, use_dora=True, lora_dropout=0.0),
           "mixlora": moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0),
           "milora": moelora.MiLoraConfig(r=4, top_k=2, lora_dropout=0.0)}[method]
    moelora.attach(model, cfg)
    randomize_adapters(model)
    model.train()
    g = torch.Generator().manual_seed(1)
    feats = []
    for n, prompt in ((9, 4), (13, 5), (6, 3), (11, 0)):  # the last one: loss on every token (`text`)
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "prompt_length": prompt})
    plain = collate(feats, pad_token_id=0)  # (with prompt_lengths: MiLoRA routes each row on its prompt)
    packed = collate_packed([[feats[0], feats[1]], [feats[2], feats[3]]], pad_token_id=0)
    logits_a, lm_a, router_a, grads_a = _loss_and_grads(model, dict(plain))
    logits_b, lm_b, router_b, grads_b = _loss_and_grads(model, dict(packed))
    for f, (row, at) in zip(feats, [(0, 0), (0, 9), (1, 0), (1, 6)], strict=True):
        n = len(f["input_ids"])
        i = feats.index(f)
        torch.testing.assert_close(logits_b[row, at : at + n], logits_a[i, :n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lm_b, lm_a, rtol=1e-5, atol=1e-6)
    assert router_b == pytest.approx(router_a, rel=1e-5)
    assert (router_a > 0) == (method in ("mixlora", "milora"))
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def test_check_packing_refuses_a_model_whose_attention_crosses_examples(monkeypatch):
    model = _model("llama")
    check_packing(model)  # transformers detects the packed rows
    trained = _model("llama")  # a resumed MiLoRA adapter routes the probe's unsegmented row on both sequences:
    moelora.attach(trained, moelora.MiLoraConfig(r=4, top_k=2), "mi")  # the probe runs the base model
    randomize_adapters(trained, scale=0.5)
    check_packing(trained)
    assert moelora.get_context(trained).active == "mi"
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(TrainingError, match="lets packed examples attend to each other"):
        check_packing(model)


def _config(path: Path, model_dir: Path, out: Path, **train_kw) -> Path:
    t = {"max_steps": 6, "batch_size": 2, "lr": 1e-3, "save_steps": 2, "cutoff_len": 512, "seed": 3, "packing": True,
         **train_kw}
    path.write_text(json.dumps({
        "model": str(model_dir),
        "method": {"type": "mixlora", "num_experts": 4, "top_k": 2, "r": 4, "lora_alpha": 8},
        "data": [{"path": str(TOY / "addition" / "train.jsonl")}, {"path": str(TOY / "successor" / "train.jsonl")}],
        "train": t, "output_dir": str(out)}))
    return path


def test_packed_training_runs_resumes_exactly_and_refuses_milora_beside_others(tmp_path, tiny_model_dir, capsys):
    full = train(load_run_config(_config(tmp_path / "a.yaml", tiny_model_dir, tmp_path / "a")), progress=False)
    assert "steps of 2 packed rows (epoch 0: 800 examples in" in capsys.readouterr().out
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["epoch"] > 0.05  # 6 steps of 2 rows of 4 examples (of 119-130 tokens): 48 of 800 examples
    cfg = _config(tmp_path / "b.yaml", tiny_model_dir, tmp_path / "b")
    train(load_run_config(cfg), progress=False, _stop_after=3)
    resumed = train(load_run_config(cfg), resume=True, progress=False)
    a, b = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    mi = train(load_run_config(cfg, ["method={type: milora, r: 4}", "train.max_steps=2", "train.save_steps=0",
                                     f"output_dir={tmp_path / 'mi'}"]), progress=False)  # alone: each example routes
    mi_rows = [json.loads(x) for x in (mi / "metrics.jsonl").read_text().splitlines()]
    assert len(mi_rows) == 2 and all(r["router_loss"] > 0 for r in mi_rows)
    d = json.loads(cfg.read_text())
    del d["method"]
    d["adapters"] = {"lo": {"type": "lora", "r": 4}, "mix": {"type": "mixlora", "num_experts": 4, "r": 4}}
    (tmp_path / "c.yaml").write_text(json.dumps({**d, "output_dir": str(tmp_path / "c")}))
    with pytest.raises(ConfigError, match=r"train.packing cannot train MiLoRA \(mi\) beside other adapters"):
        load_run_config(tmp_path / "c.yaml", ["adapters.mi={type: milora, r: 4}"])
    out = train(load_run_config(tmp_path / "c.yaml", ["train.max_steps=2"]), progress=False)  # rows repeated per adapter
    assert (out / "lo" / "adapter_model.safetensors").is_file() and (out / "mix" / "adapter_model.safetensors").is_file()


def test_packed_training_checks_the_model_first(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(TrainingError, match="lets packed examples attend to each other"):
        train(load_run_config(_config(tmp_path / "a.yaml", tiny_model_dir, tmp_path / "a")), progress=False)
    assert not list((tmp_path / "a").glob("checkpoint-*"))
