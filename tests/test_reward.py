"""Reward models (``train.stage: rm``): the value head's reward, the pairwise loss, training, saving in
LLaMA-Factory's layout, loading and resuming."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters, tiny_model
from safetensors.torch import load_file

import moelora
from moelora.config import ConfigError
from moelora.data import collate
from moelora.reward import attach_value_head, sequence_rewards, value_head
from moelora.runconfig import load_run_config
from moelora.train import _reward_losses, latest_checkpoint, train


@pytest.mark.parametrize("method", ["lora", "mixlora", "milora"])
def test_reward_is_the_value_head_on_the_last_tokens_final_hidden_state(method):
    """The oracle: the decoder's own ``last_hidden_state`` at each row's last non-padding token, through
    the head by hand; and the pairwise loss is ``-log sigmoid(r_chosen - r_rejected)``."""
    from test_mixed import CONFIGS

    model = tiny_model("llama")
    moelora.attach(model, CONFIGS[method])
    randomize_adapters(model)
    head = attach_value_head(model, "default")
    model.eval()
    g = torch.Generator().manual_seed(0)
    feats = [{"input_ids": torch.randint(3, 128, (n,), generator=g).tolist(), "labels": [-100] * n, "prompt_length": 2}
             for n in (7, 4, 9, 5)]
    batch = collate(feats, pad_token_id=0)
    batch.pop("labels")
    batch.pop("prompt_lengths")  # MiLoRA routes on every token of both forwards
    with torch.no_grad():
        got = sequence_rewards(model, model, batch, "default")
        hidden = model.model(**batch).last_hidden_state
    last = torch.tensor([6, 3, 8, 4])
    want = hidden[torch.arange(4), last] @ head.summary.weight[0] + head.summary.bias[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    class Accel:
        device = torch.device("cpu")

        @staticmethod
        def autocast():
            import contextlib

            return contextlib.nullcontext()

    pairs = [{"input_ids": feats[0]["input_ids"], "labels": [-100] * 7, "prompt_length": 2,
              "rejected_input_ids": feats[1]["input_ids"], "rejected_labels": [-100] * 4, "rejected_prompt_length": 2},
             {"input_ids": feats[2]["input_ids"], "labels": [-100] * 9, "prompt_length": 2,
              "rejected_input_ids": feats[3]["input_ids"], "rejected_labels": [-100] * 5, "rejected_prompt_length": 2}]
    with torch.no_grad():
        _, pair = _reward_losses(model, model, pairs, ["default"], 0, Accel)
        rows = collate([feats[0], feats[2], feats[1], feats[3]], pad_token_id=0)  # chosen rows, then rejected
        rows.pop("labels")
        r = sequence_rewards(model, model, rows, "default")  # (MiLoRA: routed on the 2-token prompts here)
    torch.testing.assert_close(pair["loss"][0], -F.logsigmoid(r[:2] - r[2:]), rtol=1e-6, atol=1e-6)
    if method != "milora":
        torch.testing.assert_close(r, want[[0, 2, 1, 3]], rtol=1e-5, atol=1e-5)


def write_pairs(path, n=24):
    items = [{"instruction": f"Say something about {i}.", "chosen": f"A kind and true sentence about {i}.",
              "rejected": f"no {i} no"} for i in range(n)]
    path.write_text(json.dumps(items))
    return path


def rm_config(tmp_path, model_dir, out, **train_kw):
    t = {"stage": "rm", "max_steps": 12, "batch_size": 4, "lr": 5e-3, "save_steps": 4, "cutoff_len": 64, "seed": 1,
         "val_size": 4, "eval_steps": 6, **train_kw}
    cfg = {"model": str(model_dir), "method": {"type": "mixlora", "num_experts": 4, "top_k": 2, "r": 4, "lora_alpha": 8},
           "data": [str(write_pairs(tmp_path / "pairs.json"))], "train": t, "output_dir": str(out)}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_reward_model_trains_saves_in_llamafactory_layout_and_scores(tmp_path, tiny_model_dir):
    """A MixLoRA reward model learns to rank the kind answers above the curt ones (validation reward
    accuracy 1, held-out prompts too); its head is saved as LLaMA-Factory's value_head.safetensors;
    a fresh model with the adapter and head loaded scores exactly as the trained one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = train(load_run_config(rm_config(tmp_path, tiny_model_dir, tmp_path / "rm")), progress=False)
    head = load_file(str(out / "value_head.safetensors"))
    assert {k: tuple(v.shape) for k, v in head.items()} == {"v_head.summary.weight": (1, 64),
                                                            "v_head.summary.bias": (1,)}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "rewards/accuracies" in x]
    assert train_lines[-1]["loss"] < train_lines[0]["loss"] and "router_loss" in train_lines[0]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["validation"]["default"]["best_loss"] < 0.69
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moelora.load_adapter(model, out)
    assert moelora.load_value_head(model, out, "default")
    prompts = [f"Say something about {i}." for i in (100, 101)]
    scores = moelora.reward_scores(model, tok, prompts * 2, ["A kind and true sentence about 100.",
                                                             "A kind and true sentence about 101.", "no 100 no",
                                                             "no 101 no"], format="alpaca")  # as it trained
    assert scores[0] > scores[2] and scores[1] > scores[3]
    again = moelora.reward_scores(model, tok, prompts, ["x", "y"], format="alpaca")
    assert again == moelora.reward_scores(model, tok, prompts, ["x", "y"], format="alpaca")  # eval: no dropout
    assert again != moelora.reward_scores(model, tok, prompts, ["x", "y"], format="text")
    assert value_head(model, "default").training is False
    with pytest.raises(ValueError, match="2 prompts for 1 responses"):
        moelora.reward_scores(model, tok, prompts, ["x"])
    with pytest.raises(ValueError, match="format must be"):
        moelora.reward_scores(model, tok, prompts, ["x", "y"], format="chat")
    # `moelora score`: the pairwise accuracy on pair files, encoded as training encodes them
    from moelora.cli import main as cli

    pairs = json.loads((tmp_path / "pairs.json").read_text())[:8]
    assert cli(["score", "--adapter", str(out), "--model", str(tiny_model_dir), "--data", str(tmp_path / "pairs.json"),
                "--format", "alpaca", "--limit", "8", "--output", str(tmp_path / "score.json")]) == 0
    got = json.loads((tmp_path / "score.json").read_text())["pairs"]
    chosen = moelora.reward_scores(model, tok, [x["instruction"] for x in pairs], [x["chosen"] for x in pairs],
                                   format="alpaca")
    rejected = moelora.reward_scores(model, tok, [x["instruction"] for x in pairs], [x["rejected"] for x in pairs],
                                     format="alpaca")
    assert got["pairs"] == 8 and got["accuracy"] == sum(c > r for c, r in zip(chosen, rejected)) / 8
    assert got["chosen"] == pytest.approx(sum(chosen) / 8, abs=1e-5)
    assert got["margin"] == pytest.approx((sum(chosen) - sum(rejected)) / 8, abs=1e-5)
    assert cli(["score", "--adapter", str(tmp_path), "--data", str(tmp_path / "pairs.json")]) == 2


def test_reward_model_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    full = train(load_run_config(rm_config(tmp_path, tiny_model_dir, tmp_path / "a", val_size=0, eval_steps=0)),
                 progress=False)
    cfg = rm_config(tmp_path, tiny_model_dir, tmp_path / "b", val_size=0, eval_steps=0)
    train(load_run_config(cfg), progress=False, _stop_after=6)
    assert (latest_checkpoint(tmp_path / "b") / "adapter" / "value_head.safetensors").is_file()
    resumed = train(load_run_config(cfg), resume=True, progress=False)
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_reward_model_config_errors(tmp_path, tiny_model_dir):
    cfg = rm_config(tmp_path, tiny_model_dir, tmp_path / "c")
    for override, msg in [("train.fsdp=true", "train.fsdp"), ("train.deepspeed=zero2", "train.deepspeed")]:
        with pytest.raises(ConfigError, match=f"train.stage: rm does not support {msg}"):
            load_run_config(cfg, [override])
    with pytest.raises(ConfigError, match=r"train.value_head_dropout must be in \[0, 1\)"):
        load_run_config(cfg, ["train.value_head_dropout=1.5"])


def test_several_reward_models_in_one_run_each_equal_their_run_alone(tmp_path, tiny_model_dir):
    """``adapters:`` with ``stage: rm``: one forward of every adapter's rows per step, each adapter with
    its own value head (saved beside it, in its directory) and optimizer; each equals its run alone
    (no dropout, so that the random streams do not differ)."""
    lora = {"type": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    mix = {"type": "mixlora", "num_experts": 4, "top_k": 2, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    kw = dict(value_head_dropout=0.0, max_steps=6, save_steps=0, val_size=0, eval_steps=0)
    solo = {}
    for name, method in (("plain", lora), ("mix", mix)):
        cfg = rm_config(tmp_path, tiny_model_dir, tmp_path / name, **kw)
        d = json.loads(cfg.read_text())
        d["method"] = method
        cfg.write_text(json.dumps(d))
        solo[name] = train(load_run_config(cfg), progress=False)
    cfg = rm_config(tmp_path, tiny_model_dir, tmp_path / "both", **kw)
    d = json.loads(cfg.read_text())
    d.pop("method")
    d["adapters"] = {"plain": lora, "mix": mix}
    cfg.write_text(json.dumps(d))
    out = train(load_run_config(cfg), progress=False)
    for name in ("plain", "mix"):
        for f in ("adapter_model.safetensors", "value_head.safetensors"):
            a, b = load_file(str(out / name / f)), load_file(str(solo[name] / f))
            assert a.keys() == b.keys()
            for k in a:
                if k == "v_head.summary.bias":  # the pairwise loss does not see it (r_c - r_r): its gradient is 0
                    assert (a[k] - b[k]).abs().max() <= 6 * 5e-3  # up to rounding, which Adam makes +-lr steps
                    continue
                torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {f}: {k}")


def test_score_without_a_value_head_is_dpos_implicit_reward(tmp_path, tiny_model_dir):
    """``moelora score`` on an adapter without a value head: DPO's implicit reward,
    ``beta x (log p_adapter - log p_base)`` of each response (TRL's reward accuracy), batched and
    padded; the oracle scores each side alone, unpadded, with the adapter switched on and off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moelora.cli import main as cli
    from moelora.data import PROMPT_TEMPLATES, Example, encode_example

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moelora.attach(model, moelora.LoraConfig(r=4, lora_alpha=8))
    randomize_adapters(model, seed=3, scale=0.5)
    moelora.save_adapter(model, tmp_path / "dpo")
    pairs = json.loads(write_pairs(tmp_path / "pairs.json", n=6).read_text())
    assert cli(["score", "--adapter", str(tmp_path / "dpo"), "--model", str(tiny_model_dir), "--data",
                str(tmp_path / "pairs.json"), "--format", "alpaca", "--beta", "0.5", "--batch-size", "4",
                "--output", str(tmp_path / "s.json")]) == 0
    got = json.loads((tmp_path / "s.json").read_text())["pairs"]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.eval()

    def logp(text_prompt, response, adapter):
        f = encode_example(Example(prompt=text_prompt, response=response, task="t"), tok, 1024)
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor(f["labels"])
        with torch.no_grad(), moelora.use_adapter(model, adapter):
            lp = model(ids).logits[0, :-1].log_softmax(-1)
        keep = labels[1:] != -100
        return float(lp[torch.arange(len(keep)), labels[1:].clamp(min=0)][keep].sum())

    scores = []
    for x in pairs:
        prompt = PROMPT_TEMPLATES["prompt_no_input"].format(instruction=x["instruction"])
        scores.append([0.5 * (logp(prompt, x[k], "default") - logp(prompt, x[k], None)) for k in ("chosen", "rejected")])
    assert got["pairs"] == 6
    assert got["chosen"] == pytest.approx(sum(c for c, _ in scores) / 6, abs=1e-4)
    assert got["margin"] == pytest.approx(sum(c - r for c, r in scores) / 6, abs=1e-4)
    assert got["accuracy"] == sum(c > r for c, r in scores) / 6
    assert cli(["score", "--adapter", str(tmp_path / "dpo"), "--model", str(tiny_model_dir), "--data",
                str(tmp_path / "pairs.json"), "--beta", "0"]) == 2
