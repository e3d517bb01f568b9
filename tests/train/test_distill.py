"""Consistency distillation (train/distill.py): solver targets, loss, resume, students' round trip."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mvportrait.config import DenoiserConfig
from mvportrait.data.corpus import Text2FlameCorpus
from mvportrait.engine.schedulers import (ConsistencySampler, DDIMSampler, NoiseSchedule, consistency_boundary,
                                          consistency_x0)
from mvportrait.engine.text2flame import Text2FLAME
from mvportrait.models.motion_denoiser import MotionDenoiser
from mvportrait.models.students import load_stage1
from mvportrait.models.text_encoder import HashingEncoder
from mvportrait.train import distill as D
from mvportrait.train.stage1 import caption_texts, encode_caption_table, export_weights


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def tiny_tokens():
    corpus = Text2FlameCorpus.generate(24, seed=0, frames=32)
    caps = caption_texts(corpus, "motion", 2, seed=0)
    ecaps = caption_texts(corpus, "emotion", 2, seed=0)
    enc = HashingEncoder()
    return {"motion": (corpus.motion_features(), encode_caption_table(enc, caps, tokens=True)),
            "emotion": (corpus.expression, encode_caption_table(enc, ecaps, tokens=True))}


def _teacher(kind: str, x, seed: int = 0) -> MotionDenoiser:
    torch.manual_seed(seed)
    cfg = DenoiserConfig.from_name("tiny", kind, text_cond="tokens", in_dim=int(x.shape[-1]))
    m = MotionDenoiser(cfg)
    xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
    m.set_normalization(xt.mean((0, 1)), xt.std((0, 1)))
    return m.eval()


def _dc(**kw) -> D.DistillConfig:
    return D.DistillConfig(**{"steps": 8, "batch": 4, "lr": 1e-3, "warmup": 2, "log_every": 2, "checkpoint_every": 4,
                              "velocity_weight": 0.5, **kw})


# ----------------------------------------------------------------------------- solver and loss
def test_solver_grid_is_the_trailing_50_step_grid():
    t, s = D.solver_timesteps(1000, 20, torch.arange(50))
    assert t.tolist() == list(range(19, 1000, 20))
    assert s.tolist() == [0] + list(range(19, 980, 20))
    assert D.grid_size(1000, 20) == 50
    with pytest.raises(ValueError, match="skip"):
        D.solver_timesteps(1000, 0, torch.arange(2))


@pytest.mark.parametrize("prediction", ["sample", "v_prediction", "epsilon"])
def test_teacher_target_is_a_hand_ddim_step(prediction):
    sched = NoiseSchedule.from_kind("scaled_linear", 1000, 0.00085, 0.012)
    sampler = DDIMSampler(sched, prediction_type=prediction, timestep_spacing="trailing")
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    out = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    t, s = torch.tensor([999, 519, 19]), torch.tensor([979, 499, 0])
    got = D.teacher_target(sampler, out, x_t, t, s)
    for i in range(3):
        a_t, a_s = sched.alphas_cumprod[t[i]].item(), sched.alphas_cumprod[s[i]].item()
        if prediction == "sample":
            x0 = out[i]
            eps = (x_t[i] - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        elif prediction == "epsilon":
            eps = out[i]
            x0 = (x_t[i] - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        else:
            x0 = math.sqrt(a_t) * x_t[i] - math.sqrt(1 - a_t) * out[i]
            eps = math.sqrt(a_t) * out[i] + math.sqrt(1 - a_t) * x_t[i]
        want = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
        torch.testing.assert_close(got[i], want, rtol=1e-10, atol=1e-10)


def test_distance_l2_and_pseudo_huber():
    a, b = torch.tensor([0.0, 3.0]), torch.tensor([4.0, 3.0])
    assert D.distance(a, b, "l2", 0.0) == pytest.approx(8.0)
    assert D.distance(a, b, "huber", 0.5) == pytest.approx((math.sqrt(16.25) - 0.5) / 2)


def test_consistency_loss_matches_the_lcm_recipe(tiny_tokens):
    """Recompute one batch's loss by hand: guided teacher -> DDIM to s -> target f at s vs student f at t."""
    x, table = tiny_tokens["motion"]
    dc = _dc(velocity_weight=0.0)
    task = D.Stage1Task("motion", _teacher("motion", x), x, table, dc)
    with torch.no_grad():  # make student and target differ so both terms matter
        for p in task.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    g = torch.Generator().manual_seed(5)
    x0, cond = task.batch(g, 4)
    state = g.get_state()
    sampler = DDIMSampler(task.schedule, prediction_type=task.prediction, timestep_spacing="trailing")
    loss, parts = D.consistency_loss(task, task.target, x0, cond, g, dc, sampler)
    g.set_state(state)
    n = torch.randint(0, 50, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = 19 + 20 * n
    s = (t - 20).clamp(min=0)
    x_t = task.schedule.add_noise(x0, noise, t)
    m = task.teacher_model
    tok, mask = cond
    with torch.no_grad():
        o_c = m(x_t, t, tok, mask)
        ntok, nmask = m.null(4, tok.shape[1])
        o_u = m(x_t, t, ntok, nmask)
        guided = o_u + task.guidance * (o_c - o_u)
        x_s = sampler.step(guided, t, x_t, prev_t=s).prev_sample
        f_t = consistency_x0(task.schedule, "sample", task.target(x_s, s, tok, mask), x_s, s)
        f = consistency_x0(task.schedule, "sample", task.student(x_t, t, tok, mask), x_t, t)
    assert parts["consistency"].item() == pytest.approx(((f - f_t) ** 2).mean().item(), rel=1e-5)
    assert task.guidance == 2.5 == task.teacher_model.cfg.guidance
    # at t = 19 the target is x_s itself (s = 0: c_skip = 1, c_out = 0)
    assert consistency_boundary(0, x0) == (1.0, 0.0)


def test_student_loss_decreases(tiny_tokens, tmp_path):
    x, table = tiny_tokens["emotion"]
    dc = _dc(steps=60, batch=8, lr=2e-3, log_every=10, checkpoint_every=60)
    task = D.Stage1Task("emotion", _teacher("emotion", x), x, table, dc)
    before = {n: p.clone() for n, p in task.target.named_parameters()}
    res = D.distill(task, dc, tmp_path / "run", seed=0)
    rows = [json.loads(line) for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert res["steps"] == 60 and len(rows) == 6
    assert np.mean([r["loss"] for r in rows[-2:]]) < 0.7 * np.mean([r["loss"] for r in rows[:2]])
    assert any(not torch.equal(p, before[n]) for n, p in task.target.named_parameters())
    for p in task.teacher_model.parameters():  # the teacher is never trained
        assert not p.requires_grad


def test_subset_no_ff_keeps_the_feed_forward_layers(tiny_tokens, tmp_path):
    x, table = tiny_tokens["motion"]
    dc = _dc(steps=2, subset="no-ff")
    task = D.Stage1Task("motion", _teacher("motion", x), x, table, dc)
    names = {n for n, _ in task.trained}
    assert names and not any(".linear1." in n or ".linear2." in n for n in names)
    assert any("self_attn" in n for n in names)
    teacher = dict(task.teacher_model.named_parameters())
    D.distill(task, dc, tmp_path / "run")
    for n, p in task.target.named_parameters():
        if n not in names:
            assert torch.equal(p, teacher[n]), n


def test_resume_reproduces_the_uninterrupted_run(tiny_tokens, tmp_path):
    x, table = tiny_tokens["motion"]
    dc = _dc(steps=8)
    full = D.Stage1Task("motion", _teacher("motion", x), x, table, dc)
    D.distill(full, dc, tmp_path / "full", seed=3)
    split = D.Stage1Task("motion", _teacher("motion", x), x, table, dc)
    D.distill(split, dc, tmp_path / "split", seed=3, stop_at=4)
    again = D.Stage1Task("motion", _teacher("motion", x), x, table, dc)  # fresh state, weights from the checkpoint
    res = D.distill(again, dc, tmp_path / "split", seed=3, resume=True)
    assert res["start"] == 4 and res["steps"] == 8
    for (n, a), b in zip(full.target.named_parameters(), again.target.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    with pytest.raises(ValueError, match="another task, recipe or seed"):
        D.distill(D.Stage1Task("motion", _teacher("motion", x), x, table, dc), dc, tmp_path / "split", seed=4,
                  resume=True)


def test_time_budget_stops_cleanly_with_a_checkpoint(tiny_tokens, tmp_path):
    x, table = tiny_tokens["emotion"]
    dc = _dc(steps=100000, checkpoint_every=100000)
    task = D.Stage1Task("emotion", _teacher("emotion", x), x, table, dc)
    res = D.distill(task, dc, tmp_path / "run", time_budget_s=0.5)
    assert res["stopped_by"] == "time budget" and 0 < res["steps"] < 100000
    meta = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert meta["step"] == res["steps"]


# ------------------------------------------------------------------------------ students
@pytest.fixture()
def teacher_folder(tmp_path, tiny_tokens):
    folder = tmp_path / "stage1"
    for kind in ("motion", "emotion"):
        x, _ = tiny_tokens[kind]
        export_weights(_teacher(kind, x, seed=1 if kind == "emotion" else 0), folder / kind,
                       extra={"text_encoder": "hashing", "kind": kind})
    return folder


def _students(folder, tiny_tokens, tmp_path, steps=4):
    tasks = {}
    for kind in ("motion", "emotion"):
        x, table = tiny_tokens[kind]
        teacher, _ = load_stage1(folder / kind)
        dc = _dc(steps=steps, subset="no-ff" if kind == "motion" else "all")
        task = D.Stage1Task(kind, teacher, x, table, dc)
        D.distill(task, dc, tmp_path / "runs" / kind)
        D.export_stage1_student(task, folder / f"{kind}_student", folder / kind, dc=dc,
                                extra={"text_encoder": "hashing"})
        tasks[kind] = task
    return tasks


def test_student_round_trip_gives_consistency_sampling_without_guidance(teacher_folder, tiny_tokens, tmp_path):
    tasks = _students(teacher_folder, tiny_tokens, tmp_path)
    meta = json.loads((teacher_folder / "motion_student.json").read_text())
    info = meta["distill"]
    assert info["sampler"] == "consistency" and info["teacher"] == "motion" and info["default_steps"] == 2
    assert info["guidance"] == 2.5 and meta["config"]["guidance"] == 1.0
    stored = load_file(str(teacher_folder / "motion_student.safetensors"))
    assert stored and all(v.dtype == torch.float16 for v in stored.values())
    assert not any(".linear1." in k for k in stored)  # only the trained tensors are stored
    pipe = Text2FLAME.from_pretrained(teacher_folder, student=True, text_encoder=HashingEncoder())
    assert pipe.is_student and pipe.default_steps == 2
    assert isinstance(pipe.sampler_for(pipe.motion_model), ConsistencySampler)
    assert pipe.default_guidance() == {"motion": 1.0, "emotion": 1.0}
    for kind in ("motion", "emotion"):
        got = dict(getattr(pipe, f"{kind}_model").named_parameters())
        for n, p in tasks[kind].target.named_parameters():
            torch.testing.assert_close(got[n], p.detach().half().float(), rtol=0, atol=0)
    teacher = Text2FLAME.from_pretrained(teacher_folder, text_encoder=HashingEncoder())
    assert not teacher.is_student and teacher.default_steps == 50
    assert isinstance(teacher.sampler_for(teacher.motion_model), DDIMSampler)
    assert teacher.default_guidance() == {"motion": 2.5, "emotion": 2.5}
    params = pipe.generate("nods slowly and smiles", seconds=1.0, seed=0)
    assert params.num_frames == 25 and pipe.last_timings.extra["steps"] == 2
    # re-export from the run's checkpoint gives the same file
    w, _ = D.export_stage1_checkpoint(tmp_path / "runs" / "motion", tmp_path / "re" / "motion_student",
                                      teacher_folder / "motion")
    again = load_file(str(w))
    assert again.keys() == stored.keys() and all(torch.equal(again[k], stored[k]) for k in stored)


def test_one_step_student_sample_is_consistency_x0_at_999(teacher_folder, tiny_tokens, tmp_path):
    _students(teacher_folder, tiny_tokens, tmp_path, steps=2)
    pipe = Text2FLAME.from_pretrained(teacher_folder, student=True, text_encoder=HashingEncoder())
    m = pipe.motion_model
    text = pipe.encode(["turns left"], ["smiles"])[0]
    cond, uncond = pipe.text_pair(m, text)
    got = pipe.sample_window(m, cond, uncond, steps=1, generator=torch.Generator().manual_seed(7))
    x_T = torch.randn(1, m.cfg.max_frames, m.cfg.in_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = consistency_x0(pipe.sampler_for(m).schedule, m.cfg.prediction,
                              m(x_T, torch.tensor([999]), *cond), x_T, 999)
    torch.testing.assert_close(got, want)


def test_mixed_or_broken_students_are_rejected(teacher_folder, tiny_tokens, tmp_path):
    _students(teacher_folder, tiny_tokens, tmp_path, steps=1)
    j = teacher_folder / "emotion_student.json"
    meta = json.loads(j.read_text())
    meta["distill"]["sampler"] = "ddim"
    j.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown student sampler"):
        load_stage1(teacher_folder / "emotion_student")
    meta["distill"]["sampler"] = "consistency"
    meta["config"]["width"] = 64
    j.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="differs from its teacher"):
        load_stage1(teacher_folder / "emotion_student")
    with pytest.raises(FileNotFoundError):
        load_stage1(teacher_folder / "nothing_student")


def test_bad_distill_config():
    with pytest.raises(ValueError, match="loss"):
        D.DistillConfig(loss="l1")
    with pytest.raises(ValueError, match="target_ema"):
        D.DistillConfig(target_ema=1.0)
    with pytest.raises(ValueError, match="steps"):
        D.DistillConfig(steps=0)
    with pytest.raises(ValueError, match="subset"):
        D.DistillConfig(subset="lora")
    with pytest.raises(ValueError, match="guidance"):
        D.DistillConfig(guidance=float("nan"))
    with pytest.raises(ValueError, match="unknown DistillConfig fields"):
        D.DistillConfig().replace(stpes=3)
    with pytest.raises(ValueError, match="kinds"):
        D.distill_stage1("/tmp/never", kinds=("pose",))
