"""An offline image data set: coloured shapes on plain or striped backgrounds, with labels.

No image data set is reachable offline, so tests, demos and the tour draw their own with PIL:
each image holds one shape (circle, square, triangle or cross) in one colour at a random place
and size, on a background of another colour. Labels are ``"{colour} {shape}"``; `ShapeImages`
keeps the parts (``colours``, ``shapes``) and each shape's bounding box, so patching and
attention can be read against where the shape is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mechscope.errors import InputError

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUNDS = {"white": (245, 245, 245), "grey": (128, 128, 128), "black": (20, 20, 20)}


@dataclass
class ShapeImages:
    """Images (PIL, RGB) with their labels, parts and shape boxes ``(top, left, bottom, right)``.

    Example:
        >>> from mechscope.vision import shapes
        >>> data = shapes(3, size=32, seed=0)
        >>> len(data), data.labels[1], data.colours[1], data.shapes[1], data.boxes[1]
        (3, 'red circle', 'red', 'circle', (14, 8, 31, 25))
        >>> data.classes, data.images[0].size
        (['orange triangle', 'red circle'], (32, 32))
    """

    images: list = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    colours: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def classes(self) -> list[str]:
        """The distinct labels, sorted."""
        return sorted(set(self.labels))


def draw_shape(shape: str, colour: str, background: str, size: int, box: tuple[int, int, int, int], stripes: bool):
    """One image: ``shape`` in ``colour`` filling ``box`` on ``background`` (optionally striped)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    if stripes:
        shade = tuple(min(255, c + 40) if c < 128 else c - 40 for c in BACKGROUNDS[background])
        for x in range(0, size, 6):
            draw.line((x, 0, x, size), fill=shade, width=2)
    top, left, bottom, right = box
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((left, top, right - 1, bottom - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right - 1, bottom - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((left + right) / 2, top), (left, bottom - 1), (right - 1, bottom - 1)], fill=fill)
    elif shape == "cross":
        w = max(2, (right - left) // 3)
        mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
        draw.rectangle((mid_x - w // 2, top, mid_x + w // 2, bottom - 1), fill=fill)
        draw.rectangle((left, mid_y - w // 2, right - 1, mid_y + w // 2), fill=fill)
    else:
        raise InputError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    return image


def shapes(
    n: int,
    size: int = 64,
    seed: int = 0,
    colours: tuple[str, ...] | None = None,
    kinds: tuple[str, ...] | None = None,
) -> ShapeImages:
    """``n`` random shape images of ``size`` pixels, drawn reproducibly from ``seed``.

    Example:
        >>> data = shapes(4, size=32, seed=0)
        >>> len(data), data.images[0].size, data.labels[0]
        (4, (32, 32), 'orange triangle')
    """
    colours = tuple(colours or COLOURS)
    kinds = tuple(kinds or SHAPES)
    for name, chosen, valid in (("colour", colours, COLOURS), ("shape", kinds, SHAPES)):
        bad = [c for c in chosen if c not in valid]
        if bad:
            raise InputError(f"unknown {name}s {bad}; choose among {list(valid)}")
    if n <= 0 or size < 16:
        raise InputError(f"need n > 0 images of at least 16 pixels, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    out = ShapeImages()
    for _ in range(n):
        colour, kind = colours[rng.integers(len(colours))], kinds[rng.integers(len(kinds))]
        background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
        side = int(rng.integers(size // 3, size * 2 // 3 + 1))
        top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        box = (top, left, top + side, left + side)
        out.images.append(draw_shape(kind, colour, background, size, box, stripes=bool(rng.integers(2))))
        out.labels.append(f"{colour} {kind}")
        out.colours.append(colour)
        out.shapes.append(kind)
        out.boxes.append(box)
    return out
