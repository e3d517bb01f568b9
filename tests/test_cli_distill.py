"""`mvportrait distill ...` and the --student options: clear errors for bad options, end-to-end on tiny models."""
import json

import pytest
import torch

from mvportrait.cli import main


@pytest.mark.parametrize("argv, match", [
    (["distill", "stage1", "--out", "{tmp}/r", "--kind", "pose"], "--kind must be motion, emotion or both"),
    (["distill", "stage1", "--out", "{tmp}/r", "--steps", "0"], "--steps must be >= 1"),
    (["distill", "stage1", "--out", "{tmp}/r", "--loss", "l1"], "--loss must be one of l2, huber"),
    (["distill", "stage1", "--out", "{tmp}/r", "--target-ema", "1.5"], r"--target-ema must be in \[0, 1\)"),
    (["distill", "stage1", "--out", "{tmp}/r", "--subset", "lora"], "--subset must be one of all, no-ff"),
    (["distill", "stage1", "--out", "{tmp}/r", "--time-budget", "10,20,30"], "3 values for 2 models"),
    (["distill", "stage1", "--out", "{tmp}/r", "--time-budget", "soon"], "--time-budget must be a number or one per model"),
    (["distill", "stage1", "--out", "{tmp}/r", "--teacher", "{tmp}"], "no motion teacher"),
    (["distill", "stage2", "--out", "{tmp}/r", "--views", "0"], "--views must be >= 1"),
    (["distill", "stage2", "--out", "{tmp}/r", "--lr", "-1"], "--lr must be > 0"),
    (["distill", "stage2", "--out", "{tmp}/r", "--teacher", "{tmp}"], "no stage-2 teacher"),
    (["distill", "stage2", "--out", "{tmp}/r", "--export-only"], "no distillation checkpoint"),
    (["generate", "--prompt", "nods", "--student", "--teacher", "--out", "{tmp}/o.mp4"], "at most one of --student"),
])
def test_bad_distill_options_exit_2_with_message(argv, match, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    import re

    assert re.search(match, capsys.readouterr().err)


def test_distill_stage2_cli_end_to_end_and_export_only(stage2_micro_run, tmp_path, capsys):
    from mvportrait.models.stage2 import FLAME2VideoModel

    out, _ = stage2_micro_run
    teacher = tmp_path / "stage2"
    FLAME2VideoModel.from_pretrained(out / "final").save_pretrained(teacher, dtype=torch.float32)
    n = torch.get_num_threads()
    try:
        assert main(["distill", "stage2", "--out", str(tmp_path / "run"), "--teacher", str(teacher), "--steps", "2",
                     "--views", "2", "--frames", "2", "--pool-size", "1", "--export", str(tmp_path / "student"),
                     "--threads", "1", "-q"]) == 0
    finally:
        torch.set_num_threads(n)
    assert "stage 2: 2 steps" in capsys.readouterr().out
    meta = json.loads((tmp_path / "student" / "config.json").read_text())
    assert meta["distill"]["default_steps"] == 2 and meta["distill_run"]["steps"] == 2
    # --export-only re-writes the student from the checkpoint without training
    assert main(["distill", "stage2", "--out", str(tmp_path / "run"), "--teacher", str(teacher), "--export-only",
                 "--export", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "model.safetensors").is_file()


def test_generate_and_stream_default_to_the_shipped_students():
    from argparse import Namespace

    from mvportrait.cli_stage2 import DEFAULT_TO_STUDENT, use_student

    def ns(**kw):
        return Namespace(**{"student": False, "teacher": False, "weights": None, "stage1_weights": None, **kw})

    assert DEFAULT_TO_STUDENT and use_student(ns())  # the students met their targets (model cards)
    assert not use_student(ns(teacher=True))
    assert use_student(ns(student=True, weights="w"))
    assert not use_student(ns(weights="my/teacher")) and not use_student(ns(stage1_weights="my/stage1"))
