"""``rgb_array`` frames of rlmem's envs: the observation, the hidden state and the last step.

One generic layout for every :class:`~rlmem.envs.core.TaskEnv` (nothing per env), drawn with numpy
(cells) and Pillow (text) so a frame costs about a millisecond:

- a title bar: env id, step index ``t``, and whether the episode has ended;
- ``observation``: one cell per channel, blue for positive and red for negative values (saturating at
  +-1), the value written in the cell when the cells are wide enough;
- the hidden state from ``get_state()``, one row per key: scalars as text, short float vectors as text,
  integer / bool arrays (one row per leading index, up to :data:`MAX_STRIP_ROWS`) as cells coloured by
  value with the cell at the current step ``t`` outlined; larger arrays by their shape only;
- the last action, its reward and the episode's return so far.

The frame size depends only on the env's observation and state shapes, so it is the same at every step
of an env (as videos need). Pillow comes with tensorboard, a dependency of rlmem.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

WIDTH = 480
LABEL_W = 104  # left column holding the row labels
PAD = 6
LINE_H = 18  # a text row
CELL_H = 20  # a row of cells
MAX_STRIP_ROWS = 4  # integer arrays with more leading rows are shown by their shape
MAX_TEXT_FLOATS = 8  # float vectors up to this size are written out

BACKGROUND = (250, 250, 250)
TITLE_BG = (40, 44, 52)
INK = (20, 20, 20)
MUTED = (110, 110, 110)
GRID = (200, 200, 200)
# categorical colours (Tableau 10) for integer values, value % 10
PALETTE = np.array([(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)],
                   dtype=np.uint8)


@dataclass
class StepInfo:
    """What the last step did (kept by a rendering env only)."""

    action: int | None = None  # None right after reset
    reward: float = 0.0
    episode_return: float = 0.0
    done: bool = False


class Renderer:
    """Draws frames for one env; the layout is fixed at the first frame from the shapes it sees."""

    def __init__(self, title: str):
        self.title = title
        self.font, self.small = load_font(12), load_font(10)
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def __call__(self, obs: np.ndarray, state: Mapping[str, Any], last: StepInfo) -> np.ndarray:
        """``obs: [obs_dim]``, ``state``: ``get_state()`` of one env -> frame ``[H, WIDTH, 3]`` uint8."""
        from PIL import Image, ImageDraw

        obs = np.asarray(obs, dtype=np.float64).reshape(-1)
        state = {k: np.asarray(v) for k, v in state.items()}
        shapes = {"__obs__": obs.shape, **{k: v.shape for k, v in state.items()}}
        if self._shapes is None:
            self._shapes = shapes
        elif shapes != self._shapes:  # a video needs one frame size: say what changed rather than crop
            raise ValueError(f"{self.title}: observation/state shapes changed between frames: "
                             f"{self._shapes} -> {shapes}")
        t = int(state["t"]) if "t" in state and state["t"].ndim == 0 else None
        rows = [("observation", "obs", obs[None])]
        for key, value in state.items():
            grid = _strip_grid(value)
            rows.append((key, "strip", grid) if grid is not None else (key, "text", value))
        height = LINE_H + 2 * PAD + sum(_row_height(kind, value) for _, kind, value in rows) + LINE_H + PAD
        canvas = np.empty((height, WIDTH, 3), dtype=np.uint8)
        canvas[:] = BACKGROUND
        canvas[:LINE_H + 4] = TITLE_BG
        texts: list[tuple[int, int, str, tuple[int, int, int], Any]] = []  # x, y, text, colour, font
        outlines: list[tuple[int, int, int, int]] = []
        status = "  (episode over)" if last.done else ""
        texts.append((PAD, 3, f"{self.title}   t = {t}{status}" if t is not None else self.title + status,
                      (255, 255, 255), self.font))
        y = LINE_H + 4 + PAD
        for label, kind, value in rows:
            texts.append((PAD, y + 2, label, MUTED, self.font))
            if kind == "obs":
                y = self._cells(canvas, texts, outlines, y, value, _signed_colours(value), None, signed=True)
            elif kind == "strip":
                colours = PALETTE[np.abs(value.astype(np.int64)) % len(PALETTE)]
                colours[value < 0] = GRID  # negative ids are padding / "ignore" markers (e.g. -100)
                y = self._cells(canvas, texts, outlines, y, value, colours, t, signed=False)
            else:
                texts.append((LABEL_W, y + 2, _text(value), INK, self.font))
                y += LINE_H
        if last.action is None:
            step = "action -   (reset)"
        else:
            step = f"action {last.action}   reward {last.reward:+.3g}"
        texts.append((PAD, y + 2, f"{step}   return {last.episode_return:.3g}", INK, self.font))

        image = Image.fromarray(canvas)
        draw = ImageDraw.Draw(image)
        for x0, y0, x1, y1 in outlines:
            draw.rectangle((x0, y0, x1, y1), outline=INK, width=2)
        for x, y_text, text, colour, font in texts:
            draw.text((x, y_text), text, fill=colour, font=font)
        return np.asarray(image)

    def _cells(self, canvas, texts, outlines, y, grid: np.ndarray, colours: np.ndarray, t: int | None,
               signed: bool) -> int:
        """Draw ``grid: [R, C]`` as ``R`` rows of cells coloured ``colours: [R, C, 3]``; returns the next y."""
        n_rows, n = grid.shape
        width = WIDTH - LABEL_W - PAD
        cell = max(1, min(36, width // n))
        per_line = width // cell
        for r in range(n_rows):
            for start in range(0, n, per_line):
                for j in range(start, min(n, start + per_line)):
                    x = LABEL_W + (j - start) * cell
                    canvas[y:y + CELL_H, x:x + cell] = GRID
                    canvas[y + 1:y + CELL_H - 1, x + (cell > 2):x + cell - (cell > 2)] = colours[r, j]
                    value = grid[r, j]
                    label = _number(value) if signed else str(int(value))
                    if 6 * len(label) + 3 <= cell:  # written only where it fits (about 6 px per character)
                        light = abs(value) < 0.5 if signed else value < 0
                        texts.append((x + 2, y + 4, label, INK if light else (255, 255, 255), self.small))
                if t is not None and start <= t < start + per_line and t < n:
                    x = LABEL_W + (t - start) * cell
                    outlines.append((x, y, x + cell - 1, y + CELL_H - 1))
                y += CELL_H + 2
        return y + 2


def load_font(size: int):
    """Pillow's default font at ``size`` px (a fixed-size bitmap font where Pillow has no FreeType)."""
    try:
        from PIL import ImageFont  # imported here: envs that never render never import Pillow
    except ImportError:
        raise gym.error.DependencyNotInstalled("rendering rlmem envs needs Pillow: pip install pillow") from None
    try:
        return ImageFont.load_default(size=size)
    except ImportError:  # Pillow built without FreeType
        return ImageFont.load_default()


def _strip_grid(value: np.ndarray) -> np.ndarray | None:
    """An integer / bool array drawn as cells, as ``[rows, C]`` (size-1 axes dropped), else None."""
    if value.ndim == 0 or value.dtype.kind not in "iub":
        return None
    squeezed = value.reshape([d for d in value.shape if d != 1] or [1])
    if squeezed.ndim == 1:
        return squeezed[None]
    if squeezed.ndim == 2 and squeezed.shape[0] <= MAX_STRIP_ROWS:
        return squeezed
    return None


def _row_height(kind: str, grid: np.ndarray) -> int:
    if kind == "text":
        return LINE_H
    n_rows, n = grid.shape
    cell = max(1, min(36, (WIDTH - LABEL_W - PAD) // n))
    lines = -(-n // ((WIDTH - LABEL_W - PAD) // cell))
    return n_rows * lines * (CELL_H + 2) + 2


def _signed_colours(values: np.ndarray) -> np.ndarray:
    """White at 0, blue towards +1, red towards -1 (saturating): ``[..., C] -> [..., C, 3]`` uint8."""
    v = np.clip(values, -1.0, 1.0)[..., None]
    white = np.array([255.0, 255.0, 255.0])
    blue, red = np.array([31.0, 90.0, 180.0]), np.array([200.0, 40.0, 40.0])
    out = np.where(v >= 0, white + v * (blue - white), white - v * (red - white))
    return out.astype(np.uint8)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _text(value: np.ndarray) -> str:
    if value.ndim == 0:
        item = value.item()
        return f"{item:.3g}" if isinstance(item, float) else str(item)
    if value.dtype.kind == "f" and value.size <= MAX_TEXT_FLOATS:  # e.g. a physics state
        return "  ".join(f"{v:+.3f}" for v in value.reshape(-1))
    return f"{value.dtype} array of shape {tuple(value.shape)}"
