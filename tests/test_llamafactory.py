"""LLaMA-Factory's dataset_info.json: named datasets read as LLaMA-Factory reads them.

The oracle for each layout is the ``messages`` item written by hand from LLaMA-Factory's data
README (alpaca: system + history + "instruction\\ninput"; sharegpt: roles through the tags), read
by the same reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data import make_tokenizer

from moelora.config import ConfigError
from moelora.data import DataError, DataSource, TrainData, _read
from moelora.runconfig import load_run_config

ALPACA = [{"instruction": "Add 2 and 3.", "input": "", "output": "5", "system": "Be brief.",
           "history": [["Hi", "Hello!"], ["Ready?", "Yes."]]},
          {"instruction": "Translate", "input": "chat", "output": "cat", "system": "", "history": []}]
SHAREGPT = [{"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
                               {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}],
             "system": "Sys."}]
OPENAI = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                        {"role": "assistant", "content": "A"}]}]
DPO_ALPACA = [{"instruction": "Pick", "input": "x", "chosen": "good", "rejected": "bad"}]
DPO_SHAREGPT = [{"conversations": [{"from": "human", "value": "Q"}], "chosen": {"from": "gpt", "value": "yes"},
                 "rejected": {"from": "gpt", "value": "no"}}]
KTO = [{"q": "Is 2 even?", "a": "yes", "tag": True}, {"q": "Is 3 even?", "a": "yes", "tag": False}]
INFO = {
    "alpaca_demo": {"file_name": "alpaca.json", "columns": {"prompt": "instruction", "query": "input",
                                                            "response": "output", "system": "system",
                                                            "history": "history"}},
    "sharegpt_demo": {"file_name": "sharegpt.json", "formatting": "sharegpt",
                      "columns": {"messages": "conversations", "system": "system"}},
    "openai_demo": {"file_name": "openai.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant", "system_tag": "system"}},
    "dpo_demo": {"file_name": "dpo.json", "ranking": True},
    "dpo_sharegpt": {"file_name": "dpo_sharegpt.json", "ranking": True, "formatting": "sharegpt",
                     "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "pt_demo": {"file_name": "pt.json", "columns": {"prompt": "text"}},
    "pt_txt": {"file_name": "pt.txt"},
    "kto_demo": {"file_name": "kto.json", "num_samples": 1,
                 "columns": {"prompt": "q", "response": "a", "kto_tag": "tag"}},
}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture()
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for name, items in [("alpaca.json", ALPACA), ("sharegpt.json", SHAREGPT), ("dpo.json", DPO_ALPACA),
                        ("dpo_sharegpt.json", DPO_SHAREGPT), ("kto.json", KTO)]:
        (d / name).write_text(json.dumps(items))
    (d / "openai.jsonl").write_text("".join(json.dumps(x) + "\n" for x in OPENAI))
    (d / "pt.json").write_text(json.dumps([{"text": "First document."}, {"text": "Second one."}]))
    (d / "pt.txt").write_text("line one\n\nline two\n")
    (d / "dataset_info.json").write_text(json.dumps(INFO))
    return d


def read(tok, d, name, stage="sft", **kw):
    return _read(DataSource.from_dict({"dataset": name, "dataset_dir": str(d), **kw}), tok, stage)[0]


def oracle(tok, tmp_path, items, stage="sft", turns="last"):
    path = tmp_path / "oracle.json"
    path.write_text(json.dumps(items))
    return _read(DataSource(str(path), format="messages", turns=turns), tok, stage)[0]


def same(a, b):
    assert [(e.prompt, e.response, e.rejected, e.desirable, e.spans) for e in a] == \
        [(e.prompt, e.response, e.rejected, e.desirable, e.spans) for e in b]


def test_each_layout_reads_as_llamafactory_builds_its_messages(tok, data_dir, tmp_path):
    m = lambda role, content: {"role": role, "content": content}  # noqa: E731
    alpaca = [{"messages": [m("system", "Be brief."), m("user", "Hi"), m("assistant", "Hello!"), m("user", "Ready?"),
                            m("assistant", "Yes."), m("user", "Add 2 and 3."), m("assistant", "5")]},
              {"messages": [m("user", "Translate\nchat"), m("assistant", "cat")]}]
    same(read(tok, data_dir, "alpaca_demo"), oracle(tok, tmp_path, alpaca))
    same(read(tok, data_dir, "alpaca_demo", turns="all"), oracle(tok, tmp_path, alpaca, turns="all"))
    sharegpt = [{"messages": [m("system", "Sys."), m("user", "Q1"), m("assistant", "A1"), m("user", "Q2"),
                              m("assistant", "A2")]}]
    same(read(tok, data_dir, "sharegpt_demo", turns="all"), oracle(tok, tmp_path, sharegpt, turns="all"))
    same(read(tok, data_dir, "openai_demo"), oracle(tok, tmp_path, OPENAI))
    same(read(tok, data_dir, "dpo_demo", "dpo"),
         oracle(tok, tmp_path, [{"messages": [m("user", "Pick\nx")], "chosen": "good", "rejected": "bad"}], "dpo"))
    same(read(tok, data_dir, "dpo_sharegpt", "dpo"),
         oracle(tok, tmp_path, [{"messages": [m("user", "Q")], "chosen": "yes", "rejected": "no"}], "dpo"))
    kto = read(tok, data_dir, "kto_demo", "kto")  # num_samples: 1 keeps the first item
    same(kto, oracle(tok, tmp_path, [{"messages": [m("user", "Is 2 even?"), m("assistant", "yes")], "kto_tag": True}],
                     "kto"))
    for name, texts in (("pt_demo", ["First document.", "Second one."]), ("pt_txt", ["line one", "line two"])):
        pt = read(tok, data_dir, name, pretraining=True)  # stage pt: plain text, the loss on all of it
        assert [(e.prompt, e.response) for e in pt] == [("", t) for t in texts]
    with pytest.raises(DataError, match="pretraining .* must be formatting 'alpaca' without ranking"):
        read(tok, data_dir, "sharegpt_demo", pretraining=True)
    src = DataSource.from_dict({"dataset": "alpaca_demo", "dataset_dir": str(data_dir), "weight": 2.0})
    assert (src.name, src.format, src.weight, src.path) == ("alpaca_demo", "messages", 2.0, str(data_dir / "alpaca.json"))


def test_run_config_takes_llamafactory_top_level_keys(tok, data_dir, tmp_path):
    """``dataset: a,b``, ``eval_dataset`` and ``dataset_dir`` (relative to the config's directory) as in
    a LLaMA-Factory YAML, beside ordinary entries; the data then trains like any source."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("dataset: alpaca_demo, sharegpt_demo\neval_dataset: openai_demo\ndataset_dir: data\n"
                   "data:\n  - {dataset: kto_demo, weight: 3.0}\n")
    run = load_run_config(cfg)
    assert [s.name for s in run.data] == ["kto_demo", "alpaca_demo", "sharegpt_demo"]
    assert [s.name for s in run.val_data] == ["openai_demo"] and run.data[0].weight == 3.0
    assert all(s.llamafactory is not None and Path(s.path).parent == data_dir for s in run.data + run.val_data)
    train = TrainData(run.data[1:], tok, cutoff_len=64, seed=0, val_sources=run.val_data)
    assert len(train.features) == 3 and train.stats["sharegpt_demo"]["examples"] == 1
    assert len(train.validation) == 1
    run = load_run_config(None, ["dataset=[dpo_demo]", f"dataset_dir={data_dir}"])
    assert run.data[0].llamafactory["ranking"] is True


@pytest.mark.parametrize("info,item,msg", [
    ({"file_name": "x.json", "formatting": "openai"}, None, "formatting must be 'alpaca' or 'sharegpt'"),
    ({"file_name": "x.json", "subset": "en"}, None, "'subset' is not supported"),
    ({"ms_hub_url": "a/b"}, None, "ms_hub_url is not supported"),
    ({"formatting": "alpaca"}, None, "needs file_name"),
    ({"file_name": "x.json", "colums": {}}, None, r"unknown key\(s\) \['colums'\]"),
    ({"file_name": "x.json", "columns": {"answer": "a"}}, None, r"unknown columns key\(s\) \['answer'\]"),
    ({"file_name": "x.json", "tags": {"role_tag": "role"}}, None, "'tags' apply to formatting 'sharegpt' only"),
    ({"file_name": "x.json", "num_samples": 0}, None, "num_samples must be a positive integer"),
    ({"file_name": "x.json", "formatting": "sharegpt"},
     {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]},
     "a call must have a 'name' and object 'arguments'"),
    ({"file_name": "x.json", "formatting": "sharegpt"},
     {"conversations": [{"from": "bot", "value": "q"}]},
     r"from must be one of \['function_call', 'gpt', 'human', 'observation', 'system'\]"),
    ({"file_name": "x.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}},
     {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{}]"},
     r"tools\[0\] must be a function"),
    ({"file_name": "x.json"}, {"instruction": "q", "output": "a", "images": ["a.png"]}, None),  # not mapped: ignored
    ({"file_name": "x.json", "columns": {"prompt": "instruction", "response": "output", "images": "images"}},
     {"instruction": "q", "output": "a", "images": ["a.png"]}, "images"),
    ({"file_name": "x.json", "columns": {"prompt": "instruction", "response": "output", "history": "h"}},
     {"instruction": "q", "output": "a", "h": ["q0", "a0"]}, r"\[prompt, response\] string pairs"),
    ({"file_name": "x.json"}, {"instruction": "q"}, "missing column 'output'"),
    ({"file_name": "x.json", "ranking": True}, {"instruction": "q", "chosen": "a", "rejected": "b"},
     "train it with train.stage: dpo"),
])
def test_bad_entries_and_items_name_the_problem(tok, tmp_path, info, item, msg):
    d = tmp_path / "d"
    d.mkdir()
    (d / "dataset_info.json").write_text(json.dumps({"mine": info}))
    (d / "x.json").write_text(json.dumps([item or {"instruction": "q", "output": "a"}]))
    if msg is None:
        assert read(tok, d, "mine")[0].response == "a"
        return
    with pytest.raises(DataError, match=msg):
        read(tok, d, "mine")


def test_registry_errors(tok, data_dir, tmp_path):
    with pytest.raises(DataError, match=r"no dataset 'alpaca_dem'.*did you mean 'alpaca_demo'"):
        read(tok, data_dir, "alpaca_dem")
    with pytest.raises(DataError, match="dataset_info.json: not found"):
        read(tok, tmp_path, "alpaca_demo")
    with pytest.raises(DataError, match=r"key\(s\) \['format'\] do not apply"):
        read(tok, data_dir, "alpaca_demo", format="alpaca")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset_info.json").write_text("{nope")
    with pytest.raises(DataError, match="invalid JSON at line 1"):
        read(tok, tmp_path / "bad", "x")
    with pytest.raises(ConfigError, match="dataset_dir applies to datasets named"):
        load_run_config(None, [f"dataset_dir={data_dir}"])
    with pytest.raises(ConfigError, match="dataset must be dataset names"):
        load_run_config(None, ["dataset=3"])


def test_moelora_train_on_a_llamafactory_data_dir(data_dir, tmp_path, tiny_model_dir):
    """A LLaMA-Factory style YAML (``dataset``, ``dataset_dir``) trains: SFT on two layouts, then DPO on
    a ranking dataset from the SFT adapter."""
    from moelora.cli import main as cli

    sft = tmp_path / "sft.yaml"
    sft.write_text(json.dumps({"model": str(tiny_model_dir), "dataset": "alpaca_demo,openai_demo",
                               "dataset_dir": str(data_dir), "output_dir": str(tmp_path / "sft"),
                               "method": {"type": "lora", "r": 4, "lora_alpha": 8},
                               "train": {"max_steps": 2, "batch_size": 2, "cutoff_len": 96, "save_steps": 0}}))
    assert cli(["train", "--config", str(sft), "--no-progress"]) == 0
    assert (tmp_path / "sft" / "adapter_model.safetensors").is_file()
    dpo = tmp_path / "dpo.yaml"
    dpo.write_text(json.dumps({"model": str(tiny_model_dir), "dataset": ["dpo_demo", "dpo_sharegpt"],
                               "dataset_dir": str(data_dir), "output_dir": str(tmp_path / "dpo"),
                               "adapter_name_or_path": str(tmp_path / "sft"),
                               "train": {"stage": "dpo", "max_steps": 1, "batch_size": 2, "cutoff_len": 96,
                                         "save_steps": 0}}))
    assert cli(["train", "--config", str(dpo), "--no-progress"]) == 0
    assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# LLaMA-Factory training YAMLs

LF_SFT = """\
### model
model_name_or_path: {model}
trust_remote_code: true
### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
### dataset
dataset: alpaca_demo,sharegpt_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4
dataset_dir: {data}
### output
output_dir: {out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none
### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""


def lf_config(tmp_path, data_dir, text=LF_SFT, model="some/model", **extra):
    path = tmp_path / "lf.yaml"
    path.write_text(text.format(model=model, data=data_dir, out=tmp_path / "out")
                    + "".join(f"{k}: {json.dumps(v)}\n" for k, v in extra.items()))
    return path


def test_llamafactory_sft_yaml_reads_with_its_defaults(data_dir, tmp_path):
    """LLaMA-Factory's own example (llama3_lora_sft.yaml, paths changed) maps key by key; what it
    leaves out takes LLaMA-Factory's / HF's defaults (LoRA alpha 2 x rank, dropout 0, gradient
    checkpointing on, every turn learned)."""
    run = load_run_config(lf_config(tmp_path, data_dir))
    assert run.model == "some/model" and run.output_dir == str(tmp_path / "out")
    cfg = run.adapter_configs()["default"]
    assert (cfg.method, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules) == ("lora", 8, 16, 0.0, None)
    t = run.train
    assert (t.stage, t.batch_size, t.gradient_accumulation, t.lr, t.num_epochs, t.lr_scheduler, t.warmup_ratio) == \
        ("sft", 1, 8, 1e-4, 3, "cosine", 0.1)
    assert (t.precision, t.gradient_checkpointing, t.log_steps, t.save_steps, t.save_total_limit, t.cutoff_len) == \
        ("bf16", True, 10, 500, 0, 2048)
    assert t.report_to == [] and t.max_steps == -1
    assert [(s.name, s.max_samples, s.turns) for s in run.data] == [("alpaca_demo", 1000, "all"),
                                                                     ("sharegpt_demo", 1000, "all")]
    dpo = load_run_config(lf_config(tmp_path, data_dir, LF_SFT.replace("stage: sft", "stage: dpo").replace(
        "alpaca_demo,sharegpt_demo", "dpo_demo"), pref_beta=0.2, pref_loss="simpo", lora_target="q_proj,v_proj",
        mask_history=True, eval_dataset="dpo_sharegpt", val_size=0.0))
    assert (dpo.train.stage, dpo.train.pref_beta, dpo.train.pref_loss) == ("dpo", 0.2, "simpo")
    assert run.train.eval_steps == 0  # no eval_strategy: validation after the last step only
    steps = load_run_config(lf_config(tmp_path, data_dir, eval_strategy="steps", val_size=0.1))
    assert steps.train.eval_steps == 10  # HF: eval_steps defaults to logging_steps
    assert dpo.adapter_configs()["default"].target_modules == ["q_proj", "v_proj"]
    assert [(s.name, s.turns) for s in dpo.data + dpo.val_data] == [("dpo_demo", "last"), ("dpo_sharegpt", "last")]
    pt = load_run_config(lf_config(tmp_path, data_dir, LF_SFT.replace("stage: sft", "stage: pt").replace(
        "alpaca_demo,sharegpt_demo", "pt_demo,pt_txt")))
    assert (pt.train.stage, pt.train.packing) == ("sft", True)  # LLaMA-Factory packs pt data by default
    assert [(s.name, s.format, s.llamafactory["pretraining"], s.split_long) for s in pt.data] == [
        ("pt_demo", "text", True, True), ("pt_txt", "text", True, True)]
    rm = load_run_config(lf_config(tmp_path, data_dir, LF_SFT.replace("stage: sft", "stage: rm").replace(
        "alpaca_demo,sharegpt_demo", "dpo_demo")))
    assert (rm.train.stage, rm.data[0].turns) == ("rm", "last")
    qlora = load_run_config(lf_config(tmp_path, data_dir, quantization_bit=4, optim="paged_adamw_8bit",
                                      adam_beta2=0.95, lr_scheduler_type="constant_with_warmup"))
    assert (qlora.quantization, qlora.train.optim, qlora.train.adam_beta2, qlora.train.lr_scheduler) == \
        ("4bit", "paged_adamw_8bit", 0.95, "constant")
    assert load_run_config(lf_config(tmp_path, data_dir, report_to="all")).train.report_to == ["tensorboard"]
    half = "\n".join(line for line in LF_SFT.splitlines() if not line.startswith("num_train_epochs:")) + "\n"
    assert load_run_config(lf_config(tmp_path, data_dir, half, num_train_epochs=1.5)).train.num_epochs == 1.5
    for extra, init in [({"pissa_init": True}, "pissa_niter_16"), ({"pissa_init": True, "pissa_iter": -1}, "pissa"),
                        ({"pissa_init": False, "pissa_convert": True}, True)]:  # LLaMA-Factory's pissa_iter default: 16
        assert load_run_config(lf_config(tmp_path, data_dir, **extra)).adapter_configs()["default"].init_lora_weights == init


def test_llamafactory_yaml_overrides_method_and_refusals(data_dir, tmp_path):
    path = lf_config(tmp_path, data_dir)
    run = load_run_config(path, ["learning_rate=3e-4", "train.max_steps=2", "lora_rank=4"])
    assert (run.train.lr, run.train.max_steps, run.adapter_configs()["default"].r) == (3e-4, 2, 4)
    mix = LF_SFT.replace("lora_rank: 8\nlora_target: all\n", "method: {{type: mixlora, num_experts: 4, r: 4}}\n")
    assert load_run_config(lf_config(tmp_path, data_dir, mix)).adapter_configs()["default"].method == "mixlora"
    for extra, msg in [({"finetuning_type": "full"}, "finetuning_type: 'full'"),
                       ({"stage": "ppo"}, "stage: 'ppo' is not supported .pt, sft, rm, dpo and kto are"),
                       ({"num_train_epochs": 0}, "num_train_epochs: 0: it must be a positive number"),
                       ({"lr_scheduler_type": "polynomial"}, "'polynomial' is not supported"),
                       ({"pissa_init": True, "pissa_iter": 0}, "pissa_iter: must be -1 .an exact SVD. or a positive"),
                       ({"resume_from_checkpoint": "out/checkpoint-5"}, "moelora train --resume"),
                       ({"upcast_layernorm": True}, "norms are not upcast"),
                       ({"lora_bf16_mode": True}, r"\['lora_bf16_mode'\] are not read by moelora"),
                       ({"lora_dropot": 0.1}, "did you mean 'lora_dropout'"),
                       ({"do_predict": True}, "do_predict"),
                       ({"save_strategy": "epoch"}, "save_strategy"),
                       ({"quantization_bit": 3}, "quantization_bit"),
                       ({"method": {"type": "mixlora"}}, "give either LLaMA-Factory's LoRA keys")]:
        text = LF_SFT
        if "finetuning_type" in extra or "stage" in extra or "num_train_epochs" in extra:
            key = next(iter(extra))
            text = "\n".join(line for line in LF_SFT.splitlines() if not line.startswith(key + ":")) + "\n"
        with pytest.raises(ConfigError, match=msg):
            load_run_config(lf_config(tmp_path, data_dir, text, **extra))
    no_data = "\n".join(line for line in LF_SFT.splitlines() if not line.startswith("dataset:")) + "\n"
    with pytest.raises(ConfigError, match="dataset: missing"):
        load_run_config(lf_config(tmp_path, data_dir, no_data))


def test_moelora_train_runs_a_llamafactory_yaml(data_dir, tmp_path, tiny_model_dir):
    """``moelora train --config`` on LLaMA-Factory's example YAML (fp32 here: no bf16 on this CPU
    test), with its warmup_ratio: the learning rates equal a run with the same warm-up in steps."""
    from moelora.cli import main as cli

    text = LF_SFT.replace("bf16: true", "bf16: false").replace("gradient_accumulation_steps: 8",
                                                               "gradient_accumulation_steps: 1")
    path = lf_config(tmp_path, data_dir, text, model=str(tiny_model_dir))
    assert cli(["train", "--config", str(path), "--no-progress", "train.max_steps=8", "logging_steps=1",
                "train.cutoff_len=96", "warmup_ratio=0.3"]) == 0
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
           if '"lr"' in line]
    assert len(lrs) == 8
    assert cli(["train", "--config", str(path), "--no-progress", "train.max_steps=8", "logging_steps=1",
                "train.cutoff_len=96", "warmup_steps=3", f"output_dir={tmp_path / 'out2'}"]) == 0
    lrs2 = [json.loads(line)["lr"] for line in (tmp_path / "out2" / "metrics.jsonl").read_text().splitlines()
            if '"lr"' in line]
    assert lrs == pytest.approx(lrs2) and lrs[0] < lrs[2]  # ceil(0.3 x 8) = 3 warm-up steps


def test_the_shipped_llamafactory_config_and_toy_registry_read(tok, monkeypatch):
    """``configs/llamafactory_sft.yaml`` over ``examples/toy/dataset_info.json`` (written by
    ``examples/make_toy_data.py``): the toy tasks as LLaMA-Factory-style chat examples."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # dataset_dir: examples/toy, relative to the working directory (as LLaMA-Factory)
    run = load_run_config(root / "configs" / "llamafactory_sft.yaml")
    assert run.model is None and [s.name for s in run.data] == ["addition", "successor", "letters"]
    assert (run.train.max_steps, run.train.warmup_ratio, run.train.gradient_checkpointing, run.train.eval_steps) == \
        (40, 0.1, False, 20)
    ex = _read(run.data[0], tok)[0][0]
    first = json.loads((root / "examples" / "toy" / "addition" / "train.jsonl").read_text().splitlines()[0])
    assert ex.response == first["output"] and first["instruction"] in ex.prompt
    assert len(_read(run.data[0], tok)[0]) == 200  # max_samples
