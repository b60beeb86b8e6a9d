"""Preference training (`train.stage: dpo`): the losses, the pair data formats, and training."""

from __future__ import annotations

import json
import math
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import randomize_adapters
from safetensors.torch import load_file
from test_train import TOY, run_cli_train
from transformers import AutoModelForCausalLM

import moelora
from moelora.config import ConfigError
from moelora.data import DataError, DataSource, TrainData, encode_example, read_examples
from moelora.preference import PREF_LOSSES, preference_loss
from moelora.runconfig import load_run_config
from moelora.train import _preference_losses, latest_checkpoint, train

PAIRS = TOY / "addition_pairs"


# ------------------------------------------------------------------------------------------ losses


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_each_loss_is_its_formula():
    """Two pairs, by hand: sums of log-probs and token counts, reference sums, beta 0.5."""
    pc, nc, pr, nr = [-3.0, -8.0], [3.0, 4.0], [-6.0, -5.0], [2.0, 5.0]
    rc, rr = [-4.0, -8.5], [-5.0, -6.5]  # kto_pair: batch log-ratio means 0.75 and 0.25
    beta, gamma = 0.5, 0.3
    T = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    args = ((T(pc), T(nc)), (T(pr), T(nr)), T(rc), T(rr))
    for j in range(2):
        h = (pc[j] - rc[j]) - (pr[j] - rr[j])
        a_c, a_r = pc[j] / nc[j], pr[j] / nr[j]
        h_mean = (a_c - rc[j] / nc[j]) - (a_r - rr[j] / nr[j])
        log_odds = (a_c - a_r) - (math.log(1 - math.exp(a_c)) - math.log(1 - math.exp(a_r)))
        expected = {
            "sigmoid": -math.log(_sig(beta * h)),
            "hinge": max(0.0, 1 - beta * h),
            "ipo": (h_mean - 1 / (2 * beta)) ** 2,
            "orpo": -a_c - beta * math.log(_sig(log_odds)),
            "simpo": -math.log(_sig(beta * (a_c - a_r) - gamma)),
        }
        z_c = max(0.0, sum(pc[i] - rc[i] for i in range(2)) / 2)  # kto_pair: the batch's KL estimates
        z_r = max(0.0, sum(pr[i] - rr[i] for i in range(2)) / 2)
        expected["kto_pair"] = (2 - _sig(beta * (pc[j] - rc[j] - z_r)) - _sig(beta * (z_c - (pr[j] - rr[j])))) / 2
        rewards = {k: (beta * (pc[j] - rc[j]), beta * (pr[j] - rr[j])) for k in ("sigmoid", "hinge", "kto_pair")}
        rewards |= {"ipo": (beta * (a_c - rc[j] / nc[j]), beta * (a_r - rr[j] / nr[j])),
                    "orpo": (beta * a_c, beta * a_r), "simpo": (beta * a_c, beta * a_r)}
        for kind in PREF_LOSSES:
            loss, c, r = preference_loss(kind, beta, *args, gamma=gamma)
            assert loss[j].item() == pytest.approx(expected[kind], rel=1e-12), kind
            assert (c[j].item(), r[j].item()) == pytest.approx(rewards[kind], rel=1e-12), kind
            with_ftx, _, _ = preference_loss(kind, beta, *args, gamma=gamma, ftx=0.25)
            extra = 0.0 if kind == "orpo" else 0.25 * -a_c  # orpo has its SFT term already
            assert with_ftx[j].item() == pytest.approx(expected[kind] + extra, rel=1e-12), kind
    for j in range(2):  # conservative DPO: the preference flipped with probability 0.1
        h = beta * ((pc[j] - rc[j]) - (pr[j] - rr[j]))
        smoothed = -0.9 * math.log(_sig(h)) - 0.1 * math.log(_sig(-h))
        assert preference_loss("sigmoid", beta, *args, label_smoothing=0.1)[0][j].item() == pytest.approx(smoothed)
    with pytest.raises(ValueError, match="reference"):
        preference_loss("sigmoid", beta, *args[:2])
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss("kto", beta, *args)


def test_dpo_gradient_raises_the_chosen_and_lowers_the_rejected():
    pc, pr = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    n = torch.ones(1)
    loss, _, _ = preference_loss("sigmoid", 0.1, (pc, n), (pr, n), torch.tensor([-5.0]), torch.tensor([-5.0]))
    assert loss.item() == pytest.approx(math.log(2))  # the policy is the reference: -log sigmoid(0)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)  # beta * sigmoid(0)


# -------------------------------------------------------------------------------------------- data


def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_every_format_reads_pairs(tmp_path, tok):
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    good, bad = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}
    cases = {
        "alpaca": [{"instruction": "What is 2 + 2?", "chosen": "4", "rejected": "5"}],
        "messages": [
            {"messages": user, "chosen": "4", "rejected": "5"},  # strings
            {"messages": user, "chosen": good, "rejected": bad},  # message objects
            {"prompt": user, "chosen": [good], "rejected": [bad]},  # TRL's explicit prompt
            {"prompt": "What is 2 + 2?", "chosen": [good], "rejected": [bad]},  # a prompt string
            {"chosen": user + [good], "rejected": user + [bad]},  # TRL's implicit prompt (UltraFeedback)
        ],
        "sharegpt": [
            {"conversations": [{"from": "human", "value": "What is 2 + 2?"}],
             "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}},
        ],
        "text": [{"prompt": prompt, "chosen": "4", "rejected": "5"}],
    }
    for fmt, items in cases.items():
        exs = read_examples_pairs(DataSource(str(write_jsonl(tmp_path / f"{fmt}.jsonl", items)), format=fmt), tok)
        assert [(e.response, e.rejected) for e in exs] == [("4", "5")] * len(items), fmt
        want = moelora.data.PROMPT_TEMPLATES["prompt_no_input"].format(instruction="What is 2 + 2?") \
            if fmt == "alpaca" else prompt
        assert {e.prompt for e in exs} == {want}, fmt
    skipped = write_jsonl(tmp_path / "skip.jsonl", [*cases["alpaca"], {"instruction": "x", "chosen": " ", "rejected": "y"}])
    assert len(read_examples_pairs(DataSource(str(skipped)), tok)) == 1  # an empty side is skipped


def read_examples_pairs(source: DataSource, tok):
    return moelora.data._read(source, tok, stage="dpo")[0]


def test_bad_pairs_name_the_problem(tmp_path, tok):
    user = [{"role": "user", "content": "hi"}]
    cases = [
        ("alpaca", {"instruction": "x", "chosen": "a"}, r"line 1: missing required field 'rejected'"),
        ("alpaca", {"instruction": "x", "chosen": 3, "rejected": "b"}, "field 'chosen' must be a string"),
        ("messages", {"chosen": user + [{"role": "assistant", "content": "a"}],
                      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
         "different messages before their last"),
        ("messages", {"messages": user + [{"role": "assistant", "content": "a"}], "chosen": "a", "rejected": "b"},
         "assistant message last"),
        ("messages", {"messages": user, "chosen": {"role": "user", "content": "a"}, "rejected": "b"},
         "must be an assistant message"),
        ("sharegpt", {"conversations": [{"from": "human", "value": "hi"}], "chosen": "a"},
         "missing required field 'rejected'"),
    ]
    for fmt, item, match in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", [item])
        with pytest.raises(DataError, match=match):
            read_examples_pairs(DataSource(str(path), format=fmt), tok)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": "x", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="preference pair.*train.stage: dpo"):  # SFT on pairs says what to do
        read_examples(DataSource(str(pairs)))
    with pytest.raises(DataError, match="no preference form"):
        read_examples_pairs(DataSource(str(pairs), format="llm-adapters-options"), tok)
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": user, "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="turns: all"):
        read_examples_pairs(DataSource(str(chat), format="messages", turns="all"), tok)
    (tmp_path / "lines.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match="plain text file holds no preference pairs"):
        read_examples_pairs(DataSource(str(tmp_path / "lines.txt"), format="text"), tok)


def test_both_sides_keep_the_same_prompt_tokens_when_truncated(tok):
    ex = read_examples_pairs(DataSource(str(PAIRS / "train.jsonl"), max_samples=1), tok)[0]
    ex.rejected = ex.rejected + " Let me explain at some length why that is so."
    full = encode_example(ex, tok, cutoff_len=512)
    p = full["prompt_length"]
    assert full["input_ids"][:p] == full["rejected_input_ids"][:p] and full["truncated"] == 0
    for side in ("", "rejected_"):
        labels = full[f"{side}labels"]
        assert labels[:p] == [-100] * p and labels[p:] == full[f"{side}input_ids"][p:]
        assert full[f"{side}input_ids"][-1] == tok.eos_token_id
    longer = len(full["rejected_input_ids"]) - p
    cut = encode_example(ex, tok, cutoff_len=len(full["rejected_input_ids"]) - 5)  # 5 prompt tokens go
    q = cut["prompt_length"]
    assert q == p - 5 and cut["input_ids"][:q] == cut["rejected_input_ids"][:q]
    assert cut["input_ids"][:1] == full["input_ids"][:1] and cut["input_ids"][1:q] == full["input_ids"][6:p]  # BOS kept
    assert cut["input_ids"][q:] == full["input_ids"][p:] and cut["rejected_input_ids"][q:] == full["rejected_input_ids"][p:]
    tight = encode_example(ex, tok, cutoff_len=1 + longer - 3)  # BOS + the longer side's end cut by 3
    assert tight["prompt_length"] == 1 and len(tight["rejected_input_ids"]) == 1 + longer - 3
    assert tight["input_ids"][1:] == full["input_ids"][p:]  # the shorter side still fits whole
    data = TrainData([DataSource(str(PAIRS / "train.jsonl"))], tok, 128, seed=0, val_size=10, stage="dpo")
    assert len(data) == 390 and len(data.validation) == 10 and "rejected_input_ids" in data.validation[0]
    st = data.stats["addition_pairs"]
    assert st["tokens"] == sum(len(f["input_ids"]) + len(f["rejected_input_ids"]) for f in data.features)
    with pytest.raises(DataError, match="does not pack"):
        data.packed_order(0)


# ---------------------------------------------------------------------------------------- training


def write_config(path: Path, model_dir: Path, out: Path, method: dict | None = None, **train_kw) -> Path:
    t = {"stage": "dpo", "max_steps": 4, "batch_size": 4, "lr": 1e-3, "save_steps": 2, "cutoff_len": 96, "seed": 3,
         **train_kw}
    cfg = {"model": str(model_dir), "data": [{"path": str(PAIRS / "train.jsonl")}], "train": t, "output_dir": str(out),
           "method": method or {"type": "mixlora", "num_experts": 4, "top_k": 2, "r": 4, "lora_alpha": 8,
                                "lora_dropout": 0.0, "expert_lora_dropout": 0.0}}
    path.write_text(json.dumps(cfg))
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def sequence_logp(model, ids: list[int], labels: list[int]) -> float:
    """The log-probability of the labelled tokens of one unpadded sequence, by hand."""
    logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], -1)
    return sum(logp[t, labels[t + 1]].item() for t in range(len(ids) - 1) if labels[t + 1] != -100)


def random_mixlora_and_features(model_dir, tok, toy: Path, n: int, cutoff_len: int, stage: str):
    """The tiny model with a random MixLoRA adapter (eval mode), and the first ``n`` examples of a toy set."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    moelora.attach(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_alpha=8, lora_dropout=0.0))
    randomize_adapters(model)
    data = TrainData([DataSource(str(toy / "train.jsonl"), max_samples=n)], tok, cutoff_len, seed=0, stage=stage)
    return model.eval(), [data[i] for i in range(len(data))]


@pytest.mark.parametrize("kind", ["sigmoid", "simpo", "kto_pair"])
def test_batched_pair_losses_equal_each_pair_alone(tiny_model_dir, tok, kind):
    """The padded batch of chosen and rejected rows (and the reference forward, adapters off) gives
    each pair the loss of its formula on log-probs computed one sequence at a time."""
    model, feats = random_mixlora_and_features(tiny_model_dir, tok, PAIRS, 6, 96, "dpo")
    t = load_run_config(None, ["train.stage=dpo", f"train.pref_loss={kind}", "train.pref_beta=0.3"]).train
    with torch.no_grad():
        _, pair = _preference_losses(model, model, feats, ["default"], tok.pad_token_id, Accelerator(cpu=True),
                                     True, t)
        alone = []
        for f in feats:
            sides = [(f["input_ids"], f["labels"]), (f["rejected_input_ids"], f["rejected_labels"])]
            pi = [sequence_logp(model, *s) for s in sides]
            with moelora.disable_adapter(model):
                alone.append((pi, [sequence_logp(model, *s) for s in sides]))  # the policy's, the reference's
        z_c = max(0.0, sum(pi[0] - ref[0] for pi, ref in alone) / len(alone))  # kto_pair's batch KL estimates
        z_r = max(0.0, sum(pi[1] - ref[1] for pi, ref in alone) / len(alone))
        for j, f in enumerate(feats):
            sides = [(f["input_ids"], f["labels"]), (f["rejected_input_ids"], f["rejected_labels"])]
            pi, ref = alone[j]
            n = [sum(x != -100 for x in s[1][1:]) for s in sides]
            if kind == "kto_pair":
                r_c, r_r = pi[0] - ref[0], pi[1] - ref[1]
                want, reward = (2 - _sig(0.3 * (r_c - z_r)) - _sig(0.3 * (z_c - r_r))) / 2, 0.3 * r_c
            elif kind == "sigmoid":
                h = (pi[0] - ref[0]) - (pi[1] - ref[1])
                want, reward = -F.logsigmoid(torch.tensor(0.3 * h)).item(), 0.3 * (pi[0] - ref[0])
            else:
                m = pi[0] / n[0] - pi[1] / n[1]
                want, reward = -F.logsigmoid(torch.tensor(0.3 * m - 0.5)).item(), 0.3 * pi[0] / n[0]
            assert pair["loss"][0, j].item() == pytest.approx(want, rel=1e-4, abs=1e-5)
            assert pair["reward_chosen"][0, j].item() == pytest.approx(reward, rel=1e-4, abs=1e-5)
            assert pair["logps_chosen"][0, j].item() == pytest.approx(pi[0], rel=1e-4)
    assert model.training is False  # the reference forward leaves the mode as it was


def test_dpo_training_prefers_the_chosen_answers(tmp_path, tiny_model_dir):
    """From a fresh adapter (the policy is the reference) the loss starts at log 2; training raises
    the chosen answers' reward above the rejected ones', on held-out pairs too."""
    cfg = write_config(tmp_path / "c.json", tiny_model_dir, tmp_path / "out", max_steps=30, save_steps=0, lr=3e-3,
                       val_size=40, eval_steps=30)
    out = train(load_run_config(cfg), progress=False)
    m = metrics(out)
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and m[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected",
            "router_loss"} <= m[0].keys()
    steps = [r for r in m if "loss" in r]
    last = sum(r["loss"] for r in steps[-5:]) / 5  # (0.22 when written)
    assert last < 0.4 and sum(r["rewards/accuracies"] for r in steps[-5:]) / 5 > 0.9
    [val] = [r for r in m if "val_loss" in r]
    assert val["val_loss"] < 0.45 and val["val_accuracy"] > 0.9
    assert (out / "adapter_model.safetensors").is_file()


def test_dpo_resume_and_several_adapters_equal_the_single_run(tmp_path, tiny_model_dir):
    """A resumed DPO run equals the uninterrupted one, and two adapters trained together (one
    reference forward for both) each equal their run alone."""
    mix = write_config(tmp_path / "mix.json", tiny_model_dir, tmp_path / "mix")
    lora = {"type": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    solo_lora = write_config(tmp_path / "lora.json", tiny_model_dir, tmp_path / "lora", method=lora)
    train(load_run_config(mix), progress=False)
    train(load_run_config(solo_lora), progress=False)
    cut = write_config(tmp_path / "cut.json", tiny_model_dir, tmp_path / "cut")
    train(load_run_config(cut), progress=False, _stop_after=2)
    assert latest_checkpoint(tmp_path / "cut").name == "checkpoint-2"
    train(load_run_config(cut), resume=True, progress=False)
    a, b = load_file(tmp_path / "mix" / "adapter_model.safetensors"), load_file(tmp_path / "cut" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    both = json.loads(mix.read_text())
    both["adapters"] = {"mix": both.pop("method"), "plain": lora}
    both["output_dir"] = str(tmp_path / "both")
    (tmp_path / "both.json").write_text(json.dumps(both))
    out = train(load_run_config(tmp_path / "both.json"), progress=False)
    joint = metrics(out)
    for name, solo in (("mix", tmp_path / "mix"), ("plain", tmp_path / "lora")):
        a, b = load_file(out / name / "adapter_model.safetensors"), load_file(solo / "adapter_model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
        alone = metrics(solo)
        assert [r[f"loss/{name}"] for r in joint] == pytest.approx([r["loss"] for r in alone], rel=1e-4)
        assert [r[f"rewards/margins/{name}"] for r in joint] == pytest.approx(
            [r["rewards/margins"] for r in alone], rel=1e-3, abs=1e-6)


def test_two_processes_match_one(tmp_path, tiny_model_dir):
    """DDP, FSDP2 and ZeRO-3 on CPU (gloo): 2 processes x 2 pairs = 1 process x 4 pairs, with
    validation (LoRA: a router loss is each process's own, so MixLoRA's would differ by design)."""
    lora = {"type": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    one = write_config(tmp_path / "one.json", tiny_model_dir, tmp_path / "one", lora, max_steps=3, save_steps=0,
                       val_size=9, eval_steps=3)
    two = write_config(tmp_path / "two.json", tiny_model_dir, tmp_path / "two", lora, max_steps=3, save_steps=0,
                       val_size=9, eval_steps=3, batch_size=2)
    run_cli_train(one)
    run_cli_train(two, processes=2)
    runs = ["one", "two", "fsdp"]
    fsdp = write_config(tmp_path / "f.json", tiny_model_dir, tmp_path / "fsdp", lora, max_steps=3, save_steps=0,
                        val_size=9, eval_steps=3, batch_size=2, fsdp=True)  # the reference forward through FSDP2
    run_cli_train(fsdp, processes=2)
    if find_spec("deepspeed") is not None:  # ZeRO-3: the reference forward gathers the partitioned base too
        zero3 = write_config(tmp_path / "z.json", tiny_model_dir, tmp_path / "zero3", lora, max_steps=3, save_steps=0,
                             val_size=9, eval_steps=3, batch_size=2)
        run_cli_train(zero3, processes=2, env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
        runs.append("zero3")
    for other in runs[1:]:
        a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", other))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{other}: {k}")
        ma, mb = metrics(tmp_path / "one"), metrics(tmp_path / other)
        for ra, rb in zip(ma, mb, strict=True):
            for k in ("loss", "rewards/accuracies", "rewards/margins", "val_loss", "val_accuracy"):
                if k in ra:
                    assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (other, k)
    # KTO across 2 processes: the KL estimate is averaged over them (a collective inside the loss);
    # validation of 9 examples in batches of 2 has a batch of one and a dummy batch
    kto = json.loads(write_config(tmp_path / "k.json", tiny_model_dir, tmp_path / "kto", lora, stage="kto",
                                  max_steps=2, save_steps=0, val_size=9, eval_steps=2, batch_size=2).read_text())
    kto["data"] = [{"path": str(LABELLED / "train.jsonl")}]
    (tmp_path / "k.json").write_text(json.dumps(kto))
    run_cli_train(tmp_path / "k.json", processes=2)
    m = metrics(tmp_path / "kto")
    assert [r["step"] for r in m if "kl" in r] == [1, 2] and [r["step"] for r in m if "val_loss" in r] == [2]


def test_config_errors(tmp_path, tiny_model_dir):
    shipped = load_run_config(TOY.parents[1] / "configs" / "dpo.yaml")  # the example config is valid
    assert shipped.train.stage == "dpo" and Path(shipped.data[0].path).is_file()
    cfg = write_config(tmp_path / "c.json", tiny_model_dir, tmp_path / "out")
    for override, match in [("train.stage=ppo", "train.stage must be one of sft, dpo, kto"),
                            ("train.pref_loss=sigmod", "did you mean 'sigmoid'"),
                            ("train.pref_beta=0", "pref_beta must be > 0"),
                            ("train.dpo_label_smoothing=0.5", r"dpo_label_smoothing must be in \[0, 0.5\)"),
                            ("train.packing=true", "packing does not apply")]:
        with pytest.raises(ConfigError, match=match):
            load_run_config(cfg, [override])
    sft_data = write_config(tmp_path / "s.json", tiny_model_dir, tmp_path / "s")
    with pytest.raises(DataError, match="missing required field 'chosen'"):
        train(load_run_config(sft_data, [f"data=[{{path: {TOY / 'addition' / 'train.jsonl'}}}]"]), progress=False)
    assert not (tmp_path / "s" / "adapter_model.safetensors").exists()


def test_dpo_after_sft_starts_from_the_sft_adapter_and_can_use_it_as_the_reference(tmp_path, tiny_model_dir):
    """`adapter_name_or_path` starts the policy from a saved adapter (its own config is the method);
    `train.ref_adapter` makes that adapter, frozen, the reference: the first loss is then exactly
    log 2 (policy = reference), while against the base model it is not. The saved adapter is left
    as it was, and only the policy is saved."""
    lora = {"type": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    sft = write_config(tmp_path / "sft.json", tiny_model_dir, tmp_path / "sft", lora, stage="sft", max_steps=3,
                       save_steps=0, lr=3e-3)
    train(load_run_config(sft, [f"data=[{{path: {TOY / 'addition' / 'train.jsonl'}}}]"]), progress=False)
    saved = (tmp_path / "sft" / "adapter_model.safetensors").read_bytes()
    firsts = {}
    for ref in (True, False):
        cfg = json.loads(write_config(tmp_path / "d.json", tiny_model_dir, tmp_path / f"dpo-{ref}", max_steps=2,
                                      save_steps=1).read_text())
        del cfg["method"]
        cfg["adapter_name_or_path"] = "sft"  # relative: resolved against the config file's directory
        if ref:
            cfg["train"]["ref_adapter"] = "sft"
        (tmp_path / "d.json").write_text(json.dumps(cfg))
        out = train(load_run_config(tmp_path / "d.json"), progress=False)
        firsts[ref] = metrics(out)[0]
        policy = load_file(out / "adapter_model.safetensors")
        assert policy.keys() == load_file(tmp_path / "sft" / "adapter_model.safetensors").keys()
        assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert firsts[True]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert firsts[True]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert abs(firsts[False]["loss"] - math.log(2)) > 1e-3  # against the base model the SFT adapter already prefers
    assert (tmp_path / "sft" / "adapter_model.safetensors").read_bytes() == saved


def test_adapter_and_reference_config_errors(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "c.json", tiny_model_dir, tmp_path / "out")
    for override, match in [
        (f"adapter_name_or_path={tmp_path / 'nowhere'}", "remove `method`"),
        (f"train.ref_adapter={tmp_path / 'nowhere'}", "train.ref_adapter: no adapter directory"),
        ("train.pref_loss=simpo", None),
    ]:
        if match is None:
            with pytest.raises(ConfigError, match="ref_adapter is the reference of .* pref_loss sigmoid"):
                load_run_config(cfg, [override, f"train.ref_adapter={tmp_path}"])
            continue
        with pytest.raises(ConfigError, match=match):
            load_run_config(cfg, [override])
    no_method = json.loads(cfg.read_text())
    del no_method["method"]
    no_method["adapter_name_or_path"] = str(tmp_path / "nowhere")
    (tmp_path / "n.json").write_text(json.dumps(no_method))
    with pytest.raises(ConfigError, match="adapter_name_or_path: no adapter directory"):
        load_run_config(tmp_path / "n.json")
    with pytest.raises(ConfigError, match="dpo_label_smoothing applies to pref_loss: sigmoid"):
        load_run_config(cfg, ["train.pref_loss=ipo", "train.dpo_label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="stage sft"):
        load_run_config(cfg, ["train.stage=sft", f"train.ref_adapter={tmp_path}"])


def test_use_adapter_activates_an_adapter_for_a_block_only(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for name in ("a", "b"):
        moelora.attach(model, moelora.LoraConfig(r=4, lora_alpha=8), name)
    randomize_adapters(model)
    moelora.set_adapter(model, "a")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        a = model(input_ids=ids).logits
        moelora.set_adapter(model, "b")
        b = model(input_ids=ids).logits
        moelora.set_adapter(model, "a")
        with moelora.use_adapter(model, "b"):
            torch.testing.assert_close(model(input_ids=ids).logits, b)
        assert moelora.get_context(model).active == "a"
        with pytest.raises(RuntimeError), moelora.use_adapter(model, "b"):
            raise RuntimeError("inside")
        assert moelora.get_context(model).active == "a"  # restored after an exception too
        torch.testing.assert_close(model(input_ids=ids).logits, a)
        assert not torch.allclose(a, b)
        with pytest.raises(KeyError, match="no adapter named 'c'"):
            with moelora.use_adapter(model, "c"):
                pass


# --------------------------------------------------------------------------------------------- KTO

LABELLED = TOY / "addition_labelled"


def test_kto_loss_is_its_formula():
    from moelora.preference import kto_loss

    logps, ref = torch.tensor([[-3.0, -6.0, -2.0]]), torch.tensor([-4.0, -5.0, -2.5])
    desirable, kl, beta = torch.tensor([True, False, False]), torch.tensor([[0.2]]), 0.5
    loss, reward = kto_loss(beta, logps, ref, desirable, kl, desirable_weight=1.5, undesirable_weight=0.7)
    r = [1.0, -1.0, 0.5]
    want = [1.5 * (1 - _sig(beta * (r[0] - 0.2))), 0.7 * (1 - _sig(beta * (0.2 - r[1]))),
            0.7 * (1 - _sig(beta * (0.2 - r[2])))]
    assert loss[0].tolist() == pytest.approx(want) and reward[0].tolist() == pytest.approx([beta * x for x in r])


def test_labelled_items_in_every_format(tmp_path, tok):
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    cases = {
        "alpaca": [{"instruction": "What is 2 + 2?", "output": "4", "kto_tag": True},
                   {"instruction": "What is 2 + 2?", "output": "5", "kto_tag": False}],
        "messages": [{"messages": [*user, {"role": "assistant", "content": "4"}], "label": True},
                     {"prompt": user, "completion": [{"role": "assistant", "content": "5"}], "label": False}],  # TRL's
        "sharegpt": [{"conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "4"}],
                      "kto_tag": True},
                     {"conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", "value": "5"}],
                      "kto_tag": False}],
        "text": [{"prompt": prompt, "completion": "4", "label": True}, {"prompt": prompt, "completion": "5",
                                                                         "label": False}],
    }
    for fmt, items in cases.items():
        exs = moelora.data._read(DataSource(str(write_jsonl(tmp_path / f"{fmt}.jsonl", items)), format=fmt), tok,
                                 stage="kto")[0]
        assert [(e.response, e.desirable) for e in exs] == [("4", True), ("5", False)], fmt
        want = moelora.data.PROMPT_TEMPLATES["prompt_no_input"].format(instruction="What is 2 + 2?") \
            if fmt == "alpaca" else prompt
        assert {e.prompt for e in exs} == {want}, fmt
    for item, match in [({"instruction": "x", "output": "y"}, "missing the label"),
                        ({"instruction": "x", "output": "y", "kto_tag": "yes"}, "'kto_tag' must be true or false")]:
        with pytest.raises(DataError, match=match):
            moelora.data._read(DataSource(str(write_jsonl(tmp_path / "bad.jsonl", [item]))), tok, stage="kto")
    (tmp_path / "lines.txt").write_text("a\n")
    with pytest.raises(DataError, match="plain text file holds no labels"):
        moelora.data._read(DataSource(str(tmp_path / "lines.txt"), format="text"), tok, stage="kto")


def test_kl_rows_pair_each_prompt_with_the_previous_response(tok):
    from moelora.data import kto_kl_rows

    data = TrainData([DataSource(str(LABELLED / "train.jsonl"), max_samples=3)], tok, 256, seed=0, stage="kto")
    feats = [data[i] for i in range(3)]
    rows = kto_kl_rows(feats, 256)
    for i, row in enumerate(rows):
        f, g = feats[i], feats[i - 1]
        p, q = f["prompt_length"], g["prompt_length"]
        assert row["input_ids"] == f["input_ids"][:p] + g["input_ids"][q:]
        assert row["labels"] == [-100] * p + g["labels"][q:] and row["prompt_length"] == p
    assert max(len(r["input_ids"]) for r in kto_kl_rows(feats, 20)) == 20
    with pytest.raises(DataError, match="batch_size >= 2"):
        kto_kl_rows(feats[:1], 96)


def test_batched_kto_losses_equal_each_example_alone(tiny_model_dir, tok):
    """The KTO micro-batch (reference, mismatched rows, examples) against log-probs computed one
    sequence at a time and the formula."""
    from moelora.data import kto_kl_rows

    model, feats = random_mixlora_and_features(tiny_model_dir, tok, LABELLED, 5, 256, "kto")
    t = load_run_config(None, ["train.stage=kto", "train.pref_beta=0.3", "train.kto_rejected_weight=1.5",
                               "train.cutoff_len=256"]).train
    from moelora.train import _kto_losses

    with torch.no_grad():
        _, out = _kto_losses(model, model, feats, ["default"], tok.pad_token_id, Accelerator(cpu=True), True, t)
        def both(ids, labels):
            pi = sequence_logp(model, ids, labels)
            with moelora.disable_adapter(model):
                return pi, sequence_logp(model, ids, labels)
        kl_terms = [a - b for a, b in (both(r["input_ids"], r["labels"]) for r in kto_kl_rows(feats, 256))]
        kl = max(0.0, sum(kl_terms) / len(kl_terms))
        assert out["kl"][0].item() == pytest.approx(kl, rel=1e-4, abs=1e-5)
        for j, f in enumerate(feats):
            pi, ref = both(f["input_ids"], f["labels"])
            r = pi - ref
            want = 1 - _sig(0.3 * (r - kl)) if f["desirable"] else 1.5 * (1 - _sig(0.3 * (kl - r)))
            assert out["loss"][0, j].item() == pytest.approx(want, rel=1e-4, abs=1e-5)
            assert out["reward"][0, j].item() == pytest.approx(0.3 * r, rel=1e-4, abs=1e-5)


def test_kto_training_separates_the_labels_and_trains_adapters_together_as_alone(tmp_path, tiny_model_dir):
    """A fresh adapter is the reference: every loss starts at 1 - sigmoid(0) = 0.5 (KL 0); training
    pushes desirable answers up and undesirable ones down, on held-out examples too; two adapters in
    one run (one reference forward) each equal their run alone."""
    def config(name, **kw):
        cfg = json.loads(write_config(tmp_path / f"{name}.json", tiny_model_dir, tmp_path / name, stage="kto",
                                      save_steps=0, **kw).read_text())
        cfg["data"] = [{"path": str(LABELLED / "train.jsonl")}]
        (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
        return tmp_path / f"{name}.json"

    out = train(load_run_config(config("long", max_steps=30, lr=3e-3, val_size=40, eval_steps=30)), progress=False)
    m = metrics(out)
    assert m[0]["loss"] == pytest.approx(0.5, abs=1e-5) and m[0]["kl"] == pytest.approx(0, abs=1e-5)
    steps = [r for r in m if "loss" in r]
    first, last = (sum(r["loss"] for r in part) / 10 for part in (steps[:10], steps[-10:]))
    assert last < first - 0.05  # (0.46 -> 0.36 when written)
    assert sum(r["rewards/margins"] for r in steps[-10:]) > 0
    [val] = [r for r in m if "val_loss" in r]
    assert val["val_loss"] < 0.42 and val["val_accuracy"] > 0.85  # (0.33, 95% when written)
    lora = {"type": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    mix = config("mix", max_steps=3)
    train(load_run_config(mix), progress=False)
    train(load_run_config(config("lora", max_steps=3, method=lora)), progress=False)
    both = json.loads(mix.read_text())
    both["adapters"] = {"mix": both.pop("method"), "plain": lora}
    both["output_dir"] = str(tmp_path / "both")
    (tmp_path / "both.json").write_text(json.dumps(both))
    joint = train(load_run_config(tmp_path / "both.json"), progress=False)
    for name, solo in (("mix", tmp_path / "mix"), ("plain", tmp_path / "lora")):
        a, b = load_file(joint / name / "adapter_model.safetensors"), load_file(solo / "adapter_model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
        assert [r[f"kl/{name}"] for r in metrics(joint)] == pytest.approx([r["kl"] for r in metrics(solo)], abs=1e-6)


def test_kto_config_errors(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "c.json", tiny_model_dir, tmp_path / "out", stage="kto")
    for override, match in [("train.batch_size=1", "batch_size must be >= 2"),
                            ("train.pref_loss=ipo", "apply to train.stage: dpo, not kto"),
                            ("train.kto_chosen_weight=0", "must be > 0"),
                            ("train.stage=kt0", "did you mean 'kto'")]:
        with pytest.raises(ConfigError, match=match):
            load_run_config(cfg, [override])
