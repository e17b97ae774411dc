"""The data card of a prepared dataset: what is in it, what it looks like, what was left out.

``write_card(dataset)`` writes ``<dataset>/card/README.md`` and its PNG figures:

- grades per split (table + bar chart) and the bookkeeping checks,
- sample images per grade after preprocessing (the Parquet ``image`` column) and before
  (the original file named by ``source``, when it is a readable local file),
- original image sizes and brightness (histograms; under-/over-exposed photos listed by id),
- near-duplicate groups as thumbnails with their grades, conflicting grades first,
- the quarantined inputs with their reasons.

Every number in the card comes from ``manifest.json`` and its per-image sidecar
(``_images.parquet``, ``data.details``: sizes, brightness, duplicates, quarantine); the Parquet rows
are only read (grade and split columns) to check that they agree, and to show the few sampled images. The
figures are ``aptos_ray.figures``'s.
No Ray: pyarrow reads the Parquet files, local or remote (URIs through ``aptos_ray.storage``).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from aptos_ray import figures, storage
from aptos_ray.data.details import duplicate_groups, quarantined, read_details, written
from aptos_ray.data.format import (
    GRADE_NAMES,
    GRADES,
    SPLITS,
    decode_batch,
    read_manifest,
    read_split,
)
from aptos_ray.data.preprocess import load_image, shrink_to

CARD_DIR = "card"
README = "README.md"
SAMPLES_PER_GRADE = 6
EXTREMES = 8  # darkest and brightest photos listed (and shown)
MAX_DUP_ROWS = 12  # near-duplicate groups drawn; the table lists more
MAX_TABLE_ROWS = 200  # rows of any Markdown table before "... and N more"
META_COLUMNS = ["id", "grade", "split", "source"]
DETAIL_COLUMNS = ["id", "grade", "split", "source", "reason", "orig_height", "orig_width", "brightness", "dup_group"]


def write_card(dataset_dir: str) -> Path | str:
    """Write the data card of a prepared dataset; return the path (or URI) of its README."""
    dataset = str(dataset_dir).rstrip("/")
    manifest = read_manifest(dataset)
    meta = read_rows(dataset, META_COLUMNS)
    details = read_details(dataset, manifest, DETAIL_COLUMNS)
    with storage.publish_dir(storage.join(dataset, CARD_DIR)) as staging:
        (staging / README).write_text(_render(dataset, manifest, meta, details, staging))
    return storage.join(dataset, CARD_DIR, README) if storage.is_uri(dataset) else Path(dataset) / CARD_DIR / README


# ---------------------------------------------------------------- reading


def read_rows(dataset: str, columns: list[str], ids: list[str] | None = None) -> pa.Table:
    """Rows of every split (only ``ids`` when given), only ``columns``: images are read only for
    the few rows a figure shows."""
    tables = [t for t in (read_split(dataset, split, columns, ids) for split in SPLITS) if t.num_rows]
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pa.concat_tables(tables, promote_options="default")


def load_images(dataset: str, ids: list[str], encoding: str) -> dict[str, np.ndarray]:
    """Preprocessed images of ``ids`` from the Parquet ``image`` column."""
    if not ids:
        return {}
    table = read_rows(dataset, ["id", "image", "height", "width"], sorted(set(ids)))
    out: dict[str, np.ndarray] = {}
    for batch in table.to_batches(max_chunksize=64):
        cols = batch.to_pydict()
        for id_, img in zip(cols["id"], decode_batch(cols, encoding)):
            out[id_] = img
    return out


def load_original(source: str) -> np.ndarray | None:
    """The original photograph when ``source`` is a readable local image file, else None
    (e.g. a RetinaMNIST ``npz:...`` source, a URI, or data on another machine)."""
    if not source or storage.is_uri(source) or not os.path.isfile(source):
        return None
    try:  # the decode prepare uses (orientation, modes), at the size the figure shows
        return shrink_to(load_image(source, needed=2 * figures.TILE), 4 * figures.TILE)
    except Exception:  # unreadable originals are exactly what quarantine is for; just skip
        return None


def _save(figure, path: Path) -> None:
    path.write_bytes(figures.png(figure))


# ---------------------------------------------------------------- the card


def _render(dataset: str, manifest: dict, meta: pa.Table, details: pa.Table, out: Path) -> str:
    cols = meta.to_pydict()
    good = written(details)
    brightness = {i: b for i, b in zip(good["id"].to_pylist(), good["brightness"].to_pylist()) if b is not None}
    sizes = good.select(["orig_height", "orig_width"]).drop_null()
    hw = np.stack([sizes[c].to_numpy() for c in sizes.column_names], axis=1).astype(float)
    left_out = quarantined(details)
    info = {
        "grade": dict(zip(cols["id"], cols["grade"])),
        "split": dict(zip(cols["id"], cols["split"])),
        "source": dict(zip(cols["id"], cols.get("source", [""] * len(cols["id"])))),
    }
    groups = _dup_groups_ordered(duplicate_groups(details), info)
    picks = _pick(manifest, cols, brightness, groups)
    wanted = sorted({i for ids in picks.values() for i in ids})
    images = load_images(dataset, wanted, manifest.get("encoding", "raw"))
    sections = [
        _header(dataset, manifest),
        _grades_section(manifest, cols, left_out, out),
        _samples_section(picks["samples"], images, info, out),
        _sizes_section(hw, out),
        _brightness_section(brightness, picks, images, info, out),
        _duplicates_section(manifest, groups, images, info, out),
        _quarantine_section(manifest, left_out),
    ]
    return "\n\n".join(s.strip() for s in sections) + "\n"


def _pick(manifest: dict, cols: dict, brightness: dict, groups: list[dict]) -> dict[str, list[str]]:
    """Ids each figure shows: a seeded sample per grade, the darkest/brightest, the duplicates."""
    seed = int(manifest.get("config", {}).get("seed", 0))
    rng = np.random.default_rng(seed)
    by_grade: dict[int, list[str]] = {g: [] for g in GRADES}
    for id_, grade in sorted(zip(cols["id"], cols["grade"])):
        if grade in by_grade:
            by_grade[grade].append(id_)
    samples = []
    for g in GRADES:
        ids = by_grade[g]
        chosen = rng.choice(len(ids), size=min(SAMPLES_PER_GRADE, len(ids)), replace=False) if ids else []
        samples += [ids[i] for i in sorted(chosen)]
    dark, bright = _extremes(brightness)
    dup_ids = [i for group in groups[:MAX_DUP_ROWS] for i in group["ids"][:SAMPLES_PER_GRADE]]
    return {"samples": samples, "dark": [i for i, _ in dark], "bright": [i for i, _ in bright], "dups": dup_ids}


def _header(dataset: str, manifest: dict) -> str:
    def get(key: str, default: object = "n/a") -> object:
        return manifest.get(key, default)

    cfg = manifest.get("config", {})
    inp = manifest.get("input", {})
    lines = [
        f"# Data card: `{os.path.basename(dataset) or dataset}`",
        "",
        f"Prepared dataset at `{dataset}`, created {get('created')} "
        f"(format {get('format_version')}, content hash `{str(get('content_hash'))[:16]}`).",
        "Every number below is read from `manifest.json` and its per-image sidecar `_images.parquet`.",
        "",
        "| | |",
        "|---|---|",
        f"| input | `{inp.get('path', cfg.get('input', 'n/a'))}` {_layout(inp)}|",
        f"| images read (num_inputs) | {get('num_inputs')} |",
        f"| images written (num_written) | {get('num_written')} |",
        f"| quarantined (num_quarantined) | {get('num_quarantined')} |",
        f"| stored image | {get('image_size')} px square, `{get('encoding', 'raw')}` encoding |",
    ]
    if cfg:
        steps = [name for name in ("crop_border", "circle_mask") if cfg.get(name)]
        method = "ben_graham" if cfg.get("ben_graham") else cfg.get("normalise", "none")
        steps += [method] if method != "none" else []
        lines += [
            f"| preprocessing | {', '.join(steps) or 'resize only'} |",
            f"| splits | val {cfg.get('val_fraction')}, test {cfg.get('test_fraction')}, seed {cfg.get('seed')} |",
            f"| near-duplicates | perceptual-hash distance <= {cfg.get('dedup_max_distance')} |",
        ]
        if cfg.get("limit"):
            lines.append(f"| subset | `prepare.limit={cfg['limit']}` (stratified) |")
    return "\n".join(lines)


def _layout(inp: dict) -> str:
    """' (csv layout, 2929 records, 150 selected) ' from the manifest's ``input``."""
    parts = [f"{inp['layout']} layout"] if inp.get("layout") else []
    parts += [f"{inp[k]} {label}" for k, label in (("num_records", "records"), ("num_selected", "selected"))
              if inp.get(k) is not None]
    return f"({', '.join(parts)}) " if parts else ""


# ---------------------------------------------------------------- grades


def _counts(manifest: dict) -> dict[str, list[int]]:
    counts = manifest.get("counts", {})
    return {s: [int(counts.get(s, {}).get(str(g), 0)) for g in GRADES] for s in SPLITS}


def _grades_section(manifest: dict, cols: dict, left_out: list[dict], out: Path) -> str:
    counts = _counts(manifest)
    _save(figures.grouped_bars({f"{s} ({sum(counts[s])})": counts[s] for s in SPLITS}, "Grades per split",
                               size=(7.5, 3.6), counts_on_bars=True), out / "grades.png")
    header = "| split | " + " | ".join(f"{g} {GRADE_NAMES[g]}" for g in GRADES) + " | total |"
    lines = ["## Grades per split", "", header, "|---" + "|---:" * (len(GRADES) + 1) + "|"]
    for s in SPLITS:
        lines.append(f"| {s} | " + " | ".join(str(n) for n in counts[s]) + f" | {sum(counts[s])} |")
    totals = [sum(counts[s][g] for s in SPLITS) for g in GRADES]
    lines.append("| total | " + " | ".join(str(n) for n in totals) + f" | {sum(totals)} |")
    share = " · ".join(f"{g}: {100 * n / max(1, sum(totals)):.1f}%" for g, n in zip(GRADES, totals))
    lines += ["", f"Grade shares: {share}.", "", "![grades per split](grades.png)", "",
              _checks(manifest, counts, cols, left_out)]
    return "\n".join(lines)


def _checks(manifest: dict, counts: dict[str, list[int]], cols: dict, left_out: list[dict]) -> str:
    """The books must balance; say so, or say exactly where they do not."""
    n_in, n_w, n_q = (manifest.get(k) for k in ("num_inputs", "num_written", "num_quarantined"))
    total = sum(sum(c) for c in counts.values())
    rows = Counter((s, int(g)) for s, g in zip(cols["split"], cols["grade"]))
    mismatches = [
        f"{s}/{g}: manifest {counts[s][g]}, Parquet {rows.get((s, g), 0)}"
        for s in SPLITS for g in GRADES if counts[s][g] != rows.get((s, g), 0)
    ]
    checks = [
        (f"num_inputs = num_written + num_quarantined ({n_in} = {n_w} + {n_q})",
         None not in (n_in, n_w, n_q) and n_in == n_w + n_q),
        (f"counts add up to num_written ({total})", total == n_w),
        (f"quarantine list has num_quarantined entries ({len(left_out)})", len(left_out) == (n_q or 0)),
        (f"Parquet rows per split and grade match the counts ({len(cols['id'])} rows)"
         + (": " + "; ".join(mismatches[:10]) if mismatches else ""), not mismatches),
    ]
    return "\n".join(["Checks:", ""] + [f"- {'ok' if ok else '**MISMATCH**'}: {text}" for text, ok in checks])


# ---------------------------------------------------------------- sample images


def _samples_section(samples: list[str], images: dict, info: dict, out: Path) -> str:
    lines = ["## Sample images per grade", ""]
    if not samples:
        return "\n".join(lines + ["The dataset has no rows."])
    by_grade = {g: [i for i in samples if info["grade"][i] == g] for g in GRADES}
    rows = [[images.get(i) for i in by_grade[g]] for g in GRADES]
    captions = [[i for i in by_grade[g]] for g in GRADES]
    labels = [f"{g} {GRADE_NAMES[g]}" for g in GRADES]
    _save(figures.mosaic(rows, captions, "After preprocessing (as stored)", labels), out / "samples_preprocessed.png")
    lines += ["After preprocessing, as training reads them:", "",
              "![after preprocessing](samples_preprocessed.png)", ""]
    originals = {i: load_original(info["source"].get(i, "")) for i in samples}
    available = sum(o is not None for o in originals.values())
    if available:
        rows = [[originals[i] for i in by_grade[g]] for g in GRADES]
        _save(figures.mosaic(rows, captions, "Original photographs", labels), out / "samples_original.png")
        lines += [f"The same images before preprocessing ({available} of {len(samples)} originals readable here):",
                  "", "![originals](samples_original.png)"]
    else:
        example = next((info["source"].get(i) for i in samples if info["source"].get(i)), "")
        lines.append(f"Originals are not available: the `source` column does not name a readable local file "
                     f"here (e.g. `{example}`), so only the preprocessed images are shown.")
    return "\n".join(lines)


# ---------------------------------------------------------------- sizes and brightness


def _sizes_section(hw: np.ndarray, out: Path) -> str:
    lines = ["## Original image sizes", ""]
    if not len(hw):
        return "\n".join(lines + ["The manifest records no original sizes."])
    bins = np.histogram_bin_edges(hw, bins=min(40, max(5, len(np.unique(hw)))))
    _save(figures.histogram({"width": hw[:, 1], "height": hw[:, 0]}, "pixels",
                            f"Original image sizes ({len(hw)} images)", bins), out / "sizes.png")
    common = Counter(f"{int(h)} x {int(w)}" for h, w in hw).most_common(8)
    distinct = len({tuple(x) for x in hw.tolist()})
    (h0, w0), (h1, w1) = hw.min(0).astype(int), hw.max(0).astype(int)
    lines += [
        f"{len(hw)} images, {distinct} distinct sizes; height {h0}-{h1} px, width {w0}-{w1} px.",
        "", "![original sizes](sizes.png)", "", "| height x width | images |", "|---|---:|",
    ]
    lines += [f"| {size} | {n} |" for size, n in common]
    return "\n".join(lines)


def _extremes(brightness: dict) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    ranked = sorted(brightness.items(), key=lambda kv: (kv[1], kv[0]))
    k = min(EXTREMES, len(ranked) // 2)
    return ranked[:k], ranked[::-1][:k]


def exposure_limits(values: np.ndarray) -> tuple[float, float]:
    """Brightness below/above which a photo is flagged as under-/over-exposed: Tukey fences
    (1.5 interquartile ranges beyond the quartiles) on a log scale, i.e. in exposure stops.
    Relative to the dataset, because cameras and black borders set the typical level.
    (On 600 APTOS photos this flags the ~2% darkest, under ~20 of 255.)"""
    logs = np.log2(np.maximum(values, 0.5))
    q1, q3 = np.percentile(logs, [25, 75])
    return float(2 ** (q1 - 1.5 * (q3 - q1))), float(2 ** (q3 + 1.5 * (q3 - q1)))


def _brightness_section(brightness: dict, picks: dict, images: dict, info: dict, out: Path) -> str:
    lines = ["## Brightness", ""]
    if not brightness:
        return "\n".join(lines + ["The manifest records no brightness."])
    values = np.array(list(brightness.values()), dtype=float)
    low, high = exposure_limits(values)
    under = sorted((i for i, v in brightness.items() if v < low), key=lambda i: brightness[i])
    over = sorted((i for i, v in brightness.items() if v > high), key=lambda i: -brightness[i])
    _save(figures.histogram({"brightness": values}, "mean brightness of the original (0-255)",
                            f"Brightness: {len(under)} under-, {len(over)} over-exposed (dashed: limits)",
                            limits=(low, high)), out / "brightness.png")
    lines += [
        f"Mean brightness of each original photograph: median {np.median(values):.1f}, range "
        f"{values.min():.1f}-{values.max():.1f}. Flagged outside [{low:.1f}, {high:.1f}] "
        "(1.5 interquartile ranges beyond the quartiles, in exposure stops):",
        "",
        f"- under-exposed ({len(under)}): {_id_list(under, brightness)}",
        f"- over-exposed ({len(over)}): {_id_list(over, brightness)}",
        "", "![brightness](brightness.png)", "",
    ]
    dark, bright = picks["dark"], picks["bright"]
    rows = [[_original_or(images, info, i) for i in dark], [_original_or(images, info, i) for i in bright]]
    captions = [[f"{i}\n{brightness[i]:.0f}" for i in dark], [f"{i}\n{brightness[i]:.0f}" for i in bright]]
    _save(figures.mosaic(rows, captions, "Darkest and brightest photographs (mean brightness)",
                         ["darkest", "brightest"]), out / "brightness_extremes.png")
    lines += [f"The {len(dark)} darkest: {_id_list(dark, brightness)}", "",
              f"The {len(bright)} brightest: {_id_list(bright, brightness)}", "",
              "![darkest and brightest](brightness_extremes.png)"]
    return "\n".join(lines)


def _original_or(images: dict, info: dict, id_: str) -> np.ndarray | None:
    # Exposure is a property of the photograph: show it as taken when we can.
    original = load_original(info["source"].get(id_, ""))
    return original if original is not None else images.get(id_)


def _id_list(ids: list[str], values: dict, limit: int = 30) -> str:
    if not ids:
        return "none"
    shown = ", ".join(f"`{i}` ({values[i]:.1f})" for i in ids[:limit])
    return shown + (f", ... and {len(ids) - limit} more" if len(ids) > limit else "")


# ---------------------------------------------------------------- near-duplicates


def _dup_groups_ordered(groups: list[dict], info: dict) -> list[dict]:
    """Duplicate groups (``details.duplicate_groups``), conflicting ones first (then the larger ones)."""
    for g in groups:  # an input without a usable grade (-1): the stored rows may still know it
        g["grades"] = [info["grade"].get(i, "?") if gr is None or gr < 0 else gr for i, gr in zip(g["ids"], g["grades"])]
        g["conflicting"] = len(set(g["grades"])) > 1
    return sorted(groups, key=lambda g: (not g["conflicting"], -len(g["ids"]), g["ids"]))


def _duplicates_section(manifest: dict, groups: list[dict], images: dict, info: dict, out: Path) -> str:
    lines = ["## Near-duplicates", ""]
    if not groups:
        return "\n".join(lines + ["No near-duplicate groups."])
    n_conflicting = sum(g["conflicting"] for g in groups)
    n_images = sum(len(g["ids"]) for g in groups)
    dups = manifest.get("duplicates") or {}
    cross = dups.get("num_cross_split", len(dups.get("cross_split") or []))
    exception = f", except {cross} groups whose members the input itself put in different splits" if cross else ""
    lines += [f"{len(groups)} near-duplicate groups ({n_images} images), {n_conflicting} with conflicting grades. "
              f"Prepare keeps each group in one split, so duplicates do not leak between training and evaluation"
              f"{exception}.", ""]
    shown = groups[:MAX_DUP_ROWS]
    rows = [[images.get(i) for i in g["ids"][:SAMPLES_PER_GRADE]] for g in shown]
    captions = [[f"{i}\ngrade {gr}" for i, gr in zip(g["ids"], g["grades"])][:SAMPLES_PER_GRADE] for g in shown]
    labels = [f"{'conflict' if g['conflicting'] else 'group'} {k + 1}" for k, g in enumerate(shown)]
    colors = ["tab:red" if g["conflicting"] else "black" for g in shown]
    _save(figures.mosaic(rows, captions, "Near-duplicate groups (conflicting grades first)", labels, colors),
          out / "duplicates.png")
    lines += ["![near-duplicates](duplicates.png)", "", "| group | ids | grades | splits | conflicting |",
              "|---:|---|---|---|---|"]
    for k, g in enumerate(groups[:MAX_TABLE_ROWS]):
        splits = sorted({info["split"].get(i, "?") for i in g["ids"]})
        lines.append(f"| {k + 1} | {', '.join(f'`{i}`' for i in g['ids'])} | {', '.join(map(str, g['grades']))} | "
                     f"{', '.join(splits)} | {'yes' if g['conflicting'] else 'no'} |")
    if len(groups) > MAX_TABLE_ROWS:
        lines.append(f"\n... and {len(groups) - MAX_TABLE_ROWS} more groups (see `_images.parquet`, column dup_group).")
    return "\n".join(lines)


# ---------------------------------------------------------------- quarantine


def _quarantine_section(manifest: dict, quarantined: list[dict]) -> str:
    lines = ["## Quarantined inputs", ""]
    if not quarantined:
        return "\n".join(lines + [f"None: all {manifest.get('num_inputs', 'n/a')} inputs were written."])
    kinds = Counter(str(q.get("reason", "")).split(":", 1)[0] for q in quarantined)
    reasons = ", ".join(f"{k} ({n})" for k, n in kinds.most_common())
    lines += [f"{len(quarantined)} inputs were left out: {reasons}.", "", "| id | reason | source |", "|---|---|---|"]
    for q in quarantined[:MAX_TABLE_ROWS]:
        lines.append(f"| `{q.get('id', '')}` | {_cell(q.get('reason', ''))} | `{_cell(q.get('source', ''))}` |")
    if len(quarantined) > MAX_TABLE_ROWS:
        lines.append(f"\n... and {len(quarantined) - MAX_TABLE_ROWS} more (see `_images.parquet`, column reason).")
    return "\n".join(lines)


def _cell(text: object) -> str:
    # A reason may quote a file's contents: keep the Markdown table intact.
    return str(text).replace("|", "\\|").replace("\n", " ")
