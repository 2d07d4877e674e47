"""The metrics log of a run (JSONL, rewritten atomically) and its loss-curve image (drawn with Pillow)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

from .atomic import atomic_write, atomic_write_text


class MetricsLog:
    """Rows of {step, loss, lr, images_per_s, ...} kept in memory and rewritten atomically on each add.

    Rewriting the whole (small) file instead of appending means a kill never leaves a half line.
    """

    def __init__(self, path: str | Path, up_to_step: int | None = None):
        self.path = Path(path)
        self.rows: list[dict] = []
        if self.path.exists():  # resuming: keep what was logged up to the restored step
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                if up_to_step is None or row["step"] <= up_to_step:
                    self.rows.append(row)

    def add(self, row: dict) -> None:
        """Append one row and rewrite the log atomically."""
        self.rows.append(row)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def plot(self, path: str | Path, key: str = "loss") -> None:
        """Write a PNG line plot of `key` against step (log-scale y), atomically."""
        points = [(r["step"], r[key]) for r in self.rows if key in r and r[key] > 0]
        if len(points) < 2:
            return
        image = draw_curve(points, title=f"{key} vs step")
        atomic_write(path, lambda temp: image.save(temp, format="PNG"))


def draw_curve(points: list[tuple[float, float]], title: str, size=(480, 320)) -> Image.Image:
    """Plot (x, y) points as a polyline with log10 y axis; returns an RGB image."""
    width, height = size
    left, right, top, bottom = 60, 15, 25, 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    xs = [p[0] for p in points]
    ys = [math.log10(p[1]) for p in points]
    x_min, x_max = min(xs), max(xs)
    y_min, y_max = min(ys), max(ys)
    if y_max - y_min < 1e-9:
        y_min, y_max = y_min - 0.5, y_max + 0.5

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        u = left + (x - x_min) / max(x_max - x_min, 1e-9) * (width - left - right)
        v = top + (y_max - y) / (y_max - y_min) * (height - top - bottom)
        return u, v

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.line([to_pixel(x, y) for x, y in zip(xs, ys)], fill=(31, 119, 180), width=2)
    draw.text((left, 5), title, fill="black")
    for y in (y_min, y_max):
        draw.text((2, to_pixel(x_min, y)[1] - 6), f"{10 ** y:.3g}", fill="black")
    for x in (x_min, x_max):
        draw.text((to_pixel(x, y_min)[0] - 10, height - bottom + 5), f"{x:g}", fill="black")
    return image
