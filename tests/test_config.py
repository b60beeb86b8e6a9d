"""Config validation, attach-time errors, rollback of failed attaches, and config round-trips."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers
from conftest import batch, randomize_adapters, tiny_model

import moelora
import moelora.inject
from moelora import ConfigError, LoraConfig, MiLoraConfig, MixLoraConfig
from moelora.checkpoint import config_from_checkpoint
from moelora.config import config_from_dict

# ---------------------------------------------------------------------------------------------
# Helpers


def logits(model):
    ids, mask = batch(model)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def snapshot(model):
    """Everything a failed attach must leave as it was."""
    return {
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "logits": logits(model),
    }


def assert_same_model(model, before, *, check_new_modules=True):
    after_modules = [(n, type(m)) for n, m in model.named_modules()]
    if check_new_modules:
        assert after_modules == before["modules"]
    else:  # every module that existed is still there with the same type
        assert [x for x in before["modules"] if x not in after_modules] == []
    params = dict(model.named_parameters())
    assert params.keys() == before["params"].keys()
    for n, (value, requires_grad) in before["params"].items():
        assert torch.equal(params[n], value), n
        assert params[n].requires_grad == requires_grad, n
    torch.testing.assert_close(logits(model), before["logits"], rtol=0, atol=0)


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, bos_token_id=1, eos_token_id=2)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


# ---------------------------------------------------------------------------------------------
# Invalid field values


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MixLoraConfig(num_experts=4, top_k=5), r"top_k \(5\) must not exceed num_experts \(4\)"),
        (lambda: MixLoraConfig(num_experts=1, top_k=2), r"top_k \(2\) must not exceed num_experts \(1\)"),
        (lambda: LoraConfig(r=0), r"^r must be an integer >= 1, got 0"),
        (lambda: MixLoraConfig(r=-4), r"^r must be an integer >= 1, got -4"),
        (lambda: MiLoraConfig(r=0), r"^r must be an integer >= 1, got 0"),
        (lambda: LoraConfig(r=4.0), r"^r must be an integer >= 1, got 4\.0"),
        (lambda: LoraConfig(r="8"), r"^r must be an integer >= 1, got '8'"),
        (lambda: LoraConfig(r=True), r"^r must be an integer >= 1, got True"),
        (lambda: LoraConfig(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\), got 1\.0"),
        (lambda: MixLoraConfig(lora_dropout=-0.1), r"lora_dropout must be in \[0, 1\), got -0\.1"),
        (lambda: MiLoraConfig(lora_dropout=1.5), r"lora_dropout must be in \[0, 1\), got 1\.5"),
        (lambda: LoraConfig(lora_dropout="0.1"), r"lora_dropout must be in \[0, 1\), got '0\.1'"),
        (lambda: LoraConfig(lora_dropout=float("nan")), r"lora_dropout must be in \[0, 1\), got nan"),
        (lambda: LoraConfig(lora_alpha=0), r"lora_alpha must be a positive number, got 0"),
        (lambda: MixLoraConfig(routing="top-k"), r"routing must be one of .*got 'top-k' \(did you mean 'top_k'\?\)"),
        (lambda: MixLoraConfig(routing="topp"), r"routing must be one of .*got 'topp' \(did you mean 'top_p'\?\)"),
        (lambda: MixLoraConfig(routing="expert_choice"), r"routing must be one of \('top_k', 'top_p'\), got 'expert_choice'"),
        (lambda: MixLoraConfig(num_experts=0), r"num_experts must be an integer >= 1, got 0"),
        (lambda: MixLoraConfig(top_k=0), r"top_k must be an integer >= 1, got 0"),
        (lambda: MixLoraConfig(top_p=0.0), r"top_p must be in \(0, 1\], got 0\.0"),
        (lambda: MixLoraConfig(top_p=1.2), r"top_p must be in \(0, 1\], got 1\.2"),
        (lambda: MixLoraConfig(jitter_noise=1.0), r"jitter_noise must be in \[0, 1\)"),
        (lambda: MixLoraConfig(expert_r=0), r"expert_r must be an integer >= 1, got 0"),
        (lambda: MixLoraConfig(expert_lora_dropout=1.0), r"expert_lora_dropout must be in \[0, 1\)"),
        (lambda: MiLoraConfig(pooler="atention"), r"unknown pooler 'atention' \(did you mean 'attention'\?\)"),
        (lambda: MiLoraConfig(pooler="cls"), r"unknown pooler 'cls'; choose from \('attention', 'last', 'mean', 'max'\)"),
        (lambda: MiLoraConfig(activation="rationl"), r"unknown activation 'rationl' \(did you mean 'rational'\?\)"),
        (lambda: MiLoraConfig(activation="gelue"), r"unknown activation 'gelue' \(did you mean 'gelu'\?\)"),
        (lambda: MiLoraConfig(activation="swish"), r"unknown activation 'swish'; choose from \('rational', 'gelu', 'relu', 'identity'\)"),
        (lambda: MiLoraConfig(top_k=3, target_modules=["q_proj", "v_proj"]), r"top_k \(3\) must not exceed the number of experts \(len\(target_modules\) = 2\)"),
        (lambda: MiLoraConfig(top_k=0), r"top_k must be an integer >= 1, got 0"),
        (lambda: MiLoraConfig(lb_loss_coef=-1.0), r"lb_loss_coef must be >= 0"),
        (lambda: MiLoraConfig(activation_lr_scale=0.0), r"activation_lr_scale must be positive"),
        (lambda: LoraConfig(target_modules=["q_proj", "v_proj", "q_proj"]), r"target_modules has duplicates: \['q_proj', 'v_proj', 'q_proj'\]"),
        (lambda: MixLoraConfig(target_modules=["up_proj", "up_proj"]), r"target_modules has duplicates"),
        (lambda: LoraConfig(target_modules="q_proj"), r"target_modules must be a list of module names, got 'q_proj'"),
        (lambda: LoraConfig(target_modules=["q_proj", ""]), r"target_modules must be a list of module names"),
    ],
)
def test_invalid_field_raises_config_error_naming_it(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_valid_edge_values_are_accepted():
    assert MixLoraConfig(num_experts=4, top_k=4).top_k == 4
    assert LoraConfig(r=1, lora_dropout=0.0).r == 1
    assert MiLoraConfig(top_k=2, target_modules=["q_proj", "v_proj"]).top_k == 2
    assert MixLoraConfig(routing="top_p", top_p=1.0).top_p == 1.0


# ---------------------------------------------------------------------------------------------
# config_from_dict


def test_config_from_dict_unknown_method_type_suggests_the_near_miss():
    with pytest.raises(ConfigError, match=r"unknown method type 'mixlroa' \(did you mean 'mixlora'\?\); choose from"):
        config_from_dict({"type": "mixlroa", "num_experts": 4})
    with pytest.raises(ConfigError, match=r"unknown method type 'qlora'.*choose from \['lora', 'mixlora', 'milora', 'dora'\]"):
        config_from_dict({"type": "qlora"})
    with pytest.raises(ConfigError, match=r"unknown method type None"):
        config_from_dict({"r": 8})


@pytest.mark.parametrize(
    "d, match",
    [
        ({"type": "mixlora", "num_expert": 4}, r"unknown MixLoraConfig field 'num_expert' \(did you mean 'num_experts'\?\)"),
        ({"type": "milora", "poolr": "mean"}, r"unknown MiLoraConfig field 'poolr' \(did you mean 'pooler'\?\)"),
        ({"type": "lora", "lora_alhpa": 8}, r"unknown LoraConfig field 'lora_alhpa' \(did you mean 'lora_alpha'\?\)"),
        ({"type": "dora", "use_doraa": True}, r"unknown LoraConfig field 'use_doraa' \(did you mean 'use_dora'\?\)"),
        ({"type": "lora", "num_experts": 4}, r"unknown LoraConfig field 'num_experts'"),
    ],
)
def test_config_from_dict_unknown_field_suggests_the_near_miss(d, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(d)


def test_config_from_dict_builds_and_validates():
    cfg = config_from_dict({"type": "mixlora", "num_experts": 4, "top_k": 1, "r": 8})
    assert cfg == MixLoraConfig(num_experts=4, top_k=1, r=8)
    cfg = config_from_dict({"type": "dora", "r": 4})
    assert isinstance(cfg, LoraConfig) and cfg.use_dora and cfg.r == 4
    cfg = config_from_dict({"type": "milora", "pooler": "mean"})
    assert isinstance(cfg, MiLoraConfig) and cfg.pooler == "mean"
    with pytest.raises(ConfigError, match=r"top_k \(9\) must not exceed num_experts \(8\)"):
        config_from_dict({"type": "mixlora", "top_k": 9})
    # the caller's dict is not consumed
    d = {"type": "lora", "r": 2}
    config_from_dict(d)
    assert d == {"type": "lora", "r": 2}


# ---------------------------------------------------------------------------------------------
# Attach-time errors


@pytest.mark.parametrize("config_cls", [LoraConfig, MixLoraConfig, MiLoraConfig])
def test_unknown_target_module_names_the_valid_ones(config_cls):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ConfigError, match=r"unknown target module 'q_prj' \(did you mean 'q_proj'\?\) for model_type 'llama'"):
        moelora.attach(model, config_cls(target_modules=["q_prj", "v_proj"], **({"top_k": 1} if config_cls is MiLoraConfig else {})))
    assert_same_model(model, before)
    assert not hasattr(model, "_moelora_ctx")


def test_unknown_target_on_phi3_lists_its_own_names():
    model = tiny_model("phi3")
    with pytest.raises(ConfigError, match=r"unknown target module 'q_proj' \(did you mean 'qkv_proj'\?\) for model_type 'phi3'; valid names: .*'gate_up_proj'"):
        moelora.attach(model, MixLoraConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize("config", [MixLoraConfig(), MiLoraConfig(), MixLoraConfig(target_modules=["c_attn"]), LoraConfig()],
                         ids=["mixlora", "milora", "mixlora-explicit-targets", "lora-default-targets"])
def test_unsupported_architecture_names_model_type_and_supported_list(config):
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model_type 'gpt2' \(supported: ") as info:
        moelora.attach(model, config)
    for name in moelora.ARCHITECTURES:
        assert name in str(info.value)
    assert_same_model(model, before)
    assert not hasattr(model, "_moelora_ctx")


def test_plain_lora_on_gpt2_conv1d_is_refused_and_model_unchanged():
    # GPT-2's projections are transformers' Conv1D, not nn.Linear: attaching must refuse, naming both.
    model = tiny_gpt2()
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"cannot adapt 'c_attn': it is a Conv1D, not nn.Linear"):
        moelora.attach(model, LoraConfig(target_modules=["c_attn"]))
    assert_same_model(model, before)
    assert not hasattr(model, "_moelora_ctx")


def test_plain_lora_on_unknown_architecture_with_explicit_linear_target_works():
    model = tiny_gpt2()
    ref = logits(model)
    moelora.attach(model, LoraConfig(r=4, target_modules=["lm_head"]))
    assert type(model.lm_head).__name__ == "AdaptedLinear"
    torch.testing.assert_close(logits(model), ref)  # B = 0: a fresh adapter is the identity
    randomize_adapters(model)
    assert not torch.allclose(logits(model), ref)
    model.train()  # and it trains (no decoder-layer table needed)
    ids = torch.randint(3, 64, (2, 5))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.lm_head.adapters["default"].lora.lora_B.grad is not None


def test_plain_lora_on_a_table_less_model_trains_under_reentrant_checkpointing():
    """GPT-NeoX has no decoder-layer table here; LoRA inside its checkpointed layers still gets its
    gradients under reentrant checkpointing, equal to those without it. transformers 5 makes the
    input embeddings require grads itself; on transformers 4 moelora does (this test fails there
    without it)."""

    def grads(checkpointing: bool) -> dict[str, torch.Tensor | None]:
        torch.manual_seed(0)
        cfg = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=64)
        model = transformers.GPTNeoXForCausalLM(cfg)
        moelora.attach(model, LoraConfig(r=4, target_modules=["query_key_value", "dense_h_to_4h"]))
        randomize_adapters(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 8
    for n in plain:
        assert checkpointed[n] is not None, n
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)


def test_attaching_the_same_adapter_name_twice_raises_and_keeps_the_first():
    model = tiny_model("llama")
    moelora.attach(model, LoraConfig(r=4), "a")
    randomize_adapters(model)
    before = snapshot(model)
    for cfg in (LoraConfig(r=4), MixLoraConfig(num_experts=2, top_k=1)):
        with pytest.raises(ValueError, match=r"an adapter named 'a' is already attached"):
            moelora.attach(model, cfg, "a")
    assert_same_model(model, before)
    assert list(moelora.get_context(model).configs) == ["a"]
    assert moelora.get_context(model).active == "a"


@pytest.mark.parametrize("name", ["a.b", "a/b", "", 3])
def test_bad_adapter_name_raises(name):
    model = tiny_model("llama")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"adapter_name must be a non-empty string without '\.' or '/', got " + re.escape(repr(name))):
        moelora.attach(model, LoraConfig(), name)
    assert_same_model(model, before)
    assert not hasattr(model, "_moelora_ctx")


def test_wrong_config_type_raises_type_error():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=r"config must be a LoraConfig, MixLoraConfig or MiLoraConfig, got dict"):
        moelora.attach(model, {"type": "lora"})
    with pytest.raises(TypeError, match=r"got AdapterConfig"):
        moelora.attach(model, moelora.config.AdapterConfig())


@pytest.mark.parametrize("arch, top_k, experts", [("llama", 8, 7), ("phi3", 5, 4)])
def test_milora_top_k_above_the_default_expert_count_raises_at_attach(arch, top_k, experts):
    model = tiny_model(arch)
    before = snapshot(model)
    with pytest.raises(ConfigError, match=rf"top_k \({top_k}\) exceeds the number of MiLoRA experts \({experts}\)"):
        moelora.attach(model, MiLoraConfig(top_k=top_k))
    assert_same_model(model, before)
    assert not hasattr(model, "_moelora_ctx")


def test_attach_does_not_mutate_the_callers_config():
    model = tiny_model("llama")
    cfg = MixLoraConfig(num_experts=2, top_k=1)
    moelora.attach(model, cfg)
    assert cfg.target_modules is None
    assert moelora.get_context(model).configs["default"].target_modules == list(moelora.ARCHITECTURES["llama"].modules)


# ---------------------------------------------------------------------------------------------
# A failure in the middle of attach (after some modules were wrapped) is rolled back


@pytest.mark.parametrize(
    "config",
    [LoraConfig(r=4), LoraConfig(r=4, use_dora=True), MixLoraConfig(num_experts=2, top_k=1), MiLoraConfig(r=4, top_k=2)],
    ids=["lora", "dora", "mixlora", "milora"],
)
@pytest.mark.parametrize("with_other_adapter", [False, True], ids=["bare", "other-attached"])
def test_failure_midway_through_attach_leaves_the_model_unchanged(monkeypatch, config, with_other_adapter):
    model = tiny_model("llama")
    if with_other_adapter:
        moelora.attach(model, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]), "other")
        randomize_adapters(model, seed=3)
    before = snapshot(model)

    real_new_lora = moelora.inject.new_lora
    calls = []

    def failing_new_lora(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:  # in the second decoder layer (7 LoRAs per layer for every method)
            raise RuntimeError("simulated out of memory")
        return real_new_lora(*args, **kwargs)

    monkeypatch.setattr(moelora.inject, "new_lora", failing_new_lora)
    with pytest.raises(RuntimeError, match="simulated out of memory"):
        moelora.attach(model, config, "new")
    monkeypatch.undo()
    assert len(calls) == 10

    # Same modules (by name and type), same parameters and requires_grad, same logits.
    assert_same_model(model, before, check_new_modules=not (with_other_adapter and isinstance(config, MiLoraConfig)))
    assert not any("new" in n.split(".") for n, _ in model.named_modules())
    if with_other_adapter:
        ctx = moelora.get_context(model)
        assert list(ctx.configs) == ["other"] and ctx.active == "other"
    else:  # no hooks, no context, no generate wrapper left behind
        assert not hasattr(model, "_moelora_ctx") and "generate" not in model.__dict__
        assert not model._forward_pre_hooks and not model._forward_hooks
        assert all(not layer._forward_pre_hooks for layer in model.model.layers)

    # and the model still takes the adapter afterwards
    moelora.attach(model, config, "new")
    assert moelora.get_context(model).active == "new"


# ---------------------------------------------------------------------------------------------
# Round-trips


ALL_CONFIGS = [
    LoraConfig(),
    LoraConfig(r=8, lora_alpha=3.5, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], use_rslora=True),
    LoraConfig(use_dora=True, base_model_name_or_path="org/model"),
    MixLoraConfig(),
    MixLoraConfig(num_experts=4, top_k=1, r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj", "down_proj"],
                  router_aux_loss_coef=0.01, router_init_range=0.05, jitter_noise=0.1, act_fn="gelu"),
    MixLoraConfig(routing="top_p", top_p=0.6, temperature=0.5, top_p_renormalize=False,
                  expert_r=4, expert_lora_alpha=16, expert_lora_dropout=0.1),
    MiLoraConfig(),
    MiLoraConfig(r=8, lora_alpha=16, top_k=1, pooler="last", activation="gelu", lb_loss_coef=0.1,
                 router_init_range=0.1, activation_lr_scale=0.5, target_modules=["q_proj", "up_proj"]),
    MiLoraConfig(pooler="mean", activation="relu"),
    MiLoraConfig(pooler="max", activation="identity", use_rslora=True),
]


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: f"{c.method}")
def test_config_round_trips_through_to_dict_and_json(cfg):
    d = cfg.to_dict()
    assert d["moelora_method"] == cfg.method
    d = json.loads(json.dumps(d))  # what adapter_config.json stores
    method = d.pop("moelora_method")
    back = config_from_dict({"type": method, **d})
    assert type(back) is type(cfg)
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()
    # the checkpoint reader takes the same dict (with the method key) from the "moelora" block
    back = config_from_checkpoint({"peft_type": "ignored", "moelora": {"config": json.loads(json.dumps(cfg.to_dict()))}}, "test")
    assert type(back) is type(cfg) and back == cfg


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: f"{c.method}")
def test_from_dict_without_the_method_key_round_trips(cfg):
    d = cfg.to_dict()
    d.pop("moelora_method")
    assert type(cfg).from_dict(d) == cfg


def test_dora_round_trips_through_the_dora_type_alias():
    cfg = LoraConfig(use_dora=True, r=4)
    d = cfg.to_dict()
    d.pop("moelora_method")
    d.pop("use_dora")
    assert config_from_dict({"type": "dora", **d}) == cfg


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: f"{c.method}")
def test_from_dict_of_to_dict_is_the_same_config(cfg):
    assert type(cfg).from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="config, not"):
        other = MiLoraConfig if not isinstance(cfg, MiLoraConfig) else MixLoraConfig
        other.from_dict(cfg.to_dict())


@pytest.mark.parametrize("make", [lambda: MixLoraConfig(top_p="0.8"), lambda: MixLoraConfig(temperature=None),
                                  lambda: MiLoraConfig(lb_loss_coef="1e-2"), lambda: MixLoraConfig(jitter_noise=None)])
def test_non_numeric_values_are_config_errors(make):
    with pytest.raises(ConfigError, match="must be a number"):
        make()


def test_detaching_the_last_adapter_restores_requires_grad():
    model = tiny_model("llama")
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)  # the user's own choice survives
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    moelora.attach(model, MixLoraConfig(num_experts=2, top_k=1, r=2))
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in flags)
    moelora.detach(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
