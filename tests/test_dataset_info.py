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
     {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]}, "tool turn"),
    ({"file_name": "x.json", "formatting": "sharegpt"},
     {"conversations": [{"from": "bot", "value": "q"}]}, r"from must be one of \['gpt', 'human', 'system'\]"),
    ({"file_name": "x.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "tools": "tools"}},
     {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{}]"},
     "function calling"),
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
