"""Stage-2 evaluation: metrics report and the comparison picture."""
import numpy as np

from mvportrait.engine.flame2video import FLAME2Video
from mvportrait.evaluation.stage2 import comparison_sheet, evaluate_stage2


def test_report_and_picture(stage2_micro_run):
    out, _ = stage2_micro_run
    pipe = FLAME2Video.from_pretrained(out / "final", overlap=1)
    report, pics = evaluate_stage2(pipe, n=2, steps=1, keep=1, rig="yaws:-30,30")
    for k in ("psnr", "ssim", "autoencoder_psnr", "view_consistency", "view_consistency_gt", "flicker_ratio",
              "seconds_per_frame"):
        assert np.isfinite(report[k]), k
    assert len(report["psnr_per_view"]) == 2 and 0 < report["psnr"] < 60 and -1 <= report["ssim"] <= 1
    assert report["view_consistency_gt"] < 0.05  # ground truth agrees with itself across views
    gt, gen = pics[0]
    assert gt.shape == gen.shape and gt.shape[1:] == (2, 32, 32, 3)
    sheet = comparison_sheet(pics, frames=2)
    assert sheet.dtype == np.uint8 and sheet.shape[0] == 2 * 32 + 4
    # the picture holds the ground truth and the generated frames it claims to
    assert np.array_equal(sheet[:32, :32], gt[0, 0].numpy())
    assert np.array_equal(sheet[36:68, :32], gen[0, 0].numpy())


def test_cli_eval_stage2_picture_checked_first_and_optional(stage2_micro_run, tmp_path, capsys, monkeypatch):
    from mvportrait.cli import main
    from mvportrait.evaluation import stage2 as ev

    out, _ = stage2_micro_run
    load = FLAME2Video.from_pretrained.__func__  # the micro model's 2-frame window needs overlap 1
    monkeypatch.setattr(FLAME2Video, "from_pretrained", classmethod(lambda cls, *a, **k: load(cls, *a, overlap=1, **k)))
    calls = []
    real = ev.evaluate_stage2
    monkeypatch.setattr(ev, "evaluate_stage2", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    args = ["eval", "stage2", "--weights", str(out / "final"), "--n", "1", "--steps", "1", "--threads", "1", "--quiet"]
    # a picture into a missing folder is refused before any clip is evaluated, and nothing is written
    bad = tmp_path / "missing" / "p.png"
    assert main(args + ["--out", str(tmp_path / "a.json"), "--picture", str(bad)]) == 2
    assert not calls and not (tmp_path / "a.json").exists()
    assert "directory" in capsys.readouterr().err
    # --pictures 0: the report only, and the message does not claim a picture
    assert main(args + ["--out", str(tmp_path / "b.json"), "--pictures", "0", "--picture", str(bad)]) == 0
    assert (tmp_path / "b.json").is_file() and not bad.exists() and len(calls) == 1
    assert "p.png" not in capsys.readouterr().out
    # with a picture: both written
    pic = tmp_path / "p.png"
    assert main(args + ["--out", str(tmp_path / "c.json"), "--pictures", "1", "--picture", str(pic)]) == 0
    assert pic.is_file() and str(pic) in capsys.readouterr().out


def test_longer_clips_in_windows_and_their_checks(stage2_micro_run, tmp_path, capsys, monkeypatch):
    """--frames: clips longer than the model's window run in overlapping windows (per-frame PSNR in the
    report); --first-window is checked against the model's overlap and window before any clip runs."""
    import json

    import pytest

    from mvportrait.cli import main

    import torch
    from micro import fill_zero_params, micro_stage2_config

    from mvportrait.models.stage2 import FLAME2VideoModel

    out, _ = stage2_micro_run
    torch.manual_seed(0)  # a 4-frame window (overlap 1), so a 2-frame window 0 changes the layout
    pipe = FLAME2Video(fill_zero_params(FLAME2VideoModel(micro_stage2_config(frames=4)).eval()), overlap=1)
    report, pics = evaluate_stage2(pipe, n=1, steps=1, keep=1, frames=6, first_window=2)
    assert report["frames"] == 6 and report["first_window"] == 2 and report["window"] == 4
    assert len(report["psnr_per_frame"]) == 6 and all(0 < x < 60 for x in report["psnr_per_frame"])
    assert pipe.last_timings.extra["windows"] == 3 and pics[0][1].shape[0] == 6  # 2, then 4-frame windows
    full, pics_full = evaluate_stage2(pipe, n=1, steps=1, keep=1, frames=6)
    assert full["first_window"] == 4 and pipe.last_timings.extra["windows"] == 2
    assert not torch.equal(pics[0][1], pics_full[0][1])
    with pytest.raises(ValueError, match="frames"):
        evaluate_stage2(pipe, n=1, steps=1, frames=0)

    from mvportrait.evaluation import stage2 as ev

    load = FLAME2Video.from_pretrained.__func__
    monkeypatch.setattr(FLAME2Video, "from_pretrained", classmethod(lambda cls, *a, **k: load(cls, *a, overlap=1, **k)))
    calls, real = [], ev.evaluate_stage2
    monkeypatch.setattr(ev, "evaluate_stage2", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    args = ["eval", "stage2", "--weights", str(out / "final"), "--n", "1", "--steps", "1", "--threads", "1", "--quiet",
            "--pictures", "0"]
    for bad, word in ((["--frames", "0"], "--frames"), (["--first-window", "3"], "--first-window"),
                      (["--first-window", "1"], "--first-window")):
        assert main(args + ["--out", str(tmp_path / "bad.json")] + bad) == 2
        assert word in capsys.readouterr().err and not (tmp_path / "bad.json").exists()
    assert not calls  # every bad value refused before any clip
    assert main(args + ["--out", str(tmp_path / "r.json"), "--frames", "4", "--first-window", "2"]) == 0
    assert calls[-1]["frames"] == 4 and calls[-1]["first_window"] == 2  # passed through, not only echoed
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["frames"] == 4 and len(r["psnr_per_frame"]) == 4 and r["first_window"] == 2
