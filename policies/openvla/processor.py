"""OpenVLA's inputs: the prompt, the text tokenizer (and a tiny local one) and image preprocessing.

Reference (behaviour reproduced, code written independently), openvla/openvla:

- ``experiments/robot/openvla_utils.py`` ``get_vla_action`` and the README quick start: the prompt
  is ``f"In: What action should the robot take to {task_label.lower()}?\\nOut:"`` (no trailing
  space at inference).
- ``prismatic/models/backbones/llm/prompting/base_prompter.py`` ``PurePromptBuilder``: at training
  time the human turn is wrapped as ``f"In: {msg}\\nOut: "`` (trailing space) and the action
  string follows it, so with the Llama-2 sentencepiece tokenizer the prompt's last token before
  the action tokens is the empty piece ``"▁"`` (id 29871). ``predict_action`` (modeling_prismatic.py)
  therefore appends 29871 when the prompt does not already end with it. Our ``empty_token_id``
  reproduces that for a real Llama tokenizer; the tiny word-level tokenizer has no such piece,
  so the tiny preset leaves it off.
- ``prismatic/extern/hf/processing_prismatic.py`` ``PrismaticImageProcessor``: one
  resize + normalise per vision backbone, the results stacked along channels; for the fused
  ``dinosiglip`` backbone channels 0:3 are DINOv2-normalised (ImageNet mean/std) and 3:6
  SigLIP-normalised (mean = std = 0.5). openvla-7b's ``preprocessor_config.json`` uses
  ``image_resize_strategy = "resize-naive"`` (square resize, no letterbox) with bicubic
  interpolation (PIL, antialiased) at 224 px; here the resize is ``torch`` interpolation
  (antialiased), so values differ from PIL's by resampling noise, not by convention.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"

# Llama-2's "▁" piece, which OpenVLA's predict_action appends after "Out:" (see module docstring).
LLAMA2_EMPTY_TOKEN_ID = 29871

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# DINOv2 (timm data config) uses the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PROCESSOR_CONFIG_NAME = "rlplat_processor_config.json"
# What OpenVLA's own checkpoints ship (read as a fallback by ``OpenVLAProcessor.from_pretrained``).
OPENVLA_PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"

# Words the tiny tokenizer knows: the prompt template plus a small tabletop-task vocabulary.
_TINY_CORPUS = """
In: What action should the robot take to ?
Out:
reach move touch pick push put place open close lift grasp grab stack turn slide pull drop rotate
the a an to on in into onto of at from up down left right near next top bottom front back and
square cube block ball cup bowl plate drawer door box target goal object peg hole button lid
red green blue yellow orange purple pink black white gray brown cyan magenta
small large big one two three first second it its
"""


def build_prompt(instruction: str) -> str:
    """OpenVLA's inference prompt for one instruction (lower-cased, as OpenVLA's eval code does)."""
    return PROMPT_TEMPLATE.format(instruction=instruction.lower())


def action_token_name(index: int) -> str:
    """Name of the ``index``-th reserved action slot of the tiny tokenizer (id ``text_vocab + index``)."""
    return f"<act_{index}>"


def build_tiny_tokenizer(save_dir: str | os.PathLike, num_action_bins: int = 256) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on a built-in corpus, with the action slots at the end.

    Ids: ``<pad> <s> </s> <unk>`` (0-3), then the corpus words and punctuation, then
    ``num_action_bins`` tokens ``<act_0> .. <act_{n-1}>``, so ``len(tokenizer) - num_action_bins``
    is the first action id and ``ActionTokenizer(vocab_size=len(tokenizer), n_bins=num_action_bins)``
    emits exactly those ids. Encoding prepends ``<s>`` (as Llama-2 does); unknown words map to
    ``<unk>``; padding is on the left. The tokenizer is saved to ``save_dir`` and returned as
    loaded back from it (local files only).
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors, trainers

    if num_action_bins < 1:
        raise ValueError(f"num_action_bins must be >= 1, got {num_action_bins}")
    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]
    tok = Tokenizer(models.WordLevel(unk_token=UNK_TOKEN))
    # Words and runs of punctuation ("?", ":"); whitespace (including the prompt's "\n") is dropped.
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=100_000, min_frequency=1, special_tokens=specials)
    tok.train_from_iterator(_TINY_CORPUS.split("\n"), trainer=trainer)
    text_vocab = tok.get_vocab_size()
    # Added tokens match whole ("<act_3>" is one id) and take the next free ids, i.e. the tail.
    tok.add_tokens([AddedToken(action_token_name(i), normalized=False) for i in range(num_action_bins)])
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
    )
    if len(fast) != text_vocab + num_action_bins:
        raise RuntimeError(f"tiny tokenizer has {len(fast)} ids, expected {text_vocab} + {num_action_bins}")
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(save_dir)
    return PreTrainedTokenizerFast.from_pretrained(save_dir)


@dataclass
class ProcessorConfig:
    """The processor's serialisable settings (one mean/std per vision backbone, in channel order)."""

    # Square side the images are resized to (every backbone of OpenVLA uses the same size).
    image_size: int = 224
    # Per backbone, in the model's channel order: fused OpenVLA is [DINOv2, SigLIP].
    means: list[list[float]] = field(default_factory=lambda: [list(SIGLIP_MEAN)])
    stds: list[list[float]] = field(default_factory=lambda: [list(SIGLIP_STD)])
    # torch interpolate mode ("bicubic" as OpenVLA's processor, or "bilinear").
    interpolation: str = "bicubic"
    # Token id appended to every prompt unless it already ends with it (OpenVLA + Llama-2: 29871).
    empty_token_id: int | None = None

    def __post_init__(self) -> None:
        if len(self.means) != len(self.stds) or not 1 <= len(self.means) <= 2:
            raise ValueError(
                f"means and stds need one entry per vision backbone (1 or 2), got {len(self.means)} "
                f"means and {len(self.stds)} stds"
            )
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {self.interpolation!r}")


def processor_config_for(fused: bool, image_size: int, **kwargs: Any) -> ProcessorConfig:
    """Normalisation for a SigLIP-only (``fused=False``) or DINOv2+SigLIP backbone, as OpenVLA."""
    if fused:
        return ProcessorConfig(
            image_size=image_size,
            means=[list(IMAGENET_MEAN), list(SIGLIP_MEAN)],
            stds=[list(IMAGENET_STD), list(SIGLIP_STD)],
            **kwargs,
        )
    return ProcessorConfig(image_size=image_size, means=[list(SIGLIP_MEAN)], stds=[list(SIGLIP_STD)], **kwargs)


class OpenVLAProcessor:
    """Turns uint8 images and instructions into OpenVLA model inputs.

    Args:
        tokenizer: The LLM's tokenizer; it must add BOS itself (as Llama-2's does), since the
            model inserts the image patches right after the first attended token.
        config: Image size, per-backbone normalisation, interpolation and the empty-token flag.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, config: ProcessorConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config

    @property
    def num_channels(self) -> int:
        """Channels of ``pixel_values``: 3 per vision backbone."""
        return 3 * len(self.config.means)

    def __call__(self, images: np.ndarray | torch.Tensor, instructions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Model inputs for B images [B, H, W, 3] (uint8) and B instructions.

        Returns ``input_ids`` and ``attention_mask`` [B, L] (int64, left-padded) and
        ``pixel_values`` [B, 3 * n_backbones, S, S] (float32, normalised per backbone).
        """
        if isinstance(instructions, str):
            raise TypeError("instructions must be a sequence of strings, one per image, not one string")
        pixel_values = self.preprocess_images(images)
        if pixel_values.shape[0] != len(instructions):
            raise ValueError(f"got {pixel_values.shape[0]} images but {len(instructions)} instructions")
        input_ids, attention_mask = self.tokenize([build_prompt(text) for text in instructions])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``input_ids`` and ``attention_mask`` [B, L] for ready-made prompt strings."""
        rows = [list(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
        empty = self.config.empty_token_id
        if empty is not None:
            rows = [ids if ids and ids[-1] == empty else ids + [empty] for ids in rows]
        pad_id = self.tokenizer.pad_token_id
        # Llama-2 has no pad token; the value is irrelevant under the mask but must be a valid id.
        pad_id = 0 if pad_id is None else pad_id
        length = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, length - len(ids):] = 1
        return input_ids, attention_mask

    def preprocess_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """[B, H, W, 3] uint8 -> [B, 3 * n_backbones, S, S] float32 (resized, then normalised)."""
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got shape {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (0..255), got {x.dtype}")
        x = x.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode=self.config.interpolation, antialias=True, align_corners=False)
            # PIL clamps to 0..255 after resampling; bicubic can overshoot.
            x = x.clamp(0.0, 1.0)
        out = []
        for mean, std in zip(self.config.means, self.config.stds):
            m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
            s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
            out.append((x - m) / s)
        return torch.cat(out, dim=1).contiguous()

    def save_pretrained(self, save_dir: str | os.PathLike) -> Path:
        """Write the tokenizer files and ``rlplat_processor_config.json`` into ``save_dir``."""
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(save_dir)
        with (save_dir / PROCESSOR_CONFIG_NAME).open("w") as f:
            json.dump(asdict(self.config), f, indent=2)
        return save_dir

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> OpenVLAProcessor:
        """Load from a local directory written by ``save_pretrained`` (or an OpenVLA checkpoint).

        Without our config file, OpenVLA's ``preprocessor_config.json`` is read (its ``means``,
        ``stds``, ``input_sizes`` and ``interpolations``) and ``empty_token_id`` is set to
        Llama-2's 29871, as ``predict_action`` does.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no processor directory at {path}; pass a local folder (nothing is downloaded)")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        if (path / PROCESSOR_CONFIG_NAME).is_file():
            with (path / PROCESSOR_CONFIG_NAME).open() as f:
                config = ProcessorConfig(**json.load(f))
        elif (path / OPENVLA_PREPROCESSOR_CONFIG_NAME).is_file():
            config = _config_from_openvla(path / OPENVLA_PREPROCESSOR_CONFIG_NAME)
        else:
            raise FileNotFoundError(
                f"{path} has neither {PROCESSOR_CONFIG_NAME} nor {OPENVLA_PREPROCESSOR_CONFIG_NAME}"
            )
        return cls(tokenizer, config)


def _config_from_openvla(file: Path) -> ProcessorConfig:
    with file.open() as f:
        cfg = json.load(f)
    strategy = cfg.get("image_resize_strategy", "resize-naive")
    if strategy != "resize-naive":
        raise ValueError(
            f"{file} uses image_resize_strategy={strategy!r}; only 'resize-naive' (openvla-7b's) is supported"
        )
    sizes = {int(s[-1]) for s in cfg.get("input_sizes", [[3, 224, 224]])}
    if len(sizes) != 1:
        raise ValueError(f"{file} has backbones of different input sizes {sorted(sizes)}; expected one size")
    interpolation = (cfg.get("interpolations") or ["bicubic"])[0]
    return ProcessorConfig(
        image_size=sizes.pop(),
        means=[list(m) for m in cfg["means"]],
        stds=[list(s) for s in cfg["stds"]],
        interpolation=interpolation,
        empty_token_id=LLAMA2_EMPTY_TOKEN_ID,
    )
