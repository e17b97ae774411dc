"""What ASHA saves: the tune job with ASHA against a full grid of the same space on the same data.

    python benchmarks/bench_tune.py [--images 500] [--size 64] [--epochs 4] [--model test_efficientnet]
                                    [--lrs 1e-4,3e-4,1e-3,3e-3,1e-2,3e-2] [--workers 1] [--grace 1]

Both searches are ``jobs/tune.py`` runs over the same grid (``optim.lr: {grid: [...]}``): every
value exactly once, same seed, same data. One with ASHA (grace period --grace, reduction factor 2),
one where nothing is stopped early (grace period = epochs: ASHA's only rung is the last epoch).
Reported: the best validation QWK each finds, the trial-epochs each spends, wall time, and the
rank ASHA's pick has in the full grid. The data is a stratified subset of the real APTOS images
(../shared/data/aptos2019-224) prepared once with the project's own pipeline.
Not a test: prints a table (and writes it to benchmarks/out/tune/bench_tune_grace<N>.md).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aptos_ray.config import parse_args  # noqa: E402
from aptos_ray.tune.search import run_search  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "tune"
APTOS = ROOT.parent / "shared" / "data" / "aptos2019-224"


def dataset(images: int, size: int) -> Path:
    out = ROOT / "benchmarks" / "out" / f"bench-tune-{images}-{size}"
    if not (out / "manifest.json").is_file():
        from aptos_ray.data.prepare import prepare

        prepare(parse_args([f"--prepare.input={APTOS}", f"--prepare.output={out}", f"--prepare.limit={images}",
                            f"--prepare.image_size={size}", "--prepare.card=false"]))
    return out


def search(name: str, data: Path, args: argparse.Namespace, grace_period: int) -> tuple[dict, float]:
    config = OUT / f"{name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    lrs = [float(v) for v in args.lrs.split(",")]
    config.write_text(yaml.safe_dump({"tune": {"space": {"optim.lr": {"grid": lrs}}}}))
    shutil.rmtree(OUT / name, ignore_errors=True)
    cfg = parse_args([
        "--config", str(config), f"--data.dataset={data}", f"--model.name={args.model}",
        "--model.pretrained=none", "--model.head=classification",
        f"--data.image_size={args.size}", "--train.batch_size=16", "--train.eval_batch_size=64",
        "--train.progress=false", f"--train.epochs={args.epochs}", "--optim.warmup_epochs=0",
        f"--scaling.num_workers={args.workers}", f"--tune.output={OUT}", f"--tune.name={name}",
        "--tune.num_samples=1", f"--tune.grace_period={grace_period}", "--tune.reduction_factor=2",
        f"--train.output={OUT}/train_runs",
    ])
    started = time.perf_counter()
    result = run_search(cfg)
    return result, time.perf_counter() - started


def report(asha: dict, asha_s: float, full: dict, full_s: float, epochs: int) -> str:
    a, f = asha["table"], full["table"]
    lr_rank = {lr: i + 1 for i, lr in enumerate(f["optim.lr"])}  # full table is sorted by best QWK
    asha_pick = a.iloc[0]["optim.lr"]
    per_lr = f.set_index("optim.lr")[["best_val_qwk"]].rename(columns={"best_val_qwk": "full QWK"})
    per_lr["ASHA QWK"] = a.set_index("optim.lr")["best_val_qwk"]
    per_lr["ASHA epochs"] = a.set_index("optim.lr")["epochs"]
    lines = [
        "| search | trials | trial-epochs | best val QWK | best lr | wall s |",
        "|---|---|---|---|---|---|",
        f"| full grid | {len(f)} | {int(f['epochs'].sum())} | {f.iloc[0]['best_val_qwk']:.4f} | "
        f"{f.iloc[0]['optim.lr']:g} | {full_s:.0f} |",
        f"| ASHA | {len(a)} | {int(a['epochs'].sum())} | {a.iloc[0]['best_val_qwk']:.4f} | {asha_pick:g} | "
        f"{asha_s:.0f} |",
        "",
        f"ASHA spent {a['epochs'].sum() / f['epochs'].sum():.0%} of the full grid's trial-epochs "
        f"({epochs} epochs per full trial); its pick is #{lr_rank[asha_pick]} of {len(f)} in the full grid.",
        "",
        "| lr | full QWK | ASHA QWK | ASHA epochs |",
        "|---|---|---|---|",
    ]
    lines += [f"| {lr:g} | {r['full QWK']:.4f} | {r['ASHA QWK']:.4f} | {int(r['ASHA epochs'])} |"
              for lr, r in per_lr.sort_index().iterrows()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--model", default="test_efficientnet")
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3,1e-2,3e-2")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--grace", type=int, default=2, help="ASHA grace period (epochs; the default config's)")
    args = parser.parse_args()
    data = dataset(args.images, args.size)
    asha, asha_s = search("asha", data, args, grace_period=args.grace)
    full, full_s = search("full", data, args, grace_period=args.epochs)
    setup = (f"{args.images} APTOS images at {args.size} px, {args.model}, {args.workers} worker(s) per trial, "
             f"learning rates {args.lrs}, {args.epochs} epochs, ASHA grace period {args.grace}")
    text = f"{setup}\n\n" + report(asha, asha_s, full, full_s, args.epochs)
    (OUT / f"bench_tune_grace{args.grace}.md").write_text(text)
    print("\n## Results\n")  # benchmarks/run.py keeps what follows
    print(text)


if __name__ == "__main__":
    main()
