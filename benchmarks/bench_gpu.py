"""GPU training throughput, for when a GPU machine is at hand (benchmarks/gpu_check.sh runs it).

    python benchmarks/bench_gpu.py [--models tf_efficientnet_lite0 efficientnet_b0 efficientnet_b2]
                                   [--sizes 224 384] [--batch 64] [--steps 20] [--modes plain local ray]
                                   [--budget-s 200] [--tests-log benchmarks/out/gpu_tests.log ...]
    python benchmarks/bench_gpu.py --render        # the table from --json alone (any machine)

For each model and size, training images/s three ways on the same GPU, AMP as ``train.precision=auto``
picks it (bf16 where supported, else fp16 + GradScaler) and channels_last:
- plain: a bare timm + PyTorch loop on in-memory batches (the GPU's ceiling; no data path at all);
- local: ``jobs/train.py --local`` over a prepared dataset (Parquet -> uint8 batches -> device-side
  augmentation), one process;
- ray: the same through a 1-worker Ray Train TorchTrainer (Ray Data shard).
with peak GPU memory and the share of the epoch the training thread waited for its next batch
(``data_wait_share``, 0 = the data path keeps up). Steady state: plain times the steps after 5
warm-up steps; local and ray report the second epoch's ``steady_images_per_s`` (its steps after the
first two, which wait for the data path to start). Data: synthetic fundus photos at each size (a
bare GPU machine has no shared folder). Without CUDA it prints "not run".

Rows past ``--budget-s`` are skipped, so the whole check fits its time box. Each row is added to
``--json`` as it finishes (so a part run later, e.g. ``--modes ray`` once Ray is installed, adds its
rows to the same table), and the table is printed when the run ends, also when it is interrupted
(SIGINT or SIGTERM, as ``timeout`` sends): a time box keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from aptos_ray.config import ModelConfig, parse_args  # noqa: E402
from aptos_ray.model.factory import create_model  # noqa: E402
from aptos_ray.model.heads import get_head  # noqa: E402
from aptos_ray.train.augment import GRAY, GradeTransforms  # noqa: E402
from aptos_ray.train.step import autocast, grad_scaler, resolve_precision, train_one_epoch  # noqa: E402

CPUS_PER_WORKER = max(1, min(4, (os.cpu_count() or 2) - 1))  # a typical GPU node's share, leaving one for Ray
MODES = {"plain": "plain timm + PyTorch", "local": "--local", "ray": "TorchTrainer 1 worker"}


def plain_rate(name: str, size: int, batch: int, steps: int) -> dict:
    device = torch.device("cuda")
    precision = resolve_precision("auto", device)
    model = create_model(ModelConfig(name=name, pretrained="none", head="classification"))
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = grad_scaler(precision)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (batch,), device=device)
    torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 5):
        if step == 5:  # warm-up (cudnn autotuning, allocator) not timed
            torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast(device, precision):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"images_per_s": steps * batch / seconds, "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30,
            "data_wait_share": 0.0, "precision": precision}


class PerTensorCopies(GradeTransforms):
    """The augmentation as it was: every random parameter and constant copied to the GPU on its own."""

    @staticmethod
    def _to_device(device, *parts):
        return [{k: v.to(device) for k, v in p.items()} if isinstance(p, dict) else p.to(device) for p in parts]

    def _constants(self, device):
        return 255 * self.mean.to(device), 255 * self.std.to(device), torch.tensor(GRAY, device=device)


# What each of the step's host-sync fixes is worth: the training loop as it is, and with one fix undone.
FIXES = {
    "as now": {},
    "loss read every step (.item())": {"read_loss": True},
    "cudnn.benchmark off": {"benchmark": False},
    "augmentation: one copy per parameter": {"transforms": PerTensorCopies},
}


def fix_rates(name: str, size: int, batch: int, steps: int, device: torch.device = torch.device("cuda")) -> dict:
    """Steady images/s of ``train_one_epoch`` on in-memory uint8 batches (augmentation on the GPU),
    per row of ``FIXES``."""
    import numpy as np

    precision = resolve_precision("auto", device)
    rng = np.random.default_rng(0)
    stored = size + size // 4
    batches = [(rng.integers(0, 256, (batch, stored, stored, 3), dtype=np.uint8), rng.integers(0, 5, batch))
               for _ in range(steps)]
    head = get_head("regression")
    rates = {}
    for label, undo in FIXES.items():
        torch.backends.cudnn.benchmark = undo.get("benchmark", True)
        torch.manual_seed(0)
        model = create_model(ModelConfig(name=name, pretrained="none", head="regression"))
        model = model.to(device).to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss = head.loss()
        if undo.get("read_loss"):
            plain_loss = loss

            def loss(outputs, grades, plain_loss=plain_loss):
                value = plain_loss(outputs, grades)
                value.item()  # the host read the step used to make
                return value

        transforms = undo.get("transforms", GradeTransforms)(size, (0.5,) * 3, (0.25,) * 3)
        args = (transforms, loss, optimizer, None, device, grad_scaler(precision), precision, True)
        train_one_epoch(model, batches[:4], *args, steps=4)  # warm-up: cuDNN's autotuning, the allocator
        stats = train_one_epoch(model, batches, *args, steps=steps)
        rates[label] = {"images_per_s": stats["steady_images_per_s"]}
        print("fix", label, rates[label], flush=True)
    torch.backends.cudnn.benchmark = False
    return {"model": name, "size": size, "batch": batch, "steps": steps, "rates": rates}


def print_fixes(fixes: dict) -> None:
    base = fixes["rates"].get("as now", {}).get("images_per_s")
    print(f"\nWhat each fix is worth: `train_one_epoch` of {fixes['model']} at {fixes['size']} px, batch "
          f"{fixes['batch']}, in-memory uint8 batches augmented on the GPU, steady state, each fix undone in turn\n")
    print("| training loop | img/s | / as now |\n|---|---|---|")
    for label in FIXES:
        rate = fixes["rates"].get(label, {}).get("images_per_s")
        ratio = f"{rate / base:.2f}" if rate and base else "-"
        print(f"| {label} | {f'{rate:.0f}' if rate else 'not run'} | {ratio} |")


def project_rate(name: str, size: int, batch: int, steps: int, data: Path, out: Path, local: bool) -> dict:
    from aptos_ray.train.driver import train

    run = f"{name}-{size}-{'local' if local else 'ray'}"
    cfg = parse_args([f"--data.dataset={data}", f"--model.name={name}", "--model.pretrained=none", "--model.head=classification",
                      f"--data.image_size={size}", f"--train.batch_size={batch}", "--train.eval_batch_size=128",
                      "--train.epochs=2", f"--train.max_steps_per_epoch={steps}", "--train.progress=false",
                      f"--train.output={out}", f"--train.name={run}", "--scaling.use_gpu=true",
                      "--scaling.num_workers=1", f"--scaling.cpus_per_worker={CPUS_PER_WORKER}",
                      f"--train.local={local}"])
    train(cfg)
    epoch = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()][-1]
    return {"images_per_s": epoch["steady_images_per_s"], "epoch_images_per_s": epoch["images_per_s"],
            "peak_gpu_gb": max(epoch.get("peak_gpu_memory_mb", [0])) / 1024,
            "data_wait_share": epoch["data_wait_share"]}


def dataset(size: int, batch: int, steps: int, work: Path) -> Path:
    """Enough rows for ``steps`` batches: 40 drawn photos repeated (drawing is the slow part)."""
    from helpers import synthetic_subset

    copies = -(-batch * steps // 40)
    return synthetic_subset(work / f"data-{size}", size=size, per_grade=8, val_per_grade=4, copies=copies)


def tests_summary(logs: list[str]) -> list[str]:
    found = [log for log in logs if Path(log).is_file()]
    if not found:
        return ["`pytest -m gpu`: not run here"]
    out = []
    for log in found:
        lines = [line.strip("= ") for line in Path(log).read_text().splitlines() if line.strip()]
        out.append(f"`pytest -m gpu` ({Path(log).name}): {lines[-1] if lines else 'no output'}")
    return out


def cell(r: dict | None, key: str, fmt: str) -> str:
    if r is None:
        return "not run"
    if "skipped" in r or "error" in r:
        return r.get("skipped") or f"failed: {r['error']}"
    return format(r[key], fmt)


def load_rows(path: Path) -> dict:
    """Rows saved by earlier parts of the check (``--json``), keyed (model, size, mode)."""
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return {(r["model"], r["size"], r["mode"]): {k: v for k, v in r.items() if k not in ("model", "size", "mode")}
            for r in saved.get("rows", [])}


def save_rows(path: Path, rows: dict, device: dict, fixes: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"device": device, "rows": [{"model": k[0], "size": k[1], "mode": k[2], **v} for k, v in rows.items()]}
    path.write_text(json.dumps({**saved, **({"fixes": fixes} if fixes else {})}, indent=2))


def print_table(rows: dict, device: dict, models: list[str], sizes: list[int], tests_logs: list[str],
                fixes: dict | None = None) -> None:
    print("\n## Results\n", flush=True)  # benchmarks/run.py keeps what follows
    print("\n".join(tests_summary(tests_logs)) + "\n")
    print(f"{device.get('name', '?')}, torch {device.get('torch', '?')}, precision auto -> "
          f"{device.get('precision', '?')}, channels_last, batch {device.get('batch', '?')}, "
          f"{device.get('steps', '?')} steps per epoch, steady-state images/s\n")
    modes, fed = list(MODES), [m for m in MODES if m != "plain"]
    headers = ["model", "px", *(f"{MODES[m]} img/s" for m in modes), *(f"{MODES[m]} / plain" for m in fed),
               f"peak GPU GB ({' / '.join(modes)})", f"waiting for data ({' / '.join(fed)})"]
    print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
    for name in models:
        for size in sizes:
            r = {m: rows.get((name, size, m)) for m in modes}
            base = r.get("plain")
            ratios = [f"{r[m]['images_per_s'] / base['images_per_s']:.2f}"
                      if base and "images_per_s" in base and r[m] and "images_per_s" in r[m] else "-"
                      for m in fed]
            memory = " / ".join(f"{r[m]['peak_gpu_gb']:.1f}" if r[m] and "peak_gpu_gb" in r[m] else "-" for m in modes)
            waits = " / ".join(f"{r[m]['data_wait_share']:.0%}" if r[m] and "data_wait_share" in r[m] else "-"
                               for m in fed)
            print(f"| {name} | {size} | " + " | ".join(cell(r[m], "images_per_s", ".0f") for m in modes) + " | "
                  + " | ".join(ratios) + f" | {memory} | {waits} |")
    if fixes:
        print_fixes(fixes)
    sys.stdout.flush()


def stop_on_sigterm() -> None:
    """``timeout`` sends SIGTERM by default: end like Ctrl-C, so the table of what finished is printed."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def measure(args, rows: dict, started: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = {s: dataset(s, args.batch, args.steps, work) for s in args.sizes if set(args.modes) - {"plain"}}
        for mode in args.modes:  # all plain rows first: the cheapest, and the reference
            for name in args.models:
                for size in args.sizes:
                    if time.perf_counter() - started > args.budget_s:
                        rows[name, size, mode] = {"skipped": "skipped (time budget)"}
                        continue
                    try:
                        if mode == "plain":
                            rows[name, size, mode] = plain_rate(name, size, args.batch, args.steps)
                        else:
                            rows[name, size, mode] = project_rate(name, size, args.batch, args.steps, data[size],
                                                                  work / "runs", local=mode == "local")
                    except Exception as error:  # noqa: BLE001 - one failed row must not lose the table
                        rows[name, size, mode] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
                    print(mode, name, size, rows[name, size, mode], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0", "efficientnet_b0", "efficientnet_b2"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 384])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps per run (per epoch for local/ray)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--budget-s", type=float, default=200, help="skip the rows that would start after this")
    parser.add_argument("--tests-log", nargs="*", default=[], help="pytest -m gpu outputs to summarise above the table")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "bench_gpu.json"),
                        help="rows of earlier parts are read from it, this part's added")
    parser.add_argument("--render", action="store_true", help="print the table from --json, measure nothing")
    parser.add_argument("--fixes", action="store_true",
                        help="also measure what each host-sync fix of the training step is worth (first model and size)")
    args = parser.parse_args()
    path = Path(args.json)
    rows = load_rows(path)
    saved = json.loads(path.read_text()) if path.is_file() else {}
    device, fixes = saved.get("device", {}), saved.get("fixes")
    if args.render:
        if not rows:
            print(f"\n## Results\n\nnot run: no GPU rows in {path}")
            return
        print_table(rows, device, args.models, args.sizes, args.tests_log, fixes)
        return
    if not torch.cuda.is_available():
        print("\n## Results\n\nnot run (no GPU lent): torch sees no CUDA device")
        return
    device = {"name": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
              "steps": args.steps, "precision": resolve_precision("auto", torch.device("cuda"))}
    stop_on_sigterm()
    started = time.perf_counter()
    try:
        if args.fixes:
            fixes = fix_rates(args.models[0], args.sizes[0], args.batch, args.steps)
        measure(args, rows, started)
    except KeyboardInterrupt:
        print("interrupted: the table holds the rows that finished", flush=True)
    finally:
        save_rows(path, rows, device, fixes)
        print_table(rows, device, args.models, args.sizes, args.tests_log, fixes)


if __name__ == "__main__":
    main()
