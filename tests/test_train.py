"""`moelora train` and friends on a tiny saved model: configs, resume, checkpoints, DDP, Trainer, CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import moelora
from moelora.cli import main as cli
from moelora.config import ConfigError
from moelora.runconfig import load_run_config
from moelora.sharding import deepspeed_config, deepspeed_source
from moelora.train import TrainingError, latest_checkpoint, train

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "examples" / "toy"


def write_config(path: Path, model_dir: Path, out: Path, **train_kw) -> Path:
    t = {"max_steps": 6, "batch_size": 2, "lr": 1e-3, "save_steps": 2, "cutoff_len": 128, "seed": 3, **train_kw}
    cfg = {
        "model": str(model_dir),
        "method": {"type": "mixlora", "num_experts": 4, "top_k": 2, "r": 4, "lora_alpha": 8},
        "data": [{"path": str(TOY / "addition" / "train.jsonl")}, {"path": str(TOY / "successor" / "train.jsonl"), "weight": 2.0}],
        "train": t,
        "output_dir": str(out),
    }
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


def assert_same_trained_adapter(one: Path, two: Path, rtol: float) -> None:
    """The two runs' final adapters agree, and training moved them (some lora_B is non-zero)."""
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-6, msg=k)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)


# ---------------------------------------------------------------------------------------------
# The config


def test_config_errors_name_the_problem(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_step' \(did you mean 'max_steps'\?\)"):
        load_run_config(cfg, ["train.max_step=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        load_run_config(cfg, ["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"train.lr must be float, got 'fast'"):
        load_run_config(cfg, ["train.lr=fast"])
    with pytest.raises(ConfigError, match=r"unknown method type 'mixlroa' \(did you mean 'mixlora'\?\)"):
        load_run_config(cfg, ["method.type=mixlroa"])
    with pytest.raises(ConfigError, match=r"top_k \(9\) must not exceed num_experts \(4\)"):
        load_run_config(cfg, ["method.top_k=9"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"eval.protocol must be one of choice, options, generate, generate-options, got 'option'"):
        load_run_config(cfg, ["eval={data: [t.json], protocol: option}"])
    assert load_run_config(cfg, ["eval={data: [t.json], protocol: options}"]).eval.protocol == "options"
    assert load_run_config(cfg, ["train.lr=1e-3"]).train.lr == 0.001  # YAML 1.2 floats (PyYAML reads a string)
    steps = load_run_config(cfg, ["train.max_steps=1e3"]).train.max_steps  # a whole float for an int key
    assert steps == 1000 and type(steps) is int
    with pytest.raises(ConfigError, match=r"train.max_steps must be int, got 2.5"):
        load_run_config(cfg, ["train.max_steps=2.5"])
    run = load_run_config(cfg, ["train.max_steps=20", "method.top_k=1", "data.1.weight=3", f"output_dir={tmp_path}/x"])
    assert (run.train.max_steps, run.method["top_k"], run.data[1].weight, run.output_dir) == (20, 1, 3.0, f"{tmp_path}/x")


def test_cli_reports_errors_with_exit_code_2(tmp_path, tiny_model_dir, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out")
    assert cli(["train", "--config", str(cfg), "train.batch_sise=2"]) == 2
    assert "did you mean 'batch_size'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{not json\n')
    assert cli(["train", "--config", str(cfg), f"data=[{{path: {bad}}}]"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------------------------------------
# Training


def test_train_writes_adapter_checkpoints_and_logs(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out")
    out = train(load_run_config(cfg), progress=False)
    assert (out / "adapter_config.json").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 and r["router_loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert len(rows[0]["expert_load"]) == 2 and len(rows[0]["expert_load"]["0"]) == 4
    assert list((out / "tensorboard").iterdir())
    assert rows[-1]["loss"] < rows[0]["loss"]
    # the final adapter loads into a fresh model
    model = transformers_model(tiny_model_dir)
    moelora.load_adapter(model, out)
    assert moelora.get_context(model).configs["default"].num_experts == 4


@pytest.mark.parametrize(("epochs", "steps"), [(0.5, 3), (1.5, 8)])
def test_fractional_epochs_run_that_share_of_the_steps_rounded_up(tmp_path, tiny_model_dir, epochs, steps):
    """``num_epochs: 1.5`` with 10 examples in batches of 2 (5 steps an epoch) runs ceil(7.5) = 8
    steps, HF's Trainer's rounding (LLaMA-Factory's ``num_train_epochs``)."""
    data = tmp_path / "ten.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {i} + 1?", "output": str(i + 1)}) + "\n"
                            for i in range(10)))
    path = write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out", max_steps=-1, num_epochs=epochs,
                        save_steps=0)
    cfg = json.loads(path.read_text())
    cfg["data"] = [{"path": str(data)}]
    path.write_text(json.dumps(cfg))
    out = train(load_run_config(path), progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    with pytest.raises(ConfigError, match="train.num_epochs must be > 0, got 0"):
        load_run_config(path, ["train.num_epochs=0"])


def transformers_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir):
    full = train(load_run_config(write_config(tmp_path / "a.yaml", tiny_model_dir, tmp_path / "a")), progress=False)
    cfg_b = write_config(tmp_path / "b.yaml", tiny_model_dir, tmp_path / "b")
    train(load_run_config(cfg_b), progress=False, _stop_after=3)  # "crashes" after step 3; newest checkpoint: 2
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-2"
    assert not (tmp_path / "b" / "adapter_config.json").exists()
    with pytest.raises(TrainingError, match="pass --resume to continue it or --overwrite"):
        train(load_run_config(cfg_b), progress=False)
    resumed = train(load_run_config(cfg_b), resume=True, progress=False)
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 3 was redone after the crash, and logged once
    a, b = adapter(full), adapter(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path, tiny_model_dir, monkeypatch):
    """`train.gradient_checkpointing: true`: every decoder layer is recomputed in the backward
    (dropout masks replayed), and the adapter equals the run that kept the activations."""
    import transformers.modeling_utils as mu

    calls = []
    original = mu.checkpoint
    monkeypatch.setattr(mu, "checkpoint", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    runs = {}
    for on in (False, True):
        cfg = write_config(tmp_path / f"{on}.yaml", tiny_model_dir, tmp_path / str(on), max_steps=3, save_steps=0)
        runs[on] = adapter(train(load_run_config(cfg, [f"train.gradient_checkpointing={str(on).lower()}"]), progress=False))
        assert len(calls) == (3 * 2 if on else 0)  # steps x layers, each non-reentrant
    assert all(kw["use_reentrant"] is False for kw in calls)
    assert runs[True].keys() == runs[False].keys()
    for k in runs[False]:
        torch.testing.assert_close(runs[True][k], runs[False][k], rtol=1e-5, atol=1e-6, msg=k)


def test_logits_only_at_response_positions_train_the_same_adapter(tmp_path, tiny_model_dir, monkeypatch):
    """The LM head runs only where a row predicts a response token (`logits_to_keep`): the same
    adapter as computing every position's logits (a model whose forward has no such argument)."""
    import inspect

    import transformers

    kept = []
    original = transformers.LlamaForCausalLM.forward

    def spy(self, *a, logits_to_keep=0, **kw):
        kept.append(logits_to_keep)
        return original(self, *a, logits_to_keep=logits_to_keep, **kw)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", spy)
    cfg = write_config(tmp_path / "a.yaml", tiny_model_dir, tmp_path / "a", max_steps=2, save_steps=0)
    a = adapter(train(load_run_config(cfg), progress=False))
    assert kept and all(torch.is_tensor(k) and 0 < len(k) < 95 for k in kept)  # positions, not the whole row
    import types

    import moelora.train

    without = inspect.signature(original)
    without = without.replace(parameters=[p for p in without.parameters.values() if p.name != "logits_to_keep"])
    monkeypatch.setattr(moelora.train, "inspect", types.SimpleNamespace(signature=lambda f: without))
    cfg = write_config(tmp_path / "b.yaml", tiny_model_dir, tmp_path / "b", max_steps=2, save_steps=0)
    kept.clear()
    b = adapter(train(load_run_config(cfg), progress=False))
    assert kept and all(k == 0 for k in kept)  # every position
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_refuses_an_output_dir_with_another_run_and_changes_nothing(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out", max_steps=2)
    out = train(load_run_config(cfg), progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(TrainingError, match="already holds an adapter of another run"):
        train(load_run_config(cfg), progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    train(load_run_config(cfg), overwrite=True, progress=False)  # allowed when asked


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    import moelora.train as train_mod

    calls = {"n": 0}
    real = train_mod.F.cross_entropy

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(train_mod.F, "cross_entropy", poisoned)
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out")
    with pytest.raises(TrainingError, match=r"the loss is nan at step 3: stopping \(the last good checkpoint is .*checkpoint-2\)"):
        train(load_run_config(cfg), progress=False)
    assert latest_checkpoint(tmp_path / "out").name == "checkpoint-2"
    moelora.load_adapter(transformers_model(tiny_model_dir), tmp_path / "out" / "checkpoint-2" / "adapter")


def test_sigkill_at_any_moment_leaves_the_newest_complete_checkpoint_loadable(tmp_path, tiny_model_dir):
    import random

    rng = random.Random()
    for k in range(3):
        out = tmp_path / f"out{k}"
        cfg = write_config(tmp_path / f"c{k}.yaml", tiny_model_dir, out, max_steps=400, save_steps=1, save_total_limit=2)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "moelora.cli", "train", "--config", str(cfg), "--no-progress"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 120
            while latest_checkpoint(out) is None and time.time() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert latest_checkpoint(out) is not None, "no checkpoint within 120 s"
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        ckpt = latest_checkpoint(out)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["step"] == int(ckpt.name.split("-")[1])
        model = transformers_model(tiny_model_dir)
        moelora.load_adapter(model, ckpt / "adapter")
        for name in ("optimizer.pt", "scheduler.pt", "rng_0.pt"):
            assert (ckpt / name).is_file()


def run_cli_train(config: Path, *args: str, processes: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    """``moelora train`` in subprocesses: one, or several through torchrun (gloo on the CPU)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
              str(29500 + (os.getpid() + time.monotonic_ns()) % 1000)] if processes > 1 else [sys.executable]
    r = subprocess.run([*launch, "-m", "moelora.cli", "train", "--config", str(config), "--no-progress", *args],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("sharding", ["ddp", "fsdp", "accelerate-fsdp-config"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_model_dir, sharding):
    """DDP (or FSDP2 sharding: `train.fsdp`, or accelerate's FSDP config) on CPU (gloo): 2 processes
    x batch 2 = 1 process x batch 4, same data order and seed."""
    method = '{type: lora, r: 4, lora_alpha: 8, lora_dropout: 0.0}'
    one = write_config(tmp_path / "one.yaml", tiny_model_dir, tmp_path / "one", batch_size=4, max_steps=3, save_steps=0)
    two = write_config(tmp_path / "two.yaml", tiny_model_dir, tmp_path / "two", batch_size=2, max_steps=3, save_steps=2,
                       fsdp=sharding == "fsdp")
    # validation too: 101 examples, so with batch 2 one process has a batch less (sharded: a dummy forward)
    val = (f"val_data=[{TOY / 'letters' / 'test.jsonl'}]", "train.val_size=1", "train.eval_steps=2")
    run_cli_train(one, f"method={method}", *val)
    env = {"ACCELERATE_USE_FSDP": "true"} if sharding == "accelerate-fsdp-config" else {}
    run_cli_train(two, f"method={method}", *val, processes=2, env=env)
    fsdp = sharding != "ddp"
    assert_same_trained_adapter(tmp_path / "one", tmp_path / "two", rtol=1e-4)
    evals = [[r for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
             for d in ("one", "two")]
    assert [r["step"] for r in evals[1]] == [2, 3]
    for a, b in zip(*evals, strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)
    ckpt = tmp_path / "two" / "checkpoint-2"
    assert json.loads((ckpt / "trainer_state.json").read_text())["fsdp"] is fsdp
    moelora.load_adapter(transformers_model(tiny_model_dir), ckpt / "adapter")  # gathered in full when sharded


def test_fsdp_resume_equals_an_uninterrupted_sharded_run(tmp_path, tiny_model_dir):
    """A sharded run's checkpoint (adapters and optimizer states gathered in full) resumes exactly."""
    full = write_config(tmp_path / "a.yaml", tiny_model_dir, tmp_path / "a", batch_size=2, max_steps=4, save_steps=2,
                        fsdp=True)
    run_cli_train(full, processes=2)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = write_config(tmp_path / "b.yaml", tiny_model_dir, tmp_path / "b", batch_size=2, max_steps=4,
                           save_steps=2, fsdp=True)
    assert "resuming from" in run_cli_train(resumed, "--resume", processes=2).stdout
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # one process can resume it too (the optimizer states are stored by name, in full)
    (tmp_path / "c").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "c" / "checkpoint-2")
    single = write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "c", batch_size=4, max_steps=4, save_steps=2)
    r = run_cli_train(single, "--resume")
    assert "resuming from" in r.stdout and "global batch changes" not in r.stderr  # 1 x 4 = 2 x 2
    c = adapter(tmp_path / "c")
    assert all(torch.allclose(a[k], c[k], atol=1e-3) for k in a)  # same global batch; router losses per process
    (tmp_path / "d").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "d" / "checkpoint-2")
    smaller = write_config(tmp_path / "d.yaml", tiny_model_dir, tmp_path / "d", batch_size=2, max_steps=3, save_steps=2)
    assert "resuming a run of 2 processes with 1: the global batch changes from 4 to 2" in run_cli_train(
        smaller, "--resume").stderr


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install 'moelora[deepspeed]')")


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_matches_ddp(tmp_path, tiny_model_dir, stage):
    """DeepSpeed ZeRO-2/3 on CPU (gloo), 2 processes with 2-step accumulation, warm-up and clipping:
    the same MixLoRA adapter as plain DDP (router loss included: each process's own rows, averaged).
    ZeRO-2 through train.deepspeed, ZeRO-3 through accelerate launch's DeepSpeed environment; the
    evaluation after training (rank 0, a fresh model) is not loaded partitioned by ZeRO-3."""
    kw = dict(batch_size=2, max_steps=3, gradient_accumulation=2, warmup_steps=1, max_grad_norm=0.05,
              val_size=1, eval_steps=2, load_best_model_at_end=True)  # validation: partitioned forwards in lockstep
    ddp = write_config(tmp_path / "ddp.yaml", tiny_model_dir, tmp_path / "ddp", save_steps=0, **kw)
    if stage == 2:
        ds, env = write_config(tmp_path / "ds.yaml", tiny_model_dir, tmp_path / "ds", save_steps=2, deepspeed="zero2",
                               **kw), {}
    else:
        ds = write_config(tmp_path / "ds.yaml", tiny_model_dir, tmp_path / "ds", save_steps=2, **kw)
        env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    cfg = json.loads(ds.read_text())
    cfg["eval"] = {"data": [str(TOY / "addition" / "test.jsonl")], "protocol": "generate", "limit": 4,
                   "max_new_tokens": 4, "batch_size": 4}
    ds.write_text(json.dumps(cfg))
    val = f"val_data=[{TOY / 'letters' / 'test.jsonl'}]"
    run_cli_train(ddp, val, processes=2)
    run_cli_train(ds, val, processes=2, env=env)
    assert_same_trained_adapter(tmp_path / "ddp", tmp_path / "ds", rtol=1e-5)
    evals = [[r for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
             for d in ("ddp", "ds")]
    assert [r["step"] for r in evals[1]] == [2, 3]
    for a, b in zip(*evals, strict=True):
        assert all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)
    assert_same_trained_adapter(tmp_path / "ds", tmp_path / "ds" / "best", rtol=0)  # gathered in full
    assert json.loads((tmp_path / "ds" / "eval.json").read_text())  # evaluated on rank 0 after training
    ckpt = tmp_path / "ds" / "checkpoint-2"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["deepspeed"] == {"zero_stage": stage, "world_size": 2}
    assert (ckpt / "deepspeed" / "state").is_dir() and not (ckpt / "optimizer.pt").exists()
    moelora.load_adapter(transformers_model(tiny_model_dir), ckpt / "adapter")  # the adapter in full


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, stage):
    """A ZeRO checkpoint (the engine's optimizer partitions + moelora's files) resumes bitwise;
    resuming it another way is refused by name."""
    kw = dict(batch_size=2, max_steps=4, save_steps=2, deepspeed=f"zero{stage}", warmup_steps=2)
    run_cli_train(write_config(tmp_path / "a.yaml", tiny_model_dir, tmp_path / "a", **kw), processes=2)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed = write_config(tmp_path / "b.yaml", tiny_model_dir, tmp_path / "b", **kw)
    assert "resuming from" in run_cli_train(resumed, "--resume", processes=2).stdout
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    plain = load_run_config(write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "b", batch_size=4,
                                         max_steps=4, save_steps=2))
    with pytest.raises(TrainingError, match=f"written by DeepSpeed ZeRO-{stage} with 2 processes .* resume it with that "
                                            "stage and 2 processes"):
        train(plain, resume=True, progress=False)


@needs_deepspeed
def test_deepspeed_single_process_without_a_launcher(tmp_path, tiny_model_dir):
    """train() with train.deepspeed and no launcher: a one-process group; same adapter as without
    DeepSpeed; accelerate's DeepSpeed switch is not left in the environment for a later run."""
    run_cli_train(write_config(tmp_path / "a.yaml", tiny_model_dir, tmp_path / "a", max_steps=2, save_steps=0))
    ds = write_config(tmp_path / "b.yaml", tiny_model_dir, tmp_path / "b", max_steps=2, save_steps=0,
                      deepspeed={"zero_optimization": {"stage": 1}, "train_batch_size": "auto"})
    code = ("import os; from moelora.runconfig import load_run_config; from moelora.train import train; "
            f"train(load_run_config({str(ds)!r}), progress=False); print(os.environ.get('ACCELERATE_USE_DEEPSPEED'))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "None"
    assert_same_trained_adapter(tmp_path / "a", tmp_path / "b", rtol=1e-5)


def test_deepspeed_config_errors_name_the_problem(tmp_path):
    """What moelora owns (optimizer, schedule, batch, clipping) is refused or filled, by name."""
    kw = dict(batch_size=2, gradient_accumulation=3, max_grad_norm=1.0, world=4)
    cfg = deepspeed_config("zero3", **kw)
    assert cfg["zero_optimization"] == {"stage": 3}
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"],
            cfg["gradient_clipping"]) == (2, 3, 24, 1.0)
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                             "bf16": {"enabled": "auto"}}))
    assert deepspeed_config(str(f), **kw)["bf16"] == {"enabled": "auto"}
    cases = {
        "zero4": "neither zero1/zero2/zero3 nor an existing DeepSpeed JSON config file",
        '{"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}': "remove its 'optimizer' section",
        '{"zero_optimization": {"stage": 2}, "scheduler": {}}': "remove its 'scheduler' section",
        '{"zero_optimization": {"stage": 5}}': "needs zero_optimization.stage 0, 1, 2 or 3, got 5",
        '{"train_batch_size": 16}': "needs zero_optimization.stage",
        '{"zero_optimization": {"stage": 1}, "train_micro_batch_size_per_gpu": 8}':
            "train_micro_batch_size_per_gpu is 8 but train.batch_size is 2",
        '{"zero_optimization": {"stage": 1}, "gradient_clipping": 0.5}': "gradient_clipping is 0.5 but train.max_grad_norm",
        '{"zero_optimization": {"stage": 1},': "not a valid DeepSpeed JSON config",
        "[1, 2]": "a DeepSpeed config is a JSON object, got list",
    }
    for text, message in cases.items():
        source = text
        if text.startswith(("{", "[")):
            source = str(tmp_path / "bad.json")
            Path(source).write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            deepspeed_config(source, **kw)


def test_deepspeed_refusals_before_anything_is_loaded(tmp_path, tiny_model_dir, monkeypatch):
    """Several adapters, FSDP + DeepSpeed: refused by name, output_dir untouched."""
    path = write_config(tmp_path / "m.yaml", tiny_model_dir, tmp_path / "out", deepspeed="zero2")
    cfg = json.loads(path.read_text())
    cfg["adapters"] = {"a": {"type": "lora"}, "b": {"type": "lora"}}
    del cfg["method"]
    path.write_text(json.dumps(cfg))
    multi = load_run_config(path)
    with pytest.raises(TrainingError, match="DeepSpeed trains one adapter per run"):
        train(multi, progress=False)
    both = load_run_config(write_config(tmp_path / "f.yaml", tiny_model_dir, tmp_path / "out", fsdp=True,
                                        deepspeed="zero2"))
    with pytest.raises(TrainingError, match="train.fsdp and DeepSpeed both shard the model"):
        train(both, progress=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch's DeepSpeed config
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert deepspeed_source(None) == {"zero_optimization": {"stage": 3}}
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "/x/ds.json")
    assert deepspeed_source(None) == "/x/ds.json" and deepspeed_source("zero1") == "zero1"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_hf_trainer_trains_a_moelora_model_with_the_router_loss(tmp_path, tiny_model_dir, checkpointing):
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from moelora.data import DataSource, TrainData, collate

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = transformers_model(tiny_model_dir)
    moelora.attach(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0, router_aux_loss_coef=0.1))
    data = TrainData([DataSource(str(TOY / "addition" / "train.jsonl"))], tok, cutoff_len=128, seed=0)
    features = [data[i] for i in range(16)]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1,
                             remove_unused_columns=False, use_cpu=True, gradient_checkpointing=checkpointing,
                             gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None)
    trainer = Trainer(model=model, args=args, train_dataset=features,
                      data_collator=lambda feats: collate(feats, tok.pad_token_id))
    batch = collate(features[:4], tok.pad_token_id)
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    out = model(**dict(batch))
    torch.testing.assert_close(loss, out.loss)  # the loss Trainer optimises includes the router loss ...
    lm = model.eval()(**dict(batch)).loss
    torch.testing.assert_close(out.loss, lm + out.router_loss)  # ... which is reported on its own too
    trainer.train()
    assert model.model.layers[0].gradient_checkpointing is checkpointing  # Trainer switched it on (or not)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("moe_gate" in n for n in changed) and any("lora_B" in n for n in changed)


# ---------------------------------------------------------------------------------------------
# eval / generate / plot


def test_cli_eval_generate_and_plots(tmp_path, tiny_model_dir, capsys):
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out", max_steps=2, save_steps=0)
    assert cli(["train", "--config", str(cfg), "--no-progress"]) == 0
    out = tmp_path / "out"
    data = [str(TOY / "addition" / "test.jsonl"), str(TOY / "successor" / "test.jsonl")]
    assert cli(["eval", "--model", str(tiny_model_dir), "--adapter", str(out), "--data", *data, "--protocol", "generate", "--max-new-tokens", "4",
                "--limit", "4", "--compare-base", "--output", str(tmp_path / "eval.json")]) == 0
    table = capsys.readouterr().out
    assert "addition" in table and "successor" in table and "base" in table
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["mixlora"]["tasks"]["addition"]["total"] == 4 and res["base"]["protocol"] == "generate"
    # generation options reach generate-options too (the scored protocols refuse them)
    assert cli(["eval", "--model", str(tiny_model_dir), "--data", data[0], "--protocol", "generate-options",
                "--max-new-tokens", "3", "--limit", "2", "--output", str(tmp_path / "eval_go.json")]) == 0
    res = json.loads((tmp_path / "eval_go.json").read_text())["base"]
    assert res["protocol"] == "generate-options" and res["tasks"]["addition"]["total"] == 2
    from moelora.cli import EVAL_PROTOCOLS
    from moelora.evaluate import PROTOCOLS

    assert EVAL_PROTOCOLS == list(PROTOCOLS)  # the CLI's spelled-out list
    assert cli(["generate", "--model", str(tiny_model_dir), "--adapter", str(out), "--prompt", "is 3 even?",
                "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    # --repetition-penalty and --top-k reach model.generate: the same text as calling it directly
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = moelora.load_adapter(transformers_model(tiny_model_dir), out).eval()
    enc = tok("is 3 even?", return_tensors="pt")
    texts = {}
    for extra, kw in (([], {}), (["--repetition-penalty", "4"], {"repetition_penalty": 4.0})):
        assert cli(["generate", "--model", str(tiny_model_dir), "--adapter", str(out), "--prompt", "is 3 even?",
                    "--max-new-tokens", "8", *extra]) == 0
        texts[tuple(extra)] = capsys.readouterr().out.rstrip("\n")
        with torch.no_grad():
            ref = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, **kw)
        assert texts[tuple(extra)] == tok.decode(ref[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert texts[()] != texts[("--repetition-penalty", "4")]
    assert cli(["generate", "--model", str(tiny_model_dir), "--adapter", str(out), "--prompt", "is 3 even?",
                "--max-new-tokens", "8", "--prompt-lookup", "3"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == texts[()]  # prompt lookup decoding: the same greedy text
    for bad, msg in [(["--num-beams", "2"], "not to beam search"), ([], "must be in [1, 64]")]:
        assert cli(["generate", "--model", str(tiny_model_dir), "--prompt", "x",
                    "--prompt-lookup", "3" if bad else "0", *bad]) == 2
        assert msg in capsys.readouterr().err
    hot = ["--temperature", "1.5", "--seed", "3", "--max-new-tokens", "8"]
    assert cli(["generate", "--model", str(tiny_model_dir), "--prompt", "is 3 even?", *hot, "--top-k", "1"]) == 0
    top1 = capsys.readouterr().out
    assert cli(["generate", "--model", str(tiny_model_dir), "--prompt", "is 3 even?", "--max-new-tokens", "8"]) == 0
    assert top1 == capsys.readouterr().out  # top-k 1 sampling is greedy
    assert cli(["plot", "loss", "--run", str(out), "--out", str(tmp_path / "loss.png")]) == 0
    assert cli(["plot", "routing", "--model", str(tiny_model_dir), "--adapter", str(out), "--data", *data,
                "--limit", "4", "--out", str(tmp_path / "routing.png")]) == 0
    for png in ("loss.png", "routing.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.json")]) == 2


def test_cli_export_merges_lora_into_a_plain_model_and_refuses_the_rest(tmp_path, tiny_model_dir, capsys):
    from conftest import randomize_adapters
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = transformers_model(tiny_model_dir)
    randomize_adapters(moelora.attach(model, moelora.LoraConfig(r=4, lora_alpha=8, use_dora=True)))
    moelora.save_adapter(model, tmp_path / "dora")
    moelora.detach(model)
    moelora.attach(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4))
    moelora.save_adapter(model, tmp_path / "mix")
    adapted = transformers_model(tiny_model_dir)
    moelora.load_adapter(adapted, tmp_path / "dora")
    ids = torch.randint(3, 100, (2, 9))

    out = tmp_path / "merged"
    assert cli(["export", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "dora"), "--output", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).pad_token_id is not None
    assert not any("lora" in k or "magnitude" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted.eval()(ids).logits, atol=2e-5, rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == []  # no partial left

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert cli(["export", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "dora"), "--output", str(out)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert cli(["export", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "mix"), "--output", str(out),
                "--overwrite"]) == 2
    assert "is mixlora: only LoRA and DoRA merge" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing already saved changed
    assert cli(["export", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "dora"), "--output", str(out),
                "--overwrite", "--dtype", "bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out, dtype="auto").dtype == torch.bfloat16


def test_chat_reads_turns_until_an_empty_line(tiny_model_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "moelora.cli", "chat", "--model", str(tiny_model_dir), "--max-new-tokens", "3"],
                       input="is 4 even?\n/reset\nagain\n\n", capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("model> ") == 2


def test_loading_warns_when_the_tokenizers_eos_is_not_a_generation_end_token(tiny_model_dir, tmp_path):
    """The failure behind the first GPU accuracy study: responses trained to end with one token,
    generation stopping at another. Loading such a model says so; a consistent one loads quietly."""
    import shutil
    import warnings

    import transformers

    from moelora.train import load_model_and_tokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consistent: no warning
        load_model_and_tokenizer(str(tiny_model_dir))
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    tok = transformers.AutoTokenizer.from_pretrained(bad)
    gen = transformers.GenerationConfig.from_pretrained(bad)
    gen.eos_token_id = (tok.eos_token_id + 1) % len(tok)
    gen.save_pretrained(bad)
    with pytest.warns(UserWarning, match="is not among the generation config's end tokens"):
        load_model_and_tokenizer(str(bad))


# ---------------------------------------------------------------------------------------------
# fuzzed run configs

FUZZ_CONFIG_VALUES = [None, True, 0, 1, -1, 2, 0.5, -0.5, 1e30, "", "x", "lora", "mixlora", "milora", "dora", "auto",
                      "choice", [], [1], ["q_proj"], ["x"], {}, {"a": 1}, {"type": "lora"}, {"path": 3},
                      [{"path": "nope.json"}], [{"format": "text"}], "q_proj", "4bit", {"lora": {"type": "lora"}},
                      {"lora": "x"}, {"../x": {"type": "lora"}}]
FUZZ_CONFIG_KEYS = ["model", "method", "method.type", "method.r", "method.top_k", "method.num_experts",
                    "method.lora_alpha", "method.target_modules", "method.routing", "method.pooler", "method.bogus",
                    "data", "data.0", "data.0.path", "data.0.format", "data.0.weight", "data.0.name", "train",
                    "train.max_steps", "train.lr", "train.batch_size", "train.cutoff_len", "train.precision",
                    "train.lr_scheduler", "train.seed", "train.nope", "eval", "eval.data", "eval.protocol",
                    "eval.limit", "output_dir", "quantization", "adapters", "whatever"]


def test_config_shapes_the_fuzzer_found_are_config_errors(tmp_path):
    """Each of these once escaped as a TypeError (a traceback instead of one line)."""
    from moelora.config import config_from_dict

    for bad, msg in (({"type": {}}, "unknown method type"), ({"type": ["lora"]}, "unknown method type"),
                     ({"type": "lora", "target_modules": True}, "target_modules must be a list")):
        with pytest.raises(ConfigError, match=msg):
            config_from_dict(bad)
    with pytest.raises(ConfigError, match="method block must be a mapping"):
        config_from_dict("lora")
    with pytest.raises(ConfigError, match="override 'method.r=4': method is 'x', not a mapping"):
        load_run_config(None, ["method=x", "method.r=4"])
    with pytest.raises(ConfigError, match="eval.data must be list"):
        load_run_config(None, ["eval.data=[{path: a.json}]"])
    with pytest.raises(ConfigError, match="adapters must be"):
        load_run_config(None, ["adapters={3: {type: lora}}"])


def test_fuzzed_run_configs_load_or_name_the_problem(tmp_path):
    """600 random mutations of a valid config, as YAML files and as overrides: each one loads or raises one of
    the errors the CLI reports in one line (ConfigError, DataError: ValueErrors), never another exception."""
    import random

    import yaml

    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    good = {"method": {"type": "mixlora", "num_experts": 4, "top_k": 2, "r": 8},
            "data": [{"path": str(tmp_path / "d.jsonl"), "format": "llm-adapters"}],
            "train": {"max_steps": 2, "batch_size": 2}, "output_dir": str(tmp_path / "out"),
            "eval": {"data": [str(tmp_path / "d.jsonl")], "protocol": "generate"}}
    assert load_run_config(None, [f"{k}={json.dumps(v)}" for k, v in good.items()]).adapter_config().method == "mixlora"
    rnd = random.Random(0)
    outcomes = {"ok": 0, "error": 0}
    for i in range(600):
        d = json.loads(json.dumps(good))
        overrides = []
        for key in rnd.sample(FUZZ_CONFIG_KEYS, rnd.randint(1, 3)):
            value = rnd.choice(FUZZ_CONFIG_VALUES)
            if i % 2:  # as a command-line override
                overrides.append(f"{key}={json.dumps(value)}")
                continue
            node, parts = d, key.split(".")
            try:
                for part in parts[:-1]:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                if isinstance(node, list):
                    node[int(parts[-1])] = value
                else:
                    node[parts[-1]] = value
            except (KeyError, IndexError, TypeError, ValueError):
                pass  # an earlier mutation replaced the parent: nothing to set
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(d))
        try:
            load_run_config(path, overrides)
            outcomes["ok"] += 1
        except ValueError as e:  # ConfigError and DataError
            assert str(e).strip() and "Traceback" not in str(e), (d, overrides)
            outcomes["error"] += 1
    assert outcomes["ok"] >= 10 and outcomes["error"] >= 300, outcomes


def test_train_on_every_turn_of_sharegpt_conversations(tmp_path, tiny_model_dir, caplog):
    """`moelora train` on a sharegpt file with turns: all (a YAML data entry), end to end on the tiny model:
    the loss covers every assistant turn (the data summary counts their tokens) and the adapter is saved."""
    import logging

    items = []
    for line in (TOY / "addition" / "train.jsonl").read_text().splitlines()[:12:2]:
        a, b = json.loads(line), json.loads(line)
        items.append({"conversations": [{"from": "human", "value": a["instruction"]}, {"from": "gpt", "value": a["output"]},
                                        {"from": "human", "value": b["instruction"]}, {"from": "gpt", "value": b["output"]}]})
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in items))
    cfg = json.loads(write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out", max_steps=2,
                                  save_steps=0).read_text())
    cfg["data"] = [{"path": str(data), "format": "sharegpt", "turns": "all"}]
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    with caplog.at_level(logging.INFO, logger="moelora"):
        assert cli(["train", "--config", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    from transformers import AutoTokenizer

    from moelora.data import DataSource, TrainData

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    both = TrainData([DataSource(str(data), format="sharegpt", turns="all")], tok, cutoff_len=128, seed=0)
    last = TrainData([DataSource(str(data), format="sharegpt")], tok, cutoff_len=128, seed=0)
    assert both.stats["chat"]["response_tokens"] > last.stats["chat"]["response_tokens"] > 0
    assert f"{both.stats['chat']['tokens']} tokens" in caplog.text


def test_cli_generate_guided_outputs_obey_their_guide(tmp_path, tiny_model_dir, capsys):
    """``moelora generate --json / --json-schema / --regex / --choice / --grammar`` (through the engine): a random
    model's reply obeys the guide; conflicting or unreadable guides are clear errors (exit 2)."""
    import regex

    from moelora.structured import JsonPrefix, RegexPrefix, schema_regex

    def gen(*extra):
        assert cli(["generate", "--model", str(tiny_model_dir), "--prompt", "is 3 even?", *extra]) == 0
        return capsys.readouterr().out.rstrip("\n")

    text = gen("--json", "--max-new-tokens", "30")
    assert text.startswith("{") and JsonPrefix().feed(text)
    assert gen("--json", "--max-new-tokens", "30", "--prompt-lookup", "3") == text  # the engine's speculation
    assert gen("--choice", "yes", "--choice", "no", "--max-new-tokens", "5") in ("yes", "no")
    assert regex.fullmatch(r"[0-9]{3}", gen("--regex", "[0-9]{3}", "--max-new-tokens", "10"))
    assert gen("--choice", "yes", "--choice", "no", "--temperature", "1.2", "--seed", "1") in ("yes", "no")
    schema = {"type": "object", "properties": {"even": {"type": "boolean"}}}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    text = gen("--json-schema", str(tmp_path / "s.json"), "--max-new-tokens", "30")
    assert RegexPrefix(schema_regex(schema)).feed(text) and text.startswith("{")
    (tmp_path / "g.gbnf").write_text('root ::= ("yes" | "no") (", " [0-9]{1,2})?\n')
    text = gen("--grammar", str(tmp_path / "g.gbnf"), "--max-new-tokens", "10")
    assert regex.fullmatch(r"(yes|no)(, [0-9]{1,2})?", text), text
    (tmp_path / "bad.gbnf").write_text("root ::= nope\n")
    for bad, msg in [(["--json", "--regex", "a"], "at most one"), (["--json-schema", str(tmp_path / "nope.json")], "cannot read"),
                     (["--json", "--num-beams", "2"], "beam search"), (["--regex", "("], "does not compile"),
                     (["--grammar", str(tmp_path / "bad.gbnf")], "unknown rule 'nope'"),
                     (["--grammar", str(tmp_path / "no.gbnf")], "--grammar"),
                     (["--grammar", str(tmp_path / "g.gbnf"), "--choice", "a"], "at most one")]:
        assert cli(["generate", "--model", str(tiny_model_dir), "--prompt", "x", *bad]) == 2
        assert msg in capsys.readouterr().err, bad


def test_neftune_noise_is_bounded_and_training_only_and_loraplus_speeds_up_b(tmp_path, tiny_model_dir):
    from moelora.train import neftune_hook

    emb = torch.nn.Embedding(50, 16)
    ids = torch.randint(0, 50, (2, 10))
    clean = emb(ids)
    handle = emb.register_forward_hook(neftune_hook(5.0))
    noisy = emb(ids)
    mag = 5.0 / (10 * 16) ** 0.5
    assert 0 < (noisy - clean).abs().max() <= mag and (noisy - clean).abs().mean() > mag / 4
    emb.eval()
    assert torch.equal(emb(ids), clean)  # eval: no noise
    handle.remove()
    # a run with NEFTune and LoRA+ trains, differs from the plain run, and leaves no hook behind
    runs = {}
    for name, extra in [("plain", {}), ("tuned", {"neftune_noise_alpha": 5.0, "loraplus_lr_ratio": 16.0})]:
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, tmp_path / name, max_steps=3, save_steps=0, **extra)
        assert cli(["train", "--config", str(cfg), "--no-progress"]) == 0
        runs[name] = adapter(tmp_path / name)
    assert any(not torch.equal(runs["plain"][k], runs["tuned"][k]) for k in runs["plain"])
    cfg = json.loads((tmp_path / "tuned" / "run_config.json").read_text())["train"]
    assert cfg["neftune_noise_alpha"] == 5.0 and cfg["loraplus_lr_ratio"] == 16.0
    bad = write_config(tmp_path / "bad.yaml", tiny_model_dir, tmp_path / "bad", neftune_noise_alpha=-1)
    assert cli(["train", "--config", str(bad)]) == 2
    # LoRA+: after one AdamW step from B = 0, |B| is about lr x ratio instead of lr
    moved = {}
    for ratio in (0.0, 16.0):
        cfg = write_config(tmp_path / f"r{ratio}.yaml", tiny_model_dir, tmp_path / f"r{ratio}", max_steps=1,
                           save_steps=0, loraplus_lr_ratio=ratio)
        assert cli(["train", "--config", str(cfg), "--no-progress"]) == 0
        b = [t.abs().mean() for k, t in adapter(tmp_path / f"r{ratio}").items() if "lora_B" in k]
        moved[ratio] = float(sum(b) / len(b))
    assert 10 < moved[16.0] / moved[0.0] < 20, moved


@pytest.mark.parametrize("lookup", [[], ["--prompt-lookup", "4"]])
def test_chat_reuses_earlier_turns_and_answers_like_generate(lookup, tiny_model_dir, monkeypatch, capsys):
    """``moelora chat`` runs through one engine: turn 2 reuses turn 1's prompt and reply from the prefix
    cache, and every reply equals ``model.generate`` (greedy) on the same history; with
    ``--prompt-lookup`` too (the engine's n-gram speculation, which drafted and had drafts accepted)."""
    import builtins

    from moelora.engine import Engine

    lines = iter(["what is two plus two? " * 3, "and three plus three? " * 2, ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    cached, engines = [], []
    real = Engine.generate

    def spy(self, *a, **kw):
        out = real(self, *a, **kw)
        cached.append(out[0]["cached_tokens"])
        engines.append(self)
        return out

    monkeypatch.setattr(Engine, "generate", spy)
    n = 40 if lookup else 12
    assert cli(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", str(n), *lookup]) == 0
    replies = [line[len("model> "):] for line in capsys.readouterr().out.splitlines() if line.startswith("model> ")]
    assert len(replies) == 2 and cached[0] == 0 and cached[1] >= 16
    if lookup:
        assert engines[0].speculative.num_speculative_tokens == 4 and engines[0].spec_stats["accepted"] > 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = transformers_model(tiny_model_dir).eval()
    history = []
    for question, reply in zip(["what is two plus two? " * 3, "and three plus three? " * 2], replies):
        history.append({"role": "user", "content": question.strip()})
        ids = tok(tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        assert reply == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply})


def test_report_to_wandb_logs_every_metric_and_a_resumed_run_continues_it(tmp_path, tiny_model_dir, monkeypatch):
    """`train.report_to: wandb` through a stand-in for the wandb package (the real one, offline, was
    checked by hand: 0.31.0): init with the project, the run name and the run config; every metric
    under the TensorBoard names at its step; finish; a resumed run passes the same id back."""
    import importlib.machinery
    import types

    calls = []

    class Run:
        id = "run123"

        def log(self, data, step):
            calls.append(("log", step, dict(data)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "out", max_steps=4, report_to="wandb",
                       run_name="mine", val_size=4, eval_steps=2)
    out = train(load_run_config(cfg), progress=False, _stop_after=2)
    init = calls[0][1]
    assert calls[0][0] == "init" and (init["project"], init["name"], init["id"], init["dir"]) == (
        "proj", "mine", None, str(out))
    assert init["config"]["train"]["report_to"] == ["wandb"] and calls[-1] == ("finish",)
    logs = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logs] == [1, 2, 2]  # training steps 1, 2; validation at step 2
    assert {"train/loss", "train/router_loss", "train/lr", "expert_load/layer00/expert0"} <= logs[0][2].keys()
    assert {"eval/val_loss", "eval/val_accuracy"} <= logs[2][2].keys()
    assert not (out / "tensorboard").exists()  # only what report_to names
    calls.clear()
    train(load_run_config(cfg), resume=True, progress=False)
    assert (calls[0][1]["id"], calls[0][1]["resume"]) == ("run123", "allow")
    assert [c[1] for c in calls if c[0] == "log"] == [3, 4, 4]
    with pytest.raises(ConfigError, match="unknown 'wand'.*did you mean 'wandb'"):
        load_run_config(cfg, ["train.report_to=[wand]"])
    monkeypatch.delitem(sys.modules, "wandb")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="pip install wandb"):
        load_run_config(cfg)


find_spec = importlib.util.find_spec


def test_optim_names_build_hf_s_optimizers(tmp_path, tiny_model_dir):
    """``train.optim`` (HF's / LLaMA-Factory's names) builds the optimizer with HF's settings; the
    bitsandbytes ones are a clear error without a GPU; a run trains with each torch one."""
    from types import SimpleNamespace

    from transformers.optimization import Adafactor

    from moelora.train import make_optimizer

    w = torch.nn.Parameter(torch.zeros(3))
    t = SimpleNamespace(lr=1e-3, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, optim="adamw")
    cpu = torch.device("cpu")
    opt = make_optimizer([{"params": [w], "lr": 1e-3}], t, cpu)
    assert type(opt) is torch.optim.AdamW and opt.defaults["betas"] == (0.8, 0.95) and opt.defaults["eps"] == 1e-6
    t.optim = "adamw_torch_fused"
    assert make_optimizer([{"params": [w]}], t, cpu).defaults["fused"] is True
    t.optim = "sgd"
    assert type(make_optimizer([{"params": [w]}], t, cpu)) is torch.optim.SGD
    t.optim = "adafactor"
    ada = make_optimizer([{"params": [w]}], t, cpu)
    assert isinstance(ada, Adafactor) and ada.defaults["relative_step"] is False and ada.defaults["lr"] == 1e-3
    for name in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        t.optim = name
        with pytest.raises(TrainingError, match=f"train.optim: {name} .bitsandbytes. needs a CUDA GPU"):
            make_optimizer([{"params": [w]}], t, cpu)
    for override, msg in [("train.optim=adam_w", "did you mean 'adamw'"), ("train.adam_beta2=1.0", "adam_beta1")]:
        with pytest.raises(ConfigError, match=msg):
            load_run_config(write_config(tmp_path / "bad.yaml", tiny_model_dir, tmp_path / "bad"), [override])
    moved = {}
    for name in ("sgd", "adafactor"):
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, tmp_path / name, max_steps=2, save_steps=0,
                           optim=name)
        assert cli(["train", "--config", str(cfg), "--no-progress"]) == 0
        moved[name] = sum(float(v.abs().sum()) for k, v in adapter(tmp_path / name).items() if "lora_B" in k)
    assert moved["sgd"] > 0 and moved["adafactor"] > 0 and moved["sgd"] != moved["adafactor"]


def test_cli_combine_saves_the_weighted_sum_of_two_adapters(tmp_path, tiny_model_dir, capsys):
    """``moelora combine --adapter A:0.5 --adapter B:-1`` (``cat``): the saved adapter's delta is the
    weighted sum of the two, exactly; bad inputs are errors naming them."""
    from transformers import AutoModelForCausalLM

    dirs = []
    for i, r in enumerate((4, 2)):
        m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        moelora.attach(m, moelora.LoraConfig(r=r, target_modules=["q_proj"]))
        from conftest import randomize_adapters

        randomize_adapters(m, seed=i)
        moelora.save_adapter(m, tmp_path / f"ad{i}")
        dirs.append(tmp_path / f"ad{i}")
    out = tmp_path / "both"
    assert cli(["combine", "--model", str(tiny_model_dir), "--adapter", f"{dirs[0]}:0.5", "--adapter", f"{dirs[1]}:-1",
                "--output", str(out)]) == 0
    assert "combined 2 adapters (cat, rank 6)" in capsys.readouterr().out
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for name, d in (("x", dirs[0]), ("y", dirs[1]), ("xy", out)):
        moelora.load_adapter(m, d, adapter_name=name)
    q = m.model.layers[1].self_attn.q_proj.adapters
    torch.testing.assert_close(q["xy"].lora.merged_weight(),
                               0.5 * q["x"].lora.merged_weight() - q["y"].lora.merged_weight(), rtol=1e-5, atol=1e-6)
    for bad, msg in [(["--adapter", str(dirs[0])], "at least two"),
                     (["--adapter", str(dirs[0]), "--adapter", str(tmp_path / "nope")], "no such directory"),
                     (["--adapter", str(dirs[0]), "--adapter", str(dirs[1])], "exists and is not empty")]:
        assert cli(["combine", "--model", str(tiny_model_dir), "--output", str(out), *bad]) == 2, bad
        assert msg in capsys.readouterr().err, bad
