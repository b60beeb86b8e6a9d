"""PiSSA (``LoraConfig(init_lora_weights="pissa")``, ``moelora.pissa``): the initialisation equals
PEFT's, the fresh model is the base model, the saved adapter is a plain rank-2r LoRA on the original
base (read by PEFT too), training resumes exactly, and what needs the original base is refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model
from test_train import adapter, write_config

import moelora
from moelora.config import ConfigError, LoraConfig
from moelora.engine import Engine
from moelora.runconfig import load_run_config
from moelora.train import train

TARGETS = ["q_proj", "v_proj", "down_proj"]


def ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def pissa_model(init="pissa", use_rslora=False, **patterns):
    base = tiny_model("llama")
    model = copy.deepcopy(base)
    torch.manual_seed(5)  # pissa_niter's random start
    moelora.attach(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=init,
                                     use_rslora=use_rslora, target_modules=TARGETS, **patterns))
    return base, model


def perturb(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_pissa_init_equals_peft_s_and_the_fresh_model_is_the_base():
    peft = pytest.importorskip("peft")
    base, model = pissa_model("pissa")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="pissa", target_modules=TARGETS))
    layers = zip(model.model.layers, theirs.base_model.model.model.layers, base.model.layers)
    for layer, their_layer, base_layer in layers:
        for mine, other, original in [
                (layer.self_attn.q_proj, their_layer.self_attn.q_proj, base_layer.self_attn.q_proj),
                (layer.mlp.down_proj, their_layer.mlp.down_proj, base_layer.mlp.down_proj)]:
            lora = mine.adapters["default"].lora
            torch.testing.assert_close(lora.lora_A[0], other.lora_A["default"].weight, rtol=0, atol=1e-6)
            torch.testing.assert_close(lora.lora_B[0], other.lora_B["default"].weight, rtol=0, atol=1e-6)
            torch.testing.assert_close(mine.base_layer.weight, other.base_layer.weight, rtol=0, atol=1e-6)
            assert (mine.base_layer.weight - original.weight).abs().max() > 1e-3  # the base holds the residual
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, base(ids()).logits, rtol=0, atol=1e-5)


def test_pissa_niter_is_near_the_best_rank_r_part():
    """``pissa_niter_N`` (``torch.svd_lowrank``; its random start differs from PEFT's, which draws other
    numbers before it): the model is still exactly the base, and ``s B0 A0`` is nearly the best rank-r
    approximation of ``W`` (residual within 3% of the exact SVD's)."""
    base, model = pissa_model("pissa_niter_4")
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, base(ids()).logits, rtol=0, atol=1e-5)
    for layer, original in zip(model.model.layers, base.model.layers):
        wrapper, w = layer.mlp.down_proj, original.mlp.down_proj.weight
        lora = wrapper.adapters["default"].lora
        residual = (w - lora.scaling * lora.lora_B[0] @ lora.lora_A[0]).norm()
        best = torch.linalg.svdvals(w)[4:].square().sum().sqrt()
        assert best <= residual <= 1.03 * best, (residual, best)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_a_saved_pissa_adapter_is_a_plain_lora_on_the_original_base(tmp_path, use_rslora):
    """``W_res + s B A = W + s [B B0][A; -A0]``: the checkpoint is a rank-2r LoRA with the same scale
    (alpha x 2, or x sqrt(2) with rsLoRA) which, on an untouched base, gives the trained model's
    outputs, loaded by moelora, by PEFT and served by the engine."""
    base, model = pissa_model(use_rslora=use_rslora)
    perturb(model)
    with torch.no_grad():
        want = model(ids()).logits
    moelora.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["init_lora_weights"], cfg["moelora"]["pissa"]["r"]) == (8, True, 4)
    assert cfg["lora_alpha"] == pytest.approx(8 * 2**0.5 if use_rslora else 16)
    loaded = moelora.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert not moelora.get_context(loaded).configs["default"].is_pissa
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, want, rtol=0, atol=1e-5)
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids()).logits, want, rtol=0, atol=1e-5)
    eng = Engine(copy.deepcopy(base), type("Tok", (), {"eos_token_id": 2, "pad_token_id": 0,
                                                         "decode": lambda self, t, **k: str(t)})())
    eng.load_adapter("p", str(tmp_path / "a"))
    prompt = ids()[0].tolist()
    got = eng.generate([prompt], ["p"], moelora.engine.SamplingParams(max_tokens=5, ignore_eos=True))[0]["token_ids"]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got == out[0, len(prompt):].tolist()


def test_pissa_refuses_what_needs_the_original_base_and_detach_gives_it_back():
    base, model = pissa_model()
    x = ids()
    with pytest.raises(ValueError, match="PiSSA: the base weights hold its residual"):
        with moelora.disable_adapter(model), torch.no_grad():
            model(x)
    with pytest.raises(ValueError, match="adapter 'default' is PiSSA"):
        moelora.attach(model, LoraConfig(r=2), "other")
    with_plain = copy.deepcopy(base)
    moelora.attach(with_plain, LoraConfig(r=2), "plain")
    with pytest.raises(ValueError, match=r"its model's only adapter: \['plain'\] already attached"):
        moelora.attach(with_plain, LoraConfig(init_lora_weights="pissa"), "p")
    with pytest.raises(ValueError, match="cannot serve the base or other adapters"):
        Engine(model, object()).add_attached("default")
    with pytest.raises(ConfigError, match="PiSSA is for LoRA, not DoRA"):
        LoraConfig(use_dora=True, init_lora_weights="pissa")
    with pytest.raises(ConfigError, match="init_lora_weights must be true, 'gaussian', 'pissa' or 'pissa_niter_N'"):
        LoraConfig(init_lora_weights="olora")
    perturb(model)
    moelora.detach(model)  # W_res + s B0 A0 back into the base (B0, A0: the initial ones, not the trained)
    for (n, p), q in zip(model.named_parameters(), base.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def test_merging_a_pissa_adapter_gives_the_trained_model():
    base, model = pissa_model("pissa_niter_2")
    perturb(model)
    with torch.no_grad():
        want = model(ids()).logits
        merged = moelora.merge_and_unload(model)
        assert not hasattr(merged, "_moelora_ctx")
        torch.testing.assert_close(merged(ids()).logits, want, rtol=0, atol=1e-5)


def test_gaussian_init_draws_a_from_n_0_1_over_r_and_zeros_b():
    model = tiny_model("llama")
    moelora.attach(model, LoraConfig(r=8, init_lora_weights="gaussian", target_modules=["q_proj"]))
    a = torch.cat([ly.self_attn.q_proj.adapters["default"].lora.lora_A.flatten() for ly in model.model.layers])
    assert abs(a.std().item() - 1 / 8) < 0.01 and abs(a.mean().item()) < 0.01
    assert all(ly.self_attn.q_proj.adapters["default"].lora.lora_B.abs().sum() == 0 for ly in model.model.layers)


def pissa_run(tmp_path, tiny_model_dir, name, **train_kw):
    path = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, tmp_path / name, **train_kw)
    cfg = json.loads(path.read_text())
    cfg["method"] = {"type": "lora", "r": 4, "lora_alpha": 8, "init_lora_weights": "pissa_niter_2"}
    path.write_text(json.dumps(cfg))
    return path


def test_pissa_training_resumes_exactly_and_saves_a_plain_lora(tmp_path, tiny_model_dir):
    """A PiSSA run's checkpoints are converted LoRAs; resuming splits one back (its A0, B0 checked
    against the ones recomputed from the base) and ends with the uninterrupted run's adapter."""
    full = train(load_run_config(pissa_run(tmp_path, tiny_model_dir, "a")), progress=False)
    cfg_b = pissa_run(tmp_path, tiny_model_dir, "b")
    train(load_run_config(cfg_b), progress=False, _stop_after=3)
    resumed = train(load_run_config(cfg_b), resume=True, progress=False)
    a, b = adapter(full), adapter(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.shape[0] == 8 for k, t in a.items() if "lora_A" in k)  # rank 2 x 4
    cfg = json.loads((full / "adapter_config.json").read_text())
    assert cfg["moelora"]["pissa"]["init_lora_weights"] == "pissa_niter_2" and cfg["r"] == 8
    cfg_c = pissa_run(tmp_path, tiny_model_dir, "c", seed=4)  # another seed: another random start
    train(load_run_config(cfg_c), progress=False, _stop_after=3)
    c = json.loads(cfg_c.read_text())
    c["train"]["seed"] = 3
    cfg_c.write_text(json.dumps(c))
    with pytest.raises(Exception, match="its PiSSA initialisation .A0, B0. differs"):
        train(load_run_config(cfg_c), resume=True, progress=False)


def test_pissa_run_configs_refuse_what_needs_the_original_base(tmp_path, tiny_model_dir):
    path = pissa_run(tmp_path, tiny_model_dir, "r")
    for override, why in [("train.stage=dpo", "stage dpo compares it with the base model"),
                          ("quantization=4bit", "a 4bit base cannot be decomposed"),
                          ("train.fsdp=true", "FSDP/DeepSpeed shard the base")]:
        with pytest.raises(ConfigError, match=why):
            load_run_config(path, [override])
    cfg = json.loads(path.read_text())
    cfg["adapters"] = {"a": cfg.pop("method"), "b": {"type": "lora"}}
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="several adapters share its base"):
        load_run_config(path)


def test_pissa_with_rank_and_alpha_patterns_saves_and_splits_back(tmp_path):
    """Per-module ranks and alphas (``rank_pattern``/``alpha_pattern``): each module's principal part at
    its own rank; saved converted with every rank doubled and every alpha scaled, equal on the base;
    loaded back into the same PiSSA adapter (a resume), each module's ``A``/``B`` split at its rank."""
    patterns = {"rank_pattern": {"q_proj": 6, "layers.1.mlp.down_proj": 2}, "alpha_pattern": {"v_proj": 3}}
    base, model = pissa_model("pissa", **patterns)
    assert [ly.self_attn.q_proj.adapters["default"].lora.r for ly in model.model.layers] == [6, 6]
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, base(ids()).logits, rtol=0, atol=1e-5)
    perturb(model)
    with torch.no_grad():
        want = model(ids()).logits
    moelora.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"q_proj": 12, "layers.1.mlp.down_proj": 4} and cfg["alpha_pattern"] == {"v_proj": 6}
    loaded = moelora.load_adapter(copy.deepcopy(base), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()).logits, want, rtol=0, atol=1e-5)
    _, again = pissa_model("pissa", **patterns)  # the same initialisation: the split's check passes
    moelora.load_adapter(again, tmp_path / "a")
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(again.get_parameter(n), p, rtol=0, atol=0, msg=n)
