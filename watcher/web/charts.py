"""Inline SVG charts drawn by the server: no script, no external resource, every text escaped.

Each chart carries a `<title>` (its accessible name) and a `<desc>` stating what it shows; the page puts a data
table beside it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

SMOOTHING = 0.6  # TensorBoard's default smoothing weight
Point = tuple[int, float]


def fmt(value: float | None) -> str:
    """A metric as the pages show it: four significant digits, or a dash when unknown."""
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def fmt_step(step: int | None) -> str:
    """A step with thousands separators."""
    return "—" if step is None else f"{step:,}"


def ema(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """The debiased exponential moving average, as TensorBoard draws it (non-finite values pass through)."""
    smoothed: list[float] = []
    last = 0.0
    count = 0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(value)
            continue
        last = last * weight + (1 - weight) * value
        count += 1
        # debiasing: the average starts at 0, so early values would be pulled down without it
        smoothed.append(last / (1 - weight**count))
    return smoothed


def robust_range(values: Sequence[float]) -> tuple[float, float]:
    """A y-range that a few outliers cannot stretch: the 5th-95th percentile band (inner ranks, so a lone spike
    in a short run is not averaged in) widened by half of it on each side, never beyond the data. Points
    outside it are drawn at the edge and marked, never hidden."""
    ordered = sorted(v for v in values if math.isfinite(v))
    if not ordered:
        return 0.0, 1.0
    last = len(ordered) - 1
    if last < 4:  # too few points to call any of them an outlier
        low_q, high_q = ordered[0], ordered[-1]
    else:
        low_q, high_q = ordered[math.ceil(0.05 * last)], ordered[math.floor(0.95 * last)]
    spread = high_q - low_q
    low = max(ordered[0], low_q - spread / 2)
    high = min(ordered[-1], high_q + spread / 2)
    if high - low < 1e-12:
        pad = abs(high) * 0.05 or 0.5
        low, high = low - pad, high + pad
    return low, high


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) within [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low]
    raw = (high - low) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def log_ticks(low: float, high: float) -> list[float]:
    """Tick values for a log axis spanning 10**low .. 10**high."""
    if high - low < 1:
        return [t for t in nice_ticks(10**low, 10**high, 4) if t > 0]
    ticks = []
    for power in range(math.floor(low), math.ceil(high) + 1):
        for mantissa in (1, 2, 5) if high - low < 3 else (1,):
            value = mantissa * 10.0**power
            if low <= math.log10(value) <= high:
                ticks.append(value)
    return ticks


@dataclass(frozen=True, slots=True)
class Frame:
    """The plot area of a chart and its scales."""

    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    x_low: float
    x_high: float
    y_low: float
    y_high: float

    def x(self, step: float) -> float:
        """Pixel x of a step."""
        span = self.x_high - self.x_low or 1.0
        return self.left + (step - self.x_low) / span * (self.width - self.left - self.right)

    def y(self, value: float) -> float:
        """Pixel y of a value in plot space (clamped to the plot area)."""
        span = self.y_high - self.y_low or 1.0
        inner = self.height - self.top - self.bottom
        pixel = self.top + (1 - (value - self.y_low) / span) * inner
        return min(max(pixel, self.top), self.height - self.bottom)


@dataclass(frozen=True, slots=True)
class Chart:
    """A rendered chart: the SVG, and its title and description as plain text."""

    svg: Markup
    title: str
    desc: str
    clipped: int = 0


def _polyline(frame: Frame, points: Sequence[tuple[float, float]], css: str) -> str:
    if len(points) < 2:
        return ""
    coords = " ".join(f"{frame.x(s):.1f},{frame.y(v):.1f}" for s, v in points)
    return f'<polyline class="{css}" points="{coords}"/>'


def _axes(frame: Frame, y_ticks: Sequence[float], *, log: bool, x_labels: bool = True) -> list[str]:
    parts = []
    bottom = frame.height - frame.bottom
    for tick in y_ticks:
        value = math.log10(tick) if log else tick
        if not frame.y_low <= value <= frame.y_high:
            continue
        y = frame.y(value)
        right = frame.width - frame.right
        parts.append(f'<line class="grid" x1="{frame.left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{frame.left - 4}" y="{y + 3:.1f}" text-anchor="end">{fmt(tick)}</text>')
    for tick in nice_ticks(frame.x_low, frame.x_high, 6):
        x = frame.x(tick)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{frame.top}" y2="{bottom}"/>')
        if x_labels:
            parts.append(f'<text class="tick" x="{x:.1f}" y="{bottom + 13}" text-anchor="middle">{int(tick):,}</text>')
    inner = frame.width - frame.left - frame.right
    parts.append(
        f'<rect class="frame" x="{frame.left}" y="{frame.top}" width="{inner}" height="{bottom - frame.top}"/>'
    )
    return parts


def _svg(ident: str, frame: Frame, title: str, desc: str, body: Sequence[str]) -> Markup:
    head = (
        f'<svg class="chart" id="{ident}" viewBox="0 0 {frame.width} {frame.height}" role="img" '
        f'aria-labelledby="{ident}-title" aria-describedby="{ident}-desc" xmlns="http://www.w3.org/2000/svg">'
        f'<title id="{ident}-title">{escape(title)}</title><desc id="{ident}-desc">{escape(desc)}</desc>'
    )
    return Markup(head + "".join(body) + "</svg>")


def _domain(points: Sequence[Point], x_domain: tuple[int, int] | None) -> tuple[float, float]:
    if x_domain is not None:
        low, high = x_domain
    else:
        low, high = (points[0][0], points[-1][0]) if points else (0, 1)
    return (low - 0.5, high + 0.5) if low == high else (low, high)


def loss_chart(
    points: Sequence[Point], *, log: bool = False, x_domain: tuple[int, int] | None = None, ident: str = "loss-chart"
) -> Chart:
    """Loss over steps: raw points faint, the debiased EMA on top, the best checkpoint marked, outliers at the edge."""
    points = [(s, v) for s, v in points if math.isfinite(v)]
    if not points:
        title = "loss: no checkpoint has reported a loss yet"
        frame = Frame(720, 260, 56, 12, 12, 28, 0, 1, 0, 1)
        return Chart(_svg(ident, frame, title, title, _axes(frame, [], log=False)), title, title)
    best_step, best = min(points, key=lambda p: p[1])
    smoothed = ema([v for _, v in points])
    drawable = [v for _, v in points if v > 0] if log else [v for _, v in points]
    plot = [math.log10(v) for v in drawable] if log else drawable
    low, high = robust_range(plot) if plot else (-1.0, 0.0)
    pad = (high - low) * 0.04
    x_low, x_high = _domain(points, x_domain)
    frame = Frame(720, 260, 56, 12, 12, 28, x_low, x_high, low - pad, high + pad)

    def space(value: float) -> float | None:
        if log:
            return math.log10(value) if value > 0 else None
        return value

    body = _axes(frame, log_ticks(frame.y_low, frame.y_high) if log else nice_ticks(frame.y_low, frame.y_high), log=log)
    clipped = 0
    raw = []
    marks = []
    for step, value in points:
        where = space(value)
        x = frame.x(step)
        if where is not None and low <= where <= high:
            raw.append(f'<circle class="raw" cx="{x:.1f}" cy="{frame.y(where):.1f}" r="2.2"/>')
            continue
        clipped += 1
        above = where is not None and where > high
        edge = frame.top if above else frame.height - frame.bottom
        tip, base = (edge, edge + 7) if above else (edge, edge - 7)
        marks.append(
            f'<path class="clipped" d="M{x:.1f},{tip} L{x - 4:.1f},{base} L{x + 4:.1f},{base} Z">'
            f"<title>step {step:,}: loss {escape(fmt(value))}, off the chart</title></path>"
        )
    # the raw curve, faint, under its points (clamped to the plot area like them)
    body.append(_polyline(frame, [(s, w) for s, v in points if (w := space(v)) is not None], "raw-line"))
    body += raw
    line = [(s, w) for (s, _), v in zip(points, smoothed) if (w := space(v)) is not None]
    body.append(_polyline(frame, line, "smoothed"))
    body += marks
    best_at = space(best)
    if best_at is not None:
        bx, by = frame.x(best_step), frame.y(best_at)
        anchor = "end" if bx > frame.width * 0.7 else "start"
        shift = -7 if anchor == "end" else 7
        body.append(f'<circle class="best" cx="{bx:.1f}" cy="{by:.1f}" r="4.5"/>')
        label_y = by - 8 if by > frame.top + 16 else by + 16
        body.append(
            f'<text class="best-label" x="{bx + shift:.1f}" y="{label_y:.1f}" text-anchor="{anchor}">'
            f"best {fmt(best)} @ {best_step:,}</text>"
        )
    title = f"loss, best {fmt(best)} at step {best_step:,}"
    last_step, last = points[-1]
    desc = (
        f"Training loss of {len(points):,} checkpoints, steps {points[0][0]:,} to {last_step:,}"
        f"{' on a log scale' if log else ''}: latest {fmt(last)} at step {last_step:,}, smoothed "
        f"(exponential moving average, weight {SMOOTHING}) {fmt(smoothed[-1])}; best {fmt(best)} at step "
        f"{best_step:,}."
    )
    if clipped:
        desc += f" {clipped} point{'s' if clipped != 1 else ''} outside the y-range drawn at the edge as triangles."
    return Chart(_svg(ident, frame, title, desc, body), title, desc, clipped)


def metric_chart(
    label: str, points: Sequence[Point], *, x_domain: tuple[int, int] | None = None, ident: str = "metric-chart"
) -> Chart:
    """A small line chart of one metric over steps, on the same step axis as the loss chart."""
    points = [(s, v) for s, v in points if math.isfinite(v)]
    x_low, x_high = _domain(points, x_domain)
    if not points:
        title = f"{label}: not reported"
        frame = Frame(720, 110, 56, 12, 8, 20, x_low, x_high, 0, 1)
        return Chart(_svg(ident, frame, title, title, _axes(frame, [], log=False)), title, title)
    values = [v for _, v in points]
    low, high = min(values), max(values)
    if high - low < 1e-15:
        pad = abs(high) * 0.05 or 0.5
    else:
        pad = (high - low) * 0.06
    frame = Frame(720, 110, 56, 12, 8, 20, x_low, x_high, low - pad, high + pad)
    body = _axes(frame, nice_ticks(frame.y_low, frame.y_high, 3), log=False)
    body.append(_polyline(frame, points, "metric"))
    if len(points) == 1:
        step, value = points[0]
        body.append(f'<circle class="metric-dot" cx="{frame.x(step):.1f}" cy="{frame.y(value):.1f}" r="2.5"/>')
    last_step, last = points[-1]
    title = f"{label}, latest {fmt(last)} at step {last_step:,}"
    desc = (
        f"{label.capitalize()} of {len(points):,} checkpoints, steps {points[0][0]:,} to {last_step:,}: "
        f"from {fmt(points[0][1])} to {fmt(last)}, between {fmt(low)} and {fmt(high)}."
    )
    return Chart(_svg(ident, frame, title, desc, body), title, desc)


@functools.lru_cache(maxsize=4096)
def sparkline(points: tuple[Point, ...], *, label: str = "loss") -> Markup:
    """A tiny loss curve for a table cell (its numbers are in the cells beside it); memoized, since the overview
    shows the same curves on every request until a poll changes them."""
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if len(finite) < 2:
        return Markup("")
    values = [v for _, v in finite]
    low, high = robust_range(values)
    frame = Frame(100, 24, 1, 1, 2, 2, finite[0][0], finite[-1][0], low, high)
    coords = " ".join(f"{frame.x(s):.1f},{frame.y(v):.1f}" for s, v in finite)
    text = f"{label} from {fmt(values[0])} to {fmt(values[-1])} over {len(finite)} points"
    return Markup(
        f'<svg class="spark" viewBox="0 0 100 24" role="img" aria-label="{escape(text)}" '
        f'xmlns="http://www.w3.org/2000/svg"><polyline points="{coords}"/></svg>'
    )
