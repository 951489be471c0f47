"""Render K-LoRA's per-layer, per-step LoRA choice as a "selection map" image (cf. Fig. 6 of the paper).

Rows are layers, columns are sampling steps, and each cell takes the colour of the LoRA chosen there.

Sizing rules (all within ``max_size``):

* cells are whole pixels, at most ``MAX_CELL_W`` x ``MAX_CELL_H``, and as large as the space allows;
* rows are labelled with short names (``down 1.0 attn2 to_k``, see fusion/layer_labels.py) when a row is at
  least ``MIN_NAME_ROW_H`` px (and tall enough for the font), shortened from the left with "..." to a
  bounded margin; otherwise index ticks label the rows. A line separates consecutive blocks;
* when there are more layers (or steps) than pixel rows (or columns), each pixel row (column) shows the
  average colour of the layers (steps) it covers, and a caption below the plot says so. Uniform regions thus
  keep their exact palette colour and mixed regions show a proportional blend: nothing is hidden or invented.

The grid is painted as a tiny (steps x layers) image and scaled up with NEAREST, so 1000 x 150 cells cost one
resize rather than 150,000 rectangles. Only Pillow APIs present in 9.5 (the host WebUI's pin) are used.
"""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from lib_klora.fusion.layer_labels import layer_groups_and_labels

RGB = tuple[int, int, int]

# Okabe-Ito colours (colourblind-safe), subject blue and style orange first. Grey replaces Okabe-Ito's black,
# which would read as text or frame.
PALETTE: tuple[RGB, ...] = (
    (0, 114, 178),  # blue: label 0, the subject LoRA
    (230, 159, 0),  # orange: label 1, the style LoRA
    (0, 158, 115),  # bluish green: label 2, e.g. "both"
    (204, 121, 167),  # reddish purple
    (86, 180, 233),  # sky blue
    (213, 94, 0),  # vermillion
    (240, 228, 66),  # yellow
    (136, 136, 136),  # grey
)
MAX_LABELS = len(PALETTE)

BACKGROUND: RGB = (255, 255, 255)
INK: RGB = (0, 0, 0)
FRAME: RGB = (64, 64, 64)
SEPARATOR: RGB = (255, 255, 255)  # between blocks: a gap in the grid reads as a break, not as a choice

MAX_CELL_W = 32
MAX_CELL_H = 24
MIN_NAME_ROW_H = 10
MAX_NAME_W = 260  # px for layer names; keeps the grid, not the names, the widest part of the image
MAX_LEGEND_TEXT_W = 220
PAD = 8
TICK = 3

# Key in ``Image.info`` holding the grid's (x, y, width, height), for tests and for mapping clicks to cells.
GRID_BOX_KEY = "klora_selection_grid"


def render_selection_map(
    layer_names: Sequence[str],
    choices: Sequence[Sequence[int]],
    labels: Sequence[str] = ("subject", "style"),
    title: str | None = None,
    max_size: tuple[int, int] = (1600, 2400),
) -> Image.Image:
    """Draw the selection map: ``choices[layer][step]`` indexes ``labels`` (and ``PALETTE``).

    Raises ValueError for empty or ragged ``choices``, indices outside ``labels``, a name count that does not
    match the rows, more than ``MAX_LABELS`` labels, or a ``max_size`` too small for the axes and legend.
    """
    grid = _validate(layer_names, choices, labels, max_size)
    n_layers, n_steps = len(grid), len(grid[0])
    font = _font()
    groups, short_names = layer_groups_and_labels([str(n) for n in layer_names])
    names = [_safe_text(n) for n in short_names]
    label_texts = [_safe_text(str(label)) for label in labels]

    legend = _legend_lines(grid, label_texts, font)
    lay = _layout(n_layers, n_steps, names, legend, title, font, max_size)

    img = Image.new("RGB", (lay.width, lay.height), BACKGROUND)
    img.paste(_cells(grid, lay), (lay.grid_x, lay.grid_y))
    draw = ImageDraw.Draw(img)
    draw.rectangle(
        (lay.grid_x - 1, lay.grid_y - 1, lay.grid_x + lay.grid_w, lay.grid_y + lay.grid_h), outline=FRAME
    )
    _draw_block_separators(draw, lay, groups)
    _draw_x_axis(draw, lay, n_steps, font)
    _draw_y_axis(img, draw, lay, n_layers, names, font)
    _draw_legend(draw, lay, legend, font)
    if title:
        text = _shorten_right(_safe_text(title), lay.width - 2 * PAD, font)
        draw.text((PAD, PAD - font.top), text, fill=INK, font=font.font)
    for i, caption in enumerate(lay.captions):
        text = _shorten_right(caption, lay.width - 2 * PAD, font)
        draw.text((PAD, lay.caption_y + i * font.line - font.top), text, fill=INK, font=font.font)

    img.info[GRID_BOX_KEY] = (lay.grid_x, lay.grid_y, lay.grid_w, lay.grid_h)
    return img


def save_selection_map(
    path: str | os.PathLike[str],
    layer_names: Sequence[str],
    choices: Sequence[Sequence[int]],
    labels: Sequence[str] = ("subject", "style"),
    title: str | None = None,
    max_size: tuple[int, int] = (1600, 2400),
) -> Path:
    """Render the selection map and write it as PNG to ``path`` (parent folders are created)."""
    # Render first so that bad input leaves no empty folders behind.
    img = render_selection_map(layer_names, choices, labels, title=title, max_size=max_size)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG")
    return out


# --- validation -------------------------------------------------------------------------------------------


def _validate(
    layer_names: Sequence[str],
    choices: Sequence[Sequence[int]],
    labels: Sequence[str],
    max_size: tuple[int, int],
) -> list[list[int]]:
    if isinstance(labels, str) or isinstance(layer_names, str):
        raise ValueError("labels and layer_names must be sequences of strings, not a single string")
    labels = list(labels)
    if not labels:
        raise ValueError("labels is empty: need at least one label")
    if len(labels) > MAX_LABELS:
        raise ValueError(
            f"{len(labels)} labels given, but the palette has only {MAX_LABELS} distinct colours"
        )
    try:
        max_w, max_h = (operator.index(v) for v in max_size)
    except (TypeError, ValueError):
        raise ValueError(f"max_size must be two integers (width, height), got {max_size!r}") from None
    if max_w < 1 or max_h < 1:
        raise ValueError(f"max_size must be positive, got {max_size!r}")

    rows = list(choices)
    names = list(layer_names)
    if not rows:
        raise ValueError("choices is empty: need at least one layer with at least one step")
    if len(names) != len(rows):
        raise ValueError(f"{len(names)} layer names but {len(rows)} rows of choices; need one name per row")

    grid: list[list[int]] = []
    for li, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, Iterable):
            raise ValueError(f"choices[{li}] (layer {names[li]!r}) is not a sequence of label indices")
        values: list[int] = []
        for si, value in enumerate(row):
            try:
                index = operator.index(value)
            except TypeError:
                raise ValueError(f"choices[{li}][{si}] = {value!r} is not an integer label index") from None
            if not 0 <= index < len(labels):
                raise ValueError(
                    f"choices[{li}][{si}] = {index} (layer {names[li]!r}, step {si}) is outside labels "
                    f"{labels!r}; valid indices are 0..{len(labels) - 1}"
                )
            values.append(index)
        if not values:
            raise ValueError(f"choices[{li}] (layer {names[li]!r}) has no steps")
        if grid and len(values) != len(grid[0]):
            raise ValueError(
                f"choices is ragged: layer 0 ({names[0]!r}) has {len(grid[0])} steps "
                f"but layer {li} ({names[li]!r}) has {len(values)}"
            )
        grid.append(values)
    return grid


# --- text helpers -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Font:
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont
    top: int  # ink starts this far below the draw origin (0 for the bitmap font, ~2 for FreeType)
    height: int  # ink height of ascenders plus descenders
    line: int  # pitch between text lines

    def width(self, text: str) -> int:
        return _measure().textbbox((0, 0), text, font=self.font)[2] if text else 0


@functools.lru_cache(maxsize=1)
def _measure() -> ImageDraw.ImageDraw:
    return ImageDraw.Draw(Image.new("L", (1, 1)))


@functools.lru_cache(maxsize=1)
def _font() -> _Font:
    # Pillow < 10.1 returns a bitmap font, newer ones a small FreeType font; both are measured, not assumed.
    font = ImageFont.load_default()
    _, top, _, bottom = _measure().textbbox((0, 0), "Ag|", font=font)
    return _Font(font=font, top=top, height=bottom - top, line=bottom - top + 3)


def _safe_text(text: str) -> str:
    # Pillow 9.5's bitmap font encodes text as latin-1 and raises on anything else.
    return text.encode("latin-1", "replace").decode("latin-1")


def _fit(text: str, max_w: int, font: _Font, keep_end: bool) -> str:
    if font.width(text) <= max_w:
        return text
    # Longest kept part that fits next to "..."; binary search keeps this cheap for hundreds of long names.
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        part = text[len(text) - mid :] if keep_end else text[:mid]
        candidate = "..." + part if keep_end else part + "..."
        if font.width(candidate) <= max_w:
            lo = mid
        else:
            hi = mid - 1
    part = text[len(text) - lo :] if keep_end and lo else text[:lo]
    return "..." + part if keep_end else part + "..."


def _shorten_left(text: str, max_w: int, font: _Font) -> str:
    """Drop the start of ``text``: layer names differ at their ends (block numbers, to_q/to_k)."""
    return _fit(text, max_w, font, keep_end=True)


def _shorten_right(text: str, max_w: int, font: _Font) -> str:
    return _fit(text, max_w, font, keep_end=False)


# --- layout -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Legend:
    header: str
    items: list[str]
    width: int  # swatch, gap and widest text
    swatch: int


def _legend_lines(grid: list[list[int]], labels: list[str], font: _Font) -> _Legend:
    counts = [0] * len(labels)
    for row in grid:
        for index in row:
            counts[index] += 1
    total = sum(counts)
    items = []
    for label, count in zip(labels, counts, strict=True):
        share = 100.0 * count / total
        pct = "<1%" if 0 < share < 1 else f"{share:.0f}%"
        items.append(f"{_shorten_right(label, MAX_LEGEND_TEXT_W, font)}  {pct}")
    header = "chosen LoRA (share)"
    swatch = font.height
    width = max(font.width(header), swatch + 4 + max(font.width(t) for t in items))
    return _Legend(header=header, items=items, width=width, swatch=swatch)


@dataclass(frozen=True)
class _Layout:
    width: int
    height: int
    grid_x: int
    grid_y: int
    grid_w: int
    grid_h: int
    show_names: bool
    name_w: int  # width of the y tick label column
    row_agg: bool
    col_agg: bool
    captions: list[str]
    caption_y: int


def _layout(
    n_layers: int,
    n_steps: int,
    names: list[str],
    legend: _Legend,
    title: str | None,
    font: _Font,
    max_size: tuple[int, int],
) -> _Layout:
    max_w, max_h = max_size
    line = font.line
    top = PAD + (line + PAD // 2 if title else 0)
    # frame, tick, tick labels, "sampling step", bottom padding
    bottom_fixed = 1 + TICK + 2 + line + line + PAD
    right = 2 * PAD + legend.width + PAD
    legend_h = (1 + len(legend.items)) * line
    if top + legend_h + PAD > max_h:
        raise ValueError(
            f"max_size {max_size} is too small: the legend alone needs {top + legend_h + PAD} px"
        )

    name_min = max(MIN_NAME_ROW_H, font.height + 1)  # + 1: descenders must not touch the next name
    name_cap = min(MAX_NAME_W, max_w // 3)
    for show_names in (True, False):
        if show_names and n_layers * name_min > max_h - top - bottom_fixed - 1:
            continue  # rows cannot be tall enough; skip measuring hundreds of names
        if show_names:
            name_w = min(name_cap, max(font.width(n) for n in names))
        else:
            name_w = font.width(str(n_layers - 1))
        # padding, rotated "layer", gap, tick labels, gap, tick, frame
        left = PAD + font.height + PAD // 2 + name_w + 2 + TICK + 1
        avail_w = max_w - left - right - 1  # 1 px for the frame's right edge
        avail_h_nocap = max_h - top - bottom_fixed - 1
        if avail_w < 1 or avail_h_nocap < 1:
            if show_names:
                continue
            raise ValueError(f"max_size {max_size} is too small for the axes and legend")

        col_agg = n_steps > avail_w
        grid_w = avail_w if col_agg else n_steps * min(MAX_CELL_W, avail_w // n_steps)
        # A column caption costs a line, which may be the one that tips the rows into aggregation.
        row_agg = n_layers > avail_h_nocap - (line if col_agg else 0)
        n_captions = int(row_agg) + int(col_agg)
        avail_h = avail_h_nocap - n_captions * line
        if avail_h < 1:
            raise ValueError(f"max_size {max_size} is too small for the axes, captions and legend")
        grid_h = avail_h if row_agg else n_layers * min(MAX_CELL_H, avail_h // n_layers)
        if show_names and (row_agg or grid_h // n_layers < name_min):
            continue

        captions = []
        if row_agg:
            captions.append(
                f"{n_layers} layers drawn in {grid_h} pixel rows: each row shows the average colour "
                f"of the ~{n_layers / grid_h:.1f} layers it covers"
            )
        if col_agg:
            captions.append(
                f"{n_steps} steps drawn in {grid_w} pixel columns: each column shows the average colour "
                f"of the ~{n_steps / grid_w:.1f} steps it covers"
            )
        caption_y = top + grid_h + bottom_fixed - PAD
        height = max(caption_y + n_captions * line + PAD, top + legend_h + PAD)
        content_w = left + grid_w + 1 + right
        extra = [font.width(c) for c in captions] + ([font.width(_safe_text(title))] if title else [])
        width = min(max_w, max([content_w, *(w + 2 * PAD for w in extra)]))
        return _Layout(
            width=width,
            height=height,
            grid_x=left,
            grid_y=top,
            grid_w=grid_w,
            grid_h=grid_h,
            show_names=show_names,
            name_w=name_w,
            row_agg=row_agg,
            col_agg=col_agg,
            captions=captions,
            caption_y=caption_y,
        )
    raise AssertionError("unreachable: the index-tick layout either fits or raises")


def _cells(grid: list[list[int]], lay: _Layout) -> Image.Image:
    n_layers, n_steps = len(grid), len(grid[0])
    small = Image.frombytes("P", (n_steps, n_layers), bytes(i for row in grid for i in row))
    small.putpalette([channel for colour in PALETTE for channel in colour])
    # Whole-pixel cells: NEAREST upscaling by an integer factor copies each cell exactly.
    up = small.resize(
        (n_steps if lay.col_agg else lay.grid_w, n_layers if lay.row_agg else lay.grid_h),
        Image.Resampling.NEAREST,
    ).convert("RGB")
    if up.size != (lay.grid_w, lay.grid_h):
        # More cells than pixels: BOX averages exactly the cells each pixel covers (see module docstring).
        up = up.resize((lay.grid_w, lay.grid_h), Image.Resampling.BOX)
    return up


# --- axes and legend --------------------------------------------------------------------------------------


def _tick_indices(count: int, pitch: float, min_gap: float) -> list[int]:
    """Ticks at a 1/2/5 x 10^k interval at least ``min_gap`` px apart, always including 0 and count - 1."""
    interval = 1
    while interval < count and interval * pitch < min_gap:
        magnitude = interval
        while magnitude >= 10:
            magnitude //= 10
        # 1 -> 2 -> 5 -> 10 -> 20 -> 50 -> ...
        interval = interval * 5 // 2 if magnitude == 2 else interval * 2
    ticks = list(range(0, count, interval))
    last = count - 1
    if ticks[-1] != last:
        if len(ticks) > 1 and (last - ticks[-1]) * pitch < min_gap:
            ticks.pop()  # too close to the last step's label
        ticks.append(last)
    return ticks


def _draw_x_axis(draw: ImageDraw.ImageDraw, lay: _Layout, n_steps: int, font: _Font) -> None:
    pitch = lay.grid_w / n_steps
    y0 = lay.grid_y + lay.grid_h + 1
    min_gap = font.width(str(n_steps - 1)) + 8
    for step in _tick_indices(n_steps, pitch, min_gap):
        x = lay.grid_x + int((step + 0.5) * pitch)
        draw.line((x, y0, x, y0 + TICK - 1), fill=FRAME)
        text = str(step)
        w = font.width(text)
        tx = min(max(0, x - w // 2), lay.width - w)
        draw.text((tx, y0 + TICK + 1 - font.top), text, fill=INK, font=font.font)
    text = "sampling step"
    w = font.width(text)
    # Centred under the grid; under a grid narrower than the text, end at its right edge instead of running
    # into the legend (the space under the row labels is free).
    tx = max(PAD, min(lay.grid_x + (lay.grid_w - w) // 2, lay.grid_x + lay.grid_w - w))
    draw.text((tx, y0 + TICK + 1 + font.line - font.top), text, fill=INK, font=font.font)


def _draw_y_axis(
    img: Image.Image, draw: ImageDraw.ImageDraw, lay: _Layout, n_layers: int, names: list[str], font: _Font
) -> None:
    pitch = lay.grid_h / n_layers
    x_tick = lay.grid_x - 1 - TICK
    x_right = x_tick - 2  # tick labels end here
    if lay.show_names:
        rows = range(n_layers)
        texts = [_shorten_left(n, lay.name_w, font) for n in names]
    else:
        rows = _tick_indices(n_layers, pitch, font.line + 2)
        texts = [str(i) for i in range(n_layers)]
    for row in rows:
        y = lay.grid_y + int((row + 0.5) * pitch)
        draw.line((x_tick, y, x_tick + TICK - 1, y), fill=FRAME)
        text = texts[row]
        ty = min(max(0, y - font.height // 2), lay.height - font.height) - font.top
        draw.text((x_right - font.width(text), ty), text, fill=INK, font=font.font)

    # Rotated axis title; the bitmap font cannot rotate, so draw it upright and turn the pixels.
    label = "layer"
    upright = Image.new("L", (font.width(label), font.top + font.height), 0)
    ImageDraw.Draw(upright).text((0, 0), label, fill=255, font=font.font)
    turned = upright.transpose(Image.Transpose.ROTATE_90)
    ty = lay.grid_y + (lay.grid_h - turned.height) // 2
    ty = min(max(0, ty), lay.height - turned.height)
    img.paste(Image.new("RGB", turned.size, INK), (PAD - font.top, ty), turned)


def _draw_block_separators(draw: ImageDraw.ImageDraw, lay: _Layout, groups: list[str]) -> None:
    """A 1-px line between rows of different blocks, where rows are tall enough to spare it."""
    pitch = lay.grid_h / len(groups)
    if pitch < 4:
        return
    for row in range(1, len(groups)):
        if groups[row] != groups[row - 1]:
            y = lay.grid_y + int(row * pitch)
            draw.line((lay.grid_x, y, lay.grid_x + lay.grid_w - 1, y), fill=SEPARATOR)


def _draw_legend(draw: ImageDraw.ImageDraw, lay: _Layout, legend: _Legend, font: _Font) -> None:
    x = lay.grid_x + lay.grid_w + 1 + 2 * PAD
    y = lay.grid_y
    draw.text((x, y - font.top), legend.header, fill=INK, font=font.font)
    for i, text in enumerate(legend.items):
        ly = y + (i + 1) * font.line
        s = legend.swatch
        # The outline keeps light swatches (yellow) visible on white; the interior is the exact colour.
        draw.rectangle((x, ly, x + s - 1, ly + s - 1), fill=PALETTE[i], outline=FRAME)
        draw.text((x + s + 4, ly - font.top), text, fill=INK, font=font.font)
