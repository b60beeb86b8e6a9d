"""Validation during training: `train.val_size` / `val_data`, `eval_steps`, early stopping, best adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moelora
import moelora.train as train_mod
from moelora.config import ConfigError
from moelora.data import DataError, DataSource, TrainData, collate
from moelora.runconfig import load_run_config
from moelora.train import train, validation_loss

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "examples" / "toy"


def write_config(path: Path, model_dir: Path, out: Path, extra: dict | None = None, **train_kw) -> Path:
    t = {"max_steps": 6, "batch_size": 2, "lr": 1e-3, "save_steps": 2, "cutoff_len": 128, "seed": 3, **train_kw}
    cfg = {
        "model": str(model_dir),
        "method": {"type": "mixlora", "num_experts": 4, "top_k": 2, "r": 4, "lora_alpha": 8, "lora_dropout": 0.1},
        "data": [{"path": str(TOY / "addition" / "train.jsonl")}, {"path": str(TOY / "successor" / "train.jsonl")}],
        "train": t,
        "output_dir": str(out),
        **(extra or {}),
    }
    path.write_text(json.dumps(cfg))
    return path


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_val_size_holds_examples_out_of_every_source_deterministically(tok):
    sources = [DataSource(str(TOY / "addition" / "train.jsonl")), DataSource(str(TOY / "successor" / "train.jsonl"))]
    full = TrainData(sources, tok, 128, seed=0)
    part = TrainData(sources, tok, 128, seed=0, val_size=0.1)
    assert len(part.validation) == 80 and len(part) == 720
    assert [sum(f["task"] == t for f in part.validation) for t in ("addition", "successor")] == [40, 40]
    assert part.stats["addition"]["examples"] == 360  # stats count the training examples only
    key = lambda f: (f["task"], tuple(f["input_ids"]))  # noqa: E731
    # training + validation is the whole data, each example once (as a multiset: the toy files repeat items)
    assert sorted(map(key, part.features + part.validation)) == sorted(map(key, full.features))
    assert max(part.epoch_order(0)) == 719  # epochs draw from the training examples only
    same = TrainData(sources, tok, 128, seed=0, val_size=0.1)
    assert [key(f) for f in same.validation] == [key(f) for f in part.validation]
    other = TrainData(sources, tok, 128, seed=1, val_size=0.1)
    assert {key(f) for f in other.validation} != {key(f) for f in part.validation}
    counted = TrainData(sources, tok, 128, seed=0, val_size=25)  # a count, apportioned by size
    assert [sum(f["task"] == t for f in counted.validation) for t in ("addition", "successor")] == [13, 12]
    extra = TrainData(sources[:1], tok, 128, seed=0, val_sources=[DataSource(str(TOY / "letters" / "test.jsonl"))])
    assert len(extra) == 400 and len(extra.validation) == 100 and {f["task"] for f in extra.validation} == {"letters"}
    for bad, match in [(1.5, "whole count"), (-0.1, "fraction"), (801, "more than the 800"),
                       (0.001, "holds out no example"), (0.999, "all 400 of its examples")]:
        with pytest.raises(DataError, match=match):
            TrainData(sources, tok, 128, seed=0, val_size=bad)


def test_validation_loss_is_the_token_mean_of_each_adapter_alone(tiny_model_dir, tok):
    """Against the model's own loss example by example (token-weighted), per task and in all, for
    an adapter whose routing depends on the prompt span (MiLoRA) and for two adapters at once."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    moelora.attach(model, moelora.MiLoraConfig(r=4, top_k=2), "mi")
    moelora.attach(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4), "mix")
    for p in model.parameters():  # non-zero B: the adapters change the loss
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    feats = TrainData([DataSource(str(TOY / "addition" / "train.jsonl"))], tok, 128, seed=0,
                      val_sources=[DataSource(str(TOY / "letters" / "test.jsonl"))], val_size=7).validation
    assert len(feats) == 107
    with torch.no_grad():  # a random model never predicts a target: bias the head to one of them,
        b = collate(feats, tok.pad_token_id)  # so that both adapters predict it at about half its positions
        keep = b["labels"][:, 1:] != -100
        targets = b["labels"][:, 1:][keep]
        gaps = []
        for name in ("mi", "mix"):
            moelora.set_adapter(model, name)
            logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits[:, :-1][keep]
            gaps.append(logits.max(-1, keepdim=True).values - logits)
        gap = torch.maximum(*gaps)
        candidates = targets.unique()
        median = torch.stack([gap[targets == t, t].median() for t in candidates])
        old_head = model.lm_head
        model.lm_head = torch.nn.Linear(old_head.in_features, old_head.out_features, bias=True)
        model.lm_head.weight.copy_(old_head.weight)
        model.lm_head.bias.zero_()
        model.lm_head.bias[candidates[median.argmin()]] = median.min() + 1e-4
    model.train()  # validation runs in eval mode and gives the mode back
    acc = Accelerator(cpu=True)
    both = validation_loss(model, feats, ["mi", "mix"], 8, tok.pad_token_id, acc)
    assert model.training
    model.eval()
    for name in ("mi", "mix"):
        moelora.set_adapter(model, name)
        alone = validation_loss(model, feats, [name], 5, tok.pad_token_id, acc)[name]
        sums, hits, counts = {}, {}, {}
        with torch.no_grad():
            for f in feats:
                b = collate([f], tok.pad_token_id)
                out = model(**b)
                keep = b["labels"][:, 1:] != -100
                n = int(keep.sum())
                t = f["task"]
                sums[t] = sums.get(t, 0.0) + out.loss.item() * n  # the model's mean over the shifted labels
                hits[t] = hits.get(t, 0) + int((out.logits[:, :-1].argmax(-1) == b["labels"][:, 1:])[keep].sum())
                counts[t] = counts.get(t, 0) + n
        expected = {"loss": sum(sums.values()) / sum(counts.values()), "accuracy": sum(hits.values()) / sum(counts.values()),
                    "tasks": {t: {"loss": sums[t] / counts[t], "accuracy": hits[t] / counts[t]} for t in sums}}
        assert alone.keys() == expected.keys() and alone["tasks"].keys() == expected["tasks"].keys()
        assert 0 < expected["accuracy"] < 1
        for got in (alone, both[name]):
            assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5), name
            assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12), name
            for t in expected["tasks"]:
                assert got["tasks"][t] == pytest.approx(expected["tasks"][t], rel=1e-5), (name, t)
    assert abs(both["mi"]["loss"] - both["mix"]["loss"]) > 1e-3


def test_validating_does_not_change_training_and_is_logged(tmp_path, tiny_model_dir):
    """Validation in the loop (eval mode, no RNG drawn) leaves the trained adapter bit for bit as
    without it; `val_loss` rows at every eval_steps and after the last step; the plot shows them."""
    plain = train(load_run_config(write_config(tmp_path / "a.yaml", tiny_model_dir, tmp_path / "a")), progress=False)
    val = {"val_data": [{"path": str(TOY / "addition" / "test.jsonl")}, {"path": str(TOY / "successor" / "test.jsonl")}]}
    cfg = write_config(tmp_path / "b.yaml", tiny_model_dir, tmp_path / "b", extra=val, eval_steps=4)
    out = train(load_run_config(cfg), progress=False)
    a, b = load_file(plain / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    evals = [r for r in rows(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 6]
    assert set(evals[0]) == {"step", "val_loss", "val_loss/addition", "val_loss/successor", "val_accuracy",
                             "val_accuracy/addition", "val_accuracy/successor"}
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    summary = json.loads((out / "train_summary.json").read_text())["validation"]["default"]
    assert summary == {"best_loss": evals[-1]["val_loss"], "best_step": 6, "bad": 0}
    assert not (out / "best").exists()  # kept only with load_best_model_at_end
    from moelora.plot import plot_loss

    plot_loss(out, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_eval_batch_size_batches_validation_without_changing_it(tmp_path, tiny_model_dir, monkeypatch):
    """`train.eval_batch_size` sets the validation batches (default: `batch_size`); the loss and the
    accuracy stay the same."""
    sizes = []
    batches = train_mod._validation_batches

    def spy(ddp_model, features, batch_size, accelerator):
        sizes.append(batch_size)
        yield from batches(ddp_model, features, batch_size, accelerator)

    monkeypatch.setattr(train_mod, "_validation_batches", spy)
    val = {"val_data": [{"path": str(TOY / "addition" / "test.jsonl")}]}
    evals = []
    for name, kw in (("a", {}), ("b", {"eval_batch_size": 7})):
        out = train(load_run_config(write_config(tmp_path / f"{name}.yaml", tiny_model_dir, tmp_path / name, extra=val,
                                                 max_steps=2, save_steps=0, **kw)), progress=False)
        evals.append([r for r in rows(out) if "val_loss" in r][-1])
    assert sizes == [2, 7]
    assert evals[0]["val_loss"] == pytest.approx(evals[1]["val_loss"], rel=1e-5)
    assert evals[0]["val_accuracy"] == pytest.approx(evals[1]["val_accuracy"], rel=1e-6)
    with pytest.raises(ConfigError, match="eval_batch_size must be >= 1"):
        load_run_config(write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "c", eval_batch_size=0))


def test_early_stopping_and_the_best_adapter(tmp_path, tiny_model_dir, monkeypatch):
    """Scripted validation losses: best at step 4, then two validations without improvement stop the
    run at step 8 with patience 2; the final adapter is step 4's (its checkpoint's adapter)."""
    losses = iter([3.0, 2.0, 2.5, 2.0, 9.9])
    monkeypatch.setattr(train_mod, "validation_loss",
                        lambda *a, **k: {"default": {"loss": next(losses), "accuracy": 0.5, "tasks": {}}})
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out", max_steps=20, eval_steps=2, val_size=10,
                       early_stopping_patience=2, load_best_model_at_end=True, save_total_limit=0)
    out = train(load_run_config(cfg), progress=False)
    assert [r["step"] for r in rows(out) if "val_loss" in r] == [2, 4, 6, 8]
    assert max(r["step"] for r in rows(out)) == 8
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["validation"]
    assert state == {"default": {"best_loss": 2.0, "best_step": 4, "bad": 1}}
    best = load_file(out / "checkpoint-4" / "adapter" / "adapter_model.safetensors")
    for where in (out, out / "best"):
        final = load_file(where / "adapter_model.safetensors")
        assert all(torch.equal(best[k], final[k]) for k in best)
    assert json.loads((out / "best" / "best.json").read_text()) == {"step": 4, "val_loss": 2.0}
    last = load_file(out / "checkpoint-6" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(best[k], last[k]) for k in best)  # training went on after the best
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 8 and summary["validation"]["default"]["best_step"] == 4
    moelora.load_adapter(train_mod.load_model_and_tokenizer(str(tiny_model_dir))[0], out)  # a valid adapter


def test_resume_restores_the_validation_state(tmp_path, tiny_model_dir, monkeypatch):
    """Validation losses that go up and down with the weights (a function of them, so a resumed run
    sees the same ones): the best step, the loss and the patience count continue across the resume."""
    import math

    def scripted(ddp_model, *a, **k):
        v = sum(float(p.detach().double().sum()) for p in ddp_model.parameters() if p.requires_grad)
        return {"default": {"loss": 1 + math.sin(1e5 * v), "accuracy": 0.5, "tasks": {}}}

    monkeypatch.setattr(train_mod, "validation_loss", scripted)
    kw = {"val_size": 20, "eval_steps": 1, "max_steps": 8, "load_best_model_at_end": True, "early_stopping_patience": 3}
    full = train(load_run_config(write_config(tmp_path / "a.yaml", tiny_model_dir, tmp_path / "a", **kw)), progress=False)
    cfg = write_config(tmp_path / "b.yaml", tiny_model_dir, tmp_path / "b", **kw)
    train(load_run_config(cfg), progress=False, _stop_after=5)
    resumed = train(load_run_config(cfg), resume=True, progress=False)
    evals = [r for r in rows(full) if "val_loss" in r]
    assert [r for r in rows(resumed) if "val_loss" in r] == evals
    best = min(evals, key=lambda r: r["val_loss"])
    assert 1 < best["step"] < 4  # best before the resume point, not at the end: the state had to carry over
    summary = lambda d: json.loads((d / "train_summary.json").read_text())["validation"]  # noqa: E731
    assert summary(resumed) == summary(full)
    assert summary(full)["default"]["best_step"] == best["step"]
    a, b = load_file(full / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_several_adapters_are_validated_each(tmp_path, tiny_model_dir):
    extra = {"adapters": {"lo": {"type": "lora", "r": 4}, "mi": {"type": "milora", "r": 4, "top_k": 2}},
             "val_data": [{"path": str(TOY / "letters" / "test.jsonl")}]}
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out", extra=extra, max_steps=2,
                       load_best_model_at_end=True)
    d = json.loads(cfg.read_text())
    del d["method"]
    cfg.write_text(json.dumps(d))
    out = train(load_run_config(cfg), progress=False)
    [ev] = [r for r in rows(out) if "val_loss" in r]
    assert set(ev) == {f"val_{m}{x}" for m in ("loss", "accuracy")
                       for x in ("", "/lo", "/lo/letters", "/mi", "/mi/letters")} | {"step"}
    assert ev["val_loss"] == pytest.approx((ev["val_loss/lo"] + ev["val_loss/mi"]) / 2)
    for name in ("lo", "mi"):
        assert (out / "best" / name / "adapter_model.safetensors").is_file()


def test_validation_config_errors(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out")
    with pytest.raises(ConfigError, match="train.eval_steps needs validation data"):
        load_run_config(cfg, ["train.eval_steps=5"])
    with pytest.raises(ConfigError, match="train.load_best_model_at_end needs validation data"):
        load_run_config(cfg, ["train.load_best_model_at_end=true"])
    with pytest.raises(ConfigError, match="train.val_size must be a fraction in"):
        load_run_config(cfg, ["train.val_size=2.5"])
    with pytest.raises(ConfigError, match="must be >= 0"):
        load_run_config(cfg, ["train.val_size=0.1", "train.early_stopping_patience=-1"])
    with pytest.raises(DataError, match="unknown key 'weigth'"):
        load_run_config(cfg, ["val_data=[{path: x.json, weigth: 2}]"])
    run = load_run_config(cfg, ["val_data=[examples/toy/letters/test.jsonl]", "train.eval_steps=3"])
    assert Path(run.val_data[0].path).is_file()


def test_train_on_prompt_puts_the_labels_on_every_token(tmp_path, tiny_model_dir, tok):
    """LLaMA-Factory's train_on_prompt: labels = input ids (validation examples too); the prompt
    length is kept for MiLoRA; a run's loss is then over every token."""
    sources = [DataSource(str(TOY / "addition" / "train.jsonl"), max_samples=20)]
    plain = TrainData(sources, tok, 128, seed=0, val_size=4)
    full = TrainData(sources, tok, 128, seed=0, val_size=4, train_on_prompt=True)
    for a, b in zip(plain.features + plain.validation, full.features + full.validation, strict=True):
        assert b["labels"] == b["input_ids"] == a["input_ids"] and b["prompt_length"] == a["prompt_length"]
        assert a["labels"][: a["prompt_length"]] == [-100] * a["prompt_length"]
    assert full.stats["addition"]["response_tokens"] == full.stats["addition"]["tokens"]
    with pytest.raises(DataError, match="not train.stage: dpo"):
        TrainData(sources, tok, 128, seed=0, stage="dpo", train_on_prompt=True)
    losses = []
    for name, kw in (("a", {}), ("b", {"train_on_prompt": True})):
        out = train(load_run_config(write_config(tmp_path / f"{name}.yaml", tiny_model_dir, tmp_path / name,
                                                 max_steps=1, save_steps=0, **kw)), progress=False)
        losses.append(rows(out)[0]["loss"])
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)
    with pytest.raises(ConfigError, match="train_on_prompt applies to supervised training"):
        load_run_config(write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "c", train_on_prompt=True,
                                     stage="dpo"))
