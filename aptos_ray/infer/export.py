"""Export a checkpoint to ONNX, check it against PyTorch, and describe its preprocessing in JSON.

    <predict.output>/model.onnx   input "image" float32 (batch, 3, size, size), dynamic batch
                                  output "outputs" (batch, 5) logits, or (batch, 1) regression score
    <predict.output>/model.json   size, mean, std, cut-points, head, fundus preprocessing, parity

The parity check runs the exported graph in onnxruntime on a batch size other than the one it
was traced with (so the dynamic batch axis is exercised) and fails when any output differs from
PyTorch's by more than ``TOLERANCE`` (relative to the outputs' magnitude) or any grade differs.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from aptos_ray import storage
from aptos_ray.config import Config, ConfigError
from aptos_ray.data.format import GRADE_NAMES
from aptos_ray.errors import ExportError
from aptos_ray.metrics import NUM_GRADES
from aptos_ray.train.checkpoint import prepare_config, read_checkpoint
from aptos_ray.infer.grader import Grader

OPSET = 17  # supported by the installed torch exporters and by onnxruntime >= 1.15
TOLERANCE = 1e-4  # max |onnx - torch| / max(1, max |torch|)
PARITY_BATCHES = (1, 5)  # the graph is traced at batch 2: both differ from it
INPUT_NAME, OUTPUT_NAME = "image", "outputs"




def export_onnx(model: torch.nn.Module, size: int, path: Path) -> str:
    """Write ``model`` (eval mode, CPU) to ``path`` with a dynamic batch axis; returns the exporter used.

    The dynamo exporter needs onnxscript; without it, or when it fails on a model, the
    TorchScript-based exporter (``dynamo=False``) is used, which handles every timm CNN.
    """
    x = torch.zeros(2, 3, size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": OPSET}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        try:
            import onnxscript  # noqa: F401  (the dynamo exporter's dependency)

            torch.onnx.export(model, (x,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
            return "torch.onnx (dynamo)"
        except ImportError:
            pass
        except Exception as e:  # the new exporter still trips on some models: the legacy one does not
            print(f"note: the dynamo ONNX exporter failed ({type(e).__name__}: {str(e)[:200]}); using dynamo=False")
        torch.onnx.export(model, (x,), str(path), dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **names)
    return "torch.onnx (TorchScript-based, dynamo=False)"


def check_parity(grader: Grader, path: Path, seed: int = 0) -> dict:
    """Run ``path`` in onnxruntime and compare with PyTorch; ``ExportError`` above the tolerance."""
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst, grades_equal = 0.0, True
    for batch in PARITY_BATCHES:
        images = rng.integers(0, 256, size=(batch, grader.size, grader.size, 3), dtype=np.uint8)
        x = grader.transforms.eval(images)
        with torch.no_grad():
            expected = grader.model(x.to(grader.device)).float().cpu()
        got = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
        if got.shape != expected.shape:
            raise ExportError(f"{path}: onnxruntime output shape {tuple(got.shape)} != PyTorch {tuple(expected.shape)} "
                              f"at batch {batch}")
        diff = float((got - expected).abs().max()) / max(1.0, float(expected.abs().max()))
        worst = max(worst, diff)
        same = torch.equal(grader.head.grades(got, grader.cut_points),
                           grader.head.grades(expected, grader.cut_points))
        grades_equal = grades_equal and same
    result = {"max_abs_diff": worst, "tolerance": TOLERANCE, "batch_sizes": list(PARITY_BATCHES),
              "grades_equal": grades_equal, "onnxruntime": ort.__version__}
    if worst > TOLERANCE or not grades_equal:
        raise ExportError(f"{path}: ONNX outputs differ from PyTorch (max diff {worst:.2e} > {TOLERANCE:.0e} "
                          f"or grades differ: {not grades_equal})")
    return result


def metadata(grader: Grader, checkpoint, exporter: str, parity: dict, prepare: dict, prepare_from: str) -> dict:
    """Everything a deployment needs to feed the model and read its output, without this package."""
    head = grader.head
    output = {"name": OUTPUT_NAME, "shape": ["batch", head.num_outputs], "meaning": head.output_meaning}
    cfg = checkpoint.config
    return {
        "format": "onnx", "file": "model.onnx", "opset": OPSET, "exporter": exporter,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, grader.size, grader.size], "dtype": "float32",
                  "layout": "NCHW", "channels": "RGB"},
        "output": output,
        "preprocessing": {
            "size": grader.size, "mean": list(grader.mean), "std": list(grader.std),
            "normalise": "x = (rgb_uint8 / 255 - mean) / std, per channel",
            "resize": "antialiased bilinear resize of the square prepared image to size x size",
            "fundus": {"from": prepare_from, **prepare,
                       "steps": "crop the black border, pad-resize to image_size square, Ben Graham (if set), "
                                "circle mask (if set): aptos_ray.data.preprocess.preprocess"},
        },
        "head": head.name, "num_classes": NUM_GRADES, "cut_points": grader.cut_points,
        "decode": head.decoding(grader.cut_points),
        "grade_names": list(GRADE_NAMES),
        "model": cfg.model.name, "checkpoint": checkpoint.path, "epoch": checkpoint.epoch,
        "val_metrics": {k: v for k, v in checkpoint.metrics.items()
                        if k in ("val_qwk", "val_acc", "val_kappa", "val_loss", "val_images")},
        "parity": parity,
    }


def publish(folder: Path, target: str, names: tuple[str, ...]) -> None:
    """Copy ``names`` from ``folder`` to ``target`` (a path or URI), each file whole; when one fails
    (a full disk), those already copied are removed: no model.onnx beside another model's model.json."""
    done = []
    try:
        for name in names:
            storage.write_bytes(storage.join(target, name), (folder / name).read_bytes())
            done.append(name)
    except BaseException:
        for name in done:
            with contextlib.suppress(OSError):
                fs, inner = storage.filesystem(storage.join(target, name))
                fs.delete_file(inner)
        raise


def export(cfg: Config) -> dict:
    """The export job: ``predict.checkpoint`` -> ``<predict.output>/model.onnx`` + ``model.json``
    (a local folder or a URI: built in a temporary folder, then uploaded)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"ONNX export needs onnx and onnxruntime ({e}): pip install 'aptos-ray[export]'") from None
    checkpoint = read_checkpoint(cfg.predict.checkpoint)
    grader = Grader(checkpoint, "cpu")
    target = cfg.predict.output
    with tempfile.TemporaryDirectory(prefix="aptos-export-") as tmp:
        out = Path(tmp)  # built aside, then published: a full disk leaves no half model.onnx in the output
        path = out / "model.onnx"
        exporter = export_onnx(grader.model, grader.size, path)
        parity = check_parity(grader, path)
        prepare, prepare_from = prepare_config(checkpoint)
        meta = metadata(grader, checkpoint, exporter, parity, asdict(prepare), prepare_from)
        (out / "model.json").write_text(json.dumps(meta, indent=2))
        size = path.stat().st_size
        publish(out, target, ("model.onnx", "model.json"))
    print(f"exported {checkpoint.path} -> {storage.join(target, 'model.onnx')} ({size / 1e6:.1f} MB, {exporter}, "
          f"opset {OPSET})")
    print(f"parity with PyTorch: max diff {parity['max_abs_diff']:.2e} (tolerance {TOLERANCE:.0e}) at batch sizes "
          f"{parity['batch_sizes']}, grades equal: {parity['grades_equal']}")
    print(f"preprocessing and decoding: {storage.join(target, 'model.json')}")
    return meta
