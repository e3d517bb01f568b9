"""Stage-2 consistency distillation: UNet-only student, export beside the teacher, pipeline loading."""
import json

import pytest
import torch

from mvportrait.engine.flame2video import FLAME2Video
from mvportrait.engine.schedulers import ConsistencySampler, DDIMSampler, consistency_x0
from mvportrait.models.stage2 import FLAME2VideoModel
from mvportrait.train import distill as D


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def student_run(stage2_micro_run, tmp_path_factory):
    """(teacher folder, student folder, run folder, summary) of a 6-step distillation of the micro model."""
    out, _ = stage2_micro_run
    root = tmp_path_factory.mktemp("distill2")
    teacher = root / "stage2"
    FLAME2VideoModel.from_pretrained(out / "final").save_pretrained(teacher, dtype=torch.float32)
    res = D.distill_stage2(root / "run", teacher_dir=teacher, export_dir=root / "stage2_student", seed=0,
                           overrides=dict(steps=6, batch=1, views=2, frames=2, pool_size=2, lr=1e-3, warmup=1,
                                          log_every=1, checkpoint_every=3))
    return teacher, root / "stage2_student", root / "run", res


def test_only_the_unet_changes_and_the_student_loads_beside_its_teacher(student_run):
    teacher_dir, student_dir, run, res = student_run
    assert res["steps"] == 6 and res["stopped_by"] == "steps"
    rows = [json.loads(line) for line in (run / "unet" / "loss.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["loss"] >= 0 for r in rows)
    meta = json.loads((student_dir / "config.json").read_text())
    assert meta["distill"]["teacher"] == "../stage2" and meta["distill"]["sampler"] == "consistency"
    assert meta["distill"]["guidance"] == 2.0 and meta["config"]["guidance"] == 1.0
    from safetensors.torch import load_file

    stored = load_file(str(student_dir / "model.safetensors"))
    assert stored and all(k.startswith("unet.") and v.dtype == torch.float16 for k, v in stored.items())
    teacher = FLAME2VideoModel.from_pretrained(teacher_dir)
    student = FLAME2VideoModel.from_pretrained(student_dir)
    assert student.distill["default_steps"] == 2 and teacher.distill is None
    t_state, s_state = teacher.state_dict(), student.state_dict()
    changed = {k for k in t_state if not torch.equal(t_state[k], s_state[k])}
    assert changed and all(k.startswith("unet.") for k in changed)
    for k, v in stored.items():
        assert torch.equal(s_state[k], v.float())


def test_pipeline_uses_the_consistency_sampler_and_one_step_is_consistency_x0(student_run):
    teacher_dir, student_dir, _, _ = student_run
    pipe = FLAME2Video.from_pretrained(student_dir, overlap=1)
    assert pipe.is_student and pipe.default_steps == 2 and isinstance(pipe.sampler, ConsistencySampler)
    assert pipe.config.guidance == 1.0
    teacher = FLAME2Video.from_pretrained(teacher_dir, overlap=1)
    assert not teacher.is_student and teacher.default_steps == 25 and isinstance(teacher.sampler, DDIMSampler)
    with pytest.raises(ValueError, match="not a distilled student"):
        FLAME2Video.from_pretrained(teacher_dir, student=True, overlap=1)
    cfg = pipe.config
    ref = torch.rand(3, cfg.image_size, cfg.image_size) * 2 - 1
    ctx = pipe.prepare(ref)
    maps = torch.rand(1, cfg.views, cfg.frames, 5, cfg.image_size, cfg.image_size)
    lat = {}

    def keep(i, t, x, x0):
        lat["x0"] = x0

    shape = pipe.model.latent_shape(1, views=cfg.views, frames=cfg.frames)
    feats = pipe.model.encode_renders(maps)
    with torch.inference_mode():
        got = pipe.sampler.sample(lambda x, t, c: pipe.model.denoise(x, t, feats, ctx), shape, steps=1,
                                  generator=torch.Generator().manual_seed(3), callback=keep)
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(3))
        want = consistency_x0(pipe.sampler.schedule, cfg.prediction,
                              pipe.model.denoise(x_T, torch.tensor([999]), feats, ctx), x_T, 999)
    torch.testing.assert_close(got, want)
    frames = pipe.generate_from_maps(ctx, maps, seed=0)  # default: 2 consistency steps, no guidance
    assert frames.shape == (cfg.frames, cfg.views, cfg.image_size, cfg.image_size, 3)
    assert pipe.last_timings.extra["steps"] == 2 and pipe.last_timings.extra["guidance"] == 1.0


def test_export_from_the_checkpoint_matches_and_bad_teachers_are_rejected(student_run, tmp_path):
    teacher_dir, student_dir, run, _ = student_run
    D.export_stage2_checkpoint(run / "unet", tmp_path / "again", teacher_dir)
    from safetensors.torch import load_file

    a, b = load_file(str(student_dir / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="is a student"):
        D.distill_stage2(tmp_path / "r", teacher_dir=student_dir, overrides=dict(steps=1, pool_size=1))
    with pytest.raises(ValueError, match="exceed the corpus clips"):
        D.distill_stage2(tmp_path / "r", teacher_dir=teacher_dir, overrides=dict(steps=1, pool_size=1, views=8))
    meta = json.loads((student_dir / "config.json").read_text())
    meta["distill"]["teacher"] = "."
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "config.json").write_text(json.dumps(meta))
    (tmp_path / "self" / "model.safetensors").write_bytes((student_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="own teacher"):
        FLAME2VideoModel.from_pretrained(tmp_path / "self")
