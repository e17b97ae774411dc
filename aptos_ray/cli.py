"""The command line of every job: ``aptos-ray JOB [--key=value ...]`` and ``python jobs/JOB.py ...``.

Both run ``run_job``: parse and validate the config (``aptos_ray.config``; nothing heavy imported
yet, so a bad value fails in a second), then import and run the job's function. Configuration and
data problems, missing or taken paths and unusable weights exit with status 2 and one line naming
the key or file, not a traceback; anything else (a built-in FileNotFoundError included) is a bug
and keeps its traceback. ``--help`` prints the job's examples and every key it reads.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

from aptos_ray import storage
from aptos_ray.config import HELP_FLAGS, SECTIONS, Config, help_text, parse_args, wants_help
from aptos_ray.errors import ExportError, SearchFailed, SearchInterrupted, UserError, storage_failure

# (exception, exit status): besides UserError's 2
OTHER_EXITS = ((SearchInterrupted, 130), (SearchFailed, 1), (ExportError, 1))

# The sections every Ray job reads besides its own: where Ray runs.
DATA_SECTIONS = ("synthetic", "prepare", "data")  # train and tune build the embedded default on first use
TRAIN_SECTIONS = (*DATA_SECTIONS, "model", "optim", "train", "scaling")


@dataclass(frozen=True)
class Job:
    name: str
    target: str  # "module:function", imported only once the config is valid
    summary: str
    sections: tuple[str, ...]  # what --help lists
    examples: tuple[str, ...]  # "{prog}" is replaced by how the job was started
    outputs: tuple[str, ...] = ()  # the keys of the folders it writes: checked writable before it starts
    resumes: bool = False  # --resume continues a run from its saved config (train.resume)

    def function(self) -> Callable[[Config], object]:
        module, function = self.target.split(":")
        return getattr(importlib.import_module(module), function)


def _prepare(cfg: Config) -> None:
    print(cfg.summary())
    from aptos_ray.data.prepare import prepare

    print(f"prepared dataset: {prepare(cfg)}")


JOBS = {job.name: job for job in (
    Job("prepare", "aptos_ray.cli:_prepare",
        "Prepare raw fundus data (Kaggle folder, image folders, labels CSV, RetinaMNIST .npz) into the "
        "Parquet dataset that training reads, with seeded stratified splits, a quarantine and a data card.",
        ("prepare", "scaling"),
        ("{prog} --prepare.input=../shared/data/aptos2019-224 --prepare.output=data/prepared/aptos",
         "{prog} --prepare.input=../shared/data/aptos2019-224 --prepare.output=data/prepared/aptos-128 "
         "--prepare.image_size=128 --prepare.limit=600",
         "{prog} --card-only --prepare.output=data/prepared/aptos"),
        outputs=("prepare.output",)),
    Job("train", "aptos_ray.train.driver:train",
        "Train a DR grader with Ray Train (DDP over scaling.num_workers workers) or --local in one process. "
        "With no --data.dataset it trains on the embedded synthetic default, generated on first use.",
        TRAIN_SECTIONS,
        ("{prog} --config configs/demo.yaml",
         "{prog} --local --data.dataset=data/prepared/aptos --train.epochs=3",
         "{prog} --config configs/seed_baseline.yaml --data.dataset=data/prepared/aptos",
         "{prog} --resume --train.name=NAME"),
        outputs=("train.output",), resumes=True),
    Job("tune", "aptos_ray.tune.search:run_search",
        "Search hyperparameters with Ray Tune + ASHA; every trial is a Ray Train run. Writes trials.csv, "
        "trials.md, best_config.yaml and qwk_per_epoch.png under tune.output/tune.name. Ctrl+C stops the "
        "search with its state saved (exit status 130); --tune.resume=true continues it.",
        (*TRAIN_SECTIONS, "tune"),
        ("{prog} --tune.num_samples=4 --train.epochs=4",
         "{prog} --config configs/tune_demo.yaml --data.dataset=data/prepared/aptos",
         "{prog} --tune.space=\"{'optim.lr': {'loguniform': [1e-4, 1e-2]}}\" --tune.num_samples=3",
         "{prog} --tune.name=NAME --tune.resume=true"),
        outputs=("tune.output",)),
    Job("cv", "aptos_ray.tune.cv:run_cv",
        "K-fold cross-validation: one training run per fold of data.folds (Ray Tune trials over data.fold, "
        "or one after another with --local), every image predicted once by the model that did not train on "
        "it, QWK cut-points and a referral threshold (cv.target_sensitivity) chosen on those predictions. "
        "Writes cv.json, cv.md, oof.parquet and the fold runs under cv.output/cv.name; predict the fold "
        "ensemble with --predict.checkpoint=<that folder>.",
        (*TRAIN_SECTIONS, "cv"),
        ("{prog} --config configs/quality.yaml --data.dataset=data/prepared/aptos",
         "{prog} --local --data.folds=5 --data.dataset=data/prepared/aptos --train.epochs=3 --cv.name=quick",
         "{prog} --local --data.folds=5 --data.dataset=data/prepared/aptos --train.epochs=3 --cv.name=quick "
         "--resume"),
        outputs=("cv.output",), resumes=True),
    Job("predict", "aptos_ray.infer.predict:predict",
        "Grade fundus photographs with a trained checkpoint (Ray Data actor pool): submission.csv, "
        "predictions.parquet, predict.json, and the evaluation report when the grades are known.",
        ("predict", "scaling"),
        ("{prog} --predict.checkpoint=runs/NAME --predict.images=data/prepared/aptos",
         "{prog} --predict.checkpoint=runs/NAME --predict.images=../shared/data/aptos2019-224 "
         "--predict.tta=3 --predict.output=outputs/predict",
         "{prog} --predict.checkpoint=cv_runs/NAME --predict.images=../shared/data/aptos2019-224"),
        outputs=("predict.output",)),
    Job("evaluate", "aptos_ray.infer.report:evaluate",
        "Write the evaluation report of a prediction run (report.html, report.md, metrics.json, figures).",
        ("predict",),
        ("{prog} --predict.output=outputs/predict",),
        outputs=("predict.output",)),
    Job("export", "aptos_ray.infer.export:export",
        "Export a checkpoint to ONNX (dynamic batch), checked against PyTorch with onnxruntime; "
        "exit status 1 when the outputs differ.",
        ("predict",),
        ("{prog} --predict.checkpoint=runs/NAME --predict.output=outputs/export",),
        outputs=("predict.output",)),
)}


def job_help(job: Job, prog: str) -> str:
    others = [s for s in SECTIONS if s not in job.sections]
    lines = [
        f"usage: {prog} [--config FILE.yaml ...] [--section.key=VALUE ...]",
        "",
        textwrap.fill(job.summary, width=100),
        "",
        "Examples:",
        *("  " + example.replace("{prog}", prog) for example in job.examples),
        "",
        "Values: the defaults, then each --config YAML file, then --section.key=VALUE (a YAML value).",
        "A key that only one section has may be given alone (--lr=0.01 is --optim.lr=0.01).",
        "Shortcuts: --local, --resume, --card-only, --verbose (= --train.local=true, ...). "
        f"{' / '.join(HELP_FLAGS)}: this text.",
        "",
        help_text(list(job.sections)).rstrip(),
    ]
    if others:
        lines += ["", f"Also accepted (see `aptos-ray JOB --help` of the jobs that read them): {', '.join(others)}."]
    return "\n".join(lines) + "\n"


def run_job(name: str, argv: list[str] | None = None, prog: str | None = None) -> None:
    """Parse, validate and run job ``name``; exits with the job's status on a known error."""
    job = JOBS[name]
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or f"python jobs/{name}.py"
    if wants_help(argv):
        print(job_help(job, prog), end="")
        return
    try:
        # A resume's values are the run's saved config with argv on top: validated once rebuilt.
        cfg = parse_args(argv, sections=job.sections, validate=not job.resumes)
        if job.resumes and cfg.train.resume:
            from aptos_ray.train.resume import resumed_config

            cfg = resumed_config(cfg, argv, job.sections)
        elif job.resumes:
            cfg.validate(job.sections)
        if not (sys.stdout.isatty() or cfg.scaling.verbose):
            cfg.train.progress = False  # a bar repaints line by line in a file, CI or `ray job logs`
        from aptos_ray.ray_setup import set_ray_env

        set_ray_env(cfg.scaling.verbose)  # before the job imports Ray
        check_outputs(job, cfg)
        job.function()(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except tuple(error for error, _ in OTHER_EXITS) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(next(status for error, status in OTHER_EXITS if isinstance(e, error)))
    except Exception as e:  # a full or read-only disk, an unreachable endpoint: one line, else a bug's traceback
        failure = storage_failure(e)
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(2)


def check_outputs(job: Job, cfg: Config) -> None:
    """Each folder the job writes can be written (``storage.check_writable``), before any work."""
    for key in job.outputs:
        section, name = key.split(".")
        storage.check_writable(getattr(getattr(cfg, section), name), key)


def main(argv: list[str] | None = None) -> None:
    """``aptos-ray JOB [--key=value ...]`` (the console script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: aptos-ray {{{','.join(JOBS)}}} [--key=value ...]   (aptos-ray JOB --help: its keys)"
    if not argv or argv[0] in HELP_FLAGS:
        print(usage)
        for job in JOBS.values():
            print(f"  {job.name:9s} {job.summary.split('. ')[0].rstrip('.')}.")
        return
    if argv[0] not in JOBS:
        print(f"error: unknown job '{argv[0]}'\n{usage}", file=sys.stderr)
        sys.exit(2)
    run_job(argv[0], argv[1:], prog=f"aptos-ray {argv[0]}")


if __name__ == "__main__":
    main()
