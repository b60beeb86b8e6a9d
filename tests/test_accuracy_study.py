"""The accuracy-study scripts (benchmarks/accuracy/run_study.py and report.py) without training:
the grid, the configs and commands each run gets, resumption, and the report from result files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy"
TASKS = ["arc_easy", "arc_challenge", "boolq", "openbookqa"]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"_acc_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def study():
    return _module("run_study")


@pytest.fixture(scope="module")
def report():
    return _module("report")


@pytest.fixture()
def data_root(tmp_path):
    for t in TASKS:
        (tmp_path / "data" / t).mkdir(parents=True)
        for split in ("train", "test"):
            (tmp_path / "data" / t / f"{split}.json").write_text("[]")
    return tmp_path / "data"


def test_grid_order_configs_and_commands(study, data_root, tmp_path):
    args = study.parse_args(["--out", str(tmp_path / "out"), "--data-root", str(data_root), "--answers", "text",
                             "--protocols", "options,generate-options", "--eval-limit", "100", "--gen-limit", "20",
                             "--max-steps", "40", "--seeds", "0,1", "--methods", "lora,mixlora"])
    grid = study.build_grid(args)
    names = [r.name for r in grid]
    # the base first, then multi-task for every seed, then single-task seed by seed
    assert names[:5] == ["zeroshot/base/seed0", "multi/lora/seed0", "multi/mixlora/seed0", "multi/lora/seed1",
                         "multi/mixlora/seed1"]
    assert names[5:7] == ["single/arc_easy/lora/seed0", "single/arc_easy/mixlora/seed0"]
    assert len(grid) == 1 + 2 * 2 + 4 * 2 * 2
    run = grid[5]
    cfg = study.run_config(args, run, tmp_path / "r")
    assert [d["format"] for d in cfg["data"]] == ["llm-adapters-options"]  # --answers text
    assert cfg["train"]["max_steps"] == 40 and cfg["train"]["warmup_steps"] == 4 and cfg["train"]["seed"] == 0
    assert cfg["eval"]["protocol"] == "options" and cfg["eval"]["limit"] == 100 and "max_new_tokens" not in cfg["eval"]
    cmd = study.eval_cmd(args, run, tmp_path / "r", "generate-options", adapter=True)
    i = cmd.index("--protocol")
    assert cmd[i + 1] == "generate-options" and cmd[cmd.index("--limit") + 1] == "20"
    assert cmd[cmd.index("--max-new-tokens") + 1] == "32" and cmd[cmd.index("--adapter") + 1] == str(tmp_path / "r")
    assert cmd[cmd.index("--data") + 1].endswith("arc_easy/test.json")
    # a generated protocol first: it runs inside train, with the generation settings
    args2 = study.parse_args(["--out", str(tmp_path / "o2"), "--data-root", str(data_root), "--protocols",
                              "generate-options", "--gen-limit", "7", "--max-new-tokens", "9"])
    cfg = study.run_config(args2, grid[1], tmp_path / "r")
    assert (cfg["eval"]["protocol"], cfg["eval"]["limit"], cfg["eval"]["max_new_tokens"]) == ("generate-options", 7, 9)
    assert [d["format"] for d in cfg["data"]] == ["llm-adapters"] * 4  # --answers label (the default)


def test_bad_arguments_name_the_problem(study, data_root, tmp_path, capsys):
    base = ["--out", str(tmp_path / "o"), "--data-root", str(data_root)]
    for extra, msg in ((["--protocols", "choice,generat"], "choose from choice,options,generate,generate-options"),
                       (["--settings", "mult"], "choose from multi,single"),
                       (["--methods", "lorra"], "no config ['lorra']"),
                       (["--data-root", str(tmp_path)], "--data-root: missing"),
                       (["--model", str(tmp_path / "nope")], "neither a model directory nor an embedded model")):
        with pytest.raises(SystemExit):
            study.parse_args(base + extra)
        assert msg in capsys.readouterr().err
    # an embedded model's name is accepted as it is (resolved, and converted once, by `moelora train`)
    assert study.parse_args(base + ["--model", "gemma-3-270m"]).model == "gemma-3-270m"
    assert study.run_config(study.parse_args(base + ["--model", "Gemma-3-270M"]),
                            study.build_grid(study.parse_args(base))[1], tmp_path / "r")["model"] == "Gemma-3-270M"


def test_resumption_reruns_what_is_missing(study, data_root, tmp_path):
    out = tmp_path / "out"
    args = study.parse_args(["--out", str(out), "--data-root", str(data_root), "--answers", "text", "--protocols",
                             "options,generate-options", "--eval-limit", "100", "--max-steps", "40", "--no-routing"])
    run = study.build_grid(args)[1]  # multi/lora/seed0
    d = out / run.setting / run.method / f"seed{run.seed}"
    d.mkdir(parents=True)
    every = {t: {} for t in TASKS}
    result = {"setting": "multi", "method": "lora", "seed": 0, "status": "ok", "train": {"steps": 40},
              "eval": {"options": {"limit": 100, "tasks": every}, "generate-options": {"limit": 100, "tasks": every}}}
    (d / "result.json").write_text(json.dumps(result))
    assert study.is_done(args, run)
    for change in ({"eval": {"options": {"limit": 100, "tasks": every}}},  # a protocol missing
                   {"eval": {"options": {"limit": 50, "tasks": every},  # another limit
                             "generate-options": {"limit": 100, "tasks": every}}},
                   {"eval": {"options": {"limit": 100, "tasks": every},  # a task missing
                             "generate-options": {"limit": 100, "tasks": {"arc_easy": {}}}}},
                   {"train": {"steps": 20}},  # another step count
                   {"status": "partial"}):
        (d / "result.json").write_text(json.dumps({**result, **change}))
        assert not study.is_done(args, run), change


def _result(setting, method, seed, tasks, scores, unparsed=0):
    """A result.json as run_study writes it; ``scores`` per protocol: accuracy per task."""
    ev = {}
    for p, accs in scores.items():
        ev[p] = {"limit": 10, "average": sum(accs.values()) / len(accs), "tasks": {
            t: {"accuracy": a, "accuracy_norm": a, "correct": round(10 * a), "total": 10, "unparsed": unparsed}
            for t, a in accs.items()}}
    r = {"setting": setting, "method": method, "seed": seed, "tasks": tasks, "status": "ok", "eval": ev}
    if method != "base":
        r["train"] = {"steps": 40, "seconds_with_choice_eval": 100.0}
    return r


def test_report_knows_every_protocol(report):
    from moelora.evaluate import GENERATED, PROTOCOLS

    assert (report.PROTOCOLS, report.GENERATED) == (PROTOCOLS, GENERATED)  # report.py spells them out
    assert set(report.PROTOCOLS_TEXT) == set(PROTOCOLS)  # and describes each one


def test_report_tables_from_result_files(report, tmp_path):
    out = tmp_path / "study"
    rows = [
        _result("zeroshot", "base", 0, ["arc_easy", "boolq"],
                {"options": {"arc_easy": 0.5, "boolq": 0.7}, "generate-options": {"arc_easy": 0.2, "boolq": 0.6}}, 5),
        _result("multi", "lora", 0, ["arc_easy", "boolq"], {"options": {"arc_easy": 0.6, "boolq": 0.7}}),
        _result("multi", "lora", 1, ["arc_easy", "boolq"], {"options": {"arc_easy": 0.8, "boolq": 0.7}}),
        _result("multi", "mixlora", 0, ["arc_easy", "boolq"],
                {"options": {"arc_easy": 0.9, "boolq": 0.7}, "generate-options": {"arc_easy": 0.4, "boolq": 0.5}}, 1),
        _result("single/arc_easy", "mixlora", 0, ["arc_easy"], {"options": {"arc_easy": 0.3}}),
    ]
    for r in rows:
        d = out / r["setting"] / r["method"] / f"seed{r['seed']}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(r))
    (out / "multi" / "dora" / "seed0").mkdir(parents=True)
    (out / "multi" / "dora" / "seed0" / "result.json").write_text(json.dumps(
        {"setting": "multi", "method": "dora", "seed": 0, "status": "failed", "failed_step": "train",
         "error": "Traceback ...\nRuntimeError: out of memory"}))
    docs = tmp_path / "docs" / "results.md"
    assert report.main([str(out), "--docs", str(docs), "--images", str(tmp_path / "docs" / "img")]) == 0
    md = docs.read_text()
    assert "## Results, protocol `options`" in md and "## Results, protocol `generate-options`" in md
    assert md.index("protocol `options`") < md.index("protocol `generate-options`")
    multi = md.split("### Multi-task")[1]
    # LoRA over its two seeds: 70.0 ± 14.1 on ARC-e; the best mean of a column is bold (ties: all of them)
    assert "| LoRA | 70.0 ± 14.1 (2) | **70.0 ± 0.0** (2) | 70.0 ± 7.1 (2) |" in multi
    assert "| MixLoRA | **90.0** (1) | **70.0** (1) | **80.0** (1) |" in multi
    assert "| base model (zero-shot) | 50.0 (1) |" in multi
    single = md.split("### Single-task")[1]
    assert "| MixLoRA | 30.0 (1) | — | — |" in single  # no BoolQ run: no average either
    gen = md.split("## Results, protocol `generate-options`")[1]
    assert "no parsable option text" in gen and "base model (zero-shot) 50.0%" in gen and "MixLoRA 10.0%" in gen
    assert "RuntimeError: out of memory" in md  # the failed run is listed with its error
    assert "_no metrics found_" in md and not (tmp_path / "docs" / "img" / "training_curves.png").exists()
    (out / "multi" / "lora" / "seed0" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": k, "loss": 2.0 / k}) + "\n" for k in range(1, 6)))
    assert report.main([str(out), "--docs", str(docs), "--images", str(tmp_path / "docs" / "img")]) == 0
    assert "![training curves](img/training_curves.png)" in docs.read_text()
    assert (tmp_path / "docs" / "img" / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert md.startswith("# Accuracy study: LoRA, DoRA, MixLoRA, MiLoRA on SmolLM2-135M-Instruct\n")
    # the base model named by the study's invocation; the cutoff line read from the runs' data summaries
    (out / "study.json").write_text(json.dumps({"invocations": [{"argv": ["run_study.py", "--model", "gemma-3-270m"], "args": {"model": "gemma-3-270m"}}]}))
    summary = "data: 9 examples; cutoff_len=256: {} examples truncated, 0 prompt tokens dropped\n"
    (out / "multi" / "lora" / "seed0" / "train.err").write_text(summary.format(0))
    (out / "multi" / "lora" / "seed0" / "config.yaml").write_text("train: {max_steps: 5, cutoff_len: 256}\n")
    assert report.main([str(out), "--docs", str(docs), "--images", str(tmp_path / "docs" / "img")]) == 0
    md = docs.read_text()
    assert md.startswith("# Accuracy study: LoRA, DoRA, MixLoRA, MiLoRA on Gemma-3-270M\n")
    assert "Gemma Terms of Use" in md and "nothing truncated: the data summary of each of the 1 training runs" in md
    (out / "multi" / "lora" / "seed1" / "train.err").write_text(summary.format(3))
    assert report.main([str(out), "--docs", str(docs), "--images", str(tmp_path / "docs" / "img")]) == 0
    assert "cutoff 256 tokens (3 examples truncated in the worst of 2 runs)" in docs.read_text()
    # missing results are an error, not an empty page
    assert report.main([str(tmp_path / "nothing"), "--docs", str(tmp_path / "x.md"),
                        "--images", str(tmp_path / "img2")]) == 2
