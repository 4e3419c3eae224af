"""Run logging: metrics.jsonl (always), wandb (offline by default), console progress, media."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

METRICS_FILE = "metrics.jsonl"
#: The run's log file (Hydra's job log, ``train.log`` in the run dir): step lines and the report too.
LOG_FILE = "train.log"


def say(run_dir: str | Path, text: str) -> None:
    """Prints ``text`` and appends it to the run dir's log file."""
    print(text, flush=True)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with (Path(run_dir) / LOG_FILE).open("a") as f:
        f.write(text + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file (missing file: no rows)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(src: str | Path, dst: str | Path, last_step: int) -> None:
    """Writes the rows of ``src`` with step <= last_step to ``dst`` (resume drops later rows)."""
    rows = [r for r in read_metrics(src) if r["step"] <= last_step]
    Path(dst).write_text("".join(json.dumps(r) + "\n" for r in rows))


class RunLogger:
    """Writes one JSON row per iteration and shows progress.

    Args:
        run_dir: the Hydra run directory.
        total_steps: iterations of the run (for the progress bar).
        backend: console or wandb.
        config: the resolved run config (for wandb).
        mode: wandb mode, offline or online.
        project: wandb project.
        log_every: print a console line every this many iterations.
        progress_bar: show a live bar when stdout is a terminal.
        start_step: iteration the run (re)starts from.
    """

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        backend: str = "console",
        config: Mapping[str, Any] | None = None,
        mode: str = "offline",
        project: str = "rlplat",
        log_every: int = 1,
        progress_bar: bool = True,
        start_step: int = 0,
    ) -> None:
        if backend not in ("console", "wandb"):
            raise ValueError(f"logger.backend={backend!r} must be console or wandb")
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(run_dir) / METRICS_FILE
        self.log_file = Path(run_dir) / LOG_FILE
        self.log_every = max(1, log_every)
        # No wrapping: a piped step line stays one line, whatever its length.
        self.console = Console(soft_wrap=True)
        self.wandb = None
        if backend == "wandb":
            import wandb

            os.environ.setdefault("WANDB_DIR", str(run_dir))
            self.wandb = wandb.init(project=project, mode=mode, dir=str(run_dir), config=dict(config or {}))
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
            console=self.console, disable=not (progress_bar and self.console.is_terminal),
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
        self.progress.start()

    @classmethod
    def from_config(cls, cfg: Any, run_dir: Path, start_step: int = 0) -> RunLogger:
        """The logger a run's config asks for (``cfg.logger``, ``cfg.trainer.total_steps``)."""
        from omegaconf import OmegaConf

        lc = cfg.logger
        return cls(run_dir, cfg.trainer.total_steps, backend=lc.backend,
                   config=OmegaConf.to_container(cfg, resolve=True), mode=lc.mode, project=lc.project,
                   log_every=lc.log_every, progress_bar=lc.progress_bar, start_step=start_step)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Appends a row (with ``step``) and updates the console."""
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=step)
        summary = _summary(row)
        self.progress.update(self.task, completed=step, info=summary)
        if step % self.log_every == 0 or "eval/success_rate" in row or "eval/reward" in row:
            line = f"step {step:>5}  {summary}"
            self.console.print(line, highlight=False, markup=False)
            with self.log_file.open("a") as f:
                f.write(line + "\n")

    def log_media(self, name: str, path: Path, step: int | None = None) -> None:
        """Attaches an image or video file to wandb at ``step`` (files are on disk already)."""
        if self.wandb is not None:
            import wandb

            media = wandb.Video(str(path)) if path.suffix in (".gif", ".mp4") else wandb.Image(str(path))
            self.wandb.log({name: media}, step=step)

    def close(self) -> None:
        self.progress.stop()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v: Any) -> Any:
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _summary(row: Mapping[str, Any]) -> str:
    # Embodied runs count env steps; online preference runs sampled (or demonstrated) images;
    # offline ones the pairs read.
    counter = next((key for key in ("samples", "pairs") if key in row), "env_steps")
    parts = [f"{counter} {row.get(counter, 0):,}"]
    for key, label in (
        ("perf/env_steps_per_s", "steps/s {:.0f}"),
        ("perf/samples_per_s", "samples/s {:.1f}"),
        ("perf/pairs_per_s", "pairs/s {:.1f}"),
        ("train/success_rate", "train success {:.2f}"),
        ("train/episode_return", "return {:.2f}"),
        ("reward/mean", "reward {:.3f}"),
        ("train/loss", "loss {:.4f}"),
        ("eval/success_rate", "EVAL success {:.2f}"),
        ("eval/reward", "EVAL reward {:.3f}"),
        ("eval/win_rate_vs_base", "win rate {:.2f}"),
    ):
        if row.get(key) is not None:
            parts.append(label.format(row[key]))
    return "  ".join(parts)


@dataclass(frozen=True)
class Panel:
    """One subplot of a learning-curve figure: metric keys against the x key."""

    #: Y-axis label.
    y_label: str
    #: Metric keys drawn as lines (eval/* keys with markers).
    keys: tuple[str, ...]
    #: Fixed y-range, or None to fit the data.
    y_range: tuple[float, float] | None = None


#: The embodied loop's figure: success (training episodes, greedy evaluation at any step and at
#: the last step) and episode return.
EMBODIED_PANELS = (
    Panel("success rate", ("train/success_rate", "eval/success_once", "eval/success_at_end"), (-0.02, 1.02)),
    Panel("episode return", ("train/episode_return", "eval/episode_return")),
)


def plot_learning_curve(
    metrics_path: Path,
    out_png: Path,
    panels: Sequence[Panel] = EMBODIED_PANELS,
    x_key: str = "env_steps",
) -> Path:
    """Each panel's keys versus ``x_key`` (default: env steps), side by side, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for key in panel.keys:
            pts = [(r[x_key], r[key]) for r in rows if r.get(key) is not None and x_key in r]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker="o" if key.startswith("eval") else None, label=key)
        ax.set_xlabel(x_key.replace("_", " "))
        ax.set_ylabel(panel.y_label)
        if panel.y_range is not None:
            ax.set_ylim(*panel.y_range)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def save_video(frames: Sequence[np.ndarray], path: Path, fps: float = 10, min_size: int = 256) -> Path:
    """Writes uint8 HxWx3 frames as a GIF or an MP4 (by the suffix; MP4 through imageio-ffmpeg)
    playing at ``fps``.

    Small frames are upscaled (nearest neighbour) to at least ``min_size`` pixels so a 64x64
    sim image stays viewable.
    """
    import imageio.v3 as iio

    frames = [_upscale(f, min_size) for f in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        # Pillow's GIF writer takes the frame time in milliseconds (GIFs store hundredths).
        iio.imwrite(path, np.stack(frames), duration=1000.0 / fps, loop=0)
    else:
        import imageio.v2 as imageio

        # H.264 through imageio-ffmpeg's bundled ffmpeg; even sides for its 4:2:0 chroma.
        with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1) as writer:
            for frame in frames:
                writer.append_data(frame[: frame.shape[0] // 2 * 2, : frame.shape[1] // 2 * 2])
    return path


def _upscale(frame: np.ndarray, min_size: int) -> np.ndarray:
    scale = max(1, min_size // max(1, frame.shape[0]))
    return np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1) if scale > 1 else frame


def annotate_episode(frames: Sequence[np.ndarray], instruction: str | None, success: Sequence[bool],
                     min_size: int = 256) -> list[np.ndarray]:
    """Frames of one episode with what a viewer needs drawn in: the instruction on a bar above,
    the step counter below, and from the first successful step on a green frame and "success".

    ``success[i]`` is whether the task was solved at frame i (frame 0 is the reset)."""
    from PIL import Image, ImageDraw

    out = []
    solved = False
    total = len(frames) - 1
    for i, frame in enumerate(frames):
        if i < len(success) and success[i]:
            solved = True
        tile = Image.fromarray(_upscale(np.asarray(frame, np.uint8), min_size))
        width, height = tile.size
        canvas = Image.new("RGB", (width, height + 32), (255, 255, 255))
        canvas.paste(tile, (0, 16))
        draw = ImageDraw.Draw(canvas)
        text = instruction or ""
        while text and draw.textlength(text) > width - 4:
            text = text[:-1]
        draw.text((2, 2), text, fill=(0, 0, 0))
        draw.text((2, height + 18), f"step {i}/{total}", fill=(0, 0, 0))
        if solved:
            draw.rectangle([0, 16, width - 1, height + 15], outline=(0, 170, 0), width=4)
            label = "success"
            draw.text((width - draw.textlength(label) - 4, height + 18), label, fill=(0, 140, 0))
        out.append(np.asarray(canvas))
    return out


def save_image_grid(
    images: np.ndarray, path: Path, captions: Sequence[str] | None = None, columns: int = 8, min_size: int = 96,
) -> Path:
    """Writes uint8 images [N, H, W, 3] as one PNG grid, each tile captioned underneath.

    Tiles are upscaled (nearest neighbour) to at least ``min_size`` pixels; a caption is drawn in
    PIL's default font and cut to the tile width. Used for fixed-prompt sample grids (same seeds
    before and after training).
    """
    from PIL import Image, ImageDraw

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    n, height, width = images.shape[:3]
    scale = max(1, math.ceil(min_size / max(height, width)))
    tile_h, tile_w = height * scale, width * scale
    text_h = 14 if captions is not None else 0
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * tile_w, rows * (tile_h + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % columns) * tile_w, (i // columns) * (tile_h + text_h)
        grid.paste(Image.fromarray(image).resize((tile_w, tile_h), Image.NEAREST), (x, y))
        if captions is not None:
            text = str(captions[i])
            while text and draw.textlength(text) > tile_w - 2:
                text = text[:-1]
            draw.text((x + 1, y + tile_h + 1), text, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
