"""Checkpoint compatibility with the peers: Hugging Face PEFT (LoRA, DoRA) and the official
``mixlora`` 0.2.3 package / MoE-PEFT layout (MixLoRA), both directions, compared on logits.

The official ``mixlora`` package (``pip install --no-deps mixlora==0.2.3``) has defects these
tests work around on its side only:

- its FFN experts live in a plain dict (``layer.mlp.mixlora_moes[name].experts_``) that
  ``model.eval()`` never reaches, so their LoRA dropout stays on: each expert is put in eval here;
- it asserts ``lora_dropout > 0`` and an integer ``lora_alpha``;
- it builds the expert LoRAs from the top-level LoRA settings, ignoring ``expert_lora`` (MoE-PEFT
  itself honours it; a different expert rank crashes it): the ``expert_lora`` cases inject the
  experts with the ``expert_lora`` settings, as MoE-PEFT does;
- it only knows ``routing_strategy: "mixlora"`` (top-k): ``mixlora-dynamic`` is checked against its
  expert computation with MoE-PEFT's ``_dynamic_top_p`` routing written out here.
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from conftest import batch, randomize_adapters, tiny_model

import moelora

ATOL = RTOL = 1e-5
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"}

# Architectures the official package runs (its ``_compatible_model_types``) that conftest builds.
OFFICIAL_ARCHS = ["llama", "mistral", "qwen2", "gemma", "gemma2", "phi3"]


def targets_of(arch: str) -> list[str]:
    return PHI3_TARGETS if arch == "phi3" else LLAMA_TARGETS


def act_fn_of(model) -> str:
    c = model.config
    return getattr(c, "hidden_activation", None) or c.hidden_act


def forward_logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_same_logits(got, want, mask, base=None):
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], atol=ATOL, rtol=RTOL)
    if base is not None:  # the adapter must actually change the output, or the comparison is vacuous
        assert (got[keep] - base[keep]).abs().max() > 1e-3


@pytest.fixture
def peft():
    return pytest.importorskip("peft")


@pytest.fixture
def official():
    return pytest.importorskip("mixlora")


# ---------------------------------------------------------------------------------------------
# PEFT LoRA / DoRA


def randomize_peft(model, seed: int = 3, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + scale * torch.randn(p.shape, generator=g))
            elif "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize(
    "arch,use_dora", [("llama", False), ("llama", True), ("phi3", False), ("phi3", True)]
)
def test_peft_loads_ours(peft, tmp_path, arch, use_dora):
    model = tiny_model(arch)
    ids, mask = batch(model)
    base = forward_logits(model, ids, mask)
    targets = targets_of(arch)
    moelora.attach(model, moelora.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora))
    randomize_adapters(model)
    ours = forward_logits(model, ids, mask)
    moelora.save_adapter(model, tmp_path / "ad")

    theirs_model = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path / "ad")).eval()
    cfg = theirs_model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_dora, set(cfg.target_modules)) == (4, 8, use_dora, set(targets))
    assert_same_logits(forward_logits(theirs_model, ids, mask), ours, mask, base)


@pytest.mark.parametrize(
    "arch,use_dora,use_rslora",
    [("llama", False, False), ("llama", True, False), ("llama", False, True), ("phi3", False, False), ("phi3", True, False)],
)
def test_we_load_peft(peft, tmp_path, arch, use_dora, use_rslora):
    targets = targets_of(arch)
    pcfg = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets, use_dora=use_dora, use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    theirs_model = peft.get_peft_model(tiny_model(arch), pcfg)
    randomize_peft(theirs_model)
    theirs_model.eval()
    theirs_model.save_pretrained(str(tmp_path / "ad"))
    ids, mask = batch(theirs_model)
    theirs = forward_logits(theirs_model, ids, mask)

    model = tiny_model(arch)
    base = forward_logits(model, ids, mask)
    moelora.load_adapter(model, tmp_path / "ad")
    cfg = moelora.get_context(model).configs["default"]
    assert isinstance(cfg, moelora.LoraConfig)
    assert (cfg.r, cfg.lora_alpha, cfg.use_dora, cfg.use_rslora) == (4, 8, use_dora, use_rslora)
    model.eval()
    assert_same_logits(forward_logits(model, ids, mask), theirs, mask, base)


def load_peft_saved(peft, tmp_path, config):
    """A PEFT adapter (random weights) saved and loaded here: (our model with it, ids, mask, PEFT's
    logits, the base model's logits)."""
    theirs_model = peft.get_peft_model(tiny_model(), config)
    randomize_peft(theirs_model)
    theirs_model.eval().save_pretrained(str(tmp_path / "theirs"))
    ids, mask = batch(theirs_model)
    theirs = forward_logits(theirs_model, ids, mask)
    model = tiny_model()
    base = forward_logits(model, ids, mask)
    moelora.load_adapter(model, tmp_path / "theirs")
    return model, ids, mask, theirs, base


PATTERNS = {"rank_pattern": {"q_proj": 8, "layers.1.self_attn.v_proj": 2, "down_proj": 6},
            "alpha_pattern": {"v_proj": 16, "model.layers.0.mlp.down_proj": 3}}


@pytest.mark.parametrize("use_dora", [False, True])
def test_rank_and_alpha_patterns_both_ways(peft, tmp_path, use_dora):
    """PEFT's ``rank_pattern``/``alpha_pattern`` (a rank and alpha per module, by path or regex, PEFT's
    matching): PEFT's adapter loads here with every module's own shape and scale, ours loads in
    PEFT, with equal logits both ways."""
    targets = ["q_proj", "v_proj", "down_proj"]
    model, ids, mask, theirs, base = load_peft_saved(
        peft, tmp_path, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora, **PATTERNS))
    layers = model.model.layers
    shapes = [(ly.self_attn.q_proj.adapters["default"].lora.r, ly.self_attn.v_proj.adapters["default"].lora.r,
               ly.mlp.down_proj.adapters["default"].lora.r) for ly in layers]
    assert shapes == [(8, 4, 6), (8, 2, 6)]
    assert [ly.mlp.down_proj.adapters["default"].lora.scaling for ly in layers] == [3 / 6, 8 / 6]
    assert layers[1].self_attn.v_proj.adapters["default"].lora.scaling == 16 / 2
    model.eval()
    assert_same_logits(forward_logits(model, ids, mask), theirs, mask, base)
    ours_model = tiny_model()
    moelora.attach(ours_model, moelora.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora,
                                                  **PATTERNS))
    randomize_adapters(ours_model)
    ours = forward_logits(ours_model.eval(), ids, mask)
    moelora.save_adapter(ours_model, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_model(), str(tmp_path / "ours")).eval()
    assert back.peft_config["default"].rank_pattern == PATTERNS["rank_pattern"]
    assert_same_logits(forward_logits(back, ids, mask), ours, mask, base)
    with pytest.raises(moelora.ConfigError, match=r"rank_pattern\['q_proj'\] must be a positive integer"):
        moelora.LoraConfig(rank_pattern={"q_proj": 0})
    with pytest.raises(moelora.ConfigError, match="alpha_pattern key '\\(' is not a regular expression"):
        moelora.LoraConfig(alpha_pattern={"(": 2})


@pytest.mark.parametrize("peft_side", [
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]},
    {"target_modules": r".*layers\.1\.(self_attn\.q_proj|mlp\.down_proj)"},  # the same, as a regex
    {"target_modules": ["q_proj", "down_proj"], "exclude_modules": r".*layers\.0\..*"},
])
def test_adapters_of_some_layers_only_both_ways(peft, tmp_path, peft_side):
    """PEFT's ``layers_to_transform`` (or paths / a regex / exclusions selecting the same projections in
    some layers only): read as ``LoraConfig.layers_to_transform``, the other layers untouched; ours
    with it loads in PEFT. Equal logits both ways."""
    model, ids, mask, theirs, base = load_peft_saved(peft, tmp_path, peft.LoraConfig(r=4, lora_alpha=8, **peft_side))
    cfg = moelora.get_context(model).configs["default"]
    assert (cfg.target_modules, cfg.layers_to_transform) == (["down_proj", "q_proj"], [1])
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "adapters")  # layer 0: a plain Linear
    model.eval()
    assert_same_logits(forward_logits(model, ids, mask), theirs, mask, base)
    ours_model = tiny_model()
    moelora.attach(ours_model, moelora.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0]))
    randomize_adapters(ours_model)
    ours = forward_logits(ours_model.eval(), ids, mask)
    moelora.save_adapter(ours_model, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_model(), str(tmp_path / "ours")).eval()
    assert back.peft_config["default"].layers_to_transform == [0]
    assert_same_logits(forward_logits(back, ids, mask), ours, mask, base)
    with pytest.raises(moelora.ConfigError, match="layers_to_transform must be a list of distinct layer indices"):
        moelora.LoraConfig(layers_to_transform=[1, 1])
    plain = tiny_model()
    with pytest.raises(moelora.ConfigError, match=r"layers_to_transform \[7\] names layers beyond the model's 2"):
        moelora.attach(plain, moelora.LoraConfig(layers_to_transform=[7]))
    assert getattr(plain, "_moelora_ctx", None) is None


@pytest.mark.parametrize("combination", ["cat", "svd", "linear"])
def test_add_weighted_adapter_equals_peft_s(peft, tmp_path, combination):
    """``moelora.add_weighted_adapter`` (PEFT's ``add_weighted_adapter``): the combined adapter gives
    PEFT's logits for the same adapters and weights (``cat`` exactly ``sum w_i s_i B_i A_i``; a
    negative weight subtracts); the active adapter does not change; what does not combine is named."""
    second = 2 if combination != "linear" else 4
    cfgs = [peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            peft.LoraConfig(r=second, lora_alpha=4, target_modules=["q_proj", "down_proj"])]
    theirs = peft.get_peft_model(tiny_model(), cfgs[0], adapter_name="a")
    theirs.add_adapter("b", cfgs[1])
    randomize_peft(theirs)
    theirs.save_pretrained(str(tmp_path / "ad"))
    ids, mask = batch(theirs)
    theirs.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ab", combination_type=combination)
    theirs.set_adapter("ab")
    want = forward_logits(theirs.eval(), ids, mask)
    model = tiny_model()
    base = forward_logits(model, ids, mask)
    moelora.load_adapter(model, tmp_path / "ad" / "a", "a")  # PEFT saves named adapters in subdirectories
    moelora.load_adapter(model, tmp_path / "ad" / "b", "b")
    moelora.add_weighted_adapter(model, ["a", "b"], [0.7, -0.4], "ab", combination_type=combination)
    assert moelora.get_context(model).active == "b"
    cfg = moelora.get_context(model).configs["ab"]
    assert (cfg.r, cfg.lora_alpha, sorted(cfg.target_modules)) == (
        {"cat": 6, "svd": 4, "linear": 4}[combination], cfg.r, ["down_proj", "q_proj", "v_proj"])
    moelora.set_adapter(model, "ab")
    assert_same_logits(forward_logits(model.eval(), ids, mask), want, mask, base)
    if combination == "cat":  # exact: the merged delta of every module
        q = model.model.layers[0].self_attn.q_proj.adapters
        merged = {n: q[n].lora.merged_weight() for n in ("a", "b", "ab")}
        torch.testing.assert_close(merged["ab"], 0.7 * merged["a"] - 0.4 * merged["b"], rtol=1e-5, atol=1e-6)
    if combination != "linear":
        with pytest.raises(ValueError, match=r"needs adapters of one rank, got \[4, 2\]"):
            moelora.add_weighted_adapter(model, ["a", "b"], [1, 1], "x", combination_type="linear")
    moelora.attach(model, moelora.LoraConfig(r=2, use_dora=True), "d")
    with pytest.raises(ValueError, match="adapter 'd': only plain LoRA adapters combine"):
        moelora.add_weighted_adapter(model, ["a", "d"], [1, 1], "y")


@pytest.mark.parametrize("arch,targets,names", [
    ("llama", "all-linear", LLAMA_TARGETS),  # PEFT saves it as every module's path
    ("llama", r".*\.(q_proj|v_proj)", ["q_proj", "v_proj"]),  # a regex is saved as it is
    ("llama", ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj", "v_proj"], ["up_proj", "v_proj"]),
    ("phi3", "all-linear", ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]),
    ("llama", ("all-linear", ["o_proj", "mlp.down_proj"]), ["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]),
])
def test_we_load_peft_adapters_targeted_by_path_or_regex(peft, tmp_path, arch, targets, names):
    targets, exclude = targets if isinstance(targets, tuple) else (targets, None)  # PEFT's exclude_modules too
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, exclude_modules=exclude, task_type="CAUSAL_LM")
    theirs_model = peft.get_peft_model(tiny_model(arch), pcfg)
    randomize_peft(theirs_model)
    theirs_model.eval()
    theirs_model.save_pretrained(str(tmp_path / "ad"))
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["target_modules"]
    assert saved == targets if isinstance(targets, str) and targets != "all-linear" else any("." in t for t in saved)
    ids, mask = batch(theirs_model)
    theirs = forward_logits(theirs_model, ids, mask)
    model = tiny_model(arch)
    base = forward_logits(model, ids, mask)
    assert moelora.checkpoint.read_adapter_config(tmp_path / "ad").target_modules is None  # known with the model
    moelora.load_adapter(model, tmp_path / "ad")
    assert sorted(moelora.get_context(model).configs["default"].target_modules) == sorted(names)
    model.eval()
    assert_same_logits(forward_logits(model, ids, mask), theirs, mask, base)


@pytest.mark.parametrize("targets,match", [
    (["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"],
     r"adapts q_proj in layers \[0\] but other projections in other layers"),
    (["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"], "outside the decoder layers"),
    (r".*\.nothing", "selects no linear module"),
    ({"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["model.layers.1.self_attn.q_proj"]},
     r"adapts q_proj in layers \[0\] but other projections"),
    ({"target_modules": ["q_proj"], "init_lora_weights": "pissa_niter_4"}, "convert it to a plain LoRA"),
    ({"target_modules": ["q_proj"], "alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens=.* not supported"),
])
def test_peft_targets_moelora_cannot_express_are_refused_by_name(tmp_path, targets, match):
    """Per-layer targets, modules outside the decoder layers, and PEFT options that change what the
    adapter computes: a CheckpointError naming the problem, the model untouched."""
    ad = tmp_path / "ad"
    ad.mkdir()
    fields = targets if isinstance(targets, dict) else {"target_modules": targets}
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **fields}))
    from safetensors.torch import save_file

    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)},
              str(ad / "adapter_model.safetensors"))
    model = tiny_model()
    with pytest.raises(moelora.CheckpointError, match=match):
        moelora.load_adapter(model, ad)
    assert getattr(model, "_moelora_ctx", None) is None


@pytest.mark.parametrize("arch,use_dora", [("llama", False), ("llama", True), ("phi3", True)])
def test_our_merge_of_a_peft_adapter_equals_peft_merge_and_unload(peft, tmp_path, arch, use_dora):
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets_of(arch), use_dora=use_dora, task_type="CAUSAL_LM")
    theirs_model = peft.get_peft_model(tiny_model(arch), pcfg)
    randomize_peft(theirs_model)
    theirs_model.save_pretrained(str(tmp_path / "ad"))
    theirs = theirs_model.merge_and_unload().state_dict()
    model = tiny_model(arch)
    moelora.load_adapter(model, tmp_path / "ad")
    ours = moelora.merge_and_unload(model).state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("arch,use_dora", [("llama", False), ("llama", True), ("phi3", True)])
def test_training_steps_equal_peft_training_steps(peft, tmp_path, arch, use_dora):
    """The same adapter trained a few AdamW steps on the same batch by us and by PEFT ends with the
    same weights (magnitudes included): our gradients, and the DoRA norm we cache between steps,
    follow PEFT's, not only our forward."""
    from safetensors.torch import load_file

    targets = targets_of(arch)
    model = tiny_model(arch)
    moelora.attach(model, moelora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, use_dora=use_dora))
    randomize_adapters(model)
    moelora.save_adapter(model, tmp_path / "init")
    theirs_model = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path / "init"), is_trainable=True)
    ids, mask = batch(model)
    labels = ids.masked_fill(mask == 0, -100)
    for m in (model, theirs_model):
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        for _ in range(3):
            m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    moelora.save_adapter(model, tmp_path / "ours")
    ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs = peft.get_peft_model_state_dict(theirs_model)
    init = load_file(str(tmp_path / "init" / "adapter_model.safetensors"))
    assert ours.keys() == theirs.keys() and any("magnitude" in k for k in ours) == use_dora
    for k in ours:
        assert not torch.equal(ours[k], init[k]), k  # every tensor trained, or the comparison is vacuous
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-4, msg=k)


# ---------------------------------------------------------------------------------------------
# Official mixlora 0.2.3 / MoE-PEFT layout


def official_model(official, arch: str, path, expert_lora: bool = False):
    """A fresh tiny ``arch`` with the official package's MixLoRA injected from ``path``, in eval."""
    config, weights = official.load_adapter_weights(str(path), dtype=torch.float32, device="cpu")
    model = tiny_model(arch)
    if expert_lora:
        # Their defect: the experts are built with the top-level LoRA settings (a rank mismatch
        # crashes). Inject as MoE-PEFT does: attention with the top level, experts with expert_lora.
        from mixlora.model import _inject_attn_module, _inject_mlp_module

        config.model_type_ = model.config.model_type
        ecfg = copy.copy(config)
        ex = config.expert_config_
        ecfg.lora_r_, ecfg.lora_alpha_, ecfg.lora_dropout_ = ex.lora_r_, ex.lora_alpha_, ex.lora_dropout_
        ecfg.use_rslora_ = ex.use_rslora_
        for li, layer in enumerate(model.model.layers):
            _inject_attn_module(li, layer.self_attn, config, weights)
            _inject_mlp_module(li, layer.mlp, ecfg, weights)
    else:
        official.inject_adapter_in_model(model, config, weights)
    model.eval()
    for layer in model.model.layers:  # their defect: the expert dict is invisible to model.eval()
        for moe in layer.mlp.mixlora_moes.values():
            for expert in moe.experts_.values():
                expert.eval()
    return model, config


@pytest.mark.parametrize("arch", OFFICIAL_ARCHS)
def test_official_mixlora_loads_our_export(official, tmp_path, arch):
    # conftest's models are built from a config: no name, so base_model_name_or_path is unknown
    model = tiny_model(arch)
    ids, mask = batch(model)
    base = forward_logits(model, ids, mask)
    moelora.attach(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_alpha=8, lora_dropout=0.05))
    randomize_adapters(model, scale=0.2)
    ours = forward_logits(model, ids, mask)
    moelora.export_mixlora(model, tmp_path / "ad")

    theirs_model, cfg = official_model(official, arch, tmp_path / "ad")
    assert (cfg.num_experts_, cfg.top_k_, cfg.lora_r_, cfg.lora_alpha_) == (4, 2, 4, 8)
    assert cfg.act_fn_ == act_fn_of(model)
    assert {k for k, v in cfg.target_modules_.items() if v} == set(targets_of(arch))
    assert_same_logits(forward_logits(theirs_model, ids, mask), ours, mask, base)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_official_mixlora_loads_our_export_expert_lora(official, tmp_path, arch):
    """expert_lora, partial targets, and numbers given as ints or integral floats (their config
    asserts ``int`` alpha and ``float`` router settings)."""
    model = tiny_model(arch)
    model.config._name_or_path = f"tiny/{arch}"
    ids, mask = batch(model)
    targets = ["o_proj", "down_proj"] + (["qkv_proj"] if arch == "phi3" else ["q_proj", "gate_proj"])
    cfg = moelora.MixLoraConfig(
        num_experts=3, top_k=2, r=4, lora_alpha=8.0, lora_dropout=0.05, target_modules=targets, expert_r=2,
        expert_lora_alpha=6.0, expert_lora_dropout=0.1, router_aux_loss_coef=0, router_init_range=1, jitter_noise=0,
    )
    moelora.attach(model, cfg)
    randomize_adapters(model, scale=0.2)
    ours = forward_logits(model, ids, mask)
    moelora.export_mixlora(model, tmp_path / "ad")

    theirs_model, tcfg = official_model(official, arch, tmp_path / "ad", expert_lora=True)
    assert tcfg.base_model_name_or_path == f"tiny/{arch}"
    ex = tcfg.expert_config_
    assert (ex.lora_r_, ex.lora_alpha_, ex.lora_dropout_) == (2, 6, 0.1)
    assert_same_logits(forward_logits(theirs_model, ids, mask), ours, mask)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_mixlora_gradients_equal_the_official_packages(official, tmp_path, arch):
    """One backward pass of the language-model loss gives the official package's gradients for
    every router, attention LoRA and expert LoRA: our grouped, recomputing FFN trains what theirs
    trains, not only computes the same forward. (Dropout off on both sides; their forward returns
    no router loss, so the coefficient is 0 here; the aux loss is checked in test_methods.)"""
    from moelora.checkpoint import adapter_tensors

    model = tiny_model(arch)
    ids, mask = batch(model)
    labels = ids.masked_fill(mask == 0, -100)
    moelora.attach(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_alpha=8, lora_dropout=0.05,
                                                router_aux_loss_coef=0))
    randomize_adapters(model, scale=0.2)
    moelora.export_mixlora(model, tmp_path / "ad")
    before = {k: v.detach().clone() for k, v in adapter_tensors(model, "default").items()}
    model.eval()
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    with torch.no_grad():  # one SGD step of lr 1: the change of each exported tensor is its gradient
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(p.grad)
    ours = {k: before[k] - v for k, v in adapter_tensors(model, "default").items()}

    theirs_model, _ = official_model(official, arch, tmp_path / "ad")
    moes = [layer.mlp.mixlora_moes["default"] for layer in theirs_model.model.layers]
    for moe in moes:
        moe.gate_.requires_grad_(True)
    theirs_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    theirs = {}
    for li, (layer, moe) in enumerate(zip(theirs_model.model.layers, moes)):
        theirs[f"mixlora.layers.{li}.mlp.moe_gate.weight"] = moe.gate_.grad
        for name, lora in moe.experts_.items():  # "experts.{e}.{proj}"
            _, e, proj = name.split(".")
            for ab in ("lora_A", "lora_B"):
                theirs[f"mixlora.layers.{li}.mlp.{proj}.experts.{e}.{ab}.weight"] = getattr(lora, ab).weight.grad
        for proj in ATTENTION:
            if hasattr(layer.self_attn, proj):
                for ab in ("lora_A", "lora_B"):
                    theirs[f"mixlora.layers.{li}.self_attn.{proj}.{ab}.weight"] = getattr(getattr(layer.self_attn, proj), ab).weight.grad
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert theirs[k] is not None and theirs[k].abs().max() > 0, k  # every tensor gets a gradient
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-4, msg=k)


def moe_peft_checkpoint(
    model, path, targets, *, num_experts=4, r=4, lora_alpha=8, routing="mixlora", top_k=2, top_p=0.8,
    temperature=0.0, expert_lora=None, targets_as_dict=False, seed=5,
):
    """Write ``path`` as MoE-PEFT does: its ``adapter_config.json`` fields and a pickled tensor dict."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    er = expert_lora["r"] if expert_lora else r
    tensors = {}
    for li, layer in enumerate(model.model.layers):
        for t in targets:
            if t in ATTENTION:
                lin = getattr(layer.self_attn, t)
                p = f"mixlora.layers.{li}.self_attn.{t}"
                tensors[f"{p}.lora_A.weight"] = rand(r, lin.in_features)
                tensors[f"{p}.lora_B.weight"] = rand(lin.out_features, r)
        tensors[f"mixlora.layers.{li}.mlp.moe_gate.weight"] = rand(num_experts, model.config.hidden_size, scale=0.5)
        for t in targets:
            if t not in ATTENTION:
                lin = getattr(layer.mlp, t)
                for e in range(num_experts):
                    p = f"mixlora.layers.{li}.mlp.{t}.experts.{e}"
                    tensors[f"{p}.lora_A.weight"] = rand(er, lin.in_features)
                    tensors[f"{p}.lora_B.weight"] = rand(lin.out_features, er)
    config = {
        "bias": "none",
        "peft_type": "MIXLORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": f"tiny/{model.config.model_type}",
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.05,
        "target_modules": {t: (t in targets) for t in LLAMA_TARGETS + PHI3_TARGETS} if targets_as_dict else list(targets),
        "routing_strategy": routing,
        "num_experts": num_experts,
        "act_fn": act_fn_of(model),
    }
    if expert_lora:
        config["expert_lora"] = {"bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": config[
            "base_model_name_or_path"], **expert_lora}
    if routing == "mixlora":
        config["top_k"] = top_k
    else:
        config["top_p"], config["temperature"] = top_p, temperature
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config, indent=4))
    torch.save(tensors, path / "adapter_model.bin")
    return tensors


@pytest.mark.parametrize("arch", OFFICIAL_ARCHS)
def test_we_load_moe_peft_checkpoint(official, tmp_path, arch):
    model = tiny_model(arch)
    ids, mask = batch(model)
    base = forward_logits(model, ids, mask)
    moe_peft_checkpoint(model, tmp_path / "ad", targets_of(arch))
    theirs_model, _ = official_model(official, arch, tmp_path / "ad")
    theirs = forward_logits(theirs_model, ids, mask)

    moelora.load_adapter(model, tmp_path / "ad")
    cfg = moelora.get_context(model).configs["default"]
    assert isinstance(cfg, moelora.MixLoraConfig)
    assert (cfg.num_experts, cfg.top_k, cfg.r, cfg.lora_alpha, cfg.routing) == (4, 2, 4, 8, "top_k")
    assert_same_logits(forward_logits(model, ids, mask), theirs, mask, base)


def test_we_load_moe_peft_partial_targets_dict(official, tmp_path):
    """``target_modules`` as MoE-PEFT's ``{name: bool}`` dict, with some projections left out."""
    model = tiny_model("llama")
    ids, mask = batch(model)
    moe_peft_checkpoint(model, tmp_path / "ad", ["q_proj", "v_proj", "up_proj", "down_proj"], targets_as_dict=True)
    theirs_model, _ = official_model(official, "llama", tmp_path / "ad")
    moelora.load_adapter(model, tmp_path / "ad")
    assert sorted(moelora.get_context(model).configs["default"].target_modules) == ["down_proj", "q_proj", "up_proj", "v_proj"]
    assert_same_logits(forward_logits(model, ids, mask), forward_logits(theirs_model, ids, mask), mask)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_we_load_moe_peft_expert_lora(official, tmp_path, arch):
    """``expert_lora`` (a different rank and alpha for the FFN experts), with MoE-PEFT's semantics."""
    model = tiny_model(arch)
    ids, mask = batch(model)
    expert = {"r": 2, "lora_alpha": 6, "lora_dropout": 0.05}
    moe_peft_checkpoint(model, tmp_path / "ad", targets_of(arch), expert_lora=expert)
    theirs_model, _ = official_model(official, arch, tmp_path / "ad", expert_lora=True)
    moelora.load_adapter(model, tmp_path / "ad")
    cfg = moelora.get_context(model).configs["default"]
    assert (cfg.expert_rank, cfg.expert_alpha, cfg.r, cfg.lora_alpha) == (2, 6, 4, 8)
    assert_same_logits(forward_logits(model, ids, mask), forward_logits(theirs_model, ids, mask), mask)


# ---------------------------------------------------------------------------------------------
# MoE-PEFT mixlora-dynamic (top-p): the official package's experts, MoE-PEFT's routing written out


def _dynamic_top_p(probs: torch.Tensor, top_p: float, temperature: float):
    """MoE-PEFT's ``_dynamic_top_p`` semantics: applied to the softmax probabilities (divided by the
    temperature when > 0); experts by decreasing probability until the cumulative sum exceeds
    ``top_p``, the crossing one kept; the kept raw values are the weights (no renormalisation);
    dropped slots get weight 0 and index -1."""
    if temperature > 0.0:
        probs = probs / temperature
    weights, order = probs.sort(dim=-1, descending=True)
    beyond = weights.cumsum(-1) > top_p
    crossing = torch.nn.functional.one_hot(beyond.long().argmax(-1), probs.shape[-1]).bool()
    drop = beyond & ~crossing
    return weights.masked_fill(drop, 0.0), order.masked_fill(drop, -1)


def _dynamic_forward(moe, top_p: float, temperature: float):
    """Replacement for the official ``MixLoraSparseMoe.forward`` with dynamic routing."""

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        B, T, d = hidden_states.shape
        x = hidden_states.reshape(-1, d).float()
        probs = torch.softmax(torch.nn.functional.linear(x, moe.gate_.float()), dim=-1)
        weights, selected = _dynamic_top_p(probs, top_p, temperature)  # (N, E) each
        E = moe.num_experts_
        expert_mask = torch.stack([(selected == e).t() for e in range(E)])  # (E, slots, N)
        expert_states = moe.forward_fn_(expert_mask, x, hidden_states.dtype)
        out = torch.zeros_like(x)
        for e in range(E):
            slot, tok = torch.where(expert_mask[e])
            out.index_add_(0, tok, expert_states[e] * weights[tok, slot, None])
        return out.reshape(B, T, d).to(hidden_states.dtype)

    return forward


@pytest.mark.parametrize("arch,top_p,temperature", [("llama", 0.8, 0.0), ("llama", 0.4, 1.5), ("phi3", 0.7, 0.0)])
def test_we_load_moe_peft_dynamic(official, tmp_path, arch, top_p, temperature):
    model = tiny_model(arch)
    ids, mask = batch(model)
    moe_peft_checkpoint(model, tmp_path / "ad", targets_of(arch), routing="mixlora-dynamic", top_p=top_p,
                        temperature=temperature)
    moelora.load_adapter(model, tmp_path / "ad")
    cfg = moelora.get_context(model).configs["default"]
    assert (cfg.routing, cfg.top_p, cfg.temperature, cfg.top_p_renormalize) == ("top_p", top_p, temperature, False)
    ours = forward_logits(model, ids, mask)

    # The official loader only accepts "mixlora": load the same tensors as top-k, then swap the routing.
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    raw.update(routing_strategy="mixlora", top_k=2)
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(raw))
    theirs_model, _ = official_model(official, arch, tmp_path / "ad")
    n_selected = []
    for layer in theirs_model.model.layers:
        moe = layer.mlp.mixlora_moes["default"]
        layer.mlp.forward = _dynamic_forward(moe, top_p, temperature)
        x = torch.randn(64, model.config.hidden_size)
        n_selected.append((_dynamic_top_p(torch.softmax(x @ moe.gate_.t(), -1), top_p, temperature)[1] >= 0).sum(-1))
    assert len(set(torch.cat(n_selected).tolist())) > 1  # the routing really is dynamic here
    assert_same_logits(ours, forward_logits(theirs_model, ids, mask), mask)


# ---------------------------------------------------------------------------------------------
# Unsafe or malformed pickles


PWNED = []


def _record_pwned(*args):
    PWNED.append(args)
    return args


class _Evil:
    def __reduce__(self):
        return (_record_pwned, ("code ran during unpickling",))


class _Plain:
    pass


def _bin_dir(tmp_path, obj, *, raw_pickle: bool = False):
    path = tmp_path / "ad"
    moe_peft_checkpoint(tiny_model("llama"), path, ["q_proj", "down_proj"])
    if raw_pickle:
        (path / "adapter_model.bin").write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path / "adapter_model.bin")
    return path


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda t: {"mixlora": {"layers": t}}, id="nested-dict"),
        pytest.param(lambda t: list(t.values()), id="list"),
        pytest.param(lambda t: {**t, "step": 3}, id="int-value"),
        pytest.param(lambda t: {**t, 7: torch.zeros(2)}, id="int-key"),
        pytest.param(lambda t: {**t, "extra": _Plain()}, id="non-tensor-object"),
        pytest.param(lambda t: {**t, "evil": _Evil()}, id="reduce-payload"),
    ],
)
def test_bin_must_be_flat_tensor_dict(tmp_path, make):
    tensors = moe_peft_checkpoint(tiny_model("llama"), tmp_path / "good", ["q_proj", "down_proj"])
    path = _bin_dir(tmp_path, make(tensors))
    model = tiny_model("llama")
    PWNED.clear()
    with pytest.raises(moelora.CheckpointError, match="adapter_model.bin"):
        moelora.load_adapter(model, path)
    assert PWNED == []  # weights_only: nothing in the pickle was executed
    assert not hasattr(model, "_moelora_ctx")  # the model is left as it was


def test_bin_raw_pickle_payload_not_executed(tmp_path):
    path = _bin_dir(tmp_path, {"w": _Evil()}, raw_pickle=True)
    model = tiny_model("llama")
    PWNED.clear()
    with pytest.raises(moelora.CheckpointError):
        moelora.load_adapter(model, path)
    assert PWNED == []
    assert not hasattr(model, "_moelora_ctx")


@pytest.mark.parametrize("arch,act_fn", [("llama", "gelu_new"), ("gemma", "silu")])
def test_we_load_moe_peft_checkpoint_with_its_own_act_fn(official, tmp_path, arch, act_fn):
    """MoE-PEFT applies ACT2FN[act_fn] from the config, even when it is not the model's activation."""
    model = tiny_model(arch)
    ids, mask = batch(model)
    moe_peft_checkpoint(model, tmp_path / "ad", targets_of(arch))
    cfg_path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["act_fn"] = act_fn
    cfg_path.write_text(json.dumps(cfg))
    theirs_model, _ = official_model(official, arch, tmp_path / "ad")
    moelora.load_adapter(model, tmp_path / "ad")
    assert moelora.get_context(model).configs["default"].act_fn == act_fn
    assert_same_logits(forward_logits(model, ids, mask), forward_logits(theirs_model, ids, mask), mask)
