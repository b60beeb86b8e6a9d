#!/usr/bin/env python
"""The accuracy study: LoRA, DoRA, MixLoRA, MiLoRA (and the base model zero-shot) on ARC-e, ARC-c,
BoolQ and OpenBookQA, single-task and multi-task, several seeds, through the ``moelora`` CLI.

Every run is a ``moelora train`` subprocess (with the config's ``eval`` block: the first protocol),
then ``moelora eval`` for each further protocol, then ``moelora plot routing`` for the multi-task
seed-0 MixLoRA / MiLoRA adapters. ``--workers N`` runs go in parallel (a 135M model leaves one GPU
mostly idle; each worker gets ``OMP_NUM_THREADS = cores // N``). Layout of ``--out``::

    OUT/study.json                          arguments, environment, parameter counts per method
    OUT/progress.log                        one line per finished run
    OUT/zeroshot/base/seed0/                the base model: eval_<protocol>.json, result.json
    OUT/multi/<method>/seed<k>/             one adapter on the four tasks mixed
    OUT/single/<task>/<method>/seed<k>/     one adapter per task
      config.yaml        the exact `moelora train` config of this run (resolved paths, seed, steps)
      commands.txt       the exact command lines, in order
      train.log/.err     stdout / stderr of `moelora train`; metrics.jsonl, run_config.json, adapter
      eval_<p>.json      `moelora eval --output` JSON per protocol (eval_<p>.log/.err beside it)
      routing.png        expert load per layer per task (multi-task, seed 0, MixLoRA / MiLoRA)
      result.json        the summary report.py reads (status ok | failed; error.txt on failure)

Resumable: a run whose ``result.json`` says ``ok`` for the requested protocols and limits is
skipped; one that lacks a protocol is only evaluated (if its adapter is still there). Order: the
base model, multi-task x methods for seed 0, then the other seeds, then single-task (seed by seed).
``--time-budget S`` launches nothing after S seconds; ``--deadline S`` kills the runs still going
at S seconds (they rerun next time) and launches none that would not finish by then, judged by the
slowest finished run of the same setting. ``--export FILE.tar.gz`` packs the small files (no
weights) at the end, to carry results off a machine. See benchmarks/accuracy/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:  # `import moelora` (parameter counts) from a checkout without `pip install -e .`
    sys.path.insert(1, str(REPO))
from moelora.embedded import EMBEDDED  # noqa: E402 (after the path)
from moelora.evaluate import GENERATED, PROTOCOLS  # noqa: E402 (after the path)

CONFIGS = HERE / "configs"
TASKS = ["arc_easy", "arc_challenge", "boolq", "openbookqa"]
METHODS = ["lora", "dora", "mixlora", "milora"]
ROUTED = ("mixlora", "milora")
EXPORT_SKIP = re.compile(r"(\.safetensors|\.bin|\.pt)$|(^|/)(tensorboard|checkpoint-\d+|\.checkpoint-[^/]*)(/|$)")
PARAMS_RE = re.compile(r"^(\w+): ([\d,]+) trainable / ([\d,]+) activated adapter parameters", re.M)


@dataclass
class Run:
    setting: str  # "zeroshot" | "multi" | "single/<task>"
    method: str  # a config name in configs/ (or "base")
    seed: int
    tasks: list[str] = field(default_factory=list)  # trained on (mixed) and evaluated on

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.method}/seed{self.seed}"

    @property
    def kind(self) -> str:
        return self.setting.split("/")[0]


def build_grid(args) -> list[Run]:
    """Most important first: the base model, multi-task seed 0, other seeds, then single-task."""
    runs: list[Run] = []
    if args.base:
        runs.append(Run("zeroshot", "base", 0, list(args.tasks)))
    if "multi" in args.settings:
        for seed in args.seeds:
            runs += [Run("multi", m, seed, list(args.tasks)) for m in args.methods]
    if "single" in args.settings:
        for seed in args.seeds:
            for task in args.tasks:
                runs += [Run(f"single/{task}", m, seed, [task]) for m in args.methods]
    return runs


# ---------------------------------------------------------------------------------------------
# Paths, configs, commands


def train_file(args, task: str) -> str:
    return str(Path(args.data_root) / task / "train.json")


def test_file(args, task: str) -> str:
    return str(Path(args.data_root) / task / "test.json")


def limit_for(args, protocol: str) -> int | None:
    n = args.gen_limit if protocol in GENERATED else args.eval_limit
    return n if n and n > 0 else None


def cli(args) -> list[str]:
    return [args.python, "-m", "moelora.cli"]


def run_config(args, run: Run, run_dir: Path) -> dict:
    """The method's YAML with this run's model, data, seed, steps, eval block and output_dir."""
    cfg = yaml.safe_load((CONFIGS / f"{run.method}.yaml").read_text())
    cfg["model"] = args.model
    fmt = "llm-adapters-options" if args.answers == "text" else "llm-adapters"
    cfg["data"] = [{"path": train_file(args, t), "format": fmt, "weight": 1.0, "name": t} for t in run.tasks]
    cfg["output_dir"] = str(run_dir)
    t = cfg.setdefault("train", {})
    t["seed"] = run.seed
    if args.max_steps:
        t["max_steps"] = args.max_steps
        t["warmup_steps"] = max(0, round(args.max_steps * args.warmup_ratio))
    if args.train_batch_size:
        t["batch_size"] = args.train_batch_size
    protocol = args.protocols[0]
    cfg["eval"] = {"data": [test_file(args, x) for x in run.tasks], "protocol": protocol,
                   "limit": limit_for(args, protocol), "batch_size": eval_batch(args, protocol), "compare_base": False}
    if protocol in GENERATED:
        cfg["eval"]["max_new_tokens"] = args.max_new_tokens
    return cfg


def eval_batch(args, protocol: str) -> int:
    return args.gen_batch_size if protocol in GENERATED else args.eval_batch_size


def eval_cmd(args, run: Run, run_dir: Path, protocol: str, adapter: bool) -> list[str]:
    cmd = cli(args) + ["eval"]
    if args.model:
        cmd += ["--model", args.model]
    if adapter:
        cmd += ["--adapter", str(run_dir)]
    cmd += ["--data", *[test_file(args, t) for t in run.tasks], "--protocol", protocol,
            "--batch-size", str(eval_batch(args, protocol)), "--output", str(run_dir / f"eval_{protocol}.json")]
    lim = limit_for(args, protocol)
    if lim:
        cmd += ["--limit", str(lim)]
    if protocol in GENERATED:
        cmd += ["--max-new-tokens", str(args.max_new_tokens)]
    return cmd


def routing_cmd(args, run: Run, run_dir: Path) -> list[str]:
    cmd = cli(args) + ["plot", "routing"]
    if args.model:
        cmd += ["--model", args.model]
    return cmd + ["--adapter", str(run_dir), "--data", *[test_file(args, t) for t in run.tasks],
                  "--out", str(run_dir / "routing.png"), "--limit", str(args.routing_limit),
                  "--batch-size", str(args.eval_batch_size)]


def wants_routing(args, run: Run) -> bool:
    if not args.routing or run.setting != "multi" or run.seed != args.seeds[0]:
        return False
    cfg = yaml.safe_load((CONFIGS / f"{run.method}.yaml").read_text())
    return cfg.get("method", {}).get("type") in ROUTED


# ---------------------------------------------------------------------------------------------
# Running


class Stopped(Exception):
    """The deadline passed (or Ctrl-C): the run was killed and is not recorded."""


class Runner:
    def __init__(self, args) -> None:
        self.args = args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.procs: dict[int, subprocess.Popen] = {}
        threads = max(1, (os.cpu_count() or 1) // max(1, args.workers))
        self.env = dict(os.environ)
        self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
                        # many processes share one GPU: less fragmentation, fewer out-of-memory failures
                        PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
                        PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
                            [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            self.env.setdefault(k, "1")

    def sh(self, cmd: list[str], run_dir: Path, stem: str) -> int:
        """Run ``cmd`` (stdout -> stem.log, stderr -> stem.err) in its own process group; log the command."""
        with open(run_dir / "commands.txt", "a") as f:
            f.write(shlex.join(cmd) + "\n")
        if self.stop.is_set():
            raise Stopped
        with open(run_dir / f"{stem}.log", "w") as out, open(run_dir / f"{stem}.err", "w") as err:
            p = subprocess.Popen(cmd, stdout=out, stderr=err, env=self.env, start_new_session=True)
            with self.lock:
                self.procs[p.pid] = p
            try:
                rc = p.wait()
            finally:
                with self.lock:
                    self.procs.pop(p.pid, None)
        if self.stop.is_set() and rc != 0:
            raise Stopped
        return rc

    def kill_all(self) -> None:
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:  # each run's own process group (start_new_session): the CLI and its children
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def execute(self, run: Run) -> dict:
        args = self.args
        run_dir = Path(args.out) / run.setting / run.method / f"seed{run.seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        old = read_json(run_dir / "result.json") or {}
        old = old if old.get("status") in ("ok", "partial") else {}  # partial: killed after some steps
        if old.get("train") and old["train"].get("steps") != expected_steps(args, run):
            old = {}  # trained with other max_steps: train again
        result = {"setting": run.setting, "method": run.method, "seed": run.seed, "tasks": run.tasks,
                  "status": "ok", "eval": dict(old.get("eval", {})), "params": old.get("params"),
                  "train": old.get("train"), "routing_png": old.get("routing_png")}
        t0 = time.time()
        adapter = (run_dir / "adapter_config.json").is_file() and any(run_dir.glob("adapter_model.*"))
        todo = [p for p in args.protocols if not eval_done(result, p, limit_for(args, p), run.tasks)]
        if run.method == "base":
            result["params"] = {"trainable": 0, "activated": 0}
            for p in todo:
                if not self._eval(run, run_dir, p, result, adapter=False):
                    return self._fail(run_dir, result, f"eval_{p}")
        else:
            if result["train"] is None or (todo and not adapter):
                for stale in ("commands.txt", "routing.png", "error.txt"):  # a fresh training: a fresh record
                    (run_dir / stale).unlink(missing_ok=True)
                result["routing_png"] = None
                cfg = run_config(args, run, run_dir)
                (run_dir / "config.yaml").write_text(
                    f"# {run.name}: written by benchmarks/accuracy/run_study.py from configs/{run.method}.yaml\n"
                    + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None))
                for stale in run_dir.glob("eval_*.json"):
                    stale.unlink()
                result["eval"], todo = {}, list(args.protocols)
                t1 = time.time()
                rc = self.sh(cli(args) + ["train", "--config", str(run_dir / "config.yaml"), "--overwrite",
                                          "--no-progress"], run_dir, "train")
                if rc != 0:
                    return self._fail(run_dir, result, "train")
                result["train"] = train_summary(run_dir, time.time() - t1)
                log = (run_dir / "train.log").read_text()
                m = PARAMS_RE.search(log)
                if m:
                    result["params"] = {"trainable": int(m[2].replace(",", "")), "activated": int(m[3].replace(",", ""))}
                first = args.protocols[0]
                (run_dir / "eval.json").replace(run_dir / f"eval_{first}.json")
                result["eval"][first] = eval_summary(run_dir / f"eval_{first}.json", limit_for(args, first), None)
                todo = todo[1:]
                write_json(run_dir / "result.json", {**result, "status": "partial"})
            for p in todo:
                if not self._eval(run, run_dir, p, result, adapter=True):
                    return self._fail(run_dir, result, f"eval_{p}")
            if wants_routing(args, run) and not (run_dir / "routing.png").is_file():
                if (run_dir / "adapter_config.json").is_file():
                    rc = self.sh(routing_cmd(args, run, run_dir), run_dir, "routing")
                    result["routing_png"] = "routing.png" if rc == 0 else None
                    if rc != 0:
                        result["routing_error"] = tail(run_dir / "routing.err")
            elif (run_dir / "routing.png").is_file():
                result["routing_png"] = "routing.png"
            if args.delete_adapters:
                for f in run_dir.glob("adapter_model.*"):
                    f.unlink()
        result["seconds"] = round(time.time() - t0 + (old.get("seconds") or 0), 1)
        result["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json(run_dir / "result.json", result)
        (run_dir / "error.txt").unlink(missing_ok=True)
        return result

    def _eval(self, run: Run, run_dir: Path, protocol: str, result: dict, adapter: bool) -> bool:
        t1 = time.time()
        rc = self.sh(eval_cmd(self.args, run, run_dir, protocol, adapter), run_dir, f"eval_{protocol}")
        if rc != 0:
            return False
        result["eval"][protocol] = eval_summary(run_dir / f"eval_{protocol}.json", limit_for(self.args, protocol),
                                                time.time() - t1)
        write_json(run_dir / "result.json", {**result, "status": "partial"})
        return True

    def _fail(self, run_dir: Path, result: dict, stem: str) -> dict:
        result["status"] = "failed"
        result["failed_step"] = stem
        result["error"] = tail(run_dir / f"{stem}.err")
        (run_dir / "error.txt").write_text(result["error"] + "\n")
        write_json(run_dir / "result.json", result)
        return result


def eval_done(result: dict, protocol: str, limit: int | None, tasks: list[str]) -> bool:
    """Scored with ``protocol`` at ``limit`` on every one of ``tasks`` (a base model scored on fewer
    tasks by an earlier call is scored again)."""
    e = result.get("eval", {}).get(protocol)
    return bool(e) and e.get("limit") == limit and set(tasks) <= set(e.get("tasks", {}))


def eval_summary(path: Path, limit: int | None, seconds: float | None) -> dict:
    """The adapter's (or base model's) column of a ``moelora eval --output`` JSON, with the limit used."""
    data = json.loads(path.read_text())
    name = next(k for k in data if k != "base") if len(data) > 1 else next(iter(data))
    r = data[name]
    out = {"limit": limit, "average": r["average"], "tasks": {
        t: {k: v[k] for k in ("accuracy", "accuracy_norm", "correct", "total", "unparsed") if k in v}
        for t, v in r["tasks"].items()}}
    if "average_norm" in r:
        out["average_norm"] = r["average_norm"]
    if seconds is not None:
        out["seconds"] = round(seconds, 1)
    return out


def train_summary(run_dir: Path, seconds: float) -> dict:
    rows = [r for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip() and "loss" in (r := json.loads(x))]
    losses = [r["loss"] for r in rows]
    last = losses[-10:] or [float("nan")]
    return {"seconds_with_choice_eval": round(seconds, 1), "steps": rows[-1]["step"] if rows else 0,
            "final_loss_mean10": sum(last) / len(last),
            "tokens_per_s": rows[-1].get("tokens_per_s") if rows else None}


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return f"({path.name} missing)"


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def expected_steps(args, run: Run) -> int | None:
    if run.method == "base":
        return None
    return args.max_steps or yaml.safe_load((CONFIGS / f"{run.method}.yaml").read_text())["train"]["max_steps"]


def is_done(args, run: Run) -> bool:
    """Finished with the requested steps, protocols and limits (and its heatmap, where one is due)."""
    run_dir = Path(args.out) / run.setting / run.method / f"seed{run.seed}"
    r = read_json(run_dir / "result.json")
    if not r or r.get("status") != "ok":
        return False
    if run.method != "base" and (r.get("train") or {}).get("steps") != expected_steps(args, run):
        return False
    if not all(eval_done(r, p, limit_for(args, p), run.tasks) for p in args.protocols):
        return False
    if wants_routing(args, run) and not (run_dir / "routing.png").is_file():
        return not (run_dir / "adapter_config.json").is_file() or not any(run_dir.glob("adapter_model.*"))
    return True


# ---------------------------------------------------------------------------------------------
# Study-level records


def parameter_counts(args) -> dict:
    """Trainable / activated adapter parameters per method, attached to the model on the meta device."""
    import torch
    import transformers

    import moelora
    from moelora.config import config_from_dict
    from moelora.embedded import resolve_model

    path = resolve_model(args.model)
    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        base = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(config).parameters())
    out = {"base": {"trainable": 0, "activated": 0, "base_model": base}}
    args.model_info = {"architecture": config.model_type, "parameters": base,
                       "layers": config.num_hidden_layers, "hidden": config.hidden_size}
    for m in args.methods:
        method = yaml.safe_load((CONFIGS / f"{m}.yaml").read_text())["method"]
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        moelora.attach(model, config_from_dict(method))
        out[m] = {**moelora.count_parameters(model), "base_model": base, "method": method}
    return out


def environment() -> dict:
    env = {"python": sys.version.split()[0], "platform": sys.platform, "cpus": os.cpu_count()}
    try:
        import importlib.metadata as md

        for d in ("torch", "transformers", "accelerate"):
            env[d] = md.version(d)
    except Exception:  # noqa: BLE001 (informational only)
        pass
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        env["gpu"] = gpu.stdout.strip() or None
    except (FileNotFoundError, subprocess.TimeoutExpired):
        env["gpu"] = None
    try:
        env["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=20).stdout.strip() or None
    except (FileNotFoundError, subprocess.TimeoutExpired):
        env["git_commit"] = None
    return env


def _round(x, digits: int):
    if isinstance(x, float):
        return float(f"{x:.{digits}g}")
    if isinstance(x, list):
        return [_round(v, digits) for v in x]
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    return x


def _slim_metrics(path: Path) -> bytes:
    """metrics.jsonl with scalars to 6 significant digits and expert loads to 3 (a MixLoRA run logs
    30 layers x 8 fractions per step: 1.6 MB raw for 300 steps, a third of that rounded)."""
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            r = {k: (_round(v, 3) if k == "expert_load" else _round(v, 6)) for k, v in r.items()}
            rows.append(json.dumps(r, separators=(",", ":")))
    return ("\n".join(rows) + "\n").encode()


def export(out: Path, archive: Path) -> None:
    """Pack the small files of ``out`` (no adapter weights, checkpoints, TensorBoard) into a .tar.gz
    whose top folder is ``out``'s name: ``tar xzf FILE -C runs/`` recreates ``runs/<name>``.
    ``metrics.jsonl`` goes in rounded (``_slim_metrics``), to keep the archive to a few MB."""
    import io

    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for p in sorted(out.rglob("*")):
            rel = p.relative_to(out).as_posix()
            if not p.is_file() or EXPORT_SKIP.search(rel) or rel.endswith(".tmp"):
                continue
            if p.name == "metrics.jsonl":
                data = _slim_metrics(p)
                info = tarfile.TarInfo(f"{out.name}/{rel}")
                info.size, info.mtime, info.mode = len(data), int(p.stat().st_mtime), 0o644
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.add(p, arcname=f"{out.name}/{rel}")
    size = archive.stat().st_size / 2**20
    print(f"exported {archive} ({size:.1f} MiB)" + (" WARNING: over 16 MiB" if size > 16 else ""), flush=True)


def fmt_result(r: dict) -> str:
    if r.get("status") != "ok":
        last = (r.get("error") or "").strip().splitlines()
        return f"at {r.get('failed_step')}: {last[-1] if last else '?'} (see error.txt)"
    parts = []
    if r.get("train"):
        parts.append(f"train {r['train']['seconds_with_choice_eval']:.0f}s loss {r['train']['final_loss_mean10']:.3f}")
    for p, e in r.get("eval", {}).items():
        parts.append(f"{p} avg {100 * e['average']:.1f}% (" + " ".join(
            f"{t} {100 * v['accuracy']:.1f}" for t, v in e["tasks"].items()) + ")")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--model", default=None, help="base model directory, or an embedded model's name (gemma-3-270m); default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "commonsense"),
                    help="folder with <task>/{train,test}.json (default: ../shared/data/commonsense)")
    ap.add_argument("--out", default=str(REPO / "runs" / "accuracy"), help="output folder (default: runs/accuracy)")
    ap.add_argument("--methods", type=csv, default=METHODS, help=f"configs/<name>.yaml names (default: {','.join(METHODS)})")
    ap.add_argument("--settings", type=csv, default=["multi", "single"], help="multi,single (default: both)")
    ap.add_argument("--tasks", type=csv, default=TASKS, help=f"default: {','.join(TASKS)}")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in csv(s)], default=[0, 1, 2], help="default: 0,1,2")
    ap.add_argument("--no-base", dest="base", action="store_false", help="skip the base model zero-shot")
    ap.add_argument("--max-steps", type=int, default=0, help="override train.max_steps (0: the configs' 300)")
    ap.add_argument("--warmup-ratio", type=float, default=0.1, help="with --max-steps: warmup_steps = ratio x steps")
    ap.add_argument("--train-batch-size", type=int, default=0, help="override train.batch_size (0: the configs' 16)")
    ap.add_argument("--protocols", type=csv, default=None,
                    help=f"{','.join(PROTOCOLS)}: any of them, the first runs inside train (default: choice with "
                         "--answers label, options with --answers text; generate-options generates and parses the "
                         "option texts that --answers text trains)")
    ap.add_argument("--answers", choices=["label", "text"], default="label",
                    help="training responses: 'the correct answer is answer2' (label, LLM-Adapters' format) or the "
                         "option's text (text: data format llm-adapters-options, scored by protocol options)")
    ap.add_argument("--eval-limit", type=int, default=0, help="choice/options: first N items per test set (0: all)")
    ap.add_argument("--gen-limit", type=int, default=None, help="generate(-options): first N items per test set (default: --eval-limit)")
    ap.add_argument("--eval-batch-size", type=int, default=64, help="choice/options: prompts per forward (default 64)")
    ap.add_argument("--gen-batch-size", type=int, default=64, help="generate(-options): prompts per batch (default 64)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="generate(-options): new tokens (LLM-Adapters: 32)")
    ap.add_argument("--no-routing", dest="routing", action="store_false", help="skip the routing heatmaps")
    ap.add_argument("--routing-limit", type=int, default=256, help="prompts per task for the routing heatmaps")
    ap.add_argument("--workers", type=int, default=1, help="runs in parallel (GPU: 8-12 for a 135M model)")
    ap.add_argument("--time-budget", type=float, default=0, help="launch no run after this many seconds (0: none)")
    ap.add_argument("--deadline", type=float, default=0, help="kill runs still going after this many seconds (0: none)")
    ap.add_argument("--delete-adapters", action="store_true", help="delete adapter weights once evaluated and plotted")
    ap.add_argument("--export", default=None, help="write the small files of --out into this .tar.gz at the end")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the moelora CLI subprocesses")
    ap.add_argument("--dry-run", action="store_true", help="print the grid and the first run's commands, run nothing")
    args = ap.parse_args(argv)
    if args.gen_limit is None:
        args.gen_limit = args.eval_limit
    if args.protocols is None:
        args.protocols = ["options" if args.answers == "text" else "choice"]
    bad = [p for p in args.protocols if p not in PROTOCOLS] or (not args.protocols and ["(none)"])
    if bad:
        ap.error(f"--protocols: choose from {','.join(PROTOCOLS)}, got {bad}")
    bad = [s for s in args.settings if s not in ("multi", "single")]
    if bad:
        ap.error(f"--settings: choose from multi,single, got {bad}")
    bad = [m for m in args.methods if not (CONFIGS / f"{m}.yaml").is_file()]
    if bad:
        ap.error(f"--methods: no config {bad} in {CONFIGS} (have {sorted(p.stem for p in CONFIGS.glob('*.yaml'))})")
    missing = [f for t in args.tasks for f in (train_file(args, t), test_file(args, t)) if not Path(f).is_file()]
    if missing:
        ap.error(f"--data-root: missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if args.model is not None and args.model.lower() not in EMBEDDED and not Path(args.model).is_dir():
        ap.error(f"--model: {args.model} is neither a model directory nor an embedded model ({', '.join(sorted(EMBEDDED))})")
    if args.workers < 1:
        ap.error("--workers must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = build_grid(args)
    todo = [r for r in grid if not is_done(args, r)]
    print(f"{len(grid)} runs in the grid, {len(grid) - len(todo)} already done, {len(todo)} to run with "
          f"{args.workers} worker(s)", flush=True)
    if args.dry_run:
        for r in todo:
            print("  ", r.name, "train+eval on", ",".join(r.tasks))
        if todo:
            run_dir = out / todo[-1].setting / todo[-1].method / f"seed{todo[-1].seed}"
            print("\nlast run's config:\n" + yaml.safe_dump(run_config(args, todo[-1], run_dir), sort_keys=False)
                  if todo[-1].method != "base" else "")
        return 0

    study = read_json(out / "study.json") or {"invocations": []}
    study["invocations"].append({"argv": [sys.executable, *sys.argv], "cwd": os.getcwd(),
                                 "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "args": {k: v for k, v in vars(args).items() if k != "python"}})
    study["environment"] = environment()
    try:
        study["parameters"] = {**study.get("parameters", {}), **parameter_counts(args)}
        study["model_info"] = args.model_info
    except Exception as e:  # noqa: BLE001 (the runs' own logs still carry the counts)
        print(f"warning: parameter counts on the meta device failed: {e}", flush=True)
    write_json(out / "study.json", study)

    runner = Runner(args)
    durations: dict[str, list[float]] = {}
    results: dict[str, dict] = {}
    active: dict[str, threading.Thread] = {}
    queue = list(todo)
    n_done = 0
    progress = open(out / "progress.log", "a")

    def work(run: Run) -> None:
        t0 = time.time()
        try:
            results[run.name] = runner.execute(run)
        except Stopped:
            results[run.name] = {"status": "killed"}
        except Exception as e:  # noqa: BLE001 (a broken run must not stop the study)
            results[run.name] = {"status": "failed", "failed_step": "runner", "error": repr(e)}
        results[run.name]["_wall"] = time.time() - t0

    def fits(run: Run, now: float) -> bool:
        if args.time_budget and now - start >= args.time_budget:
            return False
        if args.deadline and now - start >= args.deadline:
            return False
        if args.deadline and durations.get(run.kind):
            return now - start + 1.1 * max(durations[run.kind]) <= args.deadline
        return True

    try:
        while queue or active:
            now = time.time()
            if args.deadline and now - start >= args.deadline and active:
                if not runner.stop.is_set():
                    print(f"deadline ({args.deadline:.0f}s): killing {len(active)} run(s) still going", flush=True)
                runner.stop.set()
                runner.kill_all()
            if runner.stop.is_set() and not active:
                break
            if not runner.stop.is_set():
                for run in list(queue):
                    if len(active) >= args.workers:
                        break
                    if fits(run, now):
                        queue.remove(run)
                        th = threading.Thread(target=work, args=(run,), daemon=True)
                        active[run.name] = th
                        th.start()
                if not active and queue and not any(fits(r, now) for r in queue):
                    break
            for name, th in list(active.items()):
                if th.is_alive():
                    continue
                del active[name]
                r = results[name]
                status = r.get("status")
                if status == "killed":
                    line = f"{name} killed at the deadline (its finished steps are kept as 'partial')"
                else:
                    n_done += 1
                    if status == "ok":
                        durations.setdefault(name.split("/")[0], []).append(r["_wall"])
                    line = f"{name} {status} {r['_wall']:.0f}s {fmt_result(r)}"
                stamp = time.strftime("%H:%M:%S", time.gmtime(time.time() - start))
                line = f"[{n_done}/{len(todo)} {stamp}] {line}"
                print(line, flush=True)
                progress.write(line + "\n")
                progress.flush()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("interrupted: killing the runs still going", flush=True)
        runner.stop.set()
        runner.kill_all()
    finally:
        progress.close()
    left = [r.name for r in queue]
    ok = sum(1 for r in results.values() if r.get("status") == "ok")
    failed = [n for n, r in results.items() if r.get("status") == "failed"]
    print(f"finished in {time.time() - start:.0f}s: {ok} ok, {len(failed)} failed" + (f" {failed}" if failed else "")
          + f", {len(left)} not started" + (f" (first: {left[0]})" if left else ""), flush=True)
    if args.export:
        export(out, Path(args.export))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
