"""Score image files with the ensemble: batched by image size, bad files reported, not fatal."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qualiteacher.imageio import ImageReadError, read_image, to_tensor
from qualiteacher.iqa.ensemble import IQAEnsemble
from qualiteacher.progress import bar


def score_files(paths: list[Path], ensemble: IQAEnsemble, max_pixels: int = 64_000_000,
                batch_size: int = 8, progress: bool = False) -> list[dict]:
    """One result per path, in order: {file, raw, normalized, ensemble} or {file, error}.

    Images of the same size are scored together, `batch_size` at a time, one call per metric.
    `progress`: a bar on stderr (`qualiteacher.progress`), advanced as images are done.
    """
    results: list[dict] = [{"file": str(p)} for p in paths]
    by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    min_side = {name: spec.min_size for name, spec in ensemble.specs.items()}
    with bar(len(paths), "scoring", progress) as done:
        for i, path in enumerate(paths):
            try:
                image = to_tensor(read_image(path, max_pixels=max_pixels))
            except ImageReadError as exc:
                results[i]["error"] = str(exc)
                done.update()
                continue
            too_small = [f"{n} needs {s} px" for n, s in min_side.items() if min(image.shape[-2:]) < s]
            if too_small:
                h, w = image.shape[-2:]
                results[i]["error"] = f"{path}: image is {w}x{h}, too small to score ({', '.join(too_small)})"
                done.update()
                continue
            by_shape.setdefault(tuple(image.shape), []).append((i, image))
        for group in by_shape.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start:start + batch_size]
                scores = _score_chunk(ensemble, torch.cat([t for _, t in chunk]), [paths[i] for i, _ in chunk])
                for (i, _), row in zip(chunk, scores):
                    results[i].update(row)
                done.update(len(chunk))
    return results


def _score_chunk(ensemble: IQAEnsemble, batch: torch.Tensor, paths: list[Path]) -> list[dict]:
    """Rows for a batch; when a metric fails on the batch (NIQE on a flat image, say), each
    image is scored alone, so one odd image fails only itself, with an error naming it."""
    try:
        rows = ensemble.score(batch).rows()
    except Exception as exc:  # a metric failing on odd input must not stop the others
        if len(paths) > 1:
            return [row for i in range(len(paths)) for row in _score_chunk(ensemble, batch[i:i + 1], paths[i:i + 1])]
        reason = str(exc).splitlines()[0] if str(exc) else ""
        return [{"error": f"{paths[0]}: scoring failed ({type(exc).__name__}: {reason})"}]
    for row, path in zip(rows, paths):
        bad = [m for m, v in row["raw"].items() if not math.isfinite(v)]
        if bad:  # e.g. BRISQUE gives NaN on a flat image; NaN is not valid JSON either
            row.clear()
            row["error"] = f"{path}: scoring failed ({', '.join(bad)} gave no finite score)"
    return rows


def format_table(results: list[dict], metrics: list[str]) -> str:
    """A plain-text table: file, raw/normalised per metric, ensemble (0-10)."""
    header = ["file"] + [f"{m} raw/norm" for m in metrics] + ["ensemble"]
    rows = [header]
    for r in results:
        if "error" in r:
            rows.append([Path(r["file"]).name, "ERROR: " + r["error"].splitlines()[0]])
            continue
        cells = [Path(r["file"]).name]
        cells += [f"{r['raw'][m]:8.3f}/{r['normalized'][m]:.3f}" for m in metrics]
        cells.append(f"{r['ensemble']:.2f}")
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
