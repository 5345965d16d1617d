"""Which local-step tiles run (``select_tiles``); the rules are described in ``engine.refine``."""
from __future__ import annotations

import numpy as np

from ..tiling import Tile, source_span
from .results import GlobalResult

SELECTIONS = ("fraction", "boundary", "cover", "all")
FRACTION_RANGE = (0.1, 0.9)
TILE_MARGIN = 16  # px trimmed from inner tile edges (the reference's)


def select_tiles(tiles: list[Tile], glob: GlobalResult, selection: str, core_margin: int = 112) -> list[Tile]:
    """Tiles the local step runs, in grid order; see the module docstring for ``selection``.

    Works on the thresholded global result (> 0.5) resized to full size, but resizes only tiles
    whose low-resolution neighbourhood is mixed: bilinear values are convex combinations of
    their sources, so a tile whose sources are all above (or all at/below) 0.5 is uniform.
    """
    if selection == "all":
        return list(tiles)
    H, W = glob.full_shape
    gh, gw = glob.os1.shape
    fg_low = glob.os1 > 0.5
    chosen: list[Tile] = []
    cells: dict[int, np.ndarray] = {}
    cell = 8
    ncols = -(-W // cell)
    for t in tiles:
        ya, yb = source_span(gh, H, t.y0, t.y1)
        xa, xb = source_span(gw, W, t.x0, t.x1)
        block = fg_low[ya:yb, xa:xb]
        if bool(block.all()) or not bool(block.any()):
            continue  # uniform tile: 0% or 100% foreground, no boundary
        fg = (glob.region(t, "os1") > 0.5).numpy()
        if selection == "fraction":
            frac = float(fg.mean())
            if FRACTION_RANGE[0] <= frac <= FRACTION_RANGE[1]:
                chosen.append(t)
            continue
        edge = _boundary_pixels(fg)
        ry, rx = t.written_in_tile
        if not edge[ry, rx].any():
            continue
        if selection == "boundary":
            chosen.append(t)
            continue
        cy0, cy1, cx0, cx1 = t.core(H, W, core_margin)
        ys, xs = np.nonzero(edge[cy0 - t.y0:cy1 - t.y0, cx0 - t.x0:cx1 - t.x0])
        cells[t.index] = np.unique(((ys + cy0) // cell) * ncols + (xs + cx0) // cell)
        chosen.append(t)
    if selection == "cover":
        chosen = _greedy_cover(chosen, cells)
    return chosen


def _boundary_pixels(fg: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of the other value (both sides of the boundary)."""
    edge = np.zeros_like(fg)
    dy = fg[1:] != fg[:-1]
    dx = fg[:, 1:] != fg[:, :-1]
    edge[1:] |= dy
    edge[:-1] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return edge


def _greedy_cover(candidates: list[Tile], cells: dict[int, np.ndarray]) -> list[Tile]:
    """Greedy set cover: repeatedly take the tile whose core covers most uncovered boundary cells."""
    if not candidates:
        return []
    universe = np.unique(np.concatenate([cells[t.index] for t in candidates]))
    members = {t.index: np.searchsorted(universe, cells[t.index]) for t in candidates}
    covered = np.zeros(len(universe), bool)
    picked: list[Tile] = []
    remaining = list(candidates)
    while not covered.all() and remaining:
        gains = [int((~covered[members[t.index]]).sum()) for t in remaining]
        k = int(np.argmax(gains))
        if gains[k] == 0:
            break
        t = remaining.pop(k)
        covered[members[t.index]] = True
        picked.append(t)
    return sorted(picked, key=lambda t: t.index)
