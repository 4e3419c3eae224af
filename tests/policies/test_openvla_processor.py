"""OpenVLA prompt, tiny tokenizer and image preprocessing (numbers worked out by hand)."""

import json

import numpy as np
import pytest
import torch

from rlplat.policies.openvla import ActionTokenizer
from rlplat.policies.openvla.processor import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LLAMA2_EMPTY_TOKEN_ID,
    OpenVLAProcessor,
    ProcessorConfig,
    build_prompt,
    build_tiny_tokenizer,
    processor_config_for,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_prompt_is_openvlas_exactly():
    assert build_prompt("Push the RED cube") == "In: What action should the robot take to push the red cube?\nOut:"


def test_action_slots_are_the_last_256_ids(tokenizer):
    n = len(tokenizer)
    low, high = ActionTokenizer(vocab_size=n, n_bins=256).action_token_range
    assert (low, high) == (n - 256, n - 1)
    assert tokenizer.convert_ids_to_tokens([low, high]) == ["<act_0>", "<act_255>"]
    # Every id below the slots is a special or a text token, none an action slot.
    assert not any(t.startswith("<act_") for t in tokenizer.convert_ids_to_tokens(list(range(low))))
    # Each slot encodes as one id (added tokens are matched whole).
    assert tokenizer("<act_7>", add_special_tokens=False)["input_ids"] == [low + 7]


def test_tokenizer_adds_bos_maps_unknown_words_and_reloads(tokenizer, tmp_path):
    ids = tokenizer(build_prompt("push the cube"))["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:]) == [
        "In", ":", "What", "action", "should", "the", "robot", "take", "to",
        "push", "the", "cube", "?", "Out", ":",
    ]
    assert tokenizer("zebra", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]
    reloaded = build_tiny_tokenizer(tmp_path)
    assert reloaded.get_vocab() == tokenizer.get_vocab()


def test_left_padding_keeps_each_row_equal_to_its_own_encoding(tokenizer):
    proc = OpenVLAProcessor(tokenizer, processor_config_for(False, 32))
    images = np.zeros((2, 32, 32, 3), np.uint8)
    out = proc(images, ["put the red cube on the blue plate", "reach"])
    ids, mask = out["input_ids"], out["attention_mask"]
    short = tokenizer(build_prompt("reach"))["input_ids"]
    n_pad = ids.shape[1] - len(short)
    assert n_pad > 0 and mask[0].all()
    assert mask[1].tolist() == [0] * n_pad + [1] * len(short)
    assert ids[1, :n_pad].tolist() == [tokenizer.pad_token_id] * n_pad
    assert ids[1, n_pad:].tolist() == short


def test_constant_image_normalises_to_known_numbers(tokenizer):
    proc = OpenVLAProcessor(tokenizer, processor_config_for(False, 32, interpolation="bilinear"))
    pv = proc(np.full((1, 40, 50, 3), 128, np.uint8), ["reach"])["pixel_values"]
    assert pv.shape == (1, 3, 32, 32) and pv.dtype == torch.float32
    # SigLIP: (128 / 255 - 0.5) / 0.5; resizing a constant image keeps it constant.
    torch.testing.assert_close(pv, torch.full_like(pv, (128 / 255 - 0.5) / 0.5), atol=1e-6, rtol=0)


def test_fused_stacks_dino_then_siglip_channels(tokenizer):
    proc = OpenVLAProcessor(tokenizer, processor_config_for(True, 16))
    image = np.zeros((1, 16, 16, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 0, 128, 255
    pv = proc(image, ["reach"])["pixel_values"]
    assert pv.shape == (1, 6, 16, 16)
    x = np.array([0, 128, 255]) / 255
    expected = np.concatenate([(x - IMAGENET_MEAN) / IMAGENET_STD, (x - 0.5) / 0.5])
    np.testing.assert_allclose(pv[0, :, 5, 7].numpy(), expected, atol=1e-6)


def test_empty_token_flag_appends_once(tokenizer):
    cfg = ProcessorConfig(image_size=8, empty_token_id=5)
    proc = OpenVLAProcessor(tokenizer, cfg)
    ids, _ = proc.tokenize([build_prompt("reach"), build_prompt("reach") + " the"])
    assert ids[:, -1].tolist() == [5, 5]
    plain = tokenizer(build_prompt("reach"))["input_ids"]
    assert ids[0, -len(plain) - 1 : -1].tolist() == plain
    # A prompt already ending with the id (here ":", the last token of every prompt) is not extended.
    colon = OpenVLAProcessor(tokenizer, ProcessorConfig(image_size=8, empty_token_id=plain[-1]))
    assert colon.tokenize([build_prompt("reach")])[0][0].tolist() == plain

def test_save_and_load_round_trip(tokenizer, tmp_path):
    proc = OpenVLAProcessor(tokenizer, processor_config_for(True, 16, empty_token_id=3))
    proc.save_pretrained(tmp_path)
    loaded = OpenVLAProcessor.from_pretrained(tmp_path)
    assert loaded.config == proc.config
    images = np.random.default_rng(0).integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    a, b = proc(images, ["reach", "push the cube"]), loaded(images, ["reach", "push the cube"])
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_reads_openvlas_preprocessor_config(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    openvla_7b = {
        "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, 224, 224], [3, 224, 224]],
        "interpolations": ["bicubic", "bicubic"],
        "means": [list(IMAGENET_MEAN), [0.5, 0.5, 0.5]],
        "stds": [list(IMAGENET_STD), [0.5, 0.5, 0.5]],
        "use_fused_vision_backbone": True,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(openvla_7b))
    cfg = OpenVLAProcessor.from_pretrained(tmp_path).config
    assert cfg.image_size == 224 and cfg.interpolation == "bicubic"
    assert cfg.means[0] == list(IMAGENET_MEAN) and cfg.stds[1] == [0.5] * 3
    assert cfg.empty_token_id == LLAMA2_EMPTY_TOKEN_ID


def test_bad_inputs_are_rejected(tokenizer):
    proc = OpenVLAProcessor(tokenizer, processor_config_for(False, 8))
    with pytest.raises(TypeError, match="sequence of strings"):
        proc(np.zeros((1, 8, 8, 3), np.uint8), "reach")
    with pytest.raises(ValueError, match="uint8"):
        proc(np.zeros((1, 8, 8, 3), np.float32), ["reach"])
    with pytest.raises(ValueError, match="2 images but 1"):
        proc(np.zeros((2, 8, 8, 3), np.uint8), ["reach"])
