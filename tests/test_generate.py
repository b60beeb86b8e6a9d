"""generate(): KV-cached decoding equals recomputation, for every method; MiLoRA routes once."""

import pytest
import torch
from conftest import ARCHS, batch, randomize_adapters, tiny_model

import moelora

CONFIGS = {
    "lora": lambda: moelora.LoraConfig(r=4, lora_alpha=8),
    "dora": lambda: moelora.LoraConfig(r=4, lora_alpha=8, use_dora=True),
    "mixlora": lambda: moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_alpha=8),
    "milora": lambda: moelora.MiLoraConfig(r=4, lora_alpha=8, top_k=2),
}


def _model(method, arch="llama"):
    model = tiny_model(arch)
    moelora.attach(model, CONFIGS[method]())
    randomize_adapters(model, scale=0.2)
    return model.eval()


def _greedy_by_recompute(model, ids, mask, steps):
    """Step-by-step greedy decoding, each step a full forward without any cache."""
    prompt_lengths = mask.sum(1)
    for _ in range(steps):
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, position_ids=pos, use_cache=False, prompt_lengths=prompt_lengths).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_cached_greedy_equals_recompute(method, arch):
    model = _model(method, arch)
    ids, mask = batch(model, B=3, T=6)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out, _greedy_by_recompute(model, ids, mask, 6))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_prompt_lookup_decoding_equals_greedy(method):
    """transformers' prompt lookup decoding (``prompt_lookup_num_tokens``) verifies several proposed
    tokens in one forward after prefill: the adapters (MiLoRA's cached gates, MixLoRA's per-token
    routing) must give the greedy output exactly. The prompt repeats itself so that n-grams match."""
    model = _model(method)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7]])
    plain = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    widths = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        looked = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
                                prompt_lookup_num_tokens=3)
    finally:
        hook.remove()
    assert torch.equal(looked, plain)
    assert max(widths[1:]) > 1  # some decoding step verified proposed tokens


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_cache_on_and_off_agree_for_greedy_sampling_and_beams(method):
    model = _model(method)
    ids, mask = batch(model, B=2, T=5)
    common = dict(attention_mask=mask, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    for kw in (dict(do_sample=False), dict(do_sample=True, top_k=20), dict(num_beams=3, do_sample=False)):
        runs = []
        for use_cache in (True, False):
            torch.manual_seed(123)
            runs.append(model.generate(ids, use_cache=use_cache, **common, **kw))
        assert torch.equal(runs[0], runs[1]), kw


@pytest.mark.parametrize("kw", [{}, {"num_beams": 2}])
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_static_cache_equals_the_dynamic_cache(method, kw):
    """`cache_implementation="static"` (the cache `torch.compile`d decoding uses) hands the model a 4-D
    mask: MiLoRA's prompt pooling must still skip the left padding (it once pooled over it)."""
    model = _model(method)
    ids, mask = batch(model, B=3, T=6, left_pad=True)
    assert (mask == 0).any()
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                output_scores=True, return_dict_in_generate=True, **kw)
    dynamic = model.generate(**args)
    static = model.generate(**args, cache_implementation="static", disable_compile=True)
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.scores, dynamic.scores, strict=True):  # the gates too, not only the argmax
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(num_beams=3, do_sample=False), dict(do_sample=False, use_cache=False)])
def test_milora_router_runs_at_prefill_only(kw):
    model = _model("milora")
    ctx = moelora.get_context(model)
    ids, mask = batch(model, B=2, T=5)
    ctx.router_calls = 0
    model.generate(ids, attention_mask=mask, max_new_tokens=7, pad_token_id=0, eos_token_id=None, **kw)
    assert ctx.router_calls == model.config.num_hidden_layers  # once per layer, not per step
    ctx.router_calls = 0
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert ctx.router_calls == model.config.num_hidden_layers


def test_milora_prefill_routing_equals_training_routing():
    """Routing seen in a training forward over prompt + answer = routing at generation prefill."""
    model = tiny_model()
    moelora.attach(model, moelora.MiLoraConfig(r=4, top_k=2, lora_dropout=0.0))  # train() = eval() numerically
    randomize_adapters(model, scale=0.2)
    ctx = moelora.get_context(model)
    ids, mask = batch(model, B=3, T=6)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    at_prefill = {k: v.clone() for k, v in ctx.gates["default"].items()}
    full_mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1)
    model.train()
    pos = (full_mask.cumsum(1) - 1).clamp_min(0)  # the positions generate() gave the left-padded rows
    model(out, attention_mask=full_mask, position_ids=pos, labels=out, prompt_lengths=mask.sum(1)).loss.backward()
    for layer, g in at_prefill.items():
        torch.testing.assert_close(ctx.gates["default"][layer].detach(), g)


def test_beams_inherit_their_source_gates():
    model = _model("milora")
    ctx = moelora.get_context(model)
    ids, mask = batch(model, B=2, T=5)
    model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=3, do_sample=False, pad_token_id=0)
    single = {}
    for b in range(2):
        with torch.no_grad():
            model(ids[b : b + 1, mask[b].bool()])
        single[b] = {k: v.clone() for k, v in ctx.gates["default"].items()}
    model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=3, do_sample=False, pad_token_id=0)
    for layer, g in ctx.gates["default"].items():
        assert g.shape[0] == 6  # 2 prompts x 3 beams
        for row in range(6):
            torch.testing.assert_close(g[row], single[row // 3][layer][0], atol=1e-5, rtol=1e-5)


def test_generate_keeps_milora_gates_at_stable_addresses():
    """A compiled decoding step reads the gates as static inputs (dynamo treats tensors reached from a
    module attribute like parameters); CUDA graph trees record again whenever such an input moves.
    So ``generate`` copies each prefill's gates into one buffer per adapter, layer and shape: a later
    call with the same batch shape finds its gates at the same addresses, holding its own routing."""
    model = _model("milora")
    ctx = moelora.get_context(model)
    n_layers = model.config.num_hidden_layers

    def run(seed, B=3):
        ids, mask = batch(model, B=B, T=6, seed=seed, left_pad=True)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        gates = dict(ctx.gates["default"])  # the tensors (the forward below puts others in the dict)
        with torch.no_grad():  # the same prompts' routing, from a plain forward
            model(ids, attention_mask=mask)
        for li in range(n_layers):
            torch.testing.assert_close(gates[li], ctx.gates["default"][li])
        return gates, {li: g.data_ptr() for li, g in gates.items()}

    first, ptrs = run(0)
    first = {li: g.clone() for li, g in first.items()}
    second, again = run(1)
    assert again == ptrs  # same buffers ...
    assert any(not torch.equal(second[li], first[li]) for li in second)  # ... holding the new prompts' gates
    _, other = run(2, B=2)  # another batch shape: buffers of its own, the first shape's stay
    assert set(other.values()).isdisjoint(ptrs.values())
    assert run(3)[1] == ptrs
    moelora.detach(model)
    assert not ctx.gate_buffers


def test_decoding_without_prefill_routing_is_a_clear_error():
    model = _model("milora")
    ids, mask = batch(model, B=1, T=4)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    moelora.get_context(model).gates.clear()
    with pytest.raises(RuntimeError, match="has no routing for layer 0"):
        with torch.no_grad():
            model(ids[:, -1:], past_key_values=out.past_key_values)


def _compile_config(backend):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CompileConfig(fullgraph=True, backend=backend, mode=None, dynamic=False)
    if not hasattr(cfg, "_compile_all_devices"):
        pytest.skip("this transformers has no CompileConfig._compile_all_devices (auto-compile off the GPU)")
    cfg._compile_all_devices = True  # transformers compiles decoding on CUDA only by default
    return cfg


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_compiled_static_cache_decoding_is_one_graph_and_exact(method):
    """On a GPU, `generate(cache_implementation="static")` makes transformers `torch.compile` every
    decoding step (CUDA graphs). Here with dynamo's eager backend: the whole step is one graph
    (fullgraph=True: no graph break), compiled once for several prompts and steps (no guard on a
    step counter or on which MiLoRA modules a prompt picked), and the tokens equal eager decoding."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cfg = _compile_config(backend)
    model = _model(method)
    for seed in range(3):
        ids, mask = batch(model, B=3, T=6, seed=seed, left_pad=True)
        args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        eager = model.generate(**args)
        compiled = model.generate(**args, cache_implementation="static", compile_config=cfg)
        assert torch.equal(compiled, eager), seed
    assert len(graphs) == 1
    # the step returns the model's output only: no router records (kept in the context until the next
    # step, with CUDA graphs they would be one replay's outputs still alive at the next)
    outputs = next(n for n in graphs[0].graph.nodes if n.op == "output").args[0]
    assert len(outputs) == 1


@pytest.mark.parametrize("method", [*sorted(CONFIGS), "mixed"])
def test_compiled_decoding_static_inputs_keep_their_addresses(method):
    """CUDA graph trees assume a compiled step's static inputs (parameters, and tensors dynamo reached
    through a module attribute, such as the adapter context's) stay where they were recorded: one
    that moves makes them record the step again. So every static input of the compiled decoding
    step that the model holds (parameters or not) has the same address at every step of two
    ``generate`` calls with different prompts of one shape. (Not the step's arguments: transformers
    gives each call a new static KV cache, for any model.)"""
    torch._dynamo.reset()
    seen = []  # per call of the compiled step: the addresses of its static inputs

    def backend(gm, example_inputs):
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        if not names:  # a mixed batch: its row tables' constants, a graph without inputs
            return gm.forward
        static = [i for i, t in enumerate(example_inputs)
                  if torch.is_tensor(t) and getattr(t, "_dynamo_static_input_type", None) is not None
                  and not names[i].startswith("l_kwargs_")]
        assert static  # parameters at least

        def run(*args):
            seen.append([args[i].data_ptr() for i in static])
            return gm.forward(*args)

        return run

    cfg = _compile_config(backend)
    if method == "mixed":  # rows of every method in one batch
        model = tiny_model("llama")
        for name in CONFIGS:
            moelora.attach(model, CONFIGS[name](), name)
        randomize_adapters(model, scale=0.2)
        model.eval()
    else:
        model = _model(method)
    for seed in range(2):
        ids, mask = batch(model, B=4, T=6, seed=seed, left_pad=True)
        kw = {"adapter_names": ["lora", "milora", "mixlora", "dora"]} if method == "mixed" else {}
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                       cache_implementation="static", compile_config=cfg, **kw)
    assert len(seen) == 4 and all(ptrs == seen[0] for ptrs in seen)


def test_compiled_decoding_of_a_mixed_batch():
    """Rows with different adapters (LoRA, MiLoRA, MixLoRA, none) in one compiled decoding step:
    fullgraph=True (no graph break: the packed op's slot table is built with tensor writes, its
    stacked weights come from the eager prefill), tokens equal eager decoding."""
    torch._dynamo.reset()
    cfg = _compile_config(lambda gm, example_inputs: gm.forward)
    model = tiny_model("llama")
    moelora.attach(model, CONFIGS["lora"](), "a")
    moelora.attach(model, CONFIGS["milora"](), "b")
    moelora.attach(model, CONFIGS["mixlora"](), "c")
    randomize_adapters(model, scale=0.2)
    model.eval()
    ids, mask = batch(model, B=4, T=6, left_pad=True)
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                adapter_names=["a", "b", "c", None])
    eager = model.generate(**args)
    assert torch.equal(model.generate(**args, cache_implementation="static", compile_config=cfg), eager)


def _compiled_graphs(model, **args):
    torch._dynamo.reset()
    graphs = []
    cfg = _compile_config(lambda gm, example_inputs: (graphs.append(gm), gm.forward)[1])
    out = model.generate(**args, cache_implementation="static", compile_config=cfg)
    return out, len(graphs)


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_decoding_on_every_architecture(arch):
    """MixLoRA (the method with the most per-step logic) compiles on every supported architecture
    with fullgraph=True, into no more graphs than the bare model needs (Gemma 2/3's hybrid
    sliding-window cache takes several on its own), with tokens equal to eager decoding."""
    base = tiny_model(arch).eval()
    ids, mask = batch(base, B=3, T=6, left_pad=True)
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    _, base_graphs = _compiled_graphs(base, **args)
    model = _model("mixlora", arch)
    eager = model.generate(**args)
    compiled, graphs = _compiled_graphs(model, **args)
    assert torch.equal(compiled, eager)
    assert graphs <= base_graphs
