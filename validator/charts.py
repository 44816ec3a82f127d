"""Inline SVG charts for the dashboard: a line and a bar chart over windows, with round,
evenly spaced tick values, every one labelled (none skipped), and byte axes in one unit.

The SVGs scale to their container (``viewBox``, no fixed width), so they fit a phone.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

_W, _H = 480, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 72, 14, 14, 44
_FONT = 14


def nice_ticks(lo: float, hi: float, *, most: int = 6, integer: bool = False) -> list[float]:
    """Evenly spaced round values (steps of 1, 2 or 5 times a power of ten; whole numbers
    when ``integer``) covering [lo, hi], at most about ``most`` of them: every one is drawn
    and labelled, none is skipped."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("tick range must be finite")
    if hi < lo:
        lo, hi = hi, lo
    if hi - lo < 1e-12:
        pad = 1.0 if integer else max(abs(lo) * 0.05, 1e-6)
        lo, hi = lo - (0 if integer else pad), hi + pad
    raw = (hi - lo) / max(1, most - 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, float(round(step)))
    first = math.floor(lo / step + 1e-9) * step
    count = math.ceil((hi - first) / step - 1e-9)
    return [round(first + i * step, 12) for i in range(count + 1)]


def tick_label(value: float, step: float) -> str:
    """``value`` with as many decimals as the tick step needs (6.4, 6.6; 0.25, 0.5)."""
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    if decimals and abs(round(step * 10**decimals) - step * 10**decimals) > 1e-6:
        decimals += 1  # steps such as 0.25
    return f"{value:.{decimals}f}"


_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def _byte_ticks(top: float) -> tuple[list[float], Callable[[float], str]]:
    """Nice ticks from 0 to at least ``top`` bytes, in the one unit that suits ``top``."""
    power = 0
    while top >= 1024 and power < len(_BYTE_UNITS) - 1:
        top /= 1024
        power += 1
    ticks = nice_ticks(0.0, max(top, 1.0))
    step = ticks[1] - ticks[0]
    unit = 1024.0**power
    return [t * unit for t in ticks], lambda v: f"{tick_label(v / unit, step)} {_BYTE_UNITS[power]}"


class _Frame:
    """An SVG plot area with labelled grid lines at the given ticks."""

    def __init__(self, svg_id: str, title: str, xticks: list[float], x_range: tuple[float, float],
                 yticks: list[float], y_label: Callable[[float], str]):
        self.x0, self.x1 = x_range
        self.y0, self.y1 = yticks[0], yticks[-1]
        self.pw, self.ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
        self.parts = [
            (f'<svg id="{svg_id}" class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" '
             f'role="img" aria-label="{html.escape(title)}">'),
            f"<title>{html.escape(title)}</title>",
            f'<rect x="{_LEFT}" y="{_TOP}" width="{self.pw}" height="{self.ph}" fill="#fafafa" stroke="#999"/>',
        ]
        for y in yticks:
            self.parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + self.pw}" y1="{self.py(y):.1f}" y2="{self.py(y):.1f}" '
                              f'stroke="#e4e4e4"/>')
            self.parts.append(f'<text class="ytick" x="{_LEFT - 6}" y="{self.py(y) + 4:.1f}" text-anchor="end" '
                              f'font-size="{_FONT}">{html.escape(y_label(y))}</text>')
        for x in xticks:
            self.parts.append(f'<line x1="{self.px(x):.1f}" x2="{self.px(x):.1f}" y1="{_TOP + self.ph}" '
                              f'y2="{_TOP + self.ph + 4}" stroke="#999"/>')
            self.parts.append(f'<text class="xtick" x="{self.px(x):.1f}" y="{_H - _BOTTOM + 18}" text-anchor="middle" '
                              f'font-size="{_FONT}">{int(x)}</text>')
        self.parts.append(f'<text x="{_LEFT + self.pw / 2}" y="{_H - 5}" text-anchor="middle" '
                          f'font-size="{_FONT}">window</text>')

    def px(self, x: float) -> float:
        return _LEFT + (x - self.x0) / (self.x1 - self.x0) * self.pw

    def py(self, y: float) -> float:
        return _TOP + (1.0 - (y - self.y0) / (self.y1 - self.y0)) * self.ph

    def close(self) -> str:
        return "".join(self.parts) + "</svg>"


def _empty_chart(svg_id: str, title: str) -> str:
    return (
        f'<svg id="{svg_id}" class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {_H}" role="img" '
        f'aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>'
        f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" font-size="{_FONT}" fill="#777">no data yet</text></svg>'
    )


def _window_ticks(xs: Sequence[float]) -> list[float]:
    lo, hi = min(xs), max(xs)
    if lo == hi:  # one window: put it in the middle, not on an edge
        lo, hi = max(0, lo - 1), hi + 1
    return nice_ticks(lo, hi, most=7, integer=True)


def svg_line_chart(points: Sequence[tuple[float, float]], *, svg_id: str, title: str) -> str:
    """An inline SVG line chart of (window, value) points, e.g. the held-out loss curve."""
    if not points:
        return _empty_chart(svg_id, title)
    xticks = _window_ticks([p[0] for p in points])
    yticks = nice_ticks(min(p[1] for p in points), max(p[1] for p in points), most=6)
    step = yticks[1] - yticks[0]
    frame = _Frame(svg_id, title, xticks, (xticks[0], xticks[-1]), yticks, lambda y: tick_label(y, step))
    coords = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in points)
    frame.parts.append(f'<polyline class="curve" points="{coords}" fill="none" stroke="#1f6fb2" stroke-width="2"/>')
    x, y = points[-1]
    frame.parts.append(f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="3.5" fill="#1f6fb2">'
                       f"<title>window {int(x)}: {y:.4g}</title></circle>")
    return frame.close()


def svg_bar_chart(points: Sequence[tuple[float, float]], *, svg_id: str, title: str) -> str:
    """An inline SVG bar chart of (window, bytes) points, y axis from zero."""
    if not points:
        return _empty_chart(svg_id, title)
    xticks = _window_ticks([p[0] for p in points])
    yticks, label = _byte_ticks(max(p[1] for p in points))
    frame = _Frame(svg_id, title, xticks, (xticks[0] - 0.6, xticks[-1] + 0.6), yticks, label)
    bar = max(1.0, min(24.0, 0.7 * (frame.px(1.0) - frame.px(0.0))))
    for x, y in points:
        y_px = frame.py(y)
        frame.parts.append(
            f'<rect class="bar" x="{frame.px(x) - bar / 2:.1f}" y="{y_px:.1f}" width="{bar:.1f}" '
            f'height="{frame.py(0.0) - y_px:.1f}" fill="#4a9a5c"><title>window {int(x)}: {human_bytes(y)}</title></rect>'
        )
    return frame.close()


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    i = 0
    while abs(n) >= 1024 and i < len(_BYTE_UNITS) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {_BYTE_UNITS[i]}"
