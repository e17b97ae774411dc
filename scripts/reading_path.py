"""How far a reader walks from ``python jobs/train.py`` to the first ``optimizer.step()``.

Runs a one-step local training of the tiny test model on the embedded default and records every
function of the package called before the optimizer first steps, and the files they live in: the
measure of how direct the training path is (docs/ARCHITECTURE.md quotes it).

    python scripts/reading_path.py            # counts
    python scripts/reading_path.py --list     # and the files and functions, in call order
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import tempfile
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_pre_hook

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = str(ROOT / "aptos_ray")


class FirstStep(Exception):
    """Raised from the first optimizer step: the walk ends there."""


def walk(argv: list[str]) -> list[tuple[str, str]]:
    """(file, function) of every package function entered before the first optimizer step, in order."""
    seen: dict[tuple[str, str], None] = {}
    stepped = False

    def profile(frame, event, arg):
        code = frame.f_code
        if event != "call" or stepped or not code.co_filename.startswith(PACKAGE):
            return
        # Module and class bodies, comprehensions and lambdas are not functions a reader follows.
        if code.co_name.startswith("<") or "__qualname__" in frame.f_locals:
            return
        seen.setdefault((os.path.relpath(code.co_filename, ROOT), code.co_qualname), None)

    def first_step(optimizer, args, kwargs):
        nonlocal stepped
        stepped = True
        raise FirstStep

    register_optimizer_step_pre_hook(first_step)
    sys.argv = ["jobs/train.py", *argv]
    sys.setprofile(profile)
    try:
        runpy.run_path(str(ROOT / "jobs" / "train.py"), run_name="__main__")
    except FirstStep:
        pass
    finally:
        sys.setprofile(None)
    return list(seen)


def prepare_default(argv: list[str]) -> None:
    from aptos_ray.config import parse_args
    from aptos_ray.data.embedded import ensure_dataset

    ensure_dataset(parse_args(argv))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the files and functions too")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.chdir(tempfile.mkdtemp(prefix="reading-path-"))
    data = ["--synthetic.num_images=40", "--synthetic.image_size=64", "--prepare.image_size=64", "--prepare.card=false"]
    prepare_default(data)  # first use builds the embedded default: not the training path
    calls = walk(["--local", "--model.name=resnet18", "--model.pretrained=none", "--data.image_size=32", *data,
                  "--train.epochs=1", "--train.progress=false", "--train.tracking=none"])
    files = list(dict.fromkeys(f for f, _ in calls))
    if args.list:
        for file in files:
            print(file)
            print("".join(f"    {name}\n" for f, name in calls if f == file), end="")
    print(f"jobs/train.py -> first optimizer.step(): {len(files)} files, {len(calls)} functions of the package")


if __name__ == "__main__":
    main()
