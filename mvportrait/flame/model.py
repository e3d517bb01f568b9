"""FlameModel: the arrays of the FLAME format and its forward pass (vertices, joints, landmarks)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from mvportrait import envs
from mvportrait.flame.params import JOINT_NAMES, FlameParams
from mvportrait.kernels import lbs as lbs_kernels

# Arrays a FlameModel holds, with their shapes (V vertices, F faces, J=5 joints, L landmarks).
ARRAY_SHAPES = {
    "v_template": ("V", 3),
    "shapedirs": ("V", 3, "S"),
    "exprdirs": ("V", 3, "E"),
    "posedirs": ("V", 3, "P"),
    "j_regressor": ("J", "V"),
    "weights": ("V", "J"),
    "parents": ("J",),
    "faces": ("F", 3),
    "lmk_faces_idx": ("L",),
    "lmk_bary_coords": ("L", 3),
}

MAX_PLANS = 8  # prepared LBS calls (each with a CUDA graph) a FlameModel keeps, one per frame count / sizes


@dataclass
class FlameOutput:
    vertices: torch.Tensor  # (B, T, V, 3)
    joints: torch.Tensor  # (B, T, J, 3) posed joint positions
    landmarks: torch.Tensor | None  # (B, T, L, 3) or None without a landmark embedding


class FlameModel:
    """A FLAME-format head model: any vertex count, any number of shape/expression components.

    Build one with :func:`mvportrait.flame.io.load_flame` (FLAME ``.pkl`` or our ``.npz``) or
    :func:`mvportrait.flame.synthetic.synthetic_head`. Float arrays share one dtype and device.
    """

    def __init__(self, *, v_template, shapedirs, exprdirs, posedirs, j_regressor, weights, parents,
                 faces, lmk_faces_idx=None, lmk_bary_coords=None, expr_names=(), name="flame",
                 dtype=torch.float32, device=None):
        f = lambda a: torch.as_tensor(a, dtype=dtype, device=device).contiguous()  # noqa: E731
        i = lambda a: torch.as_tensor(a, dtype=torch.int64, device=device).contiguous()  # noqa: E731
        self.v_template, self.shapedirs, self.exprdirs = f(v_template), f(shapedirs), f(exprdirs)
        self.posedirs, self.j_regressor, self.weights = f(posedirs), f(j_regressor), f(weights)
        self.parents, self.faces = i(parents), i(faces)
        self.lmk_faces_idx = None if lmk_faces_idx is None else i(lmk_faces_idx)
        self.lmk_bary_coords = None if lmk_bary_coords is None else f(lmk_bary_coords)
        self.expr_names = tuple(expr_names)
        self.name = name
        self._validate()
        self._dirs = None  # cached [shapedirs | exprdirs] for the active component counts
        self._plans: OrderedDict = OrderedDict()  # prepared LBS calls on CUDA: (frames, n_shape, n_expr, impl)

    # ------------------------------------------------------------------------ properties
    @property
    def n_vertices(self) -> int:
        return self.v_template.shape[0]

    @property
    def n_faces(self) -> int:
        return self.faces.shape[0]

    @property
    def n_shape(self) -> int:
        return self.shapedirs.shape[2]

    @property
    def n_expr(self) -> int:
        return self.exprdirs.shape[2]

    @property
    def n_joints(self) -> int:
        return self.j_regressor.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.v_template.dtype

    @property
    def device(self) -> torch.device:
        return self.v_template.device

    def arrays(self) -> dict[str, torch.Tensor]:
        out = {k: getattr(self, k) for k in ARRAY_SHAPES}
        return {k: v for k, v in out.items() if v is not None}

    def to(self, device=None, dtype=None) -> "FlameModel":
        arrays = {k: v.cpu() for k, v in self.arrays().items()}
        return FlameModel(**arrays, expr_names=self.expr_names, name=self.name,
                          dtype=dtype or self.dtype, device=device or self.device)

    def _validate(self):
        dims: dict[str, int] = {}
        for key, spec in ARRAY_SHAPES.items():
            t = getattr(self, key)
            if t is None:
                continue
            if t.dim() != len(spec):
                raise ValueError(f"FLAME array {key!r} has shape {tuple(t.shape)}, expected {spec}")
            for sym, size in zip(spec, t.shape):
                if isinstance(sym, int):
                    if size != sym:
                        raise ValueError(f"FLAME array {key!r} has shape {tuple(t.shape)}, expected {spec}")
                elif dims.setdefault(sym, size) != size:
                    raise ValueError(f"FLAME array {key!r} has {sym}={size} but another array has "
                                     f"{sym}={dims[sym]} (shapes must agree)")
        if dims["P"] != 9 * (dims["J"] - 1):
            raise ValueError(f"posedirs has {dims['P']} pose features; {dims['J']} joints need {9 * (dims['J'] - 1)}")
        if (self.lmk_faces_idx is None) != (self.lmk_bary_coords is None):
            raise ValueError("landmark embedding needs both lmk_faces_idx and lmk_bary_coords")
        if self.faces.numel() and (self.faces.min() < 0 or self.faces.max() >= dims["V"]):
            raise ValueError(f"faces index vertices outside [0, {dims['V']})")
        if self.lmk_faces_idx is not None and (self.lmk_faces_idx.min() < 0 or self.lmk_faces_idx.max() >= dims["F"]):
            raise ValueError(f"lmk_faces_idx index faces outside [0, {dims['F']})")
        par = self.parents.tolist()
        if par[0] != -1 or any(not (0 <= p < j) for j, p in enumerate(par) if j > 0):
            raise ValueError(f"parents must be [-1, ...] with parents[j] < j, got {par}")
        for key in ("v_template", "shapedirs", "exprdirs", "posedirs", "j_regressor", "weights"):
            if not torch.isfinite(getattr(self, key)).all():
                raise ValueError(f"FLAME array {key!r} contains NaN or Inf")

    # --------------------------------------------------------------------------- forward
    def forward(self, params: FlameParams, with_landmarks: bool = True) -> FlameOutput:
        """Vertices (B, T, V, 3), joints, landmarks for every frame of every sequence.

        Uses the first ``params.shape.shape[-1]`` shape and ``params.expression.shape[-1]``
        expression components (fewer than the model has is fine; more is an error). On CUDA the
        skinning is a prepared :func:`mvportrait.kernels.lbs.lbs_plan` call per (frames, sizes, kernels).
        """
        if not isinstance(params, FlameParams):
            raise TypeError(f"expected FlameParams, got {type(params).__name__}")
        ns, ne = params.shape.shape[-1], params.expression.shape[-1]
        if ns > self.n_shape or ne > self.n_expr:
            raise ValueError(f"params have {ns} shape / {ne} expression components; the model has "
                             f"{self.n_shape} / {self.n_expr}")
        if self.n_joints != len(JOINT_NAMES):
            raise ValueError(f"FlameParams drive {len(JOINT_NAMES)} joints, the model has {self.n_joints}")
        b, t = params.batch_size, params.num_frames
        p = params.to(device=self.device, dtype=self.dtype)
        coeffs = torch.cat([p.shape, p.expression], -1).reshape(b * t, ns + ne)
        pose, trans = p.full_pose().reshape(b * t, -1), p.translation.reshape(b * t, 3)
        impl = envs.kernels()
        impl = "auto" if impl == "cpp" else impl  # there is no C++ LBS: cpp means "best available" here
        if self.device.type == "cuda":  # host-bound there: a prepared call (one CUDA graph replay)
            verts, joints = self._lbs_plan(b * t, ns, ne, impl)(coeffs, pose, trans)
        else:
            verts, joints = lbs_kernels.lbs(coeffs, pose, self.v_template, self.blend_dirs(ns, ne), self.posedirs,
                                            self.j_regressor, self.parents, self.weights, trans, impl=impl)
        lmk = self.landmarks(verts) if (with_landmarks and self.lmk_faces_idx is not None) else None
        unflat = lambda x: None if x is None else x.reshape(b, t, *x.shape[1:])  # noqa: E731
        return FlameOutput(unflat(verts), unflat(joints), unflat(lmk))

    __call__ = forward

    def _lbs_plan(self, frames: int, n_shape: int, n_expr: int, impl: str) -> lbs_kernels.LBSPlan:
        """The prepared LBS call for these sizes (made on first use; the least recently used of more
        than ``MAX_PLANS`` is dropped). It holds this model's tensors and the ``blend_dirs`` basis of
        its sizes, as the ``lbs`` call it replaces was given them."""
        key = (frames, n_shape, n_expr, impl)
        plan = self._plans.get(key)
        if plan is None:
            plan = lbs_kernels.lbs_plan(self.v_template, self.blend_dirs(n_shape, n_expr), self.posedirs,
                                        self.j_regressor, self.parents, self.weights, batch=frames, impl=impl)
            while len(self._plans) >= MAX_PLANS:
                self._plans.popitem(last=False)
            self._plans[key] = plan
        else:
            self._plans.move_to_end(key)
        return plan

    def blend_dirs(self, n_shape: int, n_expr: int) -> torch.Tensor:
        """(V, 3, n_shape + n_expr) blendshape basis, cached for the last component counts."""
        if self._dirs is None or self._dirs[0] != (n_shape, n_expr):
            d = torch.cat([self.shapedirs[..., :n_shape], self.exprdirs[..., :n_expr]], -1).contiguous()
            self._dirs = ((n_shape, n_expr), d)
        return self._dirs[1]

    def landmarks(self, vertices: torch.Tensor) -> torch.Tensor:
        """Landmarks (..., L, 3) from vertices (..., V, 3) via the face/barycentric embedding."""
        if self.lmk_faces_idx is None:
            raise ValueError(f"model {self.name!r} has no landmark embedding")
        tri = self.faces[self.lmk_faces_idx]  # (L, 3)
        corners = vertices[..., tri, :]  # (..., L, 3, 3)
        return (corners * self.lmk_bary_coords[..., None]).sum(-2)

    def rest_vertices(self, shape: torch.Tensor | None = None) -> torch.Tensor:
        """Shaped template (V, 3) (or (B, V, 3) for shape (B, S)) with no expression or pose."""
        if shape is None:
            return self.v_template
        shape = torch.as_tensor(shape, dtype=self.dtype, device=self.device)
        return self.v_template + torch.einsum("vck,...k->...vc", self.shapedirs[..., :shape.shape[-1]], shape)

    def __repr__(self):
        return (f"FlameModel({self.name!r}, vertices={self.n_vertices}, faces={self.n_faces}, "
                f"shape={self.n_shape}, expression={self.n_expr}, joints={self.n_joints}, "
                f"landmarks={0 if self.lmk_faces_idx is None else self.lmk_faces_idx.shape[0]})")
