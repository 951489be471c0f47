from __future__ import annotations

import itertools
import random

import pytest
from PIL import Image

from lib_klora.fusion import selection_map as sm
from lib_klora.fusion.selection_map import GRID_BOX_KEY, PALETTE, render_selection_map, save_selection_map

THREE = ("subject", "style", "both")


def grid_box(img: Image.Image) -> tuple[int, int, int, int]:
    return img.info[GRID_BOX_KEY]


def colours_in(img: Image.Image, box: tuple[int, int, int, int]) -> set[tuple[int, int, int]]:
    region = img.crop(box)
    return {colour for _, colour in region.getcolors(region.width * region.height)}


def has_ink(img: Image.Image, box: tuple[int, int, int, int]) -> bool:
    # Text is black (antialiased with FreeType); palette, frame and ticks are all lighter than this.
    return any(max(colour) < 50 for colour in colours_in(img, box))


def random_choices(layers: int, steps: int, n_labels: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(n_labels) for _ in range(steps)] for _ in range(layers)]


def test_palette_is_distinct_and_subject_blue_style_orange() -> None:
    assert len(set(PALETTE)) == len(PALETTE) == sm.MAX_LABELS >= 8
    assert (255, 255, 255) not in PALETTE and (0, 0, 0) not in PALETTE
    blue, orange = PALETTE[0], PALETTE[1]
    assert blue[2] > blue[0] and orange[0] > orange[2]


def test_every_pixel_of_every_cell_has_its_label_colour() -> None:
    choices = [[0, 1, 2, 0], [1, 1, 0, 2], [2, 0, 1, 1]]
    img = render_selection_map(["a", "b", "c"], choices, THREE)
    x0, y0, w, h = grid_box(img)
    assert w % 4 == 0 and h % 3 == 0, "cells must be whole pixels"
    cell_w, cell_h = w // 4, h // 3
    assert cell_w >= 1 and cell_h >= 1
    px = img.load()
    for y in range(h):
        for x in range(w):
            expected = PALETTE[choices[y // cell_h][x // cell_w]]
            assert px[x0 + x, y0 + y] == expected, (x, y)
    # One known cell per label, for a readable failure.
    assert px[x0, y0] == PALETTE[0]
    assert px[x0 + cell_w, y0] == PALETTE[1]
    assert px[x0 + 2 * cell_w, y0] == PALETTE[2]


def test_single_cell_is_visible_and_small() -> None:
    img = render_selection_map(["only_layer"], [[1]])
    x0, y0, w, h = grid_box(img)
    assert w >= 8 and h >= 8, "one cell must still be clearly visible"
    assert w <= sm.MAX_CELL_W and h <= sm.MAX_CELL_H
    assert img.getpixel((x0 + w // 2, y0 + h // 2)) == PALETTE[1]
    assert 60 <= img.width <= 700 and 40 <= img.height <= 300
    assert img.mode == "RGB"


def test_thousand_layers_by_150_steps_fit_default_size_without_aggregation() -> None:
    choices = random_choices(1000, 150, 3)
    img = render_selection_map([f"layer_{i}" for i in range(1000)], choices, THREE)
    assert img.width <= 1600 and img.height <= 2400
    x0, y0, w, h = grid_box(img)
    assert h % 1000 == 0 and h >= 1000, "every layer gets at least one whole pixel row"
    assert w % 150 == 0 and w // 150 >= 4, "columns stay a few pixels wide"
    assert x0 + w < img.width and y0 + h < img.height
    cell_w, cell_h = w // 150, h // 1000
    rng = random.Random(1)
    for _ in range(200):
        layer, step = rng.randrange(1000), rng.randrange(150)
        xy = (x0 + step * cell_w + cell_w // 2, y0 + layer * cell_h + cell_h // 2)
        assert img.getpixel(xy) == PALETTE[choices[layer][step]], (layer, step)


def test_rows_are_averaged_when_layers_outnumber_pixel_rows() -> None:
    layers = 1000
    halves = [[0] * 20 if i < layers // 2 else [1] * 20 for i in range(layers)]
    img = render_selection_map([str(i) for i in range(layers)], halves, max_size=(500, 300))
    assert img.width <= 500 and img.height <= 300
    x0, y0, w, h = grid_box(img)
    assert h < layers
    # Uniform regions keep their exact colour: aggregation must not invent colours.
    assert img.getpixel((x0 + w // 2, y0)) == PALETTE[0]
    assert img.getpixel((x0 + w // 2, y0 + h - 1)) == PALETTE[1]
    # The caption explaining the aggregation sits below the plot, left of the grid.
    assert has_ink(img, (0, y0 + h + 2, max(1, x0 - 10), img.height))

    alternating = [[i % 2] * 20 for i in range(layers)]
    img = render_selection_map([str(i) for i in range(layers)], alternating, max_size=(500, 300))
    x0, y0, w, h = grid_box(img)
    blue, orange = PALETTE[0], PALETTE[1]
    for y in range(y0, y0 + h):
        r, g, b = img.getpixel((x0 + w // 2, y))
        # Every pixel row covers both kinds of layer, so it must show a blend, not a majority colour.
        assert blue[0] < r < orange[0] and orange[2] < b < blue[2], (y, (r, g, b))


def test_no_caption_without_aggregation() -> None:
    img = render_selection_map([str(i) for i in range(100)], random_choices(100, 30, 2))
    x0, y0, _, h = grid_box(img)
    assert h >= 100
    assert not has_ink(img, (0, y0 + h + 2, x0 - 10, img.height))


def test_steps_are_averaged_when_they_outnumber_pixel_columns() -> None:
    choices = [[0] * 300 + [1] * 300]
    img = render_selection_map(["a"], choices, max_size=(400, 300))
    assert img.width <= 400 and img.height <= 300
    x0, y0, w, _ = grid_box(img)
    assert 1 <= w < 600
    assert img.getpixel((x0, y0)) == PALETTE[0]
    assert img.getpixel((x0 + w - 1, y0)) == PALETTE[1]


def test_legend_shows_a_swatch_for_every_label_even_unused_ones() -> None:
    img = render_selection_map(["a", "b"], [[0, 0], [0, 0]], THREE)
    x0, _, w, _ = grid_box(img)
    legend = colours_in(img, (x0 + w + 1, 0, img.width, img.height))
    assert {PALETTE[0], PALETTE[1], PALETTE[2]} <= legend
    assert PALETTE[3] not in legend
    assert has_ink(img, (x0 + w + 1, 0, img.width, img.height)), "legend text"


def test_legend_supports_eight_labels() -> None:
    labels = [f"lora_{i}" for i in range(8)]
    img = render_selection_map(["a"], [[0, 7]], labels)
    x0, _, w, _ = grid_box(img)
    assert set(PALETTE) <= colours_in(img, (x0 + w + 1, 0, img.width, img.height))


def test_layer_names_are_bounded_in_width() -> None:
    short = render_selection_map(["q", "k", "v"], [[0], [1], [0]])
    huge = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" * 10
    long = render_selection_map([huge, huge + "k", huge + "v"], [[0], [1], [0]])
    assert grid_box(short)[0] < grid_box(long)[0] <= sm.MAX_NAME_W + 60
    assert has_ink(long, (0, grid_box(long)[1], grid_box(long)[0], grid_box(long)[1] + grid_box(long)[3]))


def test_many_layers_use_index_ticks_not_names() -> None:
    huge = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    img = render_selection_map([f"{huge}_{i}" for i in range(1000)], [[0, 1]] * 1000)
    x0, y0, _, h = grid_box(img)
    assert x0 < 80, "index ticks need only a narrow margin"
    assert has_ink(img, (0, y0, x0, y0 + h))


def test_title_goes_on_top() -> None:
    # Five layers, so the rotated "layer" axis title stays beside the grid.
    plain = render_selection_map(list("abcde"), [[0]] * 5)
    titled = render_selection_map(
        list("abcde"), [[0]] * 5, title="K-LoRA  pattern S  alpha 1.5  beta 0.5  gamma 0.93"
    )
    assert grid_box(titled)[1] > grid_box(plain)[1]
    assert titled.height > plain.height
    assert has_ink(titled, (0, 0, titled.width, grid_box(titled)[1] - 2))
    assert not has_ink(plain, (0, 0, plain.width, grid_box(plain)[1] - 2))


def test_title_is_cut_to_max_width_and_non_latin1_text_renders() -> None:
    img = render_selection_map(
        ["層_attn1_to_q"],
        [[0, 1]],
        ("subjekt…", "stil ✓"),
        title="K-LoRA … " + "x" * 2000,
        max_size=(600, 400),
    )
    assert img.width <= 600 and img.height <= 400


@pytest.mark.parametrize("count", [1, 2, 7, 30, 149, 150, 1000])
@pytest.mark.parametrize("pitch", [1.0, 2.0, 9.0, 32.0])
def test_ticks_include_ends_and_do_not_crowd(count: int, pitch: float) -> None:
    min_gap = 20.0
    ticks = sm._tick_indices(count, pitch, min_gap)
    assert ticks[0] == 0 and ticks[-1] == count - 1
    assert ticks == sorted(set(ticks))
    gaps = [(b - a) * pitch for a, b in itertools.pairwise(ticks)]
    # Only the pair 0 / last may be closer than min_gap, when there is nothing else to show.
    assert all(g >= min_gap for g in gaps) or ticks == [0, count - 1]


def test_shorten_left_keeps_the_distinctive_end() -> None:
    font = sm._font()
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    short = sm._shorten_left(name, 100, font)
    assert short.startswith("...") and name.endswith(short[3:]) and len(short) > 3
    assert font.width(short) <= 100
    assert sm._shorten_left("to_q", 100, font) == "to_q"


@pytest.mark.parametrize(
    ("names", "choices", "labels", "message"),
    [
        ([], [], ("subject", "style"), "empty"),
        (["a"], [[]], ("subject", "style"), "no steps"),
        (["a", "b"], [[0, 1], [0]], ("subject", "style"), "ragged"),
        (["a"], [[0, 2]], ("subject", "style"), "outside labels"),
        (["a"], [[-1]], ("subject", "style"), "outside labels"),
        (["a"], [[0.5]], ("subject", "style"), "not an integer"),
        (["a"], [["0"]], ("subject", "style"), "not an integer"),
        (["a"], [0], ("subject", "style"), "not a sequence"),
        (["a", "b"], [[0]], ("subject", "style"), "layer names"),
        (["a"], [[0]], (), "labels is empty"),
        (["a"], [[0]], tuple(f"l{i}" for i in range(9)), "palette"),
        (["a"], [[0]], "subject", "single string"),
    ],
)
def test_bad_input_raises_value_error(names, choices, labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        render_selection_map(names, choices, labels)


@pytest.mark.parametrize("max_size", [(40, 40), (2000, 20), (0, 100)])
def test_too_small_max_size_raises(max_size: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="max_size"):
        render_selection_map(["a"], [[0, 1]], max_size=max_size)


def test_accepts_torch_integer_tensor() -> None:
    torch = pytest.importorskip("torch")
    choices = torch.tensor([[0, 1], [1, 0]])
    img = render_selection_map(["a", "b"], choices)
    x0, y0, _, _ = grid_box(img)
    assert img.getpixel((x0, y0)) == PALETTE[0]


def test_save_writes_a_readable_png(tmp_path) -> None:
    choices = [[0, 1, 2], [2, 1, 0]]
    out = save_selection_map(tmp_path / "maps" / "klora.png", ["a", "b"], choices, THREE, title="t")
    assert out == tmp_path / "maps" / "klora.png" and out.is_file()
    with Image.open(out) as img:
        assert img.format == "PNG"
        img.load()
        expected = render_selection_map(["a", "b"], choices, THREE, title="t")
        assert img.size == expected.size
        assert img.convert("RGB").tobytes() == expected.tobytes()


def test_save_with_bad_input_writes_nothing(tmp_path) -> None:
    with pytest.raises(ValueError):
        save_selection_map(tmp_path / "maps" / "bad.png", ["a"], [[5]])
    assert not (tmp_path / "maps").exists()
