"""Run the benchmarks that fit this machine and write benchmarks/RESULTS.md (+ out/results.json).

    python benchmarks/run.py                      # speed + quality (hours on 2 cores: quality dominates)
    python benchmarks/run.py --skip-quality       # speed only (~15 min on 2 cores)
    python benchmarks/run.py --only train data    # a subset

Each benchmark is its own script (run alone for details); this runner calls them one after
another, so they never compete for the cores, and collects the Markdown tables they print.
Figures are ratios measured side by side in one run; absolute numbers are context only.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"

BENCHMARKS = {
    "prepare": ("Prepare throughput: Ray Data vs a plain loop", ["bench_prepare.py", "--limit", "500"]),
    "data": ("Data to the training loop: prepared Parquet + Ray Data vs the seed's ImageFolder",
             ["bench_data.py", "--images", "300"]),
    "train": ("Training: TorchTrainer vs a plain PyTorch loop", ["bench_train.py", "--size", "64"]),
    "predict": ("Inference: Ray Data actor pool vs a plain loop", ["bench_predict.py"]),
    "quality-aptos": ("Grading quality on APTOS (shared folder): seed vs default recipe, same split and budget",
                      ["quality.py", "aptos", "--size", "128", "--epochs", "6", "--recipes", "seed", "default"]),
    "quality-retinamnist": ("RetinaMNIST official test split, default recipe, 3 seeds",
                            ["quality.py", "retinamnist", "--size", "64", "--epochs", "10", "--seeds", "0", "1", "2",
                             "--recipes", "default"]),
}


def machine() -> dict:
    import os

    import ray
    import timm
    import torch

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
        "python": platform.python_version(),
        "versions": f"torch {torch.__version__}, timm {timm.__version__}, ray {ray.__version__}",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }


def run(name: str, command: list[str]) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], cwd=ROOT,
                          capture_output=True, text=True)
    tables = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    context = [line for line in proc.stdout.splitlines() if line and not line.startswith("|")][-3:]
    return {"name": name, "command": " ".join(["python", f"benchmarks/{command[0]}", *command[1:]]),
            "ok": proc.returncode == 0, "minutes": round((time.perf_counter() - started) / 60, 1),
            "table": "\n".join(tables), "context": context, "stderr_tail": proc.stderr[-1500:]}


def write_results(info: dict, results: list[dict]) -> str:
    lines = ["# Benchmark results", "",
             f"{info['date']} · {info['machine']} · Python {info['python']} · {info['versions']} · GPU: {info['gpu']}",
             "", "Written by `python benchmarks/run.py`. Ratios are measured side by side in one run.", ""]
    for r in results:
        lines += [f"## {BENCHMARKS[r['name']][0]}", "", f"`{r['command']}` ({r['minutes']} min)", ""]
        lines += [r["table"] or "(no table: see out/results.json)", ""] if r["ok"] else \
                 ["Failed:", "", "```", r["stderr_tail"], "```", ""]
    text = "\n".join(lines)
    (HERE / "RESULTS.md").write_text(text)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "results.json").write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS))
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    names = args.only or [n for n in BENCHMARKS if not (args.skip_quality and n.startswith("quality"))]
    info, results = machine(), []
    for name in names:
        print(f"== {name}: {' '.join(BENCHMARKS[name][1])}", flush=True)
        results.append(run(name, BENCHMARKS[name][1]))
        print(results[-1]["table"] or results[-1]["stderr_tail"], flush=True)
        write_results(info, results)  # after each one, so a long run shows progress
    print(f"\nwrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
