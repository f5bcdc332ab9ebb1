"""Reconstructions a person can read: per setting and attack, the best, median and worst
reconstructed samples by LPIPS, each under its private original, upscaled without smoothing and
labelled with its PSNR and LPIPS.

The run directory's `images/r{round}_c{client}_{attack}.png` grids hold the private samples on
top and the matched reconstructions below, one column per scored sample in the order of that
attack run's rows against the originals (the first `attack.images-per-client` of them). A
column is linked to its leakage row by that order and then checked: the PSNR recomputed from
the two 8-bit tiles must agree with the row's, so a grid that does not fit its rows is skipped
rather than mislabelled.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from fedleak.lines import one_line
from fedleak.report.collect import RunRecord
from fedleak.report.rundir import RunDirectoryError

PADDING = 2  # torchvision's make_grid padding used by RunDirectory.save_images
# The aggregate view's one target per round is client -1 (`c-01`).
_GRID_NAME = re.compile(r"r(\d+)_c(-?\d+)_(.+)\.png")
# Columns per attack: best, quartiles, median, worst (fewer when fewer samples have images).
COLUMNS = 5
# A tile's recomputed PSNR must match its row within this, unless both are this high (8-bit
# rounding caps the recomputed value near 59 dB).
PSNR_TOLERANCE_DB = 1.0
PSNR_BOTH_HIGH_DB = 40.0


@dataclass(frozen=True)
class Sample:
    """One reconstructed sample with both images (H x W x 3, uint8) and its scores."""

    truth: np.ndarray
    reconstruction: np.ndarray
    psnr: float
    lpips: float
    round: int
    client_id: int
    not_converged: bool
    seed: int = 0  # the run's: a sweep pools a setting's seeds into one gallery


def cut_grid(png: Path, columns: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """(truth, reconstruction) tiles of a saved two-row grid with `columns` columns; None when
    the file's size does not fit that layout."""
    try:
        with Image.open(png) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        detail = one_line(f"{type(error).__name__}: {error}", 200)
        raise RunDirectoryError(
            f"{png}: unreadable image ({detail}); restore it, or delete it to leave its "
            "samples out of the gallery"
        ) from None
    height, width = pixels.shape[:2]
    tile_h, rest_h = divmod(height - PADDING, 2)
    tile_w, rest_w = divmod(width - PADDING, columns)
    tile_h, tile_w = tile_h - PADDING, tile_w - PADDING
    if rest_h or rest_w or tile_h < 1 or tile_w < 1:
        return None
    tiles = []
    for j in range(columns):
        x = PADDING + j * (tile_w + PADDING)
        top = pixels[PADDING : PADDING + tile_h, x : x + tile_w]
        y = PADDING + tile_h + PADDING
        bottom = pixels[y : y + tile_h, x : x + tile_w]
        tiles.append((top, bottom))
    return tiles


def tile_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two 8-bit tiles on the [0, 1] scale."""
    error = float(np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2))
    return 10 * math.log10(1 / max(error, 1e-12))


def _agrees(recomputed: float, recorded: float) -> bool:
    if not math.isfinite(recorded):
        return False
    if min(recomputed, recorded) >= PSNR_BOTH_HIGH_DB:
        return True
    return abs(recomputed - recorded) <= PSNR_TOLERANCE_DB


def run_samples(run: RunRecord, rows: pd.DataFrame, lpips: str) -> list[Sample]:
    """Every sample of `rows` (one run's scored rows against the originals, any attacks) whose
    reconstruction is on disk and checks out against its row."""
    per_job = run.config.attack.images_per_client
    files = {
        (int(m[1]), int(m[2]), m[3]): path
        for path in run.images
        if (m := _GRID_NAME.fullmatch(path.name))
    }
    samples = []
    for (server_round, client, attack), job in rows.groupby(
        ["round", "client_id", "attack"], sort=True
    ):
        path = files.get((int(server_round), int(client), _safe(str(attack))))
        if path is None:
            continue
        job = job.head(per_job)
        tiles = cut_grid(path, len(job))
        if tiles is None:
            continue
        for (truth, reconstruction), row in zip(tiles, job.itertuples(index=False), strict=True):
            if not _agrees(tile_psnr(truth, reconstruction), float(row.psnr)):
                continue
            converged = getattr(row, "converged", math.nan)
            samples.append(
                Sample(
                    truth=truth,
                    reconstruction=reconstruction,
                    psnr=float(row.psnr),
                    lpips=float(getattr(row, lpips)),
                    round=int(server_round),
                    client_id=int(client),
                    not_converged=converged == 0,
                    seed=run.config.seed,
                )
            )
    return samples


def _safe(name: str) -> str:
    # The file-name form of an attack name (RunDirectory.image_path).
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "attack"


def whose(client_id: int) -> str:
    """A target's name in captions: the aggregate view's one target is client -1."""
    return "aggregate" if client_id < 0 else f"client {client_id}"


_QUANTILE_NAMES = {0.0: "best", 0.25: "1st quartile", 0.5: "median", 0.75: "3rd quartile"}


def ranked(samples: list[Sample], count: int = COLUMNS) -> list[tuple[str, Sample]]:
    """Up to `count` samples at evenly spaced quantiles of LPIPS (lower first; PSNR where LPIPS
    is missing), nearest rank, labelled best, 1st quartile, median, 3rd quartile, worst."""
    if not samples:
        return []
    key = [(s.lpips if math.isfinite(s.lpips) else math.inf, -s.psnr) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: key[i])
    n = len(order)
    labelled: dict[int, str] = {}
    for q in np.linspace(0, 1, min(count, n)):
        rank = round(float(q) * (n - 1))
        name = "worst" if q == 1 else _QUANTILE_NAMES.get(round(float(q), 4))
        labelled.setdefault(rank, name or f"rank {rank + 1} of {n}")
    return [(label, samples[order[rank]]) for rank, label in sorted(labelled.items())]


# Each tile is enlarged by a whole factor to at least this many pixels on its longer side.
TILE_PIXELS = 112
_GAP, _LABEL_WIDTH, _LINE = 14, 150, 17
_INK, _ALERT, _PAPER = (20, 20, 20), (178, 34, 34), (255, 255, 255)


def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """matplotlib's DejaVu Sans (always installed with the report's dependencies)."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf" / name), size)
    except OSError:  # pragma: no cover - a matplotlib without its fonts
        return ImageFont.load_default(size=size)


def tile_scale(height: int, width: int) -> int:
    """The whole factor a tile is enlarged by: its longer side to at least TILE_PIXELS. A thin
    tile is not enlarged further (a 1 x 40 signal at 11 x 440 made five columns 2,420 px wide,
    which the report shrank to unreadable captions, audit FC1); its row is a label high."""
    return max(1, math.ceil(TILE_PIXELS / max(height, width)))


def _enlarge(tile: np.ndarray, scale: int) -> Image.Image:
    image = Image.fromarray(tile)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def gallery_figure(by_attack: dict[str, list[tuple[str, Sample]]], metric_label: str) -> bytes:
    """Two rows per attack (its private samples, then its reconstructions), one column per
    chosen sample, enlarged with nearest-neighbour sampling; the rank and origin (round,
    client, and the seed where several runs are pooled) above each private sample, PSNR and
    `metric_label` under each reconstruction (red: not converged)."""
    attacks = [a for a, chosen in by_attack.items() if chosen]
    tile_h, tile_w = by_attack[attacks[0]][0][1].truth.shape[:2]
    scale = tile_scale(tile_h, tile_w)
    cell_w, cell_h = tile_w * scale, tile_h * scale
    # A row at least a label high: the labels of 3 px rows of 1 x 40 tiles overlapped (FB3).
    row_h = max(cell_h, _LINE)
    columns = max(len(by_attack[a]) for a in attacks)
    # Tiles pooled from several seeds' runs say which (the same round and client recur).
    seeds = {sample.seed for a in attacks for _, sample in by_attack[a]}
    heading = 3 if len(seeds) > 1 else 2
    block_h = heading * _LINE + 4 + row_h + 6 + row_h + 3 * _LINE + 8 + _GAP
    small, bold = _font(12), _font(14, bold=True)
    # A column as wide as its longest caption: narrow images' captions ran into the next tile.
    captions = [
        f"round {sample.round}, {whose(sample.client_id)}"
        for a in attacks
        for _, sample in by_attack[a]
    ]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    column_w = max(cell_w, *(math.ceil(measure.textlength(c, font=small)) for c in captions))
    width = _LABEL_WIDTH + columns * (column_w + _GAP)
    canvas = Image.new("RGB", (width, block_h * len(attacks)), _PAPER)
    draw = ImageDraw.Draw(canvas)
    for i, attack in enumerate(attacks):
        top = i * block_h
        truth_y = top + heading * _LINE + 4
        recon_y = truth_y + row_h + 6
        draw.text((8, truth_y + row_h // 2), "private", font=bold, fill=_INK, anchor="lm")
        draw.text((8, recon_y + row_h // 2), attack, font=bold, fill=_INK, anchor="lm")
        for j, (label, sample) in enumerate(by_attack[attack]):
            x = _LABEL_WIDTH + j * (column_w + _GAP)
            draw.text((x, top), label, font=_font(12, bold=True), fill=_INK)
            draw.text(
                (x, top + _LINE),
                f"round {sample.round}, {whose(sample.client_id)}",
                font=small,
                fill=_INK,
            )
            if len(seeds) > 1:
                draw.text((x, top + 2 * _LINE), f"seed {sample.seed}", font=small, fill=_INK)
            inset = (row_h - cell_h) // 2
            canvas.paste(_enlarge(sample.truth, scale), (x, truth_y + inset))
            canvas.paste(_enlarge(sample.reconstruction, scale), (x, recon_y + inset))
            lpips = f"{sample.lpips:.3f}" if math.isfinite(sample.lpips) else "–"
            color = _ALERT if sample.not_converged else _INK
            below = recon_y + row_h + 3
            draw.text((x, below), f"PSNR {sample.psnr:.1f} dB", font=small, fill=color)
            draw.text((x, below + _LINE), f"{metric_label} {lpips}", font=small, fill=color)
            if sample.not_converged:  # its own line: beside the score it ran into the next tile
                draw.text((x, below + 2 * _LINE), "not converged", font=small, fill=color)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
