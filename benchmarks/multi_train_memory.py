"""Peak memory of two adapters trained together vs two separate runs (issue 5; the MixLoRA paper
reports about 40% saved by sharing the frozen base).

Runs ``moelora train`` three times as child processes on the same model and data: adapters A and
B together (``adapters:``), A alone, B alone, and reads each run's ``train_summary.json``: the
process's peak resident memory (CPU) or peak allocated GPU memory. Two separate runs need the sum
of their peaks at once; the saving is ``1 - together / (A + B)``.

    python benchmarks/multi_train_memory.py [--model DIR] [--steps 4] [--out runs/memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "examples" / "toy"
ADAPTERS = {
    "lora": {"type": "lora", "r": 16, "lora_alpha": 32},
    "mixlora": {"type": "mixlora", "num_experts": 8, "top_k": 2, "r": 16, "lora_alpha": 32},
}


def run(config: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(json.dumps({**config, "output_dir": str(out / "run")}))
    subprocess.run([sys.executable, "-m", "moelora.cli", "train", "--config", str(path), "--overwrite", "--no-progress"],
                   check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
    return json.loads((out / "run" / "train_summary.json").read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cutoff-len", type=int, default=256)
    ap.add_argument("--out", default="runs/multi_train_memory")
    args = ap.parse_args(argv)
    base = {"model": args.model, "data": [{"path": str(TOY / t / "train.jsonl")} for t in ("addition", "letters")],
            "train": {"max_steps": args.steps, "batch_size": args.batch_size, "cutoff_len": args.cutoff_len,
                      "save_steps": 0}}
    out = Path(args.out)
    together = run({**base, "adapters": ADAPTERS}, out / "together")
    alone = {name: run({**base, "method": block}, out / name) for name, block in ADAPTERS.items()}
    key = "peak_gpu_allocated_bytes" if "peak_gpu_allocated_bytes" in together else "peak_cpu_rss_bytes"
    mib = {name: s[key] / 2**20 for name, s in {"together": together, **alone}.items()}
    separate = sum(mib[n] for n in ADAPTERS)
    report = {"measure": key, "device": together["device"], "peak_mib": mib, "separate_runs_mib": separate,
              "saved_fraction": 1 - mib["together"] / separate,
              "seconds": {"together": together["seconds"], **{n: s["seconds"] for n, s in alone.items()}}}
    print(json.dumps(report, indent=1))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
