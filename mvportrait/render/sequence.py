"""Render FLAME parameter sequences from a view rig, a few frames at a time."""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from mvportrait.flame.model import FlameModel
from mvportrait.flame.params import FlameParams
from mvportrait.render.cameras import Cameras
from mvportrait.render.renderer import RenderOutput, render


def render_sequence(model: FlameModel, params: FlameParams, cameras: Cameras, *, modes=("shaded",),
                    vertex_colors=None, light_dir=None, light_space: str = "camera", background=0.0,
                    chunk: int = 4, on_frames: Callable[[int], None] | None = None) -> Iterator[RenderOutput]:
    """Yield RenderOutputs of ``chunk`` frames each for batch item 0..B-1 of ``params``.

    ``cameras`` is a (V,) rig or a (T, V) trajectory with T = params.num_frames. Memory stays
    bounded by ``chunk`` frames; ``on_frames(n)`` is called after each chunk (progress bars).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    t_total = params.num_frames
    per_frame = cameras.K.dim() == 4
    if per_frame and cameras.K.shape[0] != t_total:
        raise ValueError(f"camera trajectory has {cameras.K.shape[0]} frames, the sequence {t_total}")
    with torch.inference_mode():
        for start in range(0, t_total, chunk):
            stop = min(start + chunk, t_total)
            out = model(params.frames(start, stop), with_landmarks=False)
            cams = cameras[start:stop] if per_frame else cameras
            yield render(out.vertices, model.faces, cams, vertex_colors=vertex_colors, light_dir=light_dir,
                         light_space=light_space, background=background, modes=modes)
            if on_frames is not None:
                on_frames(stop - start)
