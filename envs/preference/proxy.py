"""Online proxy preferences: score generated images, turn score pairs into preference labels.

A ``ScoreSource`` maps a batch of images (uint8 [B, H, W, 3]) and their prompts to scores
[B] (higher is better). ``compare`` turns the scores of two samples per prompt into labels, one
objective or several (Pareto dominance, as D3PO's ``compare``), with a tie margin; ``ties``
decides whether tied pairs are dropped or labelled by a coin flip.

Sources: JPEG compressibility / incompressibility (DDPO, D3PO), PickScore (Kirstain et al. 2023:
``logit_scale.exp() * cos(image, text)`` with a CLIP model from a local folder) and a
LAION-aesthetic-style MLP head on normalised CLIP image embeddings (local weights).
"""

from __future__ import annotations

import abc
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TIE_MODES = ("drop", "random")


class ScoreSource(abc.ABC):
    """Scores images for their prompts; higher is better."""

    #: Short name for logs (``reward/<name>``).
    name: str = "score"
    #: Whether building it costs nothing (no model to load): the config check then builds it, so
    #: bad argument values fail before Ray starts.
    cheap_to_build: bool = False

    @abc.abstractmethod
    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """float32 [B] scores of uint8 images [B, H, W, 3] generated for ``prompts`` [B]."""

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        return np.asarray(self.score(images, prompts), dtype=np.float32)


def jpeg_size_kb(images: np.ndarray, quality: int = 95) -> np.ndarray:
    """JPEG file size in kB of each uint8 image [B, H, W, 3] at ``quality`` (DDPO's measure)."""
    sizes = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return np.asarray(sizes, dtype=np.float32)


class JpegCompressibility(ScoreSource):
    """Minus the JPEG size in kB: smaller files (flatter, simpler images) score higher."""

    name = "jpeg_compressibility"
    cheap_to_build = True

    def __init__(self, quality: int = 95) -> None:
        self.quality = int(quality)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return -jpeg_size_kb(images, self.quality)


class JpegIncompressibility(JpegCompressibility):
    """The JPEG size in kB: detailed, high-frequency images score higher."""

    name = "jpeg_incompressibility"

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        return jpeg_size_kb(images, self.quality)


def _load_clip(model_dir: str | Path, device: str):
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a local CLIP model folder (no config.json); download it once on a machine with "
            f"hub access (e.g. `hf download yuvalkirstain/PickScore_v1 --local-dir {folder}`) and copy it here"
        )
    model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    return model, CLIPProcessor.from_pretrained(folder, local_files_only=True)


class PickScore(ScoreSource):
    """PickScore: ``logit_scale.exp() * cos(image embedding, prompt embedding)`` of a CLIP model.

    Args:
        model_dir: Local folder with the CLIP model and processor (PickScore_v1's own weights, or
            any CLIP in the transformers format).
        device: torch device.
        batch_size: Images per forward pass.
    """

    name = "pickscore"

    def __init__(self, model_dir: str | Path, device: str = "cpu", batch_size: int = 32) -> None:
        self.device = device
        self.batch_size = int(batch_size)
        self.model, self.processor = _load_clip(model_dir, device)

    @torch.no_grad()
    def embed(self, images: np.ndarray, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised image and text embeddings [B, D]."""
        inputs = self.processor(images=list(images), text=list(prompts), padding=True, truncation=True,
                                return_tensors="pt").to(self.device)
        image = _features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        text = _features(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                      attention_mask=inputs["attention_mask"]))
        return torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            image, text = self.embed(images[start : start + self.batch_size], prompts[start : start + self.batch_size])
            out.append((self.model.logit_scale.exp() * (image * text).sum(-1)).float().cpu().numpy())
        return np.concatenate(out)


def _features(output) -> torch.Tensor:
    # transformers 5 may return a model output with the projected embeddings in pooler_output.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class AestheticHead(torch.nn.Module):
    """LAION aesthetic predictor v2's MLP on a normalised CLIP image embedding (dropout unused at eval)."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(embed_dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding).squeeze(-1)


class AestheticScore(ScoreSource):
    """Aesthetic score: the MLP head on the normalised CLIP image embedding (prompts unused).

    Args:
        clip_dir: Local CLIP folder (LAION's head expects openai/clip-vit-large-patch14).
        head_path: The head's weights (``.safetensors`` or a torch ``state_dict`` file with
            ``layers.*`` keys, as LAION ships ``sac+logos+ava1-l14-linearMSE.pth``).
    """

    name = "aesthetic"

    def __init__(self, clip_dir: str | Path, head_path: str | Path, device: str = "cpu", batch_size: int = 32) -> None:
        self.device = device
        self.batch_size = int(batch_size)
        self.model, self.processor = _load_clip(clip_dir, device)
        head_path = Path(head_path)
        if not head_path.is_file():
            raise FileNotFoundError(f"aesthetic head weights {head_path} not found; copy the file there")
        if head_path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(head_path)
        else:
            state = torch.load(head_path, map_location="cpu", weights_only=True)
        self.head = AestheticHead(self.model.config.projection_dim)
        self.head.load_state_dict(state)
        self.head.to(device).eval()

    @torch.no_grad()
    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[start : start + self.batch_size]), return_tensors="pt")
            embedding = _features(self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device)))
            out.append(self.head(torch.nn.functional.normalize(embedding, dim=-1)).float().cpu().numpy())
        return np.concatenate(out)


def compare(scores_a: np.ndarray, scores_b: np.ndarray, tie_margin: float = 0.0) -> np.ndarray:
    """Preference labels int8 [B]: +1 (a preferred), -1 (b preferred), 0 (tie or incomparable).

    With one objective ([B] scores), the higher score wins when the gap exceeds ``tie_margin``.
    With several ([B, K]), a wins when it is at least as good on every objective and better by
    more than ``tie_margin`` on one (Pareto dominance, D3PO's multi-objective ``compare``).
    """
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim not in (1, 2):
        raise ValueError(f"scores must both be [B] or [B, K], got {a.shape} and {b.shape}")
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    a_wins = (a >= b - tie_margin).all(1) & (a > b + tie_margin).any(1)
    b_wins = (b >= a - tie_margin).all(1) & (b > a + tie_margin).any(1)
    return np.where(a_wins & ~b_wins, 1, np.where(b_wins & ~a_wins, -1, 0)).astype(np.int8)


def preference_labels(
    scores_a: np.ndarray, scores_b: np.ndarray, tie_margin: float = 0.0, ties: str = "drop",
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(a_preferred bool [B], keep bool [B])`` for training pairs.

    ``ties="drop"``: tied / incomparable pairs get ``keep=False`` (no gradient, as in D3PO).
    ``ties="random"``: they are kept with a fair coin flip from ``rng``.
    """
    if ties not in TIE_MODES:
        raise ValueError(f"ties={ties!r} must be one of {TIE_MODES}")
    label = compare(scores_a, scores_b, tie_margin)
    tied = label == 0
    if ties == "random":
        if rng is None:
            raise ValueError('ties="random" needs an rng (np.random.Generator) so labels are reproducible')
        coin = rng.random(label.shape) < 0.5
        return np.where(tied, coin, label > 0), np.ones_like(tied)
    return label > 0, ~tied
