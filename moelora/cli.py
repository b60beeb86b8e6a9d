"""The ``moelora`` command line: train, eval, generate, chat, plot, serve, export.

    moelora train --config FILE [key.sub=value ...] [--resume | --overwrite]
    moelora eval --data FILE [FILE ...] [--model DIR] [--adapter DIR] --protocol choice|options|generate|generate-options
    moelora generate --prompt TEXT [--model DIR] [--adapter DIR]
    moelora chat [--model DIR] [--adapter DIR]
    moelora plot routing --adapter DIR --data FILE [FILE ...] --out routing.png
    moelora plot loss --run DIR --out loss.png
    moelora serve --model DIR --adapter NAME=PATH [...] [--port 8000] [--api-key K] [--admin]
    moelora export --adapter DIR --output DIR [--model DIR] [--dtype auto] [--overwrite]

``--model`` defaults to the embedded SmolLM2-135M-Instruct. Errors in configs, data files and
checkpoints print one line naming the problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# moelora.evaluate.PROTOCOLS, spelled out: importing evaluate here would load torch
# for `moelora --help` (tests/test_train.py checks the two agree)
EVAL_PROTOCOLS = ["choice", "options", "generate", "generate-options"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = ["main"]


def _load(model: str | None, adapter: str | None):
    import torch

    from .checkpoint import load_adapter
    from .train import load_model_and_tokenizer

    m, tok = load_model_and_tokenizer(model)
    if adapter:
        load_adapter(m, adapter)
    m.eval()
    return m.to("cuda" if torch.cuda.is_available() else "cpu"), tok


def _evaluate_both(model, tokenizer, paths, protocol, limit, batch_size, compare_base, progress=True, **kw):
    """Evaluate the adapter (and, with ``compare_base``, the base model with the adapter switched off)."""
    from .evaluate import evaluate_files
    from .inject import set_adapter

    results = {}
    ctx = getattr(model, "_moelora_ctx", None)
    if compare_base and ctx is not None:
        active = ctx.active
        set_adapter(model, None)
        results["base"] = evaluate_files(model, tokenizer, paths, protocol, limit=limit, batch_size=batch_size,
                                         progress=progress, **kw)
        set_adapter(model, active)
    name = "base"
    if ctx is not None and ctx.active is not None:  # the column is named after the method (or the adapter)
        cfg = ctx.configs[ctx.active]
        method = "dora" if getattr(cfg, "use_dora", False) else cfg.method
        name = method if ctx.active == "default" else ctx.active
    results[name] = evaluate_files(model, tokenizer, paths, protocol, limit=limit, batch_size=batch_size,
                                   progress=progress, **kw)
    return results


def _table(results: dict) -> str:
    """One row per task, one column per evaluated model."""
    names = list(results)
    first = results[names[0]]
    tasks = list(first["tasks"])
    protocol = first["protocol"]
    width = max([len("average")] + [len(t) for t in tasks]) + 2
    lines = [f"protocol: {protocol}", f"{'task':{width}s}" + "".join(f"{n:>12s}" for n in names) + f"{'n':>7s}"]
    for t in tasks:
        row = f"{t:{width}s}" + "".join(f"{results[n]['tasks'][t]['accuracy'] * 100:11.1f}%" for n in names)
        lines.append(row + f"{first['tasks'][t]['total']:7d}")
    lines.append(f"{'average':{width}s}" + "".join(f"{results[n]['average'] * 100:11.1f}%" for n in names))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from .runconfig import load_run_config
    from .train import train

    run = load_run_config(args.config, args.overrides)
    out = train(run, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # every process is done with collectives: shut the
        dist.destroy_process_group()  # group down cleanly (its threads left to exit could abort the process)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun / accelerate: the other processes are done
        # Their files are written (rank 0 saves; checkpoints were fsynced and waited for). Exit without the
        # interpreter's teardown: a DeepSpeed ZeRO-3 run on gloo still aborted there now and then in CI
        # ('terminate called without an active exception' in rank 1) after the group was shut down.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    print(f"adapter saved in {out}")
    if run.eval is not None and run.eval.data:
        import torch

        from .checkpoint import load_adapter
        from .inject import set_adapter
        from .train import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(run.model, quantization=run.quantization)
        names = list(run.adapters) if run.adapters is not None else ["default"]
        for name in names:  # several adapters: evaluated one after the other on the same model
            load_adapter(model, Path(out) / name if run.adapters is not None else out, adapter_name=name)
        model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        from .evaluate import GENERATED

        e = run.eval
        kw = {"num_beams": e.num_beams, "max_new_tokens": e.max_new_tokens} if e.protocol in GENERATED else {}
        results = {}
        for i, name in enumerate(names):
            set_adapter(model, name)
            results.update(_evaluate_both(model, tok, e.data, e.protocol, e.limit, e.batch_size,
                                          e.compare_base and i == 0, progress=not args.no_progress, **kw))
        (Path(out) / "eval.json").write_text(json.dumps(results, indent=2))
        print(_table(results))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import GENERATED

    model, tok = _load(args.model, args.adapter)
    kw = {"num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens} if args.protocol in GENERATED else {}
    results = _evaluate_both(model, tok, args.data, args.protocol, args.limit, args.batch_size,
                             args.compare_base and args.adapter is not None, **kw)
    print(_table(results))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


def _guide(args: argparse.Namespace) -> dict:
    """``--json`` / ``--json-schema FILE`` / ``--regex`` / ``--choice`` / ``--grammar FILE``: the engine's
    guide (``{}``: none)."""
    import json

    from .structured import SchemaError, check_guides, schema_regex

    guide: dict = {}
    if getattr(args, "json", False):
        guide["json_object"] = True
    if getattr(args, "json_schema", None):
        try:
            schema = json.loads(Path(args.json_schema).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--json-schema {args.json_schema}: cannot read a JSON schema ({e})") from None
        try:
            guide["guided_regex"] = schema_regex(schema)
        except SchemaError as e:
            raise ValueError(f"--json-schema {args.json_schema}: {e}") from None
    if getattr(args, "regex", None):
        if "guided_regex" in guide:
            raise ValueError("use at most one of --json, --json-schema, --regex and --choice")
        guide["guided_regex"] = args.regex
    if getattr(args, "choice", None):
        guide["guided_choice"] = list(args.choice)
    if getattr(args, "grammar", None):
        try:
            guide["guided_grammar"] = Path(args.grammar).read_text()
        except OSError as e:
            raise ValueError(f"--grammar {args.grammar}: cannot read it ({e.strerror})") from None
    check_guides(guide.get("json_object", False), guide.get("guided_regex"), guide.get("guided_choice"),
                 guide.get("guided_grammar"))
    if guide and args.num_beams > 1:
        raise ValueError("guided generation (--json, --json-schema, --regex, --choice, --grammar) does not do beam "
                         "search")
    return guide


def _engine_for(model, tok, prompt_lookup: int | None = None):
    """A one-request engine over ``model`` (its active adapter attached as is) -> (engine, adapter name);
    ``prompt_lookup`` N: the engine's n-gram speculation, up to N draft tokens from 4- to 2-token matches."""
    from .engine import Engine
    from .inject import get_context

    spec = {"num_speculative_tokens": prompt_lookup, "prompt_lookup_max": 4, "prompt_lookup_min": 2} \
        if prompt_lookup else None
    engine = Engine(model, tok, max_batch=1, speculative=spec)
    adapter = get_context(model).active if getattr(model, "_moelora_ctx", None) is not None else None
    if adapter is not None:
        engine.add_attached(adapter)
    return engine, adapter


def _generate_engine(engine_and_adapter, ids: list[int], args: argparse.Namespace, guide: dict) -> str:
    """Generation through the engine: guided decoding, and the prefix cache across a chat's turns."""
    from .engine import SamplingParams

    engine, adapter = engine_and_adapter
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k or 0, seed=args.seed, repetition_penalty=args.repetition_penalty, **guide)
    return engine.generate([ids], [adapter], params)[0]["text"]


def _generate(model, tok, prompt: str, args: argparse.Namespace, chat: bool, engine=None) -> str:
    """One reply: through ``model.generate``, or the engine when given one (``moelora chat``) or guided."""
    import torch

    if chat and tok.chat_template:
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    guide = _guide(args)
    if guide or engine is not None:
        ids = list(tok(text, add_special_tokens=not chat)["input_ids"])
        return _generate_engine(engine or _engine_for(model, tok, getattr(args, "prompt_lookup", None)), ids, args,
                                guide)
    enc = tok(text, return_tensors="pt", add_special_tokens=not chat).to(model.device)
    kw = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id,
              repetition_penalty=args.repetition_penalty)
    if args.temperature > 0:
        torch.manual_seed(args.seed)
        kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
        if args.top_k is not None:
            kw["top_k"] = args.top_k
    else:
        kw.update(do_sample=False, num_beams=args.num_beams)
    if getattr(args, "prompt_lookup", None):  # transformers' prompt lookup decoding (n-gram speculation)
        kw["prompt_lookup_num_tokens"] = args.prompt_lookup
    with torch.no_grad():
        out = model.generate(**enc, **kw)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def cmd_score(args: argparse.Namespace) -> int:
    """Preference pairs scored by an adapter: a reward model's value head (``train.stage: rm``), or
    DPO's implicit reward against the base model for an adapter without one."""
    from .data import DataSource
    from .reward import VALUE_HEAD_NAME, load_value_head, pairwise_accuracy

    if not args.beta > 0:
        raise ValueError(f"--beta must be > 0, got {args.beta}")
    model, tok = _load(args.model, args.adapter)
    rm = load_value_head(model, args.adapter, "default")
    print(f"scores: the reward model's value head ({VALUE_HEAD_NAME})" if rm else
          f"scores: DPO's implicit reward, {args.beta} x (log p_adapter - log p_base) of each response")
    results = {}
    for path in args.data:
        src = DataSource(path, format=args.format)
        results[src.name] = pairwise_accuracy(model, tok, src, batch_size=args.batch_size, cutoff_len=args.cutoff_len,
                                              limit=args.limit, beta=None if rm else args.beta)
        r = results[src.name]
        print(f"{src.name}: {r['pairs']} pairs, accuracy {r['accuracy']:.1%}, margin {r['margin']:.4f} "
              f"(chosen {r['chosen']:.4f}, rejected {r['rejected']:.4f})")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    """Combine saved LoRA adapters into one (``moelora.add_weighted_adapter``) and save it."""
    from .checkpoint import load_adapter, save_adapter
    from .inject import add_weighted_adapter
    from .train import load_model_and_tokenizer

    pairs = []
    for spec in args.adapter:
        path, sep, weight = spec.rpartition(":")
        try:
            pairs.append((path, float(weight)) if sep else (spec, 1.0))
        except ValueError:
            pairs.append((spec, 1.0))  # a path with a colon and no weight
    if len(pairs) < 2:
        raise ValueError("give at least two --adapter DIR[:WEIGHT]")
    for path, _ in pairs:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--adapter {path}: no such directory")
    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ValueError(f"--output {out} exists and is not empty; pass --overwrite to replace it")
    model, _ = load_model_and_tokenizer(args.model)
    names = [f"in{i}" for i in range(len(pairs))]
    for name, (path, _) in zip(names, pairs):
        load_adapter(model, path, adapter_name=name)
    add_weighted_adapter(model, names, [w for _, w in pairs], "combined", combination_type=args.combination,
                         svd_rank=args.svd_rank)
    save_adapter(model, out, "combined")  # atomic: written beside, then moved into place
    cfg = model._moelora_ctx.configs["combined"]
    print(f"combined {len(pairs)} adapters ({args.combination}, rank {cfg.r}): {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Merge a LoRA/DoRA adapter into the base and save a plain transformers model (with its tokenizer)."""
    import shutil
    import tempfile

    import torch

    from .checkpoint import load_adapter
    from .inject import merge_and_unload
    from .train import load_model_and_tokenizer

    out = Path(args.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ValueError(f"--output {out} exists and is not empty; pass --overwrite to replace it")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model, tok = load_model_and_tokenizer(args.model, dtype=dtype)
    load_adapter(model, args.adapter)
    model = merge_and_unload(model)  # refuses MixLoRA / MiLoRA before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:  # written beside the target, then moved into place: an interrupted export leaves no half model
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged {args.adapter} into {args.model or 'the embedded model'}: {out} ({next(model.parameters()).dtype})")
    return 0


def _check_lookup(args: argparse.Namespace) -> None:
    if args.prompt_lookup is not None:
        if not 1 <= args.prompt_lookup <= 64:
            raise ValueError(f"--prompt-lookup must be in [1, 64] (tokens proposed per step), got {args.prompt_lookup}")
        if args.num_beams > 1:
            raise ValueError("--prompt-lookup applies to greedy or sampled generation, not to beam search")


def cmd_generate(args: argparse.Namespace) -> int:
    _check_lookup(args)
    model, tok = _load(args.model, args.adapter)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    print(_generate(model, tok, prompt, args, chat=args.chat))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    _check_lookup(args)
    model, tok = _load(args.model, args.adapter)
    _guide(args)  # a bad guide fails before the first turn
    # through the engine (one per session, so each turn reuses the previous turns' keys and values
    # from its prefix cache), unless beam search is asked for (model.generate then)
    engine = _engine_for(model, tok, args.prompt_lookup) if args.num_beams == 1 else None
    history: list[dict] = []
    print("moelora chat: empty line or Ctrl-D to quit, /reset to clear the history")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        reply = _generate(model, tok, history, args, chat=True, engine=engine)
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from . import plot

    if args.what == "loss":
        plot.plot_loss(args.run, args.out)
    else:
        if not args.adapter or not args.data:
            raise ValueError("plot routing needs --adapter DIR and --data FILE [FILE ...]")
        model, tok = _load(args.model, args.adapter)
        plot.plot_routing(model, tok, args.data, args.out, limit=args.limit, batch_size=args.batch_size)
    print(f"wrote {args.out}")
    return 0


def _vllm_lora_module(spec: str) -> str:
    """vLLM's ``--lora-modules`` item, ``name=path`` or ``{"name": ..., "path": ...}`` -> ``NAME=PATH``."""
    import json

    if spec.lstrip().startswith("{"):
        try:
            d = json.loads(spec)
        except ValueError:
            d = None
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not isinstance(d.get("path"), str):
            raise ValueError(f"--lora-modules {spec!r}: expected name=path or {{\"name\": ..., \"path\": ...}}")
        return f"{d['name']}={d['path']}"
    return spec


def cmd_serve(args: argparse.Namespace) -> int:
    """OpenAI-compatible HTTP server over the multi-tenant engine (docs/serve.md)."""
    from .server import run_server

    engine, options = _serve_setup(args)
    run_server(engine, host=args.host, port=args.port, **options)
    return 0


def cmd_run_batch(args: argparse.Namespace) -> int:
    """vLLM's ``run_batch``: a JSONL file of OpenAI batch requests through the server's code path."""
    from .batch import check_paths, run_batch

    check_paths(args.input_file, args.output_file, args.overwrite)  # before the model loads
    engine, options = _serve_setup(args)
    counts = run_batch(engine, args.input_file, args.output_file, overwrite=args.overwrite,
                       concurrency=args.max_concurrency, **options)
    print(f"moelora run-batch: {counts['total']} requests, {counts['ok']} answered (200), {counts['failed']} not: "
          f"{args.output_file}")
    return 0


def _serve_setup(args: argparse.Namespace):
    """The engine and ``create_app`` options of ``serve`` / ``run-batch`` from their (shared) flags."""
    import re

    adapters: dict[str, str] = {}
    for spec in [*args.adapter, *(_vllm_lora_module(m) for m in args.lora_modules)]:
        name, sep, path = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name):
            raise ValueError(f"--adapter {spec!r}: expected NAME=PATH, NAME made of 1-64 letters, digits, '_', '-'")
        if name in adapters:
            raise ValueError(f"--adapter {name!r} given twice")
        from .checkpoint import is_hub_id

        if not Path(path).is_dir() and not is_hub_id(path):
            raise FileNotFoundError(f"--adapter {name}: no such directory (nor a hub id owner/name): {path}")
        adapters[name] = path
    api_key = getattr(args, "api_key", None) or os.environ.get("MOELORA_API_KEY") or None
    try:
        from . import server  # noqa: F401
    except ImportError as e:  # aiohttp is an optional extra
        raise ValueError(str(e)) from e
    template, ssl_context, cors = _serve_web_options(args)
    from .engine import Engine

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.adapter_budget_mb is not None and args.adapter_budget_mb <= 0:
        raise ValueError(f"--adapter-budget-mb must be positive, got {args.adapter_budget_mb}")
    budget = None if args.adapter_budget_mb is None else int(args.adapter_budget_mb * 2**20)
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError(f"--max-model-len must be at least 2, got {args.max_model_len}")
    if args.served_model_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}",
                                                                args.served_model_name):
        raise ValueError(f"--served-model-name {args.served_model_name!r}: use 1-128 letters, digits, '_', '-', "
                         "'.', ':', '/'")
    if args.served_model_name in adapters:
        raise ValueError(f"--served-model-name {args.served_model_name!r} is also an --adapter name")
    if args.max_num_batched_tokens < 1:
        raise ValueError(f"--max-num-batched-tokens must be positive, got {args.max_num_batched_tokens}")
    if not args.prefix_cache_mb >= 0:
        raise ValueError(f"--prefix-cache-mb must be >= 0 (0: off), got {args.prefix_cache_mb}")
    if args.enable_prefix_caching is False:  # vLLM's --no-enable-prefix-caching
        args.prefix_cache_mb = 0
    kv_bytes = None
    if args.kv_cache_mb is not None and args.kv_cache_memory_bytes is not None:
        raise ValueError("give --kv-cache-mb or --kv-cache-memory-bytes, not both")
    if args.kv_cache_mb is not None:
        if not args.kv_cache_mb > 0:
            raise ValueError(f"--kv-cache-mb must be positive, got {args.kv_cache_mb}")
        kv_bytes = int(args.kv_cache_mb * 2**20)
    elif args.kv_cache_memory_bytes is not None:
        if args.kv_cache_memory_bytes < 1:
            raise ValueError(f"--kv-cache-memory-bytes must be positive, got {args.kv_cache_memory_bytes}")
        kv_bytes = args.kv_cache_memory_bytes
    speculative = None
    if args.speculative_config is not None:
        from .speculative import SpeculativeConfig

        try:
            spec = json.loads(args.speculative_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--speculative-config is not valid JSON: {e}") from e
        speculative = SpeculativeConfig.from_dict(spec)
    engine = Engine.from_pretrained(args.model, adapters=adapters, max_batch=args.max_num_seqs or args.max_batch,
                                    max_queue=args.max_queue, device=device, adapter_budget_bytes=budget,
                                    dtype=args.dtype, max_model_len=args.max_model_len,
                                    base_name=args.served_model_name,
                                    prefix_cache_bytes=int(args.prefix_cache_mb * 2**20),
                                    max_prefill_tokens=args.max_num_batched_tokens,
                                    chunked_prefill=args.enable_chunked_prefill is not False,
                                    speculative=speculative, kv_cache_bytes=kv_bytes, preemption=args.preemption,
                                    scheduling_policy=args.scheduling_policy)
    if template is not None:
        engine.tokenizer.chat_template = template
        try:
            engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as e:  # jinja's errors, or the template's own raise_exception
            raise ValueError(f"--chat-template: the template fails on a one-message chat: {type(e).__name__}: {e}") \
                from None
    options = dict(tool_parser=args.tool_call_parser, sampling_defaults=_sampling_defaults(args, engine.model),
                   trust_request_chat_template=args.trust_request_chat_template, log_requests=args.enable_log_requests,
                   reasoning_parser=args.reasoning_parser)
    if args.command == "serve":
        options.update(api_key=api_key, admin=args.admin, cors=cors, ssl_context=ssl_context)
    return engine, options


def _sampling_defaults(args: argparse.Namespace, model) -> dict:
    """vLLM's ``--generation-config`` (``auto``: the model's, ``vllm``: none, or a directory's
    ``generation_config.json``) and ``--override-generation-config`` -> the server's sampling defaults."""
    import json

    from .server import _check_sampling_defaults, generation_defaults

    source = args.generation_config
    if source == "auto":
        defaults = generation_defaults(getattr(model, "generation_config", None))
    elif source == "vllm":
        defaults = {}
    else:
        from transformers import GenerationConfig

        try:
            defaults = generation_defaults(GenerationConfig.from_pretrained(source))
        except (OSError, ValueError) as e:
            raise ValueError(f"--generation-config {source}: no generation_config.json there ({e})") from None
    if args.override_generation_config:
        try:
            extra = json.loads(args.override_generation_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--override-generation-config is not valid JSON: {e}") from None
        if not isinstance(extra, dict):
            raise ValueError("--override-generation-config must be a JSON object")
        defaults.update({("max_tokens" if k == "max_new_tokens" else k): v for k, v in extra.items()})
    try:
        _check_sampling_defaults(defaults)
    except ValueError as e:
        raise ValueError(f"--generation-config {source}: {e}") from None
    if defaults:
        print(f"moelora serve: requests that omit them get the sampling defaults {defaults} (--generation-config "
              f"{source}; 'vllm' turns them off)", flush=True)
    return defaults


def _serve_web_options(args: argparse.Namespace):
    """``--chat-template``, ``--ssl-*`` and ``--allowed-*`` (vLLM's flags), checked before the model
    loads: -> (the template text or None, an ``ssl.SSLContext`` or None, a ``Cors`` or None)."""
    import json
    import ssl

    from .server import Cors

    template = None
    if args.chat_template is not None:
        path = Path(args.chat_template)
        template = path.read_text() if path.is_file() else args.chat_template
        if not any(c in template for c in "{}") and not path.is_file():
            raise ValueError(f"--chat-template {args.chat_template!r}: neither a file nor a Jinja template")
        import jinja2

        try:
            jinja2.Environment().parse(template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"--chat-template: line {e.lineno}: {e.message}") from None
    ssl_context = None
    if args.ssl_certfile or args.ssl_keyfile:
        if not args.ssl_certfile:
            raise ValueError("--ssl-keyfile needs --ssl-certfile")
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
            if args.ssl_ca_certs:
                ssl_context.load_verify_locations(args.ssl_ca_certs)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"--ssl-certfile/--ssl-keyfile/--ssl-ca-certs: {e}") from None
        ssl_context.verify_mode = ssl.VerifyMode(args.ssl_cert_reqs)
    elif args.ssl_ca_certs:
        raise ValueError("--ssl-ca-certs needs --ssl-certfile")

    def names(flag: str, value: str | None) -> list[str] | None:
        if value is None:
            return None
        try:
            got = json.loads(value) if value.lstrip().startswith("[") else [v.strip() for v in value.split(",")]
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag}: not a JSON list ({e})") from None
        if not isinstance(got, list) or not got or not all(isinstance(v, str) and v for v in got):
            raise ValueError(f"{flag}: expected a JSON list of strings, or comma-separated values, got {value!r}")
        return got

    origins = names("--allowed-origins", args.allowed_origins)
    cors = None
    if origins is not None:
        cors = Cors(origins, names("--allowed-methods", args.allowed_methods) or ["*"],
                    names("--allowed-headers", args.allowed_headers) or ["*"], args.allow_credentials)
    elif args.allowed_methods or args.allowed_headers or args.allow_credentials:
        raise ValueError("--allowed-methods/--allowed-headers/--allow-credentials need --allowed-origins")
    return template, ssl_context, cors


def _lookup_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                   help="prompt lookup decoding: propose up to N tokens per step from n-grams of the prompt and "
                        "reply, verified in one forward (same output, fewer forwards when the reply copies the "
                        "prompt); transformers' for plain generate, the engine's n-gram speculation for chat "
                        "and guided generation")


def _gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="base model directory or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="adapter directory")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (or beam search with --num-beams)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=None, help="sampling: the k most likely tokens (0: all; default: "
                   "the model's generation config)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="transformers' (1: off; > 1 discourages "
                   "tokens of the prompt and output)")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("guided generation (one of them; through the engine, docs/serve.md)")
    g.add_argument("--json", action="store_true", help="the reply is one JSON object")
    g.add_argument("--json-schema", default=None, metavar="FILE", help="the reply is JSON valid under this schema")
    g.add_argument("--regex", default=None, help="the reply matches this regular expression entirely")
    g.add_argument("--choice", action="append", default=None, help="the reply is one of these (repeatable)")
    g.add_argument("--grammar", default=None, metavar="FILE",
                   help="the reply is a sentence of this GBNF grammar (start rule: root; docs/serve.md)")


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    """The flags ``serve`` and ``run-batch`` share: the model, adapters, the engine, the API's options."""
    p.add_argument("--model", default=None, help="base model directory or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve the adapter directory PATH as model NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (or $MOELORA_API_KEY)")
    p.add_argument("--admin", action="store_true", help="enable POST/DELETE /v1/admin/adapters (load/unload)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond the batch (then 429)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="prefill at most this many tokens a step (rows x longest prompt): new requests wait, "
                        "a longer prompt is prefilled in chunks while the others decode (default: 8192)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="base model weights (auto: bfloat16 on a GPU that has it, else float32)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context limit for prompt + completion (default and maximum: the model's)")
    p.add_argument("--served-model-name", default=None,
                   help="the base model's name in the API (default: its directory's name)")
    p.add_argument("--adapter-budget-mb", type=float, default=None,
                   help="keep at most this many MiB of adapters resident; the least recently used idle ones are "
                        "evicted and reloaded from their directory on demand (default: no limit)")
    p.add_argument("--tool-call-parser", choices=["hermes", "llama3_json", "mistral", "pythonic"], default=None,
                   help="let chat requests pass OpenAI 'tools' (any tool_choice; required/named are enforced by "
                        "guided decoding) and parse the model's calls into tool_calls, as the model writes them: "
                        "hermes <tool_call>{json}</tool_call> (Qwen2.5/3, Hermes), llama3_json (Llama 3.1/3.3), "
                        "mistral [TOOL_CALLS][...] , pythonic [f(x=1)] (Llama 3.2/4)")
    p.add_argument("--reasoning-parser", choices=["deepseek_r1", "qwen3"], default=None,
                   help="vLLM's: a chat reply's <think>...</think> goes to message.reasoning_content (streamed as "
                        "delta.reasoning_content), the rest to content (deepseek_r1: reasoning from the start; "
                        "qwen3: when the reply opens with <think>)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM command lines; --tool-call-parser is what enables tools")
    v = p.add_argument_group("vLLM spellings (so vLLM command lines work)")
    v.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="as --adapter (also vLLM's JSON form {\"name\": ..., \"path\": ...})")
    v.add_argument("--max-num-seqs", type=int, default=None, help="as --max-batch")
    v.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="--no-enable-prefix-caching turns the prefix cache off (on by default)")
    v.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="--no-enable-chunked-prefill: a prompt longer than --max-num-batched-tokens is prefilled "
                        "alone in one step (chunked by default)")
    v.add_argument("--enable-lora", action="store_true", help="accepted and ignored: adapters are always enabled")
    p.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs",
                   help="vLLM's: admit waiting requests in arrival order, or by their 'priority' field (lower "
                        "first; equal ones in arrival order). With --kv-cache-mb, the last to arrive (or the highest "
                        "priority value) is the one preempted")
    p.add_argument("--kv-cache-mb", type=float, default=None, metavar="MB",
                   help="memory for the running requests' keys and values (rows x the longest prompt + output so "
                        "far): requests are admitted while it fits, and when running ones outgrow it the last to "
                        "arrive is preempted and recomputed later, its output unchanged (vLLM's); the others wait "
                        "(default: no limit)")
    p.add_argument("--no-preemption", dest="preemption", action="store_false",
                   help="with --kv-cache-mb: admit a request only while every running one fits to its end (prompt "
                        "+ max_tokens), so none is ever preempted (fewer run at once)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None, metavar="N",
                   help="vLLM's name: --kv-cache-mb in bytes")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='vLLM\'s n-gram speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4}\' (also prompt_lookup_min, disable_by_batch_size): drafts from '
                        "each request's own text, verified in one forward; outputs unchanged (default: off)")
    p.add_argument("--generation-config", default="auto", metavar="auto|vllm|DIR",
                   help="vLLM's: default sampling fields (temperature, top_p, top_k, min_p, repetition_penalty, "
                        "max_new_tokens as max_tokens) for requests that omit them: 'auto' the model's "
                        "generation_config.json, 'vllm' none (OpenAI's defaults), or a directory's (default: auto)")
    p.add_argument("--override-generation-config", default=None, metavar="JSON",
                   help="vLLM's: sampling defaults on top of --generation-config, e.g. '{\"temperature\": 0.5}'")
    w = p.add_argument_group("web (vLLM's flags)")
    w.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="the Jinja chat template for chat requests, a file or the template itself (default: the "
                        "tokenizer's; needed for a base model without one)")
    w.add_argument("--enable-log-requests", action="store_true",
                   help="log one line per finished request: id, model, finish reason, tokens, latency (no text)")
    w.add_argument("--trust-request-chat-template", action="store_true",
                   help="let chat requests bring their own 'chat_template' (refused by default)")
    w.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    w.add_argument("--ssl-keyfile", default=None, help="... and this private key (PEM; default: in the certfile)")
    w.add_argument("--ssl-ca-certs", default=None, help="CA certificates to verify client certificates with")
    w.add_argument("--ssl-cert-reqs", type=int, choices=(0, 1, 2), default=0,
                   help="client certificates: 0 not asked, 1 optional, 2 required (ssl.CERT_*)")
    w.add_argument("--allowed-origins", default=None, metavar="JSON_OR_LIST",
                   help="browser origins allowed to call the API (CORS), e.g. '[\"*\"]' or "
                        "'https://a.example,https://b.example' (default: none; vLLM allows all)")
    w.add_argument("--allowed-methods", default=None, help="with --allowed-origins: the methods (default: all)")
    w.add_argument("--allowed-headers", default=None, help="with --allowed-origins: the headers (default: all)")
    w.add_argument("--allow-credentials", action="store_true", help="with --allowed-origins: allow cookies/auth")
    p.add_argument("--prefix-cache-mb", type=float, default=256,
                   help="keys/values of prompt blocks kept for prompts that start the same way (per adapter; "
                        "not MiLoRA), least recently used evicted first; 0: off (default: 256)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moelora", description="Mixtures of LoRA experts: train, evaluate, generate.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune an adapter from a YAML config")
    p.add_argument("--config", default=None, help="YAML run config (see configs/); omitted = defaults + overrides")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=20")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true", help="start over even if output_dir holds another run")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="evaluate on llm-adapters files (choice or options log-likelihood, or generate+parse)")
    p.add_argument("--model", default=None)
    p.add_argument("--adapter", default=None)
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--protocol", choices=EVAL_PROTOCOLS, default="choice")
    p.add_argument("--limit", type=int, default=None, help="first N items of each file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--output", default=None, help="write the results as JSON")
    p.add_argument("--compare-base", action="store_true", help="also evaluate the base model")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("generate", help="generate from one prompt")
    _gen_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _lookup_arg(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _gen_args(p)
    _lookup_arg(p)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("plot", help="routing heatmaps and training curves")
    p.add_argument("what", choices=["routing", "loss"])
    p.add_argument("--out", required=True, help="output image (.png)")
    p.add_argument("--run", default=None, help="plot loss: the run's output_dir")
    p.add_argument("--model", default=None)
    p.add_argument("--adapter", default=None)
    p.add_argument("--data", nargs="*", default=[])
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server, many adapters on one base model")
    _serve_arguments(p)
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("run-batch", help="a JSONL file of OpenAI batch requests through the server, offline (vLLM's "
                       "run_batch)")
    p.add_argument("-i", "--input-file", required=True, help="one request per line: {custom_id, method: POST, url: "
                   "/v1/chat/completions or /v1/completions, body}")
    p.add_argument("-o", "--output-file", required=True, help="one result per line, in the input's order")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests in flight at once (default: twice the engine's batch)")
    _serve_arguments(p)
    p.set_defaults(fn=cmd_run_batch)

    p = sub.add_parser("score", help="pairwise accuracy on preference pairs: a reward model (train.stage: rm), "
                                     "or a DPO adapter's implicit reward")
    p.add_argument("--adapter", required=True, help="a reward model's directory (with value_head.safetensors), or "
                                                    "any adapter (DPO's implicit reward against the base model)")
    p.add_argument("--beta", type=float, default=0.1, help="the implicit reward's beta (pref_beta; no effect on "
                                                             "the accuracy)")
    p.add_argument("--data", required=True, nargs="+", help="preference pair files (chosen/rejected)")
    p.add_argument("--format", default="llm-adapters", help="their data format (llm-adapters, alpaca, messages, "
                                                            "sharegpt, text), as in training")
    p.add_argument("--model", default=None, help="base model directory or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cutoff-len", type=int, default=1024, help="encode pairs as training with this cutoff_len")
    p.add_argument("--limit", type=int, default=None, help="the first N pairs of each file")
    p.add_argument("--output", default=None, help="also write the figures as JSON")
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("combine", help="combine saved LoRA adapters into one (PEFT's add_weighted_adapter)")
    p.add_argument("--model", default=None, help="base model directory or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", action="append", required=True, metavar="DIR[:WEIGHT]",
                   help="an adapter and its weight (default 1; negative subtracts); twice or more")
    p.add_argument("--combination", choices=["cat", "svd", "linear"], default="cat",
                   help="cat: exact, rank = the sum of the ranks; svd: the best --svd-rank approximation; "
                        "linear: A and B summed (same ranks; rough) (default: cat)")
    p.add_argument("--svd-rank", type=int, default=None, help="svd: the combined rank (default: the largest)")
    p.add_argument("--output", required=True, help="directory for the combined adapter")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.set_defaults(fn=cmd_combine)

    p = sub.add_parser("export", help="merge a LoRA/DoRA adapter into the base and save a plain transformers model")
    p.add_argument("--model", default=None, help="base model directory or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", required=True, help="LoRA or DoRA adapter directory (ours or PEFT's)")
    p.add_argument("--output", required=True, help="directory for the merged model and its tokenizer")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights' dtype (auto: the base model's own); the merge itself is computed in float32")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.set_defaults(fn=cmd_export)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .train import TrainingError

    args = build_parser().parse_args(argv)
    log = logging.getLogger("moelora")  # data summaries (truncation counts, mixing quotas) and warnings
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError, TrainingError, ValueError, FileNotFoundError) as e:
        print(f"moelora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moelora {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
