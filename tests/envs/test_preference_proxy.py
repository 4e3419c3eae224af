"""Proxy preference sources and pairwise labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlplat.envs.preference.proxy import (
    AestheticHead,
    AestheticScore,
    JpegCompressibility,
    JpegIncompressibility,
    PickScore,
    compare,
    jpeg_size_kb,
    preference_labels,
)


def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    flat = np.full((32, 32, 3), 120, np.uint8)
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return np.stack([flat, noise])


def test_jpeg_scores_rank_flat_above_noise_and_are_opposite():
    batch = images()
    sizes = jpeg_size_kb(batch)
    assert sizes[0] < sizes[1] and sizes[0] > 0
    comp = JpegCompressibility()(batch, ["a", "b"])
    incomp = JpegIncompressibility()(batch, ["a", "b"])
    np.testing.assert_allclose(comp, -sizes)
    np.testing.assert_allclose(incomp, sizes)
    assert comp[0] > comp[1] and incomp[1] > incomp[0]


def test_bad_images_or_prompt_count_are_named():
    with pytest.raises(ValueError, match=r"uint8 \[B, H, W, 3\]"):
        JpegCompressibility()(np.zeros((2, 8, 8), np.uint8), ["a", "b"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        JpegCompressibility()(images(), ["a"])


def test_compare_single_objective_with_margin():
    a = np.array([1.0, 0.0, 0.5, 2.0])
    b = np.array([0.0, 1.0, 0.55, 2.0])
    assert compare(a, b).tolist() == [1, -1, -1, 0]
    assert compare(a, b, tie_margin=0.1).tolist() == [1, -1, 0, 0]


def test_compare_pareto_dominance():
    a = np.array([[1.0, 1.0], [1.0, 0.0], [2.0, 1.0], [0.0, 0.0]])
    b = np.array([[0.0, 1.0], [0.0, 1.0], [2.0, 3.0], [0.0, 0.0]])
    # dominates, incomparable, dominated, equal.
    assert compare(a, b).tolist() == [1, 0, -1, 0]
    with pytest.raises(ValueError, match="both be"):
        compare(a, b[:, 0])


def test_preference_labels_drop_or_flip_ties():
    a, b = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    win, keep = preference_labels(a, b)
    assert win.tolist() == [True, False, False] and keep.tolist() == [True, True, False]
    win1, keep1 = preference_labels(a, b, ties="random", rng=np.random.default_rng(3))
    win2, _ = preference_labels(a, b, ties="random", rng=np.random.default_rng(3))
    assert keep1.all() and win1.tolist() == win2.tolist() and win1[:2].tolist() == [True, False]
    with pytest.raises(ValueError, match="needs an rng"):
        preference_labels(a, b, ties="random")
    with pytest.raises(ValueError, match="ties="):
        preference_labels(a, b, ties="coin")


def save_tiny_clip(folder) -> None:
    """A random CLIP with a byte-level tokenizer (no merges), saved like a hub download."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True)
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab |= {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
                     "pad_token_id": vocab["<|endoftext|>"]},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)


def test_pickscore_is_scaled_cosine_of_a_local_clip(tmp_path):
    save_tiny_clip(tmp_path / "clip")
    source = PickScore(tmp_path / "clip", batch_size=1)
    batch = images()
    prompts = ["a grey square", "colourful noise"]
    scores = source(batch, prompts)
    image, text = source.embed(batch, prompts)
    assert torch.allclose(image.norm(dim=-1), torch.ones(2)) and torch.allclose(text.norm(dim=-1), torch.ones(2))
    expected = (source.model.logit_scale.exp() * (image * text).sum(-1)).detach().numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    # Batching does not change scores; the prompt matters.
    np.testing.assert_allclose(PickScore(tmp_path / "clip", batch_size=8)(batch, prompts), scores, rtol=1e-5, atol=1e-6)
    assert not np.allclose(source(batch, prompts[::-1]), scores)


def test_aesthetic_head_on_clip_embeddings(tmp_path):
    from safetensors.torch import save_file

    save_tiny_clip(tmp_path / "clip")
    torch.manual_seed(1)
    head = AestheticHead(16)
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    source = AestheticScore(tmp_path / "clip", tmp_path / "head.safetensors")
    batch = images()
    scores = source(batch, ["", ""])
    image, _ = PickScore(tmp_path / "clip").embed(batch, ["", ""])
    np.testing.assert_allclose(scores, head.eval()(image).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_missing_local_weights_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local CLIP model folder.*hf download"):
        PickScore(tmp_path / "nothing")
