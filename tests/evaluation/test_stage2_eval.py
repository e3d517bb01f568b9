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
