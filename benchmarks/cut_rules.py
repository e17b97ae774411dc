"""Cut-point rules (cv.cut_rule) compared on a cross-validation's out-of-fold scores, without retraining.

    python benchmarks/cut_rules.py cv_runs/NAME            # reads cv_runs/NAME/oof.parquet
    python benchmarks/cut_rules.py cv_runs/NAME --resplits 5 --rules qwk prior

Each fold is graded with cut-points the rule chose on the other folds' scores only (as jobs/cv.py
scores its table), and the graded folds are pooled: predicted vs true count per grade, accuracy, QWK,
Cohen kappa, referable-DR sensitivity / specificity at predicted grade >= 2 and at the referral
threshold. So that one fold split's noise does not pick the rule, the out-of-fold rows are then
re-split into as many stratified random folds ``--resplits`` times (each image keeps the score its own
fold model gave it) and every rule is cross-fitted again: the change against ``qwk`` (today's rule) as
mean +- sd over the re-splits, and on how many of them the goal holds (accuracy >= +0.04, QWK within
0.005 of ``qwk``, every grade's predicted count within 1.5x of its true count).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aptos_ray.cut_rules import CUT_RULES, MIN_PRECISION  # noqa: E402
from aptos_ray.tune.cv_results import OOF_FILE, cross_fitted, scores_of  # noqa: E402

GOAL_ACC, GOAL_QWK, GOAL_RATIO = 0.04, 0.005, 1.5


def figures(oof: pd.DataFrame, rule: str, min_precision: float, target_sensitivity: float) -> dict:
    result = scores_of(cross_fitted(oof, target_sensitivity, rule, min_precision))
    true, called = np.array(result["true_counts"]), np.array(result["predicted_counts"])
    ratio = called / np.maximum(true, 1)
    result["worst_ratio"] = float(max(ratio.max(), 1 / max(ratio.min(), 1e-9)))
    return result


def meets_goal(rule: dict, baseline: dict) -> bool:
    return (rule["acc"] - baseline["acc"] >= GOAL_ACC and rule["qwk"] >= baseline["qwk"] - GOAL_QWK
            and rule["worst_ratio"] <= GOAL_RATIO)


def resplit(oof: pd.DataFrame, folds: int, seed: int) -> pd.DataFrame:
    out = oof.copy()
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for k, (_, rows) in enumerate(splitter.split(out, out["grade"])):
        out.loc[out.index[rows], "fold"] = k
    return out


def table(results: dict[str, dict], resplits: dict[str, list[dict]], baseline: str) -> str:
    head = ("| rule | predicted counts (true {true}) | worst count ratio | acc | QWK | kappa | "
            "sens / spec (grade >= 2) | referral sens / spec | Δacc, ΔQWK over re-splits | goal met |")
    true = " / ".join(str(n) for n in results[baseline]["true_counts"])
    lines = [head.format(true=true), "|" + "---|" * 10]
    for rule, r in results.items():
        deltas = [(s["acc"] - b["acc"], s["qwk"] - b["qwk"]) for s, b in zip(resplits[rule], resplits[baseline])]
        met = sum(meets_goal(s, b) for s, b in zip(resplits[rule], resplits[baseline]))
        d = np.array(deltas) if deltas else np.zeros((1, 2))
        lines.append(
            f"| {rule} | {' / '.join(str(n) for n in r['predicted_counts'])} | {r['worst_ratio']:.2f} | "
            f"{r['acc']:.3f} | {r['qwk']:.3f} | {r['kappa']:.3f} | {r['sens_grade']:.2f} / {r['spec_grade']:.2f} | "
            f"{r['sens_refer']:.2f} / {r['spec_refer']:.2f} | {d[:, 0].mean():+.3f} ± {d[:, 0].std():.3f}, "
            f"{d[:, 1].mean():+.4f} ± {d[:, 1].std():.4f} | "
            f"{'yes' if meets_goal(r, results[baseline]) else 'no'}; {met}/{len(deltas)} re-splits |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cv_dir", type=Path, help="a cross-validation folder holding oof.parquet")
    parser.add_argument("--rules", nargs="+", default=list(CUT_RULES), choices=CUT_RULES)
    parser.add_argument("--min-precision", type=float, default=MIN_PRECISION, help="the qwk_precision floor")
    parser.add_argument("--target-sensitivity", type=float, default=0.9)
    parser.add_argument("--resplits", type=int, default=5, help="random re-splits of the out-of-fold rows")
    args = parser.parse_args()
    oof = pd.read_parquet(args.cv_dir / OOF_FILE, columns=["id", "grade", "fold", "score"])
    folds = oof["fold"].nunique()
    rules = ["qwk", *[r for r in args.rules if r != "qwk"]]
    results, resplits = {}, {rule: [] for rule in rules}
    for rule in rules:
        results[rule] = figures(oof, rule, args.min_precision, args.target_sensitivity)
        print(f"{rule}: acc {results[rule]['acc']:.3f} QWK {results[rule]['qwk']:.3f} "
              f"counts {results[rule]['predicted_counts']}", flush=True)
    for seed in range(1, args.resplits + 1):
        shuffled = resplit(oof, folds, seed)
        for rule in rules:
            resplits[rule].append(figures(shuffled, rule, args.min_precision, args.target_sensitivity))
        print(f"re-split {seed}/{args.resplits} done", flush=True)
    print(f"\n{len(oof)} out-of-fold scores from {args.cv_dir}, {folds} folds; qwk_precision floor "
          f"{args.min_precision}; goal: accuracy +{GOAL_ACC}, QWK within {GOAL_QWK} of qwk, "
          f"every grade's count within {GOAL_RATIO}x\n")
    print(table(results, resplits, "qwk"))


if __name__ == "__main__":
    main()
