"""Mixed batches: rows of one forward use different adapters (``adapter_names=``), any method.

Every row must get exactly what running its adapter alone on that row gives, the frozen layers run
once for the whole batch, and generation, router losses and gradients follow each row's adapter.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, batch, randomize_adapters, tiny_model

import moelora
from moelora import LoraConfig, MiLoraConfig, MixLoraConfig

CONFIGS = {
    "lora": LoraConfig(r=4, lora_alpha=8),
    "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True),
    "mixlora": MixLoraConfig(num_experts=4, top_k=2, r=4, lora_alpha=8),
    "milora": MiLoraConfig(r=4, lora_alpha=8, top_k=2),
    "lora_mlp": LoraConfig(r=2, lora_alpha=4, target_modules=["down_proj"]),
}


def zoo(arch: str = "llama", names=tuple(CONFIGS)):
    model = tiny_model(arch)
    for name in names:
        cfg = CONFIGS[name]
        if arch == "phi3" and cfg.target_modules == ["down_proj"]:
            cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["gate_up_proj"])
        moelora.attach(model, cfg, name)
    return randomize_adapters(model).eval()


def alone(model, ids, mask, names):
    """Each row run in a batch of its own with its adapter active."""
    rows = []
    for b, name in enumerate(names):
        moelora.set_adapter(model, name)
        rows.append(model(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1]).logits)
    return torch.cat(rows)


def assert_mixed_equals_alone(model, names):
    ids, mask = batch(model, B=len(names), T=6)
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        ref = alone(model, ids, mask, names)
    real = mask.bool()
    torch.testing.assert_close(mixed[real], ref[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_equals_each_row_alone(arch):
    assert_mixed_equals_alone(zoo(arch), ["mixlora", None, "lora", "milora", "dora", "mixlora", "lora_mlp", "milora"])


@pytest.mark.parametrize("layout,names", [
    ("by_slot", ["lora", "dora", None, "milora", "lora_mlp", "mixlora"]),  # a few rows per adapter
    ("dense", ["lora"] * 6 + ["dora", None, "milora"]),  # most rows on one adapter: masked dense
])
def test_both_packed_layouts_equal_each_row_alone(layout, names, monkeypatch):
    import moelora.lora as lora_module

    used = []
    for fn in ("packed_lora", "packed_lora_by_slot"):
        original = getattr(lora_module, fn)
        monkeypatch.setattr(lora_module, fn, lambda *a, _f=original, _n=fn: used.append(_n) or _f(*a))
    assert_mixed_equals_alone(zoo(), names)
    assert set(used) == {"packed_lora_by_slot" if layout == "by_slot" else "packed_lora"}


def test_an_adapter_replaced_under_the_same_name_is_not_served_from_the_old_pack():
    model = zoo(names=("lora", "dora", "milora"))
    names = ["lora", "dora", "milora", "lora"]
    ids, mask = batch(model, B=len(names), T=5)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        moelora.detach(model, "lora")
        moelora.attach(model, CONFIGS["lora"], "lora")
        for n, p in model.named_parameters():  # new tensors, new values; the other adapters untouched
            if ".adapters.lora." in n:
                p.copy_(torch.randn_like(p) * 0.1)
        after = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        ref = alone(model, ids, mask, names)
    real = mask.bool()
    torch.testing.assert_close(after[real], ref[real], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(after[0], before[0])


def test_pooled_mixlora_tenants_follow_weight_updates_and_replacement():
    """Several MixLoRA tenants are routed and computed together from a pooled copy of their
    routers and experts: an in-place update or a replaced adapter must not be served stale."""
    model = tiny_model("llama")
    for name in ("m1", "m2"):
        moelora.attach(model, CONFIGS["mixlora"], name)
    randomize_adapters(model).eval()
    names = ["m1", "m2", "m1", None]
    assert_mixed_equals_alone(model, names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".m1." in n:
                p.mul_(1.5)
    assert_mixed_equals_alone(model, names)
    moelora.detach(model, "m1")
    moelora.attach(model, CONFIGS["mixlora"], "m1")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".m1." in n:
                p.copy_(torch.randn_like(p) * 0.1)
    assert_mixed_equals_alone(model, names)


def test_decoding_steps_reuse_the_packs_checked_at_prefill(monkeypatch):
    """Checking the packed weights is a Python pass over every adapter tensor: generate() does it at
    the prefill only, whatever the number of decoding steps. An in-place edit is seen from the next
    generate's prefill: its output equals each row's adapter alone, with the new weights."""
    import moelora.lora as lora_module

    model = zoo(names=("lora", "dora", "mixlora"))
    names = ["lora", "dora", "mixlora", "lora"]
    ids, mask = batch(model, B=len(names), T=5)
    checks = []
    original = lora_module.weights_key
    monkeypatch.setattr(lora_module, "weights_key", lambda t, _f=original: checks.append(1) or _f(t))

    def generate(n: int) -> list[list[int]]:
        checks.clear()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist(), len(checks)

    _, short = generate(2)
    first, long = generate(8)
    assert short == long > 0  # not proportional to the steps
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapters.dora." in n and "lora_B" in n:
                p.mul_(-3.0)
    edited, _ = generate(8)
    for b, name in enumerate(names):
        moelora.set_adapter(model, name)
        with torch.no_grad():
            ref = model.generate(input_ids=ids[b:b + 1, mask[b].bool()], max_new_tokens=8, min_new_tokens=8,
                                 do_sample=False, pad_token_id=0)[0, int(mask[b].sum()):].tolist()
        assert edited[b] == ref, (b, name)
    assert edited[1] != first[1]  # the edit changed the dora row


def test_mixed_batch_differs_per_adapter_and_does_not_change_active():
    model = zoo()
    moelora.set_adapter(model, "lora")
    ids, mask = batch(model, B=1, T=5)
    ids, mask = ids.repeat(5, 1), mask.repeat(5, 1)
    names = list(CONFIGS)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert not torch.allclose(out[i], out[j]), (names[i], names[j])
    assert moelora.get_context(model).active == "lora"
    assert moelora.get_context(model).groups is not None  # per forward; the next forward resets it
    with torch.no_grad():
        model(input_ids=ids[:1], attention_mask=mask[:1])
    assert moelora.get_context(model).groups is None


def test_bad_adapter_names_are_clear_errors():
    model = zoo(names=("lora",))
    ids, mask = batch(model, B=2, T=4)
    with pytest.raises(KeyError, match="'nope' is not attached"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["lora", "nope"])
    with pytest.raises(ValueError, match="3 entries but the batch has 2 rows"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["lora", None, None])


def test_mixed_generate_equals_each_row_alone():
    model = zoo()
    names = ["milora", "mixlora", None, "dora", "lora"]
    ids, mask = batch(model, B=len(names), T=6)
    out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=6,
                         do_sample=False, pad_token_id=0)
    for b, name in enumerate(names):
        moelora.set_adapter(model, name)
        one = model.generate(input_ids=ids[b : b + 1, mask[b].bool()], max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
        assert out[b, ids.shape[1]:].tolist() == one[0, one.shape[1] - 6 :].tolist(), name


def test_mixed_router_losses_and_gradients_are_per_adapter():
    model = zoo(names=("mixlora", "milora", "lora"))  # eval mode: no dropout, losses still reported
    names = ["mixlora", "milora", "lora", "mixlora", "milora"]
    ids, mask = batch(model, B=len(names), T=6)
    out = model(input_ids=ids, attention_mask=mask, adapter_names=names)
    assert set(out.router_losses) == {"mixlora", "milora"}
    torch.testing.assert_close(out.router_loss, sum(out.router_losses.values()))
    # each adapter's router loss equals the one its rows give alone
    for name in ("mixlora", "milora"):
        rows = [i for i, n in enumerate(names) if n == name]
        moelora.set_adapter(model, name)
        solo = model(input_ids=ids[rows], attention_mask=mask[rows])
        torch.testing.assert_close(out.router_losses[name], solo.router_loss)
    # the gradient of one row's logits reaches only that row's adapter
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, adapter_names=names)
    out.logits[2].sum().backward()  # row 2 uses "lora"
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".adapters.lora." in n for n in grads), sorted(grads)[:5]


def test_packed_inference_path_equals_the_training_path_and_follows_weight_updates():
    model = zoo(names=("lora", "milora", "lora_mlp", "dora"))
    names = ["lora", "milora", "lora_mlp", "dora", "lora", None]
    ids, mask = batch(model, B=len(names), T=5)
    with torch.no_grad():  # packed: plain LoRA and MiLoRA rows in one op per projection
        packed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    looped = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits.detach()  # grad on: per group
    torch.testing.assert_close(packed, looped, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # an in-place update (what an optimizer step does) invalidates the pack
        for n, p in model.named_parameters():
            if ".adapters.lora." in n and "lora_B" in n:
                p.mul_(3.0)
        again = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    assert not torch.allclose(again[0], packed[0]) and torch.allclose(again[3], packed[3], atol=1e-6)
    torch.testing.assert_close(again, model(input_ids=ids, attention_mask=mask, adapter_names=names).logits.detach(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("N", [3, 40])
def test_packed_lora_both_forms_equal_one_lora_per_row(N):
    from moelora.kernels.dense import packed_lora, packed_lora_by_slot

    g = torch.Generator().manual_seed(0)
    P, r, d_in, d_out = 5, 4, 12, 10
    A, B = torch.randn(P, r, d_in, generator=g), torch.randn(P, d_out, r, generator=g)
    x = torch.randn(N, d_in, generator=g)
    slot, weight = torch.randint(0, P, (N,), generator=g), torch.rand(N, generator=g)
    ref = torch.stack([weight[n] * B[slot[n]] @ (A[slot[n]] @ x[n]) for n in range(N)])
    torch.testing.assert_close(packed_lora(x, A, B.transpose(1, 2), slot, weight), ref, rtol=1e-5, atol=1e-5)
    # by slot: each slot's tokens, padded with token 0 at weight 0
    m = int(torch.bincount(slot, minlength=P).max())
    index, w = torch.zeros(P, m, dtype=torch.long), torch.zeros(P, m)
    for p in range(P):
        tok = (slot == p).nonzero().flatten()
        index[p, : len(tok)], w[p, : len(tok)] = tok, weight[tok]
    torch.testing.assert_close(packed_lora_by_slot(x, A, B.transpose(1, 2).contiguous(), index, w), ref,
                               rtol=1e-5, atol=1e-5)


def test_dora_norm_is_cached_and_follows_weight_updates():
    model = zoo(names=("dora",))
    ids, mask = batch(model, B=2, T=5)
    with torch.inference_mode():
        first = model(input_ids=ids, attention_mask=mask).logits
        again = model(input_ids=ids, attention_mask=mask).logits  # the cached norms
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    with torch.no_grad():  # an optimizer-like in-place update: the norms must be recomputed
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(2.0)
    cached = model(input_ids=ids, attention_mask=mask).logits.detach()
    for m in model.modules():
        m.__dict__.pop("_norm_cache", None)
    fresh = model(input_ids=ids, attention_mask=mask).logits.detach()
    torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
    assert not torch.allclose(cached, first)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2"])
def test_several_mixlora_tenants_share_one_routing_and_expert_op(arch):
    model = tiny_model(arch)
    moelora.attach(model, MixLoraConfig(num_experts=4, top_k=2, r=4, lora_alpha=8), "mixA")
    moelora.attach(model, MixLoraConfig(num_experts=6, top_k=2, r=2, lora_alpha=8), "mixB")
    moelora.attach(model, MixLoraConfig(num_experts=3, top_k=2, r=4, lora_alpha=4), "mixC")
    moelora.attach(model, CONFIGS["lora"], "lora")
    randomize_adapters(model).eval()
    names = ["mixA", "mixB", None, "mixC", "lora", "mixB", "mixA"]
    ids, mask = batch(model, B=len(names), T=6)
    ffn = model.model.layers[0].mlp
    with torch.no_grad():
        pooled = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        assert ffn.__dict__.get("_pools"), "the pooled path was not taken"
        ref = alone(model, ids, mask, names)
    real = mask.bool()
    torch.testing.assert_close(pooled[real], ref[real], rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # a weight update rebuilds the pool
        for n, p in model.named_parameters():
            if ".mixB." in n and "experts" in n and "lora_B" in n:
                p.mul_(2.0)
        again = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        ref2 = alone(model, ids, mask, names)
    torch.testing.assert_close(again[real], ref2[real], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(again[1], pooled[1])


def test_milora_inference_skips_the_modules_no_row_selected(monkeypatch):
    from moelora.lora import LoraWeights

    model = tiny_model()
    moelora.attach(model, MiLoraConfig(r=4, lora_alpha=8, top_k=2), "mi")
    randomize_adapters(model).eval()
    ids, mask = batch(model, B=1, T=6)
    with_grad = model(input_ids=ids, attention_mask=mask).logits.detach()  # training-like: every module runs
    calls = []
    original = LoraWeights.delta
    monkeypatch.setattr(LoraWeights, "delta", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    with torch.no_grad():
        skipped = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(skipped, with_grad, rtol=1e-5, atol=1e-6)
    layers = model.config.num_hidden_layers
    assert len(calls) == layers * 2  # one row, top-2: only its 2 selected modules of 7 per layer ran
    calls.clear()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(calls) == 3 * layers * 2  # prefill + 2 decoding steps, 2 modules per layer each
    moelora.set_backend(model, "reference")  # any backend: the same tokens
    assert torch.equal(out, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                           pad_token_id=0))
