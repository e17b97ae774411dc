"""Run the benchmarks that fit this machine and write benchmarks/RESULTS.md (+ out/results.json).

    python benchmarks/run.py                      # everything (~1.5 h on 2 cores, mostly the quality runs)
    python benchmarks/run.py --skip-quality       # speed only (about 20 min on 2 cores)
    python benchmarks/run.py --only train data    # rerun some sections, keep the others
    python benchmarks/run.py --render             # rewrite RESULTS.md from out/results.json
    python benchmarks/run.py --splice-section gpu FILE  # a section from a benchmark's saved output

Each benchmark is its own script (run alone for details); this runner calls them one after
another, so they never compete for the cores, and collects the Markdown tables they print.
Figures are ratios measured side by side in one run; absolute numbers are context only.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"

APTOS_RECIPES = ["seed", "default", "lite0-pretrained-classification", "lite0-scratch-regression"]
BENCHMARKS = {
    "quality-aptos": ("Grading quality on APTOS (shared folder): seed vs default recipe, same split and budget",
                      ["quality.py", "aptos", "--size", "128", "--epochs", "6", "--recipes", *APTOS_RECIPES]),
    "quality-retinamnist": ("RetinaMNIST official test split: default recipe and its classification-head "
                            "variant (for AUC), 3 seeds",
                            ["quality.py", "retinamnist", "--size", "64", "--epochs", "30", "--seeds", "0", "1", "2",
                             "--recipes", "default", "lite0-pretrained-classification"]),
    "quality-cv": ("Cross-validation on APTOS (5 folds): the default recipe at 160 px, the seed recipe, camera shift",
                   ["quality.py", "cv", "--prepare-size", "224", "--size", "160", "--epochs", "5", "--folds", "5",
                    "--recipes", "default", "--rescore-tta", "3", "--local", "--threads", "2"]),
    "bn": ("BatchNorm with small per-worker DDP batches: local vs frozen (vs SyncBatchNorm on GPU)",
           ["bench_bn.py", "--size", "128", "--epochs", "3", "--batches", "8", "4"]),
    "prepare": ("Prepare throughput: Ray Data vs a plain loop", ["bench_prepare.py", "--limit", "500"]),
    "data": ("Data to the training loop: prepared Parquet + Ray Data vs the seed's ImageFolder",
             ["bench_data.py", "--images", "300"]),
    "train": ("Training: TorchTrainer vs a plain PyTorch loop", ["bench_train.py", "--size", "64"]),
    "predict": ("Inference: Ray Data actor pool vs a plain loop", ["bench_predict.py", "--limit", "1000"]),
    "gradability": ("Gradability: verdicts on the shared APTOS folder and on known degradations",
                    ["bench_gradability.py", "--degrade", "300", "--synthetic", "100"]),
    "tune": ("Tune: ASHA vs a full grid", ["bench_tune.py"]),
    "decode": ("Full-size photographs: JPEGs decoded at the size needed vs in full",
               ["bench_decode.py", "--images", "30", "--synthetic", "4", "--degrade", "30", "--jobs", "200",
                "--old", "../main", "--parts", "cost", "equality", "jobs", "png"]),
    "predict-memory": ("Predict's driver memory as inputs grow: 2,929, 20,503 and 87,870 raw inputs, to a local "
                       "folder and to S3", ["bench_predict_memory.py", "--copies", "1", "7", "30"]),
    "scale": ("Scale: prepare, one training epoch and predict at 1k, 5k and 20k images of 512 px; growth and "
              "extrapolation to EyePACS (88,702)",
              ["bench_scale.py", "--sizes", "1000", "5000", "20000", "--old", "../main", "--old-sizes", "1000", "5000",
               "--timeout", "2400"]),
    "augment": ("Batched augmentation: per-image torchvision vs v2 on a batch vs kornia vs train.augment",
                ["bench_augment.py"]),
    "gpu": ("GPU check (benchmarks/gpu_check.sh): pytest -m gpu, and training throughput of Lite0, B0 and B2 "
            "at 224 and 384 px: plain PyTorch vs --local vs TorchTrainer",
            ["bench_gpu.py", "--tests-log", "benchmarks/out/gpu_tests.log"]),
}
GPU_ONLY = {"gpu"}  # skipped, and said so in RESULTS.md, where torch sees no CUDA device
# How to read each table (printed under it in RESULTS.md).
NOTES = {
    "quality-aptos": "The shared APTOS folder prepared once at 128 px, split 70/15/15 (stratified, seeded, "
                     "near-duplicates kept together). Every recipe: 6 epochs, one process (`--local`, the loop Ray "
                     "runs). Best epoch by validation QWK; its checkpoint scored once on the test split. The seed's "
                     "published figures (50 epochs, 224 px, 733 images): accuracy 0.719, Cohen kappa 0.547. "
                     "At this budget the seed recipe has not left its degenerate phase: it predicts the up-weighted "
                     "rare grades, because its sampler and its class-weighted loss correct for imbalance twice and lr "
                     "0.01 from scratch is unstable. The classification head finds grades 3-4 far less often than "
                     "the default regression head. `minutes` is wall time on 2 cores.",
    "quality-retinamnist": "Official split (1,080 / 120 / 400), 28 px images upsampled to 64. Published on this "
                           "test split, ACC / AUC: ResNet-18 (28) 0.524 / 0.717, ResNet-50 (28) 0.528 / 0.726, "
                           "ResNet-50 (224) 0.511 / 0.716, Google AutoML Vision 0.531 / 0.750; MedMNIST+ up to "
                           "0.642 ACC. AUC is one-vs-rest on softmax probabilities, so only classification heads "
                           "have it. Mean and spread over the seeds are in the last rows. These rows were measured "
                           "by the code of 2026-11-29 (commit 05c5554): a rerun of seed 0 on later code (issue 18: "
                           "test QWK 0.519, not 0.584) is a different training run, not noise. Code at 05c5554 run "
                           "twice gives the same epoch 0 (val QWK 0.5592, val loss 1.8372), and the code of "
                           "2026-11-30 08:00 (9d45529) twice the same too (0.4330, 3.0512), but the two differ from "
                           "epoch 0: commit 8d0c22e replaced the per-image torchvision augmentation by the batched "
                           "device-side one (other random draws, one resampling instead of several), and issue 18's "
                           "per-epoch seeding (train/step.py) changes the draws again. The spread of such a "
                           "change is the spread over seeds above (test QWK sd 0.036); these rows wait for a rerun "
                           "on the current code (30 epochs x 3 seeds x 2 recipes, ~18 min idle; not done in the "
                           "issue-18 session, the machine was shared at load 20-45).",
    "quality-cv": "Every image of the shared folder predicted once, by the model of the fold that did not train on "
                  "it (its last epoch). Each fold is graded with cut-points and a referral threshold chosen on the "
                  "other folds' out-of-fold predictions only; `pooled OOF` is all folds together. `referral`: score "
                  ">= a threshold set for sensitivity 0.90 on the other folds. 160 px and 5 epochs because the "
                  "issue's 224 px / 10 epochs takes about 4 h on 2 cores (80 min here); the seed recipe's own "
                  "schedule (50 epochs) about 54 h. The camera-shift rows and the reduced-settings seed row are "
                  "separate commands (quality.py cv --shift, --recipes seed), written beside this table by hand.",
    "bn": "Same split, budget and global batch in every pair of rows; the DDP rows give each worker's BatchNorm "
          "half the batch. Frozen keeps the pretrained running statistics and affine (timm's FrozenBatchNorm). "
          "One seed: differences under ~0.02 QWK are noise.",
    "prepare": "500 APTOS images, 256 px output. On 224 px inputs an image costs ~3 ms, so Ray's per-task overhead "
               "shows; Ray pays off on full-size photographs and more cores.",
    "data": "Images/s per CPU core delivered to the training loop (tensors ready for the model), same images. "
            "`new, GPU worker` is all a GPU worker's CPU does now (rows -> one uint8 batch; augmentation runs on "
            "the GPU; pinning, one more copy per batch there, is not in this figure); `new, CPU worker` adds the batched "
            "augmentation on the CPU, as a CPU-only run does. "
            "On full-size photographs the seed decodes and resizes every image every epoch, which preparing "
            "once removes. The end-to-end table times epochs of the `--local` training loop with each path, in "
            "turns; per CPU second is the figure that holds on a shared machine.",
    "train": "Images/s of the second epoch; the project's rows run the whole pipeline (Parquet, Ray Data shard, "
             "resampling, augmentation).",
    "predict": "efficientnet_b0 at 224 px on raw APTOS files (preprocessing included). On one 2-core machine the "
               "pool splits the same two cores into two single-threaded actors and pays their start-up; it is "
               "there to spread inference over a cluster's nodes.",
    "gradability": "Thresholds (aptos_ray/infer/quality.py) were set between the real photographs and the "
                   "degraded ones in the third table: below the darkest/blurriest real photographs (p1) and above "
                   "the degraded ones' bulk, leaving the 'mild' variants as the borderline they are. The shared "
                   "folder is graded data, so nearly every photograph should pass; the 3 flagged are dim grey "
                   "photographs (median fundus luminance 28-29). Sharpness is measured with the fundus resized to "
                   "224 px, so a full-size photograph is judged at the scale the model sees. The assessment runs in "
                   "predict's row-loading task, on the photograph before preprocessing; its cost is the last table.",
    "augment": "The same augmentation (crop 0.85-1, both flips, rotation to 180 degrees, brightness and contrast "
               "0.2, resize, normalise) from a uint8 batch, one core. v2 on a batch tensor draws one set of "
               "parameters for the whole batch, so it cannot replace the per-image loop; kornia and "
               "train.augment draw per image. train.augment composes crop, flips, rotation and resize into "
               "one matrix per image and resamples once; it is what training uses, on the worker's device.",
    "gpu": "`plain` is a bare timm + PyTorch loop on in-memory batches (the GPU's ceiling); `--local` and "
           "TorchTrainer run the whole data path (Parquet, uint8 batches readied by a background thread, "
           "augmentation on the GPU). `waiting for data` is the share of the epoch the training thread waited "
           "for its next batch. Steady state: the second epoch after its first two steps (plain: after 5 warm-up steps); synthetic photos at each size.",
    "scale": "Inputs: jittered 512 px upscales of the shared APTOS photographs (JPEG, ~30 KB), made in /tmp. "
             "Each stage is its own driver process with a local Ray of 2 CPUs and a 3 GiB object store: prepare "
             "(256 px, data card included), one epoch of test_efficientnet at 64 px (1 Ray Train worker; "
             "`data.materialize=auto` materialises 1k and 5k and streams 20k, whose splits exceed half the "
             "store), predict of the train split (1 actor). Driver RSS is the process's peak (VmHWM); the "
             "object store is polled once a second. `old` is the main checkout's prepare on the same inputs in "
             "the same run. Extrapolation, on paper: wall = fixed + slope x N (linear fit); the 4-node "
             "figure assumes 4 nodes like this one (2 cores each), per-image work (decode, preprocess, hash, "
             "the pass-2 rewrite, training steps under DDP, inference) divided by 4, and the fixed part and the "
             "driver's all-pairs near-duplicate search (quadratic, measured apart) not divided; network and "
             "shared-storage bandwidth assumed not to bind. "
             "Full-size EyePACS JPEGs (~3-10 MP, ~0.4 MB) cost more per image than these 512 px inputs. Measured "
             "side by side (\"Full-size photographs: JPEGs decoded at the size needed vs in full\": decode + "
             "preprocess at 256 px, one core), a 3888 x 2592 JPEG costs 16.9x a 512 px one when decoded in full "
             "(the code before) and 1.9x with the reduced decode prepare now uses. The extrapolation redone with "
             "that cost: prepare's slope grows by the extra work per image over 2 cores, (t_full-size - t_512) / "
             "2, with t rescaled to this run's load by the 512 px figure (13 ms here, 38.8 ms there): +103 s per "
             "1k images with full decodes, +5.9 s per 1k with reduced ones, so prepare of EyePACS at full size "
             "takes 29 + 120.4 x 88.7 + 48 s = 3.0 h here and 0.76 h on 4 nodes with full decodes, 29 + 23.2 x "
             "88.7 + 48 s = 0.59 h here and 0.16 h on 4 nodes with reduced ones. Predicting EyePACS' raw "
             "photographs (rather than a prepared split) adds predict's row work (decode, quality check, "
             "preprocess: 2,012 vs 307 ms per image there): +337 vs +51 s per 1k images, so 8.5 h vs 1.4 h here, "
             "2.1 h vs 0.36 h on 4 nodes. Everything after the decode (pass 2, the driver, training, predict of "
             "prepared splits) is unchanged. "
             "Same results as before: on the shared "
             "APTOS folder (2,929 images, default settings) the two-pass prepare gives the same per-split ids, "
             "the same image bytes per id, the same near-duplicate groups and the same content hash as the "
             "one-writer prepare run with Ray Data's `preserve_order` (rows in input order); the one-writer "
             "prepare's default split them in task-completion order, so two of its runs gave different splits "
             "(measured), which sorting by input order fixes. Row order inside the split files differs.",
    "predict-memory": "Inputs: the shared APTOS PNGs under 1, 7 and 30 ids each (hard links, labelled: the "
                      "report runs), raw inputs of one predict each, in its own process with a local Ray of 2 CPUs "
                      "and an untrained test_efficientnet. S3 is moto's server in a process of its own. RSS is the "
                      "driver's (VmRSS before and after each stage of infer.predict, VmHWM for the peak); it "
                      "includes torch, Ray and the checkpoint (about 1 GB before the first input). Growth per input "
                      "is the difference between two sizes over the inputs added; stages whose memory has a cap "
                      "(the contact sheet: 48 photographs; the report's bootstrap: 4 M draws a chunk) grow until "
                      "they reach it, so the larger pair of sizes is the slope that goes on.",
    "decode": "Inputs made in /tmp: the shared APTOS photographs enlarged into 3888 x 2592 frames (JPEG "
              "quality 90, ~0.4 MB, the disc 85-100% of the height) and synthetic photographs rendered at that size "
              "(vessels, lesions and noise at full resolution). `reduced` is `preprocess.decode_photo(needed=...)`: "
              "the smallest power-of-two DCT-domain reduction (PIL `Image.draft`) whose shorter side stays at "
              "least twice the size needed (prepare: `image_size`; predict: that or the quality check's 224 px, "
              "so 1/4 at 256 px); `full` is the decode before; the plain PIL loop opens, converts and resizes "
              "(no crop, no mask). PNGs and small JPEGs are never reduced (same cost, same pixels). Equality: "
              "the preprocessed images of both decodes (default settings), per channel mean absolute difference "
              "and PSNR; the tests pin mean absolute difference <= 1.5 (of 255), PSNR >= 35 dB and the crop box "
              "within 1 output pixel on generated 1600 x 1200 JPEGs (tests/test_decode.py, reductions 1/2 and "
              "1/4); here the means stay within those limits at every size, while the worst single image, an "
              "enlarged APTOS photograph at 128 px (1/8), reaches 2.9 / 31 dB. Verdicts: predict's "
              "quality check (`quality.assess_photo`, which measures a reduced decode at the size its full "
              "decode is measured at) on full-size JPEG copies of bench_gradability.py's degradations (same "
              "seeded sample; blur scaled to the size); `expected` is the verdict at 224 px, where `small` is "
              "too small: enlarged, its disc is > 1000 px and gradable, under both decodes. End to end: each "
              "job in its own process, old = the commit before (git archive), new = this code, on the same "
              "inputs in the same run, on a shared 2-core machine under heavy load (load average 20-60): "
              "single runs, so read the ratios, not the seconds. The per-image rows subtract the small run from "
              "the large one, so Ray's start-up, the model's loading and the report cancel. Predict reads the "
              "raw JPEGs (labels.csv + images/) with a test_efficientnet checkpoint (64 px input) trained on the "
              "new prepare. Disk: the peak under the job's output folder (prepare's staged rows are now zstd).",
    "tune": "Same grid, seed and data for both searches. Trial start-up (~15-20 s) dwarfs an epoch here, so "
            "wall time barely moves; trial-epochs are what ASHA saves.",
}
QUALITY = {"quality-aptos", "quality-retinamnist", "quality-cv", "bn"}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MARKER = "## Results"  # every benchmark prints it before its report
LOG_LINE = re.compile(r"^(\(|\[|\d{4}-\d\d-\d\d|\w+:\s+\d+%)")  # Ray actor logs, timestamps, progress bars


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
    # Ray workers' logs and progress bars share stdout: drop escape codes and log lines.
    lines = [ANSI.sub("", line.split("\r")[-1]).strip() for line in proc.stdout.splitlines()]
    start = len(lines) - lines[::-1].index(MARKER) if MARKER in lines else 0
    report = [line for line in lines[start:] if not LOG_LINE.match(line)]
    if not start:  # no marker: the table rows alone
        report = [line for line in report if line.startswith("|")]
    return {"name": name, "command": " ".join(["python", f"benchmarks/{command[0]}", *command[1:]]),
            "ok": proc.returncode == 0, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "minutes": round((time.perf_counter() - started) / 60, 1),
            "table": "\n".join(report).strip(), "stdout_tail": lines[-3:], "stderr_tail": proc.stderr[-1500:]}


def spaced(table: str) -> str:
    """Tables printed one after another arrive as one block of rows: a blank line before each header."""
    rows, out = table.splitlines(), []
    for i, row in enumerate(rows):
        if out and out[-1] and i + 1 < len(rows) and rows[i + 1].startswith("|---"):
            out.append("")
        out.append(row)
    return "\n".join(out)


def merged(results: list[dict]) -> list[dict]:
    """This run's results over the previous run's (``--only`` reruns a part), in BENCHMARKS order."""
    path = HERE / "out" / "results.json"
    previous = json.loads(path.read_text())["results"] if path.is_file() else []
    by_name = {r["name"]: r for r in previous if r["name"] in BENCHMARKS} | {r["name"]: r for r in results}
    return [by_name[name] for name in BENCHMARKS if name in by_name]


def write_results(info: dict, results: list[dict]) -> str:
    lines = ["# Benchmark results", "",
             f"{info['date']} · {info['machine']} · Python {info['python']} · {info['versions']} · GPU: {info['gpu']}",
             "", "Written by `python benchmarks/run.py` (`--only NAME` reruns one section and keeps the others). "
             "Ratios are measured side by side within one benchmark; absolute times are context only.", ""]
    for r in results:
        lines += [section(r)]
    for name in GPU_ONLY - {r["name"] for r in results}:
        lines += [f"## {BENCHMARKS[name][0]}", "", not_run(name), ""]
    text = "\n".join(lines)
    (HERE / "RESULTS.md").write_text(text)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "results.json").write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return text


def not_run(name: str) -> str:
    return ("not run (no GPU lent): no GPU on the machine that wrote this file (`bash benchmarks/gpu_check.sh` "
            "on a GPU machine adds it).")


def section(r: dict) -> str:
    """One benchmark's part of RESULTS.md, from its title to the line before the next section."""
    when = ", ".join(part for part in (f"{r['minutes']} min" if r.get("minutes") is not None else "", r.get("date", ""))
                     if part)
    lines = [f"## {BENCHMARKS[r['name']][0]}", "", f"`{r['command']}` ({when})", ""]
    lines += [spaced(r["table"]) or "(no table: see out/results.json)", "", NOTES[r["name"]], ""] if r["ok"] else \
             ["Failed:", "", "```", r["stderr_tail"], "```", ""]
    return "\n".join(lines)


def splice(results: list[dict]) -> None:
    """Replace only these sections of RESULTS.md (appended if absent), keeping every other line as it is:
    for a machine without out/results.json, e.g. a GPU machine running gpu_check.sh on a fresh checkout."""
    text = (HERE / "RESULTS.md").read_text()
    for r in results:
        title = f"## {BENCHMARKS[r['name']][0]}"
        start = text.find(title + "\n")
        if start < 0:
            text = text.rstrip("\n") + "\n\n" + section(r)
            continue
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section(r) + ("\n" + text[end + 1:] if end >= 0 else "")
    (HERE / "RESULTS.md").write_text(text)


def saved_report(name: str, path: Path) -> dict:
    """A result as ``run`` makes it, from a benchmark's saved output (what follows its ``## Results``)."""
    lines = [ANSI.sub("", line).rstrip() for line in path.read_text().splitlines()]
    start = len(lines) - lines[::-1].index(MARKER) if MARKER in lines else 0
    command = {"gpu": "bash benchmarks/gpu_check.sh"}.get(name, " ".join(["python", f"benchmarks/{BENCHMARKS[name][1][0]}"]))
    return {"name": name, "command": command, "ok": True,
            "date": datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "table": "\n".join(lines[start:]).strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS))
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--render", action="store_true", help="rewrite RESULTS.md from out/results.json, run nothing")
    parser.add_argument("--splice", action="store_true",
                        help="replace only the sections run in RESULTS.md, keep the rest (no out/results.json needed)")
    parser.add_argument("--splice-section", nargs=2, metavar=("NAME", "FILE"),
                        help="replace section NAME of RESULTS.md with the report in FILE (a benchmark's output), "
                             "e.g. gpu benchmarks/out/gpu_check.md copied back from a GPU machine")
    args = parser.parse_args()
    if args.splice_section:
        name, path = args.splice_section
        splice([saved_report(name, Path(path))])
        print(f"spliced the '{name}' section of {HERE / 'RESULTS.md'} from {path}")
        return
    if args.render:
        saved = json.loads((HERE / "out" / "results.json").read_text())
        write_results(saved["machine"], saved["results"])
        return
    names = args.only or [n for n in BENCHMARKS if not (args.skip_quality and n in QUALITY)]
    import torch

    if not torch.cuda.is_available():
        names = [n for n in names if n not in GPU_ONLY]
    info, results = machine(), []
    for name in names:
        print(f"== {name}: {' '.join(BENCHMARKS[name][1])}", flush=True)
        results.append(run(name, BENCHMARKS[name][1]))
        print(results[-1]["table"] or results[-1]["stderr_tail"], flush=True)
        if args.splice:
            splice(results[-1:])
        else:
            write_results(info, merged(results))  # after each one, so a long run shows progress
    print(f"\nwrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
