"""The lm-evaluation-harness model type ``moelora`` on a local multiple-choice task and a tiny saved model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch
import transformers

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'moelora[lm-eval]')")

import lm_eval  # noqa: E402
from conftest import randomize_adapters  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import moelora  # noqa: E402
import moelora_lm_eval_plugin  # noqa: E402
from moelora.lm_eval_model import MoeLoraLM  # noqa: E402  (registers "moelora")

PLUGIN_OFF = moelora_lm_eval_plugin.DISABLE_ENV

TASK = "moelora_toy_choice"
DOCS = [
    {"question": "What is two plus two?", "choices": ["four", "five", "seven"], "answer": 0},
    {"question": "Which colour is the sky on a clear day?", "choices": ["green", "blue", "red"], "answer": 1},
    {"question": "How many legs does a cat have?", "choices": ["two", "six", "four"], "answer": 2},
    {"question": "What do bees make?", "choices": ["honey", "milk", "silk"], "answer": 0},
    {"question": "Which number is the largest?", "choices": ["three", "ten", "one"], "answer": 1},
    {"question": "What is the opposite of hot?", "choices": ["warm", "loud", "cold"], "answer": 2},
]
CONFIGS = {
    "mixlora": moelora.MixLoraConfig(num_experts=4, top_k=2, r=4, lora_alpha=8, lora_dropout=0.0),
    "milora": moelora.MiLoraConfig(r=4, lora_alpha=8, top_k=3, lora_dropout=0.0),
}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval-adapters")
    out = {}
    for seed, (name, cfg) in enumerate(CONFIGS.items(), start=1):
        model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        moelora.attach(model, cfg)
        randomize_adapters(model, seed=seed, scale=0.3)
        moelora.save_adapter(model, root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A local lm_eval task: a YAML config and its JSONL data set, nothing fetched."""
    root = tmp_path_factory.mktemp("lm-eval-task")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return root


def _load(model_dir, adapter=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        moelora.load_adapter(model, adapter)
    return model


def _encode(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm_eval's split for a causal model: encode the whole text, the context is its prefix."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    assert whole[: len(ctx)] == ctx
    return ctx, whole[len(ctx) :]


@torch.no_grad()
def _direct_loglik(model, ctx: list[int], cont: list[int]) -> float:
    """Sum of the continuation's token log-probs, one unpadded sequence, routed on the context."""
    ids = torch.tensor([ctx + cont[:-1]])
    kwargs = {"prompt_lengths": torch.tensor([len(ctx)])} if hasattr(model, "_moelora_ctx") else {}
    logp = torch.log_softmax(model(ids, **kwargs).logits[0, len(ctx) - 1 :].float(), dim=-1)
    return float(logp.gather(1, torch.tensor(cont)[:, None]).sum())


def _evaluate(model_dir, adapter, task_dir, **kw):
    return lm_eval.simple_evaluate(
        model="moelora",
        model_args=f"pretrained={model_dir},adapter={adapter}",
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),  # indexing lm_eval's own tasks takes ~12 s
        device="cpu",
        batch_size=4,
        **kw,
    )


@pytest.mark.parametrize("method", list(CONFIGS))
def test_simple_evaluate_local_task(method, tiny_model_dir, adapters, task_dir):
    out = _evaluate(tiny_model_dir, adapters[method], task_dir, log_samples=True)
    acc = out["results"][TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0
    samples = out["samples"][TASK]
    assert len(samples) == len(DOCS)
    assert out["config"]["moelora_adapter"] == str(adapters[method])

    # Every choice's loglikelihood is the direct computation with the adapter (and not the base model's).
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    model, base = _load(tiny_model_dir, adapters[method]), _load(tiny_model_dir)
    agree = 0
    for s in samples[:2] + samples[-1:]:
        scores = []
        for (context, continuation), resp in zip(s["arguments"], s["resps"], strict=True):
            ctx, cont = _encode(tok, context, continuation)
            want = _direct_loglik(model, ctx, cont)
            assert resp[0][0] == pytest.approx(want, abs=1e-4)
            assert abs(_direct_loglik(base, ctx, cont) - want) > 1e-3
            scores.append(want)
        best = max(range(len(scores)), key=scores.__getitem__)
        agree += float(best == s["target"]) == s["acc"]
    assert agree == 3  # each doc's acc is the argmax of the direct scores


def test_milora_routes_on_the_context(tiny_model_dir, adapters):
    lm = MoeLoraLM(pretrained=tiny_model_dir, adapter=adapters["milora"], device="cpu", batch_size=8)
    model, tok = lm.model, lm.tokenizer
    pairs = [("Question: What do bees make?\nAnswer:", c) for c in (" honey and wax", " silk")]
    pairs += [("Question: How many legs does a cat have?\nAnswer:", c) for c in (" four legs", " two")]
    pairs += [("Name a colour:", " blue sky")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)  # one batch: 5 rows, right-padded, one forward
    ctx = moelora.get_context(model)
    batch_gates = {li: g.clone() for li, g in ctx.gates["default"].items()}
    assert batch_gates[0].shape[0] == len(pairs)

    encoded = [_encode(tok, c, x) for c, x in pairs]
    for (ids, cont), (ll, _) in zip(encoded, got, strict=True):
        assert ll == pytest.approx(_direct_loglik(model, ids, cont), abs=1e-4)

    with torch.no_grad():
        alone, full = [], []
        for ids, cont in encoded:
            model(torch.tensor([ids]))  # the context alone: the routing generation would use
            alone.append({li: g.clone() for li, g in ctx.gates["default"].items()})
            model(torch.tensor([ids + cont[:-1]]))  # no prompt_lengths: routed on every token
            full.append({li: g.clone() for li, g in ctx.gates["default"].items()})
    for li, gates in batch_gates.items():
        for row in gates:  # the batch's rows are in lm_eval's order: match each to its own context
            assert any(torch.allclose(row, a[li][0], atol=1e-5) for a in alone)
            assert not any(torch.allclose(row, f[li][0], atol=1e-5) for f in full)


def test_milora_context_split_not_confused(tiny_model_dir, adapters):
    """Same input row, different context/continuation split: HFLM's logits cache would merge them."""
    lm = MoeLoraLM(pretrained=tiny_model_dir, adapter=adapters["milora"], device="cpu", batch_size=8)
    assert lm.logits_cache
    ids = lm.tokenizer("Question: What is the opposite of hot?\nAnswer: cold")["input_ids"]
    assert 0 not in ids and len(ids) >= 8
    reqs = [(("a", "b"), ids[:4], ids[4:8]), (("a", "b"), ids[:5], ids[5:8]), (("a", "b"), ids[:6], ids[6:8])]
    assert len(lm._context_tables(reqs)) == 3  # one request per group
    got = [ll for ll, _ in lm._loglikelihood_tokens(reqs, disable_tqdm=True)]
    want = [_direct_loglik(lm.model, ctx, cont) for _, ctx, cont in reqs]
    assert got == pytest.approx(want, abs=1e-4)
    assert abs(want[0] - want[1]) > 1e-4 or abs(want[1] - want[2]) > 1e-4


def test_generate_until(tiny_model_dir, adapters):
    lm = MoeLoraLM(pretrained=tiny_model_dir, adapter=adapters["milora"], device="cpu", batch_size=2)
    prompts = ["Question: What do bees make?\nAnswer:", "Name a colour:"]
    reqs = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 5}), i) for i, p in enumerate(prompts)]
    got = lm.generate_until(reqs, disable_tqdm=True)
    model, tok = lm.model, lm.tokenizer
    for p, text in zip(prompts, got, strict=True):
        ids = tok(p, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
        want = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).split("\n\n")[0]
        assert text == want


def _plugin_pth_installed() -> bool:
    files = metadata.distribution("moelora").files or []
    return any(f.name == "moelora-lm-eval.pth" for f in files)


@pytest.mark.slow  # ~25 s each on 2 CPU cores: the lm_eval CLI always indexes its own ~10k task files (~12 s)
@pytest.mark.parametrize("program", ["lm_eval", "moelora.lm_eval_model"])
def test_cli(program, tiny_model_dir, adapters, task_dir, tmp_path):
    """Plain `lm_eval --model moelora` (the installed .pth plugin) and `python -m moelora.lm_eval_model`."""
    if program == "lm_eval" and not _plugin_pth_installed():
        pytest.skip("moelora's installation predates moelora-lm-eval.pth (pip install -e .)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop(PLUGIN_OFF, None)
    cmd = [sys.executable, "-m", program, "--model", "moelora",
           "--model_args", f"pretrained={tiny_model_dir},adapter={adapters['mixlora']}",
           "--tasks", TASK, "--include_path", str(task_dir), "--device", "cpu", "--batch_size", "4",
           "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert TASK in proc.stdout and "acc" in proc.stdout
    [result_file] = Path(tmp_path / "out").rglob("results_*.json")
    acc = json.loads(result_file.read_text())["results"][TASK]["acc,none"]
    assert acc == _evaluate(tiny_model_dir, adapters["mixlora"], task_dir)["results"][TASK]["acc,none"]


def _run_python(code: str, **env_extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != PLUGIN_OFF}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, **env_extra})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_plugin_registers_lazily_at_lm_eval_import():
    """The .pth plugin: nothing of moelora/torch loads at start-up; lm_eval's registry gets a lazy
    placeholder that resolves to MoeLoraLM; the switch turns it off."""
    if not _plugin_pth_installed():
        pytest.skip("moelora's installation predates moelora-lm-eval.pth (pip install -e .)")
    assert _run_python("import sys; print('moelora' in sys.modules, 'torch' in sys.modules)") == "False False"
    code = ("import sys, lm_eval.api.registry as r; print(r.model_registry._objs.get('moelora'), "
            "'moelora.lm_eval_model' in sys.modules)")
    assert _run_python(code) == "moelora.lm_eval_model:MoeLoraLM False"
    assert _run_python(code, **{PLUGIN_OFF: "1"}) == "None False"
    resolved = _run_python("import lm_eval.api.registry as r; c = r.get_model('moelora'); print(c.__module__, c.__name__)")
    assert resolved == "moelora.lm_eval_model MoeLoraLM"


def test_plugin_register_unit():
    """register(): the placeholder, then the decorator upgrades it; releases with entry-point discovery
    and names already taken are left alone; a broken registry never raises."""
    import types

    from lm_eval.api.registry import Registry

    fake = types.SimpleNamespace(model_registry=Registry("model"))
    assert moelora_lm_eval_plugin.register(fake)
    assert fake.model_registry._objs["moelora"] == "moelora.lm_eval_model:MoeLoraLM"
    fake.model_registry.register("moelora")(MoeLoraLM)  # what importing moelora.lm_eval_model does
    assert fake.model_registry.get("moelora") is MoeLoraLM
    assert not moelora_lm_eval_plugin.register(fake)  # already there
    newer = types.SimpleNamespace(model_registry=Registry("model"), load_plugins=lambda *a: [])
    assert not moelora_lm_eval_plugin.register(newer) and "moelora" not in newer.model_registry
    assert not moelora_lm_eval_plugin.register(types.SimpleNamespace(model_registry=object()))


def test_lm_eval_models_entry_point():
    """lm-eval releases with plugin discovery read the `lm_eval.models` entry-point group."""
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="lm_eval.models")}
    if "moelora" not in eps:
        pytest.skip("moelora's installed metadata predates the lm_eval.models entry point (pip install -e .)")
    assert eps["moelora"] == "moelora.lm_eval_model:MoeLoraLM"


def test_console_script_entry_point():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    if "moelora-lm-eval" not in scripts:
        pytest.skip("moelora's installed metadata predates the moelora-lm-eval script (pip install -e .)")
    assert scripts["moelora-lm-eval"] == "moelora.lm_eval_model:main"
