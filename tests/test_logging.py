import json
import math

import numpy as np
import pytest

from rlplat.logging import RunLogger, plot_learning_curve, read_metrics, save_video, truncate_metrics


def test_run_logger_writes_rows_and_prints_progress(tmp_path, capsys):
    logger = RunLogger(tmp_path, total_steps=3, progress_bar=False)
    for step in (1, 2):
        logger.log(step, {"env_steps": 100 * step, "train/success_rate": 0.5 * step, "bad": math.nan})
    logger.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == [
        {"step": 1, "env_steps": 100, "train/success_rate": 0.5, "bad": None},
        {"step": 2, "env_steps": 200, "train/success_rate": 1.0, "bad": None},
    ]
    assert "train success 1.00" in capsys.readouterr().out


def test_truncate_metrics_drops_rows_after_the_checkpoint(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))
    truncate_metrics(src, tmp_path / "b.jsonl", last_step=3)
    assert [r["step"] for r in read_metrics(tmp_path / "b.jsonl")] == [1, 2, 3]
    truncate_metrics(src, src, last_step=2)
    assert [r["step"] for r in read_metrics(src)] == [1, 2]


def test_plot_and_video_files(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "env_steps": 10 * s, "train/success_rate": s / 5}) + "\n" for s in range(1, 6))
    )
    png = plot_learning_curve(tmp_path / "metrics.jsonl", tmp_path / "media/curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    frames = [np.full((16, 16, 3), i * 20, np.uint8) for i in range(5)]
    gif = save_video(frames, tmp_path / "media/ep.gif")
    assert gif.read_bytes()[:6] in (b"GIF89a", b"GIF87a")


def test_wandb_backend_runs_offline_inside_the_run_dir(tmp_path):
    logger = RunLogger(tmp_path, total_steps=2, backend="wandb", mode="offline", progress_bar=False,
                       config={"seed": 0})
    logger.log(1, {"env_steps": 10, "train/success_rate": 0.25})
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["train/success_rate"] == 0.25


def test_wandb_backend_attaches_image_grids(tmp_path):
    import numpy as np

    from rlplat.logging import save_image_grid

    grid = save_image_grid(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "media" / "eval_step_00000.png")
    logger = RunLogger(tmp_path, total_steps=1, backend="wandb", mode="offline", progress_bar=False)
    logger.log_media("eval/samples", grid)
    logger.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert list(run.glob("files/media/images/eval/samples_*.png"))


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(ValueError, match="logger.backend"):
        RunLogger(tmp_path, total_steps=1, backend="tensorboard")


def test_image_grid_tiles_and_captions(tmp_path):
    import numpy as np
    from PIL import Image

    from rlplat.logging import save_image_grid

    images = np.zeros((5, 16, 16, 3), np.uint8)
    images[:, :, :, 0] = np.arange(5)[:, None, None] * 50
    path = save_image_grid(images, tmp_path / "grid.png", captions=[f"prompt {i}" for i in range(5)], columns=3)
    grid = np.asarray(Image.open(path))
    # 2 rows x 3 columns of 96 px tiles (16 px scaled by 6) plus a 14 px caption strip per row.
    assert grid.shape == (2 * (96 + 14), 3 * 96, 3)
    assert (grid[0:96, 96:192, 0] == 50).all() and (grid[110:206, 0:96, 0] == 150).all()
    # The caption strip holds dark text pixels; the unused sixth tile stays white.
    assert (grid[96:110, 0:96] < 100).any() and (grid[110:206, 192:288] == 255).all()
    import pytest

    with pytest.raises(ValueError, match="5 images but 1 captions"):
        save_image_grid(images, tmp_path / "x.png", captions=["a"])


def test_videos_play_at_the_given_rate_as_gif_and_mp4(tmp_path):
    import imageio.v3 as iio
    from PIL import Image

    frames = [np.full((32, 32, 3), i * 40, np.uint8) for i in range(6)]
    gif = save_video(frames, tmp_path / "ep.gif", fps=20)
    with Image.open(gif) as image:
        assert image.n_frames == 6 and image.info["duration"] == 50  # ms per frame: 20 fps
        assert image.size == (256, 256)  # upscaled from 32
    mp4 = save_video(frames, tmp_path / "ep.mp4", fps=20)
    assert iio.immeta(mp4, plugin="FFMPEG")["fps"] == 20.0
    assert len(list(iio.imiter(mp4, plugin="FFMPEG"))) == 6


def test_annotated_episode_marks_success_from_its_first_step_and_counts_steps():
    from rlplat.logging import annotate_episode

    frames = [np.full((32, 32, 3), 128, np.uint8) for _ in range(4)]
    out = annotate_episode(frames, "reach the red square", [False, False, True, True])
    assert len(out) == 4 and out[0].shape == (256 + 32, 256, 3)
    green = np.array([0, 170, 0], np.uint8)

    def framed(img):  # the 4-pixel border around the picture
        return bool((img[16:16 + 256, 0] == green).all())

    assert [framed(img) for img in out] == [False, False, True, True]
    # The header carries the instruction (dark pixels), the footer a counter that changes each step.
    assert (out[0][:16] < 100).any()
    assert not np.array_equal(out[0][-14:], out[1][-14:])
