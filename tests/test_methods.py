"""Equivalences of the methods on tiny models: the reference forms, the losses, gradients, dropout."""

import pytest
import torch
from conftest import ARCHS, batch, randomize_adapters, tiny_model

import moelora
from moelora.methods.mixlora import MixLoraExperts, MixLoraFFN

METHOD_CONFIGS = {
    "lora": lambda: moelora.LoraConfig(r=4, lora_alpha=8),
    "dora": lambda: moelora.LoraConfig(r=4, lora_alpha=8, use_dora=True),
    "mixlora": lambda: moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_alpha=8),
    "mixlora_top_p": lambda: moelora.MixLoraConfig(num_experts=4, routing="top_p", top_p=0.6, r=4, lora_alpha=8),
    "milora": lambda: moelora.MiLoraConfig(r=4, lora_alpha=8, top_k=3),
}


def _logits(model, ids, mask, **kw):
    with torch.no_grad():
        return model(ids, attention_mask=mask, **kw).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_fresh_adapter_is_the_base_model(arch, method):
    model = tiny_model(arch)
    ids, mask = batch(model)
    base = _logits(model, ids, mask)
    moelora.attach(model, METHOD_CONFIGS[method]())
    got = _logits(model, ids, mask)
    keep = mask.bool()
    # LoRA/DoRA/MiLoRA: B = 0 adds exact zeros. MixLoRA: sum_j w_j h = h up to float rounding (w sums to 1).
    torch.testing.assert_close(got[keep], base[keep], atol=1e-6, rtol=0)
    assert any(p.requires_grad for p in model.parameters())
    assert all(not p.requires_grad for n, p in model.named_parameters() if not moelora.inject.is_adapter_parameter(n))


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_mixlora_one_expert_top1_is_lora(arch):
    mix = tiny_model(arch)
    moelora.attach(mix, moelora.MixLoraConfig(num_experts=1, top_k=1, r=4, lora_alpha=8, lora_dropout=0.0))
    randomize_adapters(mix)
    lora = tiny_model(arch)
    moelora.attach(lora, moelora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    mix_t = moelora.checkpoint.adapter_tensors(mix, "default")
    lora_state = {}
    for key, t in mix_t.items():
        if "moe_gate" in key:
            continue
        _, _, li, where, proj, *rest = key.split(".")
        ab = rest[-2]  # lora_A / lora_B
        lora_state[f"base_model.model.model.layers.{li}.{where}.{proj}.{ab}.weight"] = t
    with torch.no_grad():
        for key, p, i in moelora.methods.checkpoint_entries(lora, moelora.get_context(lora).configs["default"], "default"):
            p[i].copy_(lora_state[key])
    ids, mask = batch(mix)
    keep = mask.bool()
    torch.testing.assert_close(_logits(mix, ids, mask)[keep], _logits(lora, ids, mask)[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma"])
@pytest.mark.parametrize("routing", ["top_k", "top_p"])
def test_fast_mixlora_equals_the_naive_per_expert_loop(arch, routing):
    model = tiny_model(arch)
    cfg = moelora.MixLoraConfig(num_experts=4, top_k=2, routing=routing, top_p=0.5, r=4, lora_alpha=8, lora_dropout=0.0)
    moelora.attach(model, cfg)
    randomize_adapters(model, scale=0.3)
    ids, mask = batch(model)
    results = {}
    for backend in ("reference", "torch", "grouped"):
        moelora.set_backend(model, backend)
        model.zero_grad()
        model.train()
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[backend] = (out.loss.detach(), _logits(model.eval(), ids, mask), grads)
    ref = results["reference"]
    for fast in (results["torch"], results["grouped"]):
        torch.testing.assert_close(fast[0], ref[0])
        torch.testing.assert_close(fast[1], ref[1], atol=1e-5, rtol=1e-5)
        for n in ref[2]:
            torch.testing.assert_close(fast[2][n], ref[2][n], atol=1e-5, rtol=1e-4, msg=n)


def _capture_ffn_inputs(model):
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.append(a[0].detach()))
             for m in model.modules() if isinstance(m, moelora.methods.mixlora.MixLoraFFN)]
    return inputs, hooks


def test_mixlora_training_loss_adds_the_aux_loss_over_non_padding_tokens():
    model = tiny_model()
    coef = 0.5
    moelora.attach(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0, router_aux_loss_coef=coef))
    randomize_adapters(model)
    ids, mask = batch(model)
    inputs, hooks = _capture_ffn_inputs(model)
    model.train()
    out = model(ids, attention_mask=mask, labels=ids)
    for h in hooks:
        h.remove()
    lm = model.eval()(ids, attention_mask=mask, labels=ids).loss  # eval: the router loss is not added
    # METHODS.md: stack all layers' non-pad router logits, P = softmax, M = one_hot(topk), f = mean_N M.
    gates = [m.adapters["default"].moe_gate for m in model.modules() if isinstance(m, moelora.methods.mixlora.MixLoraFFN)]
    logits = torch.cat([(x @ g.T)[mask.bool()] for x, g in zip(inputs, gates)])  # (N, E)
    P = logits.softmax(-1)
    M = torch.nn.functional.one_hot(P.topk(2, -1).indices, 4).float()  # (N, k, E)
    aux = 4 * (M.mean(0) * P.mean(0)).sum()
    torch.testing.assert_close(out.loss, lm + coef * aux, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.router_loss, coef * aux, atol=1e-6, rtol=1e-5)


def test_milora_training_loss_adds_the_lb_loss():
    model = tiny_model()
    moelora.attach(model, moelora.MiLoraConfig(r=4, top_k=2, lora_dropout=0.0, lb_loss_coef=0.3))
    randomize_adapters(model)
    ids, mask = batch(model)
    model.train()
    out = model(ids, attention_mask=mask, labels=ids)
    ctx = moelora.get_context(model)
    per_layer = [moelora.routing.milora_lb_loss(r.logits) for r in ctx.records["default"]]
    assert len(per_layer) == model.config.num_hidden_layers
    lm = model.eval()(ids, attention_mask=mask, labels=ids).loss
    torch.testing.assert_close(out.loss, lm + 0.3 * torch.stack(per_layer).mean(), atol=1e-5, rtol=1e-5)


def test_milora_routing_uses_prompt_tokens_only():
    model = tiny_model()
    moelora.attach(model, moelora.MiLoraConfig(r=4, top_k=2, pooler="attention"))
    randomize_adapters(model)
    ctx = moelora.get_context(model)
    ids, mask = batch(model, B=3, T=6)
    answer = torch.randint(3, 100, (3, 4))
    full = torch.cat([ids, answer], 1)
    full_mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1)
    _logits(model, ids, mask)  # prompt alone: every non-padding token is the prompt
    prompt_gates = {k: v.clone() for k, v in ctx.gates["default"].items()}
    lengths = mask.sum(1)
    _logits(model, full, full_mask, prompt_lengths=lengths)  # training-style forward on prompt + answer
    for layer, g in prompt_gates.items():
        torch.testing.assert_close(ctx.gates["default"][layer], g)
    _logits(model, full, full_mask)  # without prompt_lengths the answer counts as prompt: routing differs
    assert any(not torch.allclose(ctx.gates["default"][layer], g) for layer, g in prompt_gates.items())


def test_milora_delta_is_gate_weighted_lora():
    """One projection by hand: y = W x + w_e * s * B A x with w_e the sequence's gate."""
    model = tiny_model()
    moelora.attach(model, moelora.MiLoraConfig(r=4, lora_alpha=8, top_k=2, lora_dropout=0.0))
    randomize_adapters(model)
    ids, mask = batch(model)
    q = model.model.layers[1].self_attn.q_proj
    seen = {}
    q.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    _logits(model, ids, mask)
    gate = moelora.get_context(model).gates["default"][1][:, 0]  # q_proj is expert 0
    lora = q.adapters["default"].lora
    x = seen["x"]
    want = x @ q.weight.T + gate.view(-1, 1, 1) * (x @ lora.lora_A[0].T @ lora.lora_B[0].T) * lora.scaling
    torch.testing.assert_close(seen["y"], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_gradients_reach_every_adapter_parameter_and_no_base_parameter(method):
    model = tiny_model()
    cfg = METHOD_CONFIGS[method]()
    if isinstance(cfg, moelora.MiLoraConfig):
        cfg.top_k = 7  # every expert selected, so every LoRA is on the gradient path
    if isinstance(cfg, moelora.MixLoraConfig):
        cfg.top_k, cfg.routing = 4, "top_k"
    moelora.attach(model, cfg)
    randomize_adapters(model)
    model.train()
    ids, mask = batch(model)
    model(ids, attention_mask=mask, labels=ids).loss.backward()
    trainable = 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            trainable += 1
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    assert trainable > 0


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_dropout_active_in_train_off_in_eval(method):
    model = tiny_model()
    cfg = METHOD_CONFIGS[method]()
    cfg.lora_dropout = 0.5
    moelora.attach(model, cfg)
    randomize_adapters(model, scale=0.3)
    ids, mask = batch(model)
    model.eval()
    torch.testing.assert_close(_logits(model, ids, mask), _logits(model, ids, mask), atol=0, rtol=0)
    model.train()
    assert not torch.allclose(_logits(model, ids, mask), _logits(model, ids, mask))


def test_router_loss_is_reported_in_eval_but_not_added():
    model = tiny_model()
    moelora.attach(model, moelora.MixLoraConfig(num_experts=4, r=4))
    ids, mask = batch(model)
    out = model.eval()(ids, attention_mask=mask, labels=ids)
    assert out.router_loss > 0
    assert "router_loss" not in out.keys()  # an attribute: Trainer's logits tuple stays clean


def test_several_adapters_switch_and_detach():
    model = tiny_model()
    ids, mask = batch(model)
    base = _logits(model, ids, mask)
    moelora.attach(model, moelora.LoraConfig(r=4), adapter_name="a")
    moelora.attach(model, moelora.MixLoraConfig(num_experts=2, top_k=1, r=4), adapter_name="b")
    moelora.attach(model, moelora.MiLoraConfig(r=4, top_k=2), adapter_name="c")
    randomize_adapters(model)
    outs = {}
    for name in ("a", "b", "c"):
        moelora.set_adapter(model, name)
        outs[name] = _logits(model, ids, mask)
    assert not torch.allclose(outs["a"], outs["b"]) and not torch.allclose(outs["b"], outs["c"])
    moelora.set_adapter(model, None)
    torch.testing.assert_close(_logits(model, ids, mask), base)
    moelora.set_adapter(model, "a")
    torch.testing.assert_close(_logits(model, ids, mask), outs["a"])
    moelora.detach(model, "b")
    moelora.set_adapter(model, "c")
    torch.testing.assert_close(_logits(model, ids, mask), outs["c"])
    moelora.detach(model)
    assert not hasattr(model, "_moelora_ctx")
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(_logits(model, ids, mask), base)
    assert all(p.requires_grad for p in model.parameters())  # detach restores what attach froze


def test_disable_adapter_runs_the_base_and_restores_the_active_adapter():
    model = tiny_model()
    ids, mask = batch(model)
    base = _logits(model, ids, mask)
    moelora.attach(model, moelora.MixLoraConfig(num_experts=2, top_k=1, r=4), adapter_name="b")
    randomize_adapters(model)
    adapted = _logits(model, ids, mask)
    assert not torch.allclose(adapted, base)
    with moelora.disable_adapter(model):
        torch.testing.assert_close(_logits(model, ids, mask), base)
    torch.testing.assert_close(_logits(model, ids, mask), adapted)
    with pytest.raises(RuntimeError, match="inside"):
        with moelora.disable_adapter(model):
            raise RuntimeError("inside")
    torch.testing.assert_close(_logits(model, ids, mask), adapted)  # restored after an exception too
    with moelora.disable_adapter(model):
        moelora.detach(model, "b")
        moelora.attach(model, moelora.LoraConfig(r=4), adapter_name="c")  # the previous one is gone:
    assert moelora.get_context(model).active == "c"  # what was set inside stays


def test_count_parameters_and_param_groups():
    model = tiny_model()
    moelora.attach(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4))
    counts = moelora.count_parameters(model)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    d, inter, L = 64, 96, 2
    attn = 4 * (4 * d + d * 4) - 2 * (4 * d) + 2 * (4 * 32)  # k_proj/v_proj output 32 (2 kv heads x 16)
    ffn_expert = (4 * d + inter * 4) * 2 + (4 * inter + d * 4)
    assert counts["trainable"] == L * (attn + 4 * ffn_expert + 4 * d)
    assert counts["activated"] == L * (attn + 2 * ffn_expert + 4 * d)
    m2 = tiny_model()
    moelora.attach(m2, moelora.MiLoraConfig(r=4))
    groups = moelora.param_groups(m2, lr=1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3 * 0.01]
    assert sum(p.numel() for g in groups for p in g["params"]) == moelora.count_parameters(m2)["trainable"]
    # LoRA+: every lora_B (attention LoRAs and the experts') in its own group at lr x ratio
    groups = moelora.param_groups(model, lr=1e-3, weight_decay=0.1, loraplus_lr_ratio=16)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["lr"] for g in groups] == [1e-3, 1e-3 * 16] and groups[1]["weight_decay"] == 0.1
    fast = {names[id(p)] for p in groups[1]["params"]}
    assert fast == {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("lora_B")}
    assert any(".experts" in n or "mixlora" in n for n in fast) and any("q_proj" in n for n in fast)
    assert sum(p.numel() for g in groups for p in g["params"]) == counts["trainable"]


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_trains_under_bf16_autocast_with_float32_router_logits(method, monkeypatch):
    """`train.precision: bf16` runs the model under autocast: the routers must still compute their
    logits in float32 (METHODS.md), and MiLoRA once failed there (scatter of bf16 into float32)."""
    model = tiny_model("llama")
    moelora.attach(model, METHOD_CONFIGS[method]())
    randomize_adapters(model)
    ids, mask = batch(model)
    seen = []
    real = moelora.routing.top_k_routing

    def spy(logits, k):
        seen.append(logits.dtype)
        return real(logits, k)

    for mod in (moelora.routing, moelora.methods.mixlora):
        monkeypatch.setattr(mod, "top_k_routing", spy)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask, labels=ids, prompt_lengths=torch.full((ids.shape[0],), 3))
    assert out.logits.dtype == torch.bfloat16  # autocast is really on
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    if method.startswith("mixlora") and "top_p" not in method or method == "milora":
        assert seen and set(seen) == {torch.float32}


@pytest.mark.parametrize("method", ["lora", "dora", "mixlora", "milora"])
def test_lora_products_run_on_autocasts_dtype_without_a_float32_copy_of_the_input(method, monkeypatch):
    """Under bf16 autocast the float32 adapters' products run in bf16 anyway: the input must reach
    them in bf16, not upcast first (a float32 copy of every adapted input, k copies of the FFN's
    hidden activations for MixLoRA). Without autocast they stay float32 (as PEFT)."""
    model = tiny_model("llama")
    moelora.attach(model, METHOD_CONFIGS[method]())
    randomize_adapters(model)
    ids, mask = batch(model)
    seen = []
    real = torch.nn.functional.linear
    lora_A = {m.lora_A.untyped_storage().data_ptr() for m in model.modules() if isinstance(m, moelora.lora.LoraWeights)}

    def spy(x, w, *a, **k):
        if w.untyped_storage().data_ptr() in lora_A:  # an adapter's A product (not a router's, nor the base)
            seen.append(x.dtype)
        return real(x, w, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    seen.clear()
    out = model(ids, attention_mask=mask, labels=ids)
    assert seen and set(seen) == {torch.float32}


def _saved_bytes_and_grads(recompute: bool, arch: str = "llama"):
    torch.manual_seed(0)
    model = tiny_model(arch)
    moelora.attach(model, moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_alpha=8, lora_dropout=0.1))
    randomize_adapters(model)
    moelora.set_recompute(model, recompute)
    assert {m.recompute for m in model.modules() if isinstance(m, moelora.methods.mixlora.MixLoraExperts)} == {recompute}
    ids, mask = batch(model, B=4, T=16)
    model.train()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(123)  # the same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return sum(saved), out.loss.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "phi3"])  # separate and fused gate/up
def test_mixlora_recomputed_experts_give_the_same_gradients_and_keep_less(arch):
    """Training recomputes the expert part of the FFN (k copies of the hidden activations) in the
    backward pass instead of keeping it: same loss and gradients (dropout masks replayed), less kept."""
    kept, loss, grads = _saved_bytes_and_grads(True, arch)
    kept_plain, loss_plain, grads_plain = _saved_bytes_and_grads(False, arch)
    torch.testing.assert_close(loss, loss_plain, atol=0, rtol=0)
    assert grads.keys() == grads_plain.keys() and len(grads) > 0
    for n in grads:
        torch.testing.assert_close(grads[n], grads_plain[n], atol=1e-6, rtol=1e-5, msg=n)
    assert kept < 0.8 * kept_plain, (kept, kept_plain)


def _checkpointing_step(method: str, checkpointing: dict | None, arch: str = "llama"):
    """One training forward/backward with transformers' gradient checkpointing set as given (None:
    off): the loss, the adapter gradients, bytes autograd kept, MixLoRA expert-part runs, records."""
    model = randomize_adapters(moelora.attach(tiny_model(arch), METHOD_CONFIGS[method]()))
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model.train()
    runs = []
    for m in model.modules():
        if isinstance(m, MixLoraExperts):
            original = m._experts
            m._experts = lambda *a, _f=original: runs.append(1) or _f(*a)
    ids, mask = batch(model, B=3, T=10)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(7)  # the same dropout masks in both runs
    kw = {"prompt_lengths": mask.sum(1) - 2} if method == "milora" else {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids, attention_mask=mask, labels=ids, **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    records = len(moelora.get_context(model).records.get("default", []))
    return out.loss.detach(), grads, sum(saved), len(runs), records


@pytest.mark.parametrize("method", ["lora", "dora", "mixlora", "milora"])
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less(method, arch):
    """transformers' (non-reentrant) gradient checkpointing: the same loss and gradients, router
    loss included; the recompute in the backward records no router call twice, and MixLoRA does
    not recompute its expert part a third time inside the recomputed layer."""
    loss, grads, kept, runs, records = _checkpointing_step(method, None, arch)
    loss_c, grads_c, kept_c, runs_c, records_c = _checkpointing_step(method, {"use_reentrant": False}, arch)
    torch.testing.assert_close(loss_c, loss, atol=0, rtol=0)
    assert grads_c.keys() == grads.keys() and sum(g.abs().sum() > 0 for g in grads_c.values()) > len(grads) / 2
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], atol=1e-6, rtol=1e-5, msg=n)
    assert kept_c < 0.5 * kept, (kept_c, kept)
    assert records_c == records == (2 if method in ("mixlora", "milora") else 0)  # one per layer
    if method == "mixlora":
        assert runs == runs_c == 4  # per layer: forward + one recompute (MixLoRA's own, or the layer's)


@pytest.mark.parametrize("method", ["mixlora", "milora"])
def test_reentrant_gradient_checkpointing_is_refused_for_routers(method):
    """Reentrant checkpointing runs the forward without autograd: the router loss would get no
    gradient. Refused with the fix named; plain LoRA trains under it unchanged."""
    with pytest.raises(ValueError, match=f"{method} cannot train under reentrant gradient checkpointing.*use_reentrant': False"):
        _checkpointing_step(method, {"use_reentrant": True})
    loss, grads, *_ = _checkpointing_step("lora", None)
    loss_c, grads_c, *_ = _checkpointing_step("lora", {"use_reentrant": True})
    torch.testing.assert_close(loss_c, loss, atol=0, rtol=0)
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merge_and_unload_gives_a_plain_model_with_the_adapters_outputs(arch, method):
    model = tiny_model(arch)
    ids, mask = batch(model)
    base = _logits(model, ids, mask)
    randomize_adapters(moelora.attach(model, METHOD_CONFIGS[method]()))
    moelora.attach(model, METHOD_CONFIGS["mixlora"](), adapter_name="other")  # removed too
    moelora.set_adapter(model, "default")
    adapted = _logits(model, ids, mask)
    merged = moelora.merge_and_unload(model)
    assert merged is model and not hasattr(model, "_moelora_ctx")
    assert not any(isinstance(m, (moelora.lora.AdaptedLinear, MixLoraFFN)) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # as before attach
    out = _logits(model, ids, mask)
    torch.testing.assert_close(out, adapted, atol=2e-5, rtol=1e-5)
    assert (out - base).abs().max() > 1e-2  # the adapter mattered


def test_merge_and_unload_into_a_bfloat16_base():
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids, mask = batch(model)
    randomize_adapters(moelora.attach(model, METHOD_CONFIGS["dora"]()))
    adapted = _logits(model, ids, mask).float()
    moelora.merge_and_unload(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = _logits(model, ids, mask).float()
    assert (out - adapted).abs().max() < 0.05 * adapted.abs().max()  # bf16 rounding of the merged weights


@pytest.mark.parametrize("method", ["mixlora", "milora"])
def test_merge_refuses_routed_methods_and_changes_nothing(method):
    model = randomize_adapters(moelora.attach(tiny_model("llama"), METHOD_CONFIGS[method]()))
    ids, mask = batch(model)
    before = _logits(model, ids, mask)
    with pytest.raises(ValueError, match=f"is {method}: only LoRA and DoRA merge"):
        moelora.merge_and_unload(model)
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        moelora.merge_and_unload(model, "nope")
    torch.testing.assert_close(_logits(model, ids, mask), before, atol=0, rtol=0)
