"""Batch inference: a checkpoint + images -> submission.csv, predictions.parquet, unreadable.csv.

    infer.inputs.find_inputs (driver: ids, labels if known, paths; problems found here are "unreadable")
      raw files  -> ray.data.from_items -> map_batches(load_rows)        (Ray tasks: decode + the
                                                                          training prepare steps)
      prepared   -> ray.data.read_parquet(<dataset>/<split>)              (already preprocessed)
      -> map_batches(GradePredictor, compute=ActorPoolStrategy(size=n))   (Ray actors: the model is
                                                                          loaded once per actor)
      local output: the rows (no image) stream to the driver, which writes every file
      URI output:   -> write_parquet(<output>/_staging-XXXX/)           (the workers: one row per input)
                    -> read_parquet(staging) -> predicted rows -> write_parquet(predictions.parquet/)
                                                                     (the workers: parts, published whole)
                    the driver reads back only the narrow columns its own files use (for raw
                    inputs not even the ids and paths: its listing has them, by order)
      -> driver: rows sorted back into input order -> infer.outputs: submission.csv, unreadable.csv,
         predict.json (+ infer.report with labels); the staging folder is removed

Every input ends up either predicted or in ``unreadable.csv`` with its id and the reason, so
``num_inputs == num_predicted + num_unreadable`` always holds. The model call itself is plain
PyTorch (``infer.grader.Grader``), shared with the single-process benchmark and the export parity check.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from dataclasses import asdict

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from aptos_ray import storage
from aptos_ray.config import Config, ConfigError, PrepareConfig, ScalingConfig
from aptos_ray.data.format import TRAIN_COLUMNS, decode_batch, encode_image
from aptos_ray.data.preprocess import ImageError, preprocess
from aptos_ray.data.sources import read_photo, stop_on_driver_only_paths
from aptos_ray.train.checkpoint import Checkpoint, prepare_config, read_checkpoint
from aptos_ray.infer.ensemble import build_grader, checkpoint_for_driver, read_ensemble
from aptos_ray.infer.grader import PROB_COLUMNS, Grader
from aptos_ray.infer.inputs import Inputs, find_inputs, normalisation_of, preprocessing_differences
from aptos_ray.infer.outputs import (PREDICTIONS, by_id, prediction_columns, print_summary, remove_stale_report,
                                     split_results, write_outputs)
from aptos_ray.infer.quality import QUALITY_COLUMNS, as_columns, assess_photo, decode_size, not_assessed
from aptos_ray.infer.report import write_report
from aptos_ray.infer.screening import quality_of_rows, screening_outputs
from aptos_ray.ray_setup import (
    check_assigned_gpus_usable,
    check_seen_by_every_node,
    cluster_node_types,
    init_ray,
    placement_problem,
    ray_progress,
    worker_capacity,
)


def load_rows(batch: dict, prepare: dict) -> dict:
    """Ray task: read and preprocess raw image files exactly as ``prepare`` did for training, and
    judge each photograph's quality (``infer.quality``) as it came, before preprocessing.

    A file that cannot be used keeps its row, with ``reason`` set and no image.
    """
    cfg = PrepareConfig(**prepare)
    images, heights, widths, reasons, qualities = [], [], [], [], []
    for i in range(len(batch["source"])):
        quality = not_assessed()
        record = {k: batch[k][i] for k in ("source", "listed_on", "array") if k in batch}
        try:
            photo = read_photo(record, cfg.min_image_side, cfg.max_pixels, needed=decode_size(cfg))
            quality = assess_photo(photo)
            arr = preprocess(photo.pixels, cfg)
            data, reason = encode_image(arr, "raw"), ""
        except ImageError as e:
            arr, data, reason = None, b"", e.reason
        except Exception as e:  # one odd file must not stop the job: report it with the error
            arr, data, reason = None, b"", f"unreadable image: {type(e).__name__}: {e}"
        qualities.append(quality)
        images.append(data)
        heights.append(0 if arr is None else arr.shape[0])
        widths.append(0 if arr is None else arr.shape[1])
        reasons.append(reason)
    rows = {k: v for k, v in batch.items() if k != "array"}  # npz pixels: decoded into "image" now
    return {**rows, "image": np.array(images, dtype=object), "height": np.array(heights, dtype=np.int32),
            "width": np.array(widths, dtype=np.int32), "reason": np.array(reasons, dtype=object),
            **as_columns(qualities)}


class GradePredictor:
    """Ray Data actor: loads the checkpoint once, then grades batches of preprocessed rows."""

    def __init__(self, checkpoint_path: str, tta: int, encoding: str):
        check_assigned_gpus_usable("predict actor")
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES per actor
        self.grader = build_grader(checkpoint_path, device, tta)  # one checkpoint, or an ensemble
        self.encoding = encoding
        self.float_columns = self.grader.output_columns

    def __call__(self, batch: dict) -> dict:
        n = len(batch["id"])
        reasons = batch.get("reason", np.full(n, "", dtype=object))
        ok = np.array([not r for r in reasons], dtype=bool)
        out = {k: v for k, v in batch.items() if k != "image"}
        out["reason"] = reasons
        if ok.any():
            good = {k: batch[k][ok] for k in ("image", "height", "width")}
            graded = self.grader(decode_batch(good, self.encoding))
        else:
            graded = {}
        out["predicted"] = _fill(n, ok, graded.get("predicted"), -1, np.int64)
        for name in self.float_columns:
            out[name] = _fill(n, ok, graded.get(name), np.nan, np.float64)
        return out


class FoldGradePredictor:
    """Ray Data actor for out-of-fold predictions (jobs/cv.py): loads every fold's checkpoint once,
    then grades each row with the model of its own ``fold``; ``score`` (+ ``prob_0..4``)."""

    def __init__(self, checkpoints: dict, tta: int, encoding: str):
        check_assigned_gpus_usable("predict actor")
        device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES per actor
        self.graders = {int(k): Grader(read_checkpoint(path), device, tta) for k, path in checkpoints.items()}
        self.encoding = encoding
        first = next(iter(self.graders.values()))
        self.columns = ["score", *(PROB_COLUMNS if first.head.has_probabilities else [])]

    def __call__(self, batch: dict) -> dict:
        folds = np.asarray(batch["fold"], dtype=np.int64)
        out = {"id": batch["id"], "grade": np.asarray(batch["grade"], dtype=np.int64), "fold": folds,
               **{c: np.full(len(folds), np.nan) for c in self.columns}}
        for fold in np.unique(folds):
            mine = folds == fold
            graded = self.graders[int(fold)](decode_batch({k: batch[k][mine] for k in ("image", "height", "width")},
                                                          self.encoding))
            for column in self.columns:
                out[column][mine] = graded[column]
        return out


def predict_folds(ds, checkpoints: dict[int, str], tta: int, encoding: str, batch_size: int, num_actors: int,
                  scaling: ScalingConfig | None = None) -> pd.DataFrame:
    """Out-of-fold predictions of ``ds`` (prepared rows with a ``fold`` column) through the same
    actor pool and staging as ``predict``; rows in no particular order."""
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    size, resources = actor_resources(num_actors, scaling)
    return collect(ds.map_batches(
        FoldGradePredictor,
        fn_constructor_kwargs={"checkpoints": checkpoints, "tta": tta, "encoding": encoding},
        compute=ray.data.ActorPoolStrategy(size=size),
        batch_size=batch_size,
        batch_format="numpy",
        **resources,
    ))


def _fill(n: int, ok: np.ndarray, values, missing, dtype) -> np.ndarray:
    full = np.full(n, missing, dtype=dtype)
    if values is not None:
        full[ok] = values
    return full


def actor_resources(num_actors: int, scaling: ScalingConfig | None = None) -> tuple[int, dict]:
    """(pool size, per-actor resources). ``scaling.use_gpu``: each actor asks for
    ``scaling.gpus_per_worker`` GPUs, and the pool is as large as asked (``num_actors``), up to what
    the cluster's nodes, or its autoscaler's node types, hold: an autoscaler adds the GPU nodes.
    Otherwise one GPU per actor where the cluster has GPUs now, else CPU actors."""
    if scaling is not None and scaling.use_gpu:
        return gpu_actors(num_actors, scaling.gpus_per_worker)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return max(1, min(num_actors, gpus)), {"num_gpus": 1, "num_cpus": 1}
    # CPU-only: the actors must leave one whole CPU free, because every read, repartition and
    # preprocessing task asks for one. With 2 actors x 1 CPU on a 2-core machine the pipeline
    # waited forever for it ("Active & requested resources: 2.5/2 CPU"). Fractional actors still
    # get a torch thread each, so the cores are used all the same.
    cpus = float(ray.cluster_resources().get("CPU", 1))
    size = max(1, min(num_actors, int(cpus)))
    return size, {"num_cpus": round(max(0.0, min(1.0, (cpus - 1) / size)), 3)}


def gpu_actors(num_actors: int, gpus_per_actor: float) -> tuple[int, dict]:
    per_actor = {"CPU": 1, "GPU": gpus_per_actor}
    node_types = cluster_node_types()
    problem = placement_problem(per_actor, 1, node_types)
    if problem:  # refused before any work: Ray Data would wait for the actors for ever
        raise ConfigError(f"predict with --scaling.use_gpu=true: the Ray cluster cannot fit one actor: {problem}")
    capacity = worker_capacity(per_actor, node_types)
    size = num_actors if math.isinf(capacity) else max(1, min(num_actors, int(capacity)))
    return size, {"num_gpus": gpus_per_actor, "num_cpus": 1}


def build_dataset(inputs: Inputs, checkpoint: Checkpoint, prepare: PrepareConfig, tta: int, batch_size: int,
                  num_actors: int, scaling: ScalingConfig | None = None):
    """The Ray Data pipeline that yields one prediction row per readable or unreadable input row."""
    if inputs.kind == "prepared":
        ds = ray.data.read_parquet(**storage.ray_data_source(storage.join(inputs.dataset, inputs.split)),
                                   columns=[*TRAIN_COLUMNS, "orig_height", "orig_width"])
        encoding = inputs.encoding
        # Quality in the same pass, fused with the read: normalised images (exposure and colour
        # changed) are not judged.
        assessable = normalisation_of(inputs.prepared_with or {}) == "none"
        ds = ds.map_batches(quality_of_rows, batch_size=batch_size, batch_format="numpy",
                            fn_kwargs={"encoding": encoding, "assessable": assessable})
        # One block goes to one actor: Parquet's blocks, cut to a batch, spread the work over the pool.
        ds = ds.repartition(target_num_rows_per_block=batch_size)
    else:  # from_items already makes blocks of one batch: a repartition would only add a pass
        ds = ray.data.from_items(inputs.items, override_num_blocks=max(1, math.ceil(len(inputs.items) / batch_size)))
        ds = ds.map_batches(load_rows, batch_size=batch_size, batch_format="numpy",
                            fn_kwargs={"prepare": asdict(prepare)})
        encoding = "raw"
    # No more actors than batches: each one costs a process and a model load.
    num_rows = inputs.num_rows if inputs.kind == "prepared" else len(inputs.items)
    size, resources = actor_resources(min(num_actors, math.ceil(num_rows / batch_size)), scaling)
    return ds.map_batches(
        GradePredictor,
        fn_constructor_kwargs={"checkpoint_path": checkpoint.path, "tta": tta, "encoding": encoding},
        compute=ray.data.ActorPoolStrategy(size=size),
        batch_size=batch_size,
        batch_format="numpy",
        **resources,
    )


STAGING = "_staging"  # the workers' prediction rows, beside the outputs until predictions.parquet/ is written
# Rows per file of the staging folder and of predictions.parquet/: a file per batch (32 rows) made
# thousands of files, and the driver, which lists and opens them, grew by their metadata.
PART_ROWS = 8192
DRIVER_SKIPS = ("height", "width", "orig_height", "orig_width")  # columns no output needs
# Raw inputs: each row's id and path are the listing's, at its ``order``; the driver, which holds
# the listing, takes them from there (``outputs.split_results``) rather than read a second copy.
LISTED = ("id", "source")
# Only in predictions.parquet: the driver's outputs (counts, report, contact sheet, overlays) never read them.
QUALITY_STATISTICS = tuple(c for c in QUALITY_COLUMNS if c not in ("gradable", "quality_reason"))


def writes_parts(output: str) -> bool:
    """Whether the Ray workers write predictions.parquet (as a folder of parts): to a URI output,
    which every node reaches. A local folder may be one node's disk alone."""
    return not storage.is_local(output)


def collect(ds, output: str | None = None, listed: bool = False) -> pd.DataFrame:
    """Every output row of the pipeline, without the columns no output needs (nor, with ``listed``,
    the ``LISTED`` ones: raw inputs, whose rows carry their ``order`` in the listing).

    To a local folder (or none): streamed to the driver. Workers on other nodes would write a
    local folder to their own disks, and the driver read back only its own part; Ray Data's
    ``local://``, which runs the writes on the driver's node, is deprecated in Ray 2.60. To a URI
    ``output``: ``write_parts``.
    """
    skip = (*DRIVER_SKIPS, *(LISTED if listed else ()))
    if output is not None and writes_parts(output):
        return write_parts(ds, output, skip)
    return _rows_to_driver(ds, skip)


def write_parts(ds, output: str, skip: tuple[str, ...]) -> pd.DataFrame:
    """To a URI ``output``: predictions.parquet written by the Ray workers as a folder of parts; no
    row of it passes through the driver. Returns the rows the driver's own outputs need.

    Pass 1 (the pipeline): every row, no image, to a staging folder there. The driver reads back
    the columns of submission.csv, unreadable.csv, the counts, the report, the contact sheet and the
    overlays (not the quality statistics, nor the image sizes). Pass 2 (a Ray Data read of the
    staging folder): the predicted rows, in predictions.parquet's columns and types, written by
    the workers as parts and published whole (``storage.publish_location``): a killed predict
    leaves the older folder or none, never half of one. The staging folder is removed either way.
    """
    fs, staging = storage.filesystem(storage.join(output, f"{STAGING}-{uuid.uuid4().hex[:8]}"))
    try:
        ds.write_parquet(staging, filesystem=fs, compression="zstd", min_rows_per_file=PART_ROWS)
        if fs.get_file_info(staging).type == pafs.FileType.NotFound:  # no rows at all
            return pd.DataFrame()
        fragments = list(pads.dataset(staging, filesystem=fs, format="parquet").get_fragments())
        # Blocks type their columns alone (a block of failed rows may hold only nulls): one schema for all.
        schema = pa.unify_schemas([f.physical_schema for f in fragments], promote_options="permissive")
        rows = pads.dataset(staging, filesystem=fs, format="parquet", schema=schema)
        driver_rows = rows.to_table(columns=[c for c in schema.names if c not in (*skip, *QUALITY_STATISTICS)])
        publish_parts(ray.data.read_parquet(staging, filesystem=fs, schema=schema), schema, output)
        return driver_rows.to_pandas()
    finally:
        fs.delete_dir_contents(staging, missing_dir_ok=True)
        if fs.get_file_info(staging).type != pafs.FileType.NotFound:
            fs.delete_dir(staging)


def publish_parts(staged, schema: pa.Schema, output: str) -> None:
    """``<output>/predictions.parquet/``: the predicted rows of ``staged``, written by the workers."""
    target = storage.join(output, PREDICTIONS)
    fs, inner = storage.filesystem(target)
    if fs.get_file_info(inner).type == pafs.FileType.File:  # an older run's single file: not beside the parts
        fs.delete_file(inner)
    with storage.publish_location(target) as location:
        parts_fs, parts = storage.filesystem(location)
        staged.map_batches(predicted_part, batch_format="pyarrow").write_parquet(
            parts, filesystem=parts_fs, compression="zstd", min_rows_per_file=PART_ROWS)
        if not parts_fs.get_file_info(pafs.FileSelector(parts, allow_not_found=True)):  # no row predicted
            empty = pa.Table.from_pandas(prediction_columns(schema.empty_table().to_pandas()), preserve_index=False)
            with parts_fs.open_output_stream(f"{parts}/empty.parquet") as f:
                pq.write_table(empty, f)


def predicted_part(batch: pa.Table) -> pa.Table:
    """Ray task: a batch of staged rows -> its predicted rows as predictions.parquet holds them.

    Arrow in and out, converted as the driver converts a local output's rows: Ray's own pandas
    batches would store Arrow-backed pandas types, and the parts read back as other dtypes.
    """
    rows = batch.to_pandas()
    return pa.Table.from_pandas(prediction_columns(rows[rows["reason"].astype(str) == ""]), preserve_index=False)


def _rows_to_driver(ds, skip: tuple[str, ...]) -> pd.DataFrame:
    tables = [t.drop_columns([c for c in skip if c in t.column_names])
              for t in ds.iter_batches(batch_size=None, batch_format="pyarrow") if t.num_rows]
    if not tables:
        return pd.DataFrame()
    # Blocks type their columns alone (a block of failed rows may hold only nulls): one schema for all.
    return pa.concat_tables(tables, promote_options="permissive").to_pandas()


# --------------------------------------------------------------------------- the job


def predict(cfg: Config) -> dict:
    """Predict ``cfg.predict.images`` with ``cfg.predict.checkpoint``; returns the summary (predict.json)."""
    p = cfg.predict
    ensemble = read_ensemble(p.checkpoint)  # one checkpoint, several, or a cross-validation's fold models
    checkpoint, for_actors = checkpoint_for_driver(ensemble)
    inputs = find_inputs(p.images, p.split)
    if inputs.kind != "prepared" and not inputs.items:
        reasons = sorted({u["reason"].split(":")[0] for u in inputs.unreadable})
        raise ConfigError(f"{inputs.path}: none of its {inputs.num_inputs} inputs can be read ({', '.join(reasons)})")
    prepare, prepare_from = prepare_config(checkpoint)
    if for_actors is not checkpoint:
        print(f"ensemble of {len(ensemble.members)} models: {ensemble.spec}")
    print(f"checkpoint: {checkpoint.path} (epoch {checkpoint.epoch}, {checkpoint.config.model.name}, "
          f"{checkpoint.config.model.head} head)")
    print(f"inputs: {inputs.kind} {inputs.path}: {inputs.num_inputs} images"
          + (f", split {inputs.split}" if inputs.kind == "prepared" else f"; preprocessing from {prepare_from}"))
    for note in inputs.notes:
        print(f"note: {note}")
    differences = preprocessing_differences(inputs.prepared_with, prepare) if inputs.kind == "prepared" else []
    if differences:
        print(f"warning: {inputs.path} was prepared differently from the training data ({prepare_from}): "
              f"{', '.join(differences)}; predictions may be off", file=sys.stderr)

    init_ray(cfg.scaling)
    check_seen_by_every_node({"predict.checkpoint": checkpoint.path, "predict.images": p.images})
    started = time.perf_counter()
    parts = writes_parts(p.output)
    if parts:  # an older predict.json must not vouch for the parts about to replace its predictions
        remove_stale_report(p.output, ("predict.json",))
    with ray_progress():
        ds = build_dataset(inputs, for_actors, prepare, p.tta, p.batch_size, p.num_actors, cfg.scaling)
        rows = collect(ds, p.output, listed=inputs.kind != "prepared")
    stop_on_driver_only_paths(rows.get("reason", []))  # no shared storage: no predictions
    seconds = time.perf_counter() - started
    predictions, unreadable = split_results(rows, inputs)
    del rows  # the driver keeps one copy of each row: the predictions hold all its outputs need
    summary = write_outputs(p.output, predictions, unreadable, {
        "checkpoint": checkpoint.path, "epoch": checkpoint.epoch, "model": checkpoint.config.model.name,
        "head": checkpoint.config.model.head, "cut_points": for_actors.cut_points, "tta": p.tta,
        "cut_rule": ensemble.cut_points_made_by(for_actors.cut_points),
        "input": {"kind": inputs.kind, "path": inputs.path, "split": inputs.split or None},
        "preprocessing": None if inputs.kind == "prepared" else {"from": prepare_from, **asdict(prepare)},
        "num_inputs": inputs.num_inputs, "seconds": round(seconds, 2),
        "images_per_s": round(len(predictions) / max(seconds, 1e-9), 2),
        "checkpoint_val_metrics": {k: v for k, v in checkpoint.metrics.items() if k.startswith("val_") and k != "val_confusion"},
        **({"ensemble": ensemble.meta()} if for_actors is not checkpoint else {}),
    }, parts_written=parts)
    screening_outputs(p, summary, predictions, inputs, checkpoint, prepare)
    print_summary(summary, unreadable, p.output)
    if summary["num_labelled"]:
        # The parts hold no order; evaluate reads them back sorted by id, and must find the same report.
        metrics = write_report(p.output, by_id(predictions) if parts else predictions, summary)
        print(f"report: {storage.join(p.output, 'report.html')} (QWK {metrics['qwk']:.4f} on {metrics['n']} labelled images)")
    return summary
