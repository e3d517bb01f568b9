"""mvportrait.render: cameras, view rigs and trajectories; multi-view mesh renders; video output."""
from mvportrait.render.cameras import (
    DEFAULT_DISTANCE,
    DEFAULT_FOV_Y_DEG,
    DEFAULT_TARGET,
    TRAJECTORY_KINDS,
    Cameras,
    intrinsics_from_fov,
    look_at,
    parse_view_spec,
    trajectory,
    view_rig,
    yaw_pitch_to_eye,
)
from mvportrait.render.renderer import MODES, RenderOutput, render, to_uint8, vertex_normals
from mvportrait.render.video import make_grid, read_video, save_frames, write_image, write_video

__all__ = [
    "Cameras",
    "look_at",
    "intrinsics_from_fov",
    "yaw_pitch_to_eye",
    "parse_view_spec",
    "view_rig",
    "trajectory",
    "DEFAULT_DISTANCE",
    "DEFAULT_FOV_Y_DEG",
    "DEFAULT_TARGET",
    "TRAJECTORY_KINDS",
    "MODES",
    "RenderOutput",
    "render",
    "vertex_normals",
    "to_uint8",
    "make_grid",
    "write_video",
    "read_video",
    "write_image",
    "save_frames",
]
