"""Seeing is believing: snapshots of a spatial network, BIMT connectivity drawings and animations.

During training, take cheap snapshots (CPU copies of the weights and coordinates, no drawing);
after training, draw them or turn them into a GIF/MP4:

    >>> snaps = []
    >>> for step in range(steps):
    ...     ...  # train, relocate
    ...     if step % 50 == 0:
    ...         snaps.append(take_snapshot(graph, step))
    >>> save_snapshots(snaps, "run.safetensors")  # pickle-free
    >>> fig = draw_connectivity(graph, path="final.png")  # current weights
    >>> render_animation(graph, load_snapshots("run.safetensors"), gif_path="run.gif", mp4_path="run.mp4")

The drawing follows the paper: each layer at its height, every neuron at its coordinates,
every connection a line whose width and opacity grow with |w| (relative to the largest
weight of its layer) and whose colour gives the sign (blue positive, red negative). If any
drawn layer lives in the plane (2-D coordinates) the picture is 3-D (x, y, height) and 1-D
layers sit at y = 0.5; otherwise it is 2-D (x, height).

Only matplotlib's object API is used (``Figure`` + ``FigureCanvasAgg``): no pyplot state, and
the user's backend is never changed. matplotlib and imageio are imported on first use.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from topotorch.geometry import as_plane
from topotorch.graph import Connection, SpatialGraph, active_mask, aggregate

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "Snapshot",
    "take_snapshot",
    "save_snapshots",
    "load_snapshots",
    "connection_matrices",
    "draw_connectivity",
    "render_animation",
]

_FORMAT = "topotorch.snapshots"
_FORMAT_VERSION = "1"
POSITIVE = (0.0, 0.0, 1.0)  # blue
NEGATIVE = (1.0, 0.0, 0.0)  # red
STREAM = (0.55, 0.55, 0.55)  # residual skip connections


# ---------------------------------------------------------------------------------------------
# snapshots
# ---------------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """The state of a spatial network at one training step.

    ``weights``: CPU float32 copies of every connection weight and bias (by parameter name);
    ``positions``: each space's coordinates (float64, or ``None`` for spaces not in space).
    """

    step: int
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    positions: dict[str, torch.Tensor | None] = field(default_factory=dict)


@torch.no_grad()
def take_snapshot(graph: SpatialGraph, step: int) -> Snapshot:
    """Copy the graph's connection weights/biases and coordinates to the CPU. Cheap: no drawing.

    Usage: ``if step % 50 == 0: snaps.append(take_snapshot(graph, step))``.
    """
    weights: dict[str, torch.Tensor] = {}
    for conn in graph.connections:
        for name in (conn.weight, conn.bias):
            if name is not None and name not in weights:
                weights[name] = graph.tensor(name).detach().to("cpu", torch.float32, copy=True)
    positions = {
        s.name: (None if s.positions is None else s.positions.detach().to("cpu", copy=True)) for s in graph.spaces
    }
    return Snapshot(int(step), weights, positions)


def save_snapshots(snapshots: Sequence[Snapshot], path: str | Path) -> None:
    """Write snapshots to one safetensors file (no pickle).

    Tensors are stored as ``"<step>/<weight name>"`` and ``"<step>/pos/<space>"`` (step zero-padded
    to six digits; a repeated step gets a ``_<index>`` suffix); the steps, their order and which
    spaces had no coordinates go in the file's string metadata.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    index = []
    used: set[str] = set()
    for i, snap in enumerate(snapshots):
        key = f"{int(snap.step):06d}"
        if key in used:
            key = f"{key}_{i}"
        used.add(key)
        entry: dict[str, Any] = {"key": key, "step": int(snap.step), "weights": list(snap.weights), "positions": {}}
        for name, w in snap.weights.items():
            tensors[f"{key}/{name}"] = w.detach().cpu().contiguous().clone()
        for name, p in snap.positions.items():
            entry["positions"][name] = p is not None
            if p is not None:
                tensors[f"{key}/pos/{name}"] = p.detach().cpu().contiguous().clone()
        index.append(entry)
    meta = {"format": _FORMAT, "version": _FORMAT_VERSION, "snapshots": json.dumps(index)}
    save_file(tensors, str(path), metadata=meta)


def load_snapshots(path: str | Path) -> list[Snapshot]:
    """Read snapshots written by :func:`save_snapshots`, in their original order."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a topotorch snapshot file (format {meta.get('format')!r})")
        out = []
        for entry in json.loads(meta["snapshots"]):
            key = entry["key"]
            weights = {name: f.get_tensor(f"{key}/{name}") for name in entry["weights"]}
            positions = {
                name: (f.get_tensor(f"{key}/pos/{name}") if has else None) for name, has in entry["positions"].items()
            }
            out.append(Snapshot(int(entry["step"]), weights, positions))
    return out


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------
def connection_matrices(
    graph: SpatialGraph, conn: Connection, snapshot: Snapshot | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(|W| aggregated, signed W aggregated) per (target neuron, source neuron): two (N_t, N_s) CPU matrices."""
    if snapshot is not None:
        if conn.weight not in snapshot.weights:
            raise KeyError(f"snapshot at step {snapshot.step} has no weight {conn.weight!r}")
        w = snapshot.weights[conn.weight]
    else:
        w = graph.tensor(conn.weight)
    w = w.detach().to("cpu", torch.float32)
    nt, ns = graph.space(conn.target).size, graph.space(conn.source).size
    return aggregate(w, conn, nt, ns), aggregate(w, conn, nt, ns, absolute=False)


def _positions(graph: SpatialGraph, snapshot: Snapshot | None) -> dict[str, torch.Tensor]:
    """Coordinates of every drawn space (spaces without coordinates are left out)."""
    out: dict[str, torch.Tensor] = {}
    for s in graph.spaces:
        p = snapshot.positions.get(s.name, s.positions) if snapshot is not None else s.positions
        if p is not None:
            out[s.name] = p.detach().cpu().to(torch.float64)
    return out


def _needs_3d(pos: dict[str, torch.Tensor]) -> bool:
    return any(p.shape[1] == 2 for p in pos.values())


def _point_array(p: torch.Tensor, height: float, three_d: bool) -> np.ndarray:
    """(N, 2) [x, height] or (N, 3) [x, y, height] drawing coordinates of a space."""
    if three_d:
        q = as_plane(p).numpy()
        return np.column_stack([q[:, 0], q[:, 1], np.full(len(q), height)])
    return np.column_stack([p[:, 0].numpy(), np.full(p.shape[0], height)])


def _label_text(space, i: int) -> str:
    if space.labels is not None:
        return str(space.labels[i])
    return f"{'x' if space.role == 'input' else 'y'}{i + 1}"


def _draw(
    ax: Axes,
    graph: SpatialGraph,
    snapshot: Snapshot | None,
    threshold: float,
    title: str | None,
    max_edges: int,
    linewidth: float,
    max_labels: int,
    three_d: bool,
) -> None:
    from matplotlib.collections import LineCollection

    ax3d: Any = ax  # an mplot3d Axes3D when three_d (mpl_toolkits is untyped here): x, y, z calls
    pos = _positions(graph, snapshot)
    pts = {s.name: _point_array(pos[s.name], s.height, three_d) for s in graph.spaces if s.name in pos}
    heights = [s.height for s in graph.spaces if s.name in pos]
    # residual streams: one copy of the stream per layer boundary it is read or written at
    stream_pts: dict[tuple[str, float], np.ndarray] = {}

    def endpoint(name: str, other: str, is_source: bool) -> np.ndarray:
        sp = graph.space(name)
        if not sp.stream:
            return pts[name]
        h = graph.space(other).height + (-0.5 if is_source else 0.5)
        if (name, h) not in stream_pts:
            stream_pts[(name, h)] = _point_array(pos[name], h, three_d)
        return stream_pts[(name, h)]

    # connections: one LineCollection per connection, strongest edges only
    for conn in graph.connections:
        if conn.target not in pts or conn.source not in pts:
            continue
        mag, signed = connection_matrices(graph, conn, snapshot)
        top = float(mag.max()) if mag.numel() else 0.0
        flat = mag.reshape(-1)
        keep = torch.nonzero(active_mask(flat, threshold)).squeeze(1)
        if keep.numel() == 0 or top <= 0:
            continue
        if keep.numel() > max_edges:
            keep = keep[torch.topk(flat[keep], max_edges).indices]
        keep = keep.sort().values
        ti, si = (keep // mag.shape[1]).numpy(), (keep % mag.shape[1]).numpy()
        rel = (flat[keep] / top).numpy().astype(np.float64)
        src_pts, tgt_pts = endpoint(conn.source, conn.target, True), endpoint(conn.target, conn.source, False)
        segs = np.stack([src_pts[si], tgt_pts[ti]], axis=1)  # (E, 2, 2|3)
        colors = np.empty((len(rel), 4))
        colors[:, :3] = np.where((signed.reshape(-1)[keep] >= 0).numpy()[:, None], POSITIVE, NEGATIVE)
        colors[:, 3] = np.clip(rel, 0.0, 1.0)
        widths = linewidth * rel
        if three_d:
            from mpl_toolkits.mplot3d.art3d import Line3DCollection

            coll = Line3DCollection(segs, colors=colors, linewidths=widths)
        else:
            coll = LineCollection(list(segs), colors=colors, linewidths=widths)
        coll.set_gid(f"edges:{conn.weight}")
        ax.add_collection(coll)

    # the stream's skip connections: each copy to the next one up, drawn faint
    for name in {n for n, _ in stream_pts}:
        copies = sorted(h for n, h in stream_pts if n == name)
        skips = (
            np.concatenate(
                [np.stack([stream_pts[(name, a)], stream_pts[(name, b)]], axis=1) for a, b in zip(copies, copies[1:])]
            )
            if len(copies) > 1
            else None
        )
        if skips is not None:
            if three_d:
                from mpl_toolkits.mplot3d.art3d import Line3DCollection

                coll = Line3DCollection(skips, colors=[STREAM], linewidths=0.4)
            else:
                coll = LineCollection(list(skips), colors=[STREAM], linewidths=0.4)
            coll.set_gid(f"stream:{name}")
            ax.add_collection(coll)
        heights += copies

    # neurons and labels
    for s in graph.spaces:
        if s.name not in pts:
            continue
        layers = [stream_pts[k] for k in stream_pts if k[0] == s.name] if s.stream else [pts[s.name]]
        p = np.concatenate(layers) if layers else pts[s.name]
        size = float(np.clip(2000.0 / max(s.size, 1), 2.0, 40.0))
        if three_d:
            sc = ax3d.scatter(p[:, 0], p[:, 1], p[:, 2], s=size, c="black", depthshade=False, zorder=3)
        else:
            sc = ax.scatter(p[:, 0], p[:, 1], s=size, c="black", zorder=3)
        sc.set_gid(f"neurons:{s.name}")
        if s.role not in ("input", "output") or s.size > max_labels:
            continue
        below = s.role == "input"
        offset = (-0.08 if below else 0.08) * max(max(heights) - min(heights), 1.0)
        fs = 9 if s.size <= 20 else 6
        for i in range(s.size):
            txt = _label_text(s, i)
            if three_d:
                t = ax3d.text(p[i, 0], p[i, 1], p[i, 2] + offset, txt, ha="center", va="center", fontsize=fs)
            else:
                t = ax.text(p[i, 0], p[i, 1] + offset, txt, ha="center", va="top" if below else "bottom", fontsize=fs)
            t.set_gid(f"label:{s.name}:{i}")

    # frame
    allp = np.concatenate(list(pts.values()) + list(stream_pts.values())) if pts else np.zeros((1, 3 if three_d else 2))
    lo, hi = allp.min(0), allp.max(0)
    pad_x = 0.05 * max(hi[0] - lo[0], 1e-9) + 0.02
    ax.set_xlim(lo[0] - pad_x, hi[0] + pad_x)
    zl, zh = (min(heights), max(heights)) if heights else (0.0, 1.0)
    pad_z = 0.15 * max(zh - zl, 1.0)
    if three_d:
        pad_y = 0.05 * max(hi[1] - lo[1], 1e-9) + 0.02
        ax.set_ylim(lo[1] - pad_y, hi[1] + pad_y)
        ax3d.set_zlim(zl - pad_z, zh + pad_z)
        ax.set_axis_off()
    else:
        ax.set_ylim(zl - pad_z, zh + pad_z)
        ax.set_axis_off()
    if title is None and snapshot is not None:
        title = f"step {snapshot.step}"
    if title:
        ax.set_title(title, y=1.0)  # a fixed y: matplotlib skips measuring the (hidden) axes' ticks to place it


def _new_figure(figsize: tuple[float, float], dpi: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.92)
    FigureCanvasAgg(fig)
    return fig


def _add_axes(fig: Figure, three_d: bool) -> Axes:
    if three_d:
        import mpl_toolkits.mplot3d  # noqa: F401  registers the "3d" projection

        ax = fig.add_subplot(projection="3d")
        ax.view_init(elev=20, azim=-60)
        ax.set_box_aspect((1.0, 1.0, 1.0), zoom=1.25)
        return ax
    return fig.add_subplot()


def draw_connectivity(
    graph: SpatialGraph,
    snapshot: Snapshot | None = None,
    path: str | Path | None = None,
    ax: Axes | None = None,
    threshold: float = 0.0,
    title: str | None = None,
    *,
    max_edges: int = 20_000,
    linewidth: float = 2.0,
    max_labels: int = 64,
    figsize: tuple[float, float] = (8.0, 6.0),
    dpi: float = 100,
) -> Figure:
    """Draw the network as the BIMT paper does and return the matplotlib ``Figure``.

    Weights come from ``snapshot`` if given (its coordinates too), else from the live model.
    A line's width is ``linewidth * |w| / max|w|`` (max over its connection), its opacity
    ``|w| / max|w|``, its colour blue (w >= 0) or red (w < 0); weights with ``|w| <= threshold``
    are not drawn, and at most the ``max_edges`` strongest of each connection are. Each
    connection is one ``LineCollection`` (gid ``"edges:<weight name>"``). Input/output neurons
    are labelled (``space.labels`` or x1.., y1..) at their current coordinates when the space has
    at most ``max_labels`` neurons. 3-D (x, y, height) if any drawn space has 2-D coordinates,
    else 2-D (x, height). ``ax`` draws into existing axes (3-D axes needed for 3-D drawings);
    ``path`` saves the figure. Usage: ``draw_connectivity(g, path="net.png", threshold=1e-2)``.
    """
    three_d = _needs_3d(_positions(graph, snapshot))
    if ax is None:
        fig = _new_figure(figsize, dpi)
        ax = _add_axes(fig, three_d)
    else:
        root = ax.get_figure(root=True)
        if root is None:
            raise ValueError("ax belongs to no figure")
        fig = root
        if three_d and getattr(ax, "name", "") != "3d":
            raise ValueError("this network has 2-D coordinates and needs 3-D axes (projection='3d')")
    _draw(ax, graph, snapshot, threshold, title, max_edges, linewidth, max_labels, three_d)
    if path is not None:
        fig.savefig(str(path), dpi=dpi)
    return fig


# ---------------------------------------------------------------------------------------------
# animation
# ---------------------------------------------------------------------------------------------
def _frame_indices(n: int, max_frames: int) -> list[int]:
    if n <= max_frames:
        return list(range(n))
    if max_frames < 2:
        return [n - 1]
    return sorted(set(np.linspace(0, n - 1, max_frames).round().astype(int).tolist()))


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad an (H, W, 3) frame with white to even height and width (yuv420p needs them even)."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), constant_values=255)


def ffmpeg_available() -> bool:
    """Whether imageio-ffmpeg can find an ffmpeg binary (needed for MP4)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return True
    except (ImportError, RuntimeError):  # not installed, or it found no ffmpeg binary (its documented error)
        return False


def render_animation(
    graph: SpatialGraph,
    snapshots: Sequence[Snapshot],
    gif_path: str | Path | None = None,
    mp4_path: str | Path | None = None,
    fps: float = 10,
    threshold: float = 0.0,
    max_frames: int = 120,
    *,
    max_edges: int = 20_000,
    linewidth: float = 2.0,
    figsize: tuple[float, float] = (8.0, 6.0),
    dpi: float = 80,
    on_frame: Callable[[int, int], None] | None = None,
) -> int:
    """Draw each snapshot (evenly subsampled to at most ``max_frames``) into a GIF and/or MP4.

    Call after training. One figure is reused for every frame. The MP4 is H.264 (libx264,
    yuv420p) through imageio-ffmpeg. Both files are written under temporary names and renamed
    when complete, so an interruption (Ctrl-C) leaves no half-written animation. ``on_frame(done,
    total)`` is called after each frame (progress bars). Returns the number of frames written.
    Usage: ``render_animation(g, snaps, gif_path="bimt.gif", mp4_path="bimt.mp4", fps=10)``.
    """
    if gif_path is None and mp4_path is None:
        raise ValueError("render_animation needs gif_path and/or mp4_path")
    if not snapshots:
        raise ValueError("render_animation needs at least one snapshot")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    import os

    import imageio
    import imageio.v3 as iio
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from topotorch.checkpoint import set_file_mode

    chosen = [snapshots[i] for i in _frame_indices(len(snapshots), max_frames)]
    three_d = any(_needs_3d(_positions(graph, s)) for s in chosen)
    fig = _new_figure(figsize, dpi)
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)  # _new_figure attaches an Agg canvas (buffer_rgba)
    writer = None
    tmp_gif = Path(gif_path).with_name(Path(gif_path).stem + ".part.gif") if gif_path is not None else None
    tmp_mp4 = Path(mp4_path).with_name(Path(mp4_path).stem + ".part.mp4") if mp4_path is not None else None
    if mp4_path is not None:
        if not ffmpeg_available():
            raise RuntimeError("MP4 output needs imageio-ffmpeg with an ffmpeg binary (pip install imageio-ffmpeg)")
        writer = imageio.get_writer(
            str(tmp_mp4),
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            macro_block_size=1,
            quality=8,
        )
    frames = []
    done = False
    ax = _add_axes(fig, three_d)  # one axes for every frame: only its drawn artists are replaced (clearing
    try:  # the axes rebuilt its hidden ticks each frame, half the render time)
        for k, snap in enumerate(chosen):
            for artist in [*ax.collections, *ax.texts, *ax.lines, *ax.patches]:
                artist.remove()
            _draw(ax, graph, snap, threshold, None, max_edges, linewidth, 64, three_d)
            canvas.draw()
            frame = _even(np.asarray(canvas.buffer_rgba())[..., :3].copy())
            if writer is not None:
                writer.append_data(frame)
            if gif_path is not None:
                frames.append(frame)
            if on_frame is not None:
                on_frame(k + 1, len(chosen))
        if writer is not None:
            writer.close()
            writer = None
        if gif_path is not None:
            iio.imwrite(str(tmp_gif), np.stack(frames), extension=".gif", duration=1000.0 / fps, loop=0)
        for tmp, final in ((tmp_mp4, mp4_path), (tmp_gif, gif_path)):
            if tmp is not None and final is not None:  # both or neither
                set_file_mode(tmp)
                os.replace(tmp, final)
        done = True
    finally:
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already failing; the partial file is removed below
                pass
        if not done:
            for tmp in (tmp_gif, tmp_mp4):
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
    return len(chosen)
