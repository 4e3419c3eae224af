"""Tiny OpenVLA: structure, save/load, batched KV-cached masked generation, teacher forcing."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers import Dinov2WithRegistersModel, LlamaForCausalLM, SiglipVisionModel

from rlplat.policies.openvla.modeling import (
    OpenVLAForActionPrediction,
    build_tiny_openvla,
    load_openvla,
)

torch.set_num_threads(1)

INSTRUCTIONS = [
    "reach",
    "push the red cube",
    "put the green ball in the blue bowl on the left",
    "open the drawer",
]


def _inputs(processor, n=4, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (n, 40, 40, 3), dtype=np.uint8)
    return processor(images, INSTRUCTIONS[:n])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_openvla(tmp_path_factory.mktemp("tiny"), action_dim=7, seed=0)
    return (path, *load_openvla(path))


@pytest.fixture(scope="module")
def tiny_fused(tmp_path_factory):
    path = build_tiny_openvla(tmp_path_factory.mktemp("fused"), fused=True, value_head=True, seed=1)
    return (path, *load_openvla(path))


def test_module_names_and_projector_shapes(tiny, tiny_fused):
    _, model, _, _ = tiny
    assert isinstance(model.vision_backbone.featurizer, SiglipVisionModel)
    assert not hasattr(model.vision_backbone, "fused_featurizer")
    assert isinstance(model.language_model, LlamaForCausalLM)
    p = model.projector
    assert (p.fc1.in_features, p.fc1.out_features, p.fc2.out_features) == (32, 64, 64)
    assert not hasattr(p, "fc3")

    _, fused, processor, _ = tiny_fused
    # OpenVLA's dinosiglip order: featurizer = DINOv2, fused_featurizer = SigLIP.
    assert isinstance(fused.vision_backbone.featurizer, Dinov2WithRegistersModel)
    assert isinstance(fused.vision_backbone.fused_featurizer, SiglipVisionModel)
    p = fused.projector
    assert (p.fc1.in_features, p.fc1.out_features) == (64, 256)
    assert (p.fc2.in_features, p.fc2.out_features, p.fc3.out_features) == (256, 64, 64)
    names = {n for n, _ in fused.named_parameters()}
    assert {"projector.fc3.weight", "value_head.weight", "language_model.lm_head.weight"} <= names


def test_fused_model_runs_on_six_channels(tiny_fused):
    _, model, processor, act_tok = tiny_fused
    inputs = _inputs(processor, n=2)
    assert inputs["pixel_values"].shape == (2, 6, 32, 32)
    ids, logprobs = model.generate_actions(**inputs, action_tokenizer=act_tok)
    assert ids.shape == logprobs.shape == (2, 7)
    # 16 patches per backbone, concatenated along features -> 16 tokens inserted.
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1] + 16


def test_save_and_reload_gives_identical_outputs(tiny, tmp_path):
    _, model, processor, act_tok = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again, processor2, act_tok2 = load_openvla(tmp_path)
    assert act_tok2.action_token_range == act_tok.action_token_range
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    inputs = _inputs(processor)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**_inputs(processor2)).logits)
    assert again.config.norm_stats == model.config.norm_stats


def test_batched_generation_equals_one_at_a_time(tiny):
    _, model, processor, act_tok = tiny
    batch = _inputs(processor)
    assert (batch["attention_mask"] == 0).any(), "the instructions must need left padding"
    ids, logprobs = model.generate_actions(**batch, action_tokenizer=act_tok)
    for i in range(4):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        # Drop this row's padding so it runs exactly as an unpadded batch of one.
        keep = one["attention_mask"][0].bool()
        one["input_ids"], one["attention_mask"] = one["input_ids"][:, keep], one["attention_mask"][:, keep]
        ids_i, logprobs_i = model.generate_actions(**one, action_tokenizer=act_tok)
        assert torch.equal(ids_i[0], ids[i])
        torch.testing.assert_close(logprobs_i[0], logprobs[i], atol=1e-5, rtol=0)


def test_kv_cached_generation_equals_recompute_without_cache(tiny):
    _, model, processor, act_tok = tiny
    batch = _inputs(processor)
    ids, logprobs = model.generate_actions(**batch, action_tokenizer=act_tok)
    low, high = act_tok.action_token_range
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        for d in range(7):
            logits = model(input_ids, mask, batch["pixel_values"]).logits[:, -1, low : high + 1]
            log_p = torch.log_softmax(logits.float(), dim=-1)
            choice = log_p.argmax(-1)
            assert torch.equal(choice + low, ids[:, d])
            torch.testing.assert_close(log_p.gather(-1, choice[:, None])[:, 0], logprobs[:, d], atol=1e-5, rtol=0)
            input_ids = torch.cat([input_ids, ids[:, d : d + 1]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)


def test_generation_is_masked_to_action_ids(tiny):
    path, _, processor, act_tok = tiny
    model, _, _ = load_openvla(path)  # a private copy: the head is edited below
    batch = _inputs(processor)
    before, logprobs_before = model.generate_actions(**batch, action_tokenizer=act_tok)
    # Make every position prefer a text token by a wide margin (a biased copy of the LM head).
    text_id = 5
    head = model.language_model.lm_head
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[text_id] = 100.0
    model.language_model.lm_head = biased
    with torch.no_grad():
        assert (model(**batch).logits[:, -1].argmax(-1) == text_id).all()
    low, high = act_tok.action_token_range
    for do_sample in (False, True):
        ids, _ = model.generate_actions(
            **batch, action_tokenizer=act_tok, do_sample=do_sample, generator=torch.Generator().manual_seed(0)
        )
        assert ((ids >= low) & (ids <= high)).all()
    # The text logit is excluded, so the greedy actions and their log-probs are unchanged.
    ids, logprobs = model.generate_actions(**batch, action_tokenizer=act_tok)
    assert torch.equal(ids, before)
    torch.testing.assert_close(logprobs, logprobs_before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("do_sample", [False, True])
def test_evaluate_actions_matches_generation(tiny, do_sample):
    _, model, processor, act_tok = tiny
    batch = _inputs(processor)
    gen = torch.Generator().manual_seed(3)
    ids, logprobs = model.generate_actions(**batch, action_tokenizer=act_tok, do_sample=do_sample, generator=gen)
    out = model.evaluate_actions(**batch, action_token_ids=ids, action_tokenizer=act_tok)
    torch.testing.assert_close(out["token_logprobs"], logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["action_logprob"], logprobs.sum(-1), atol=1e-5, rtol=0)
    assert out["entropy"].shape == (4,)
    assert ((out["entropy"] >= 0) & (out["entropy"] <= math.log(256) + 1e-5)).all()
    assert out["hidden"].shape == (4, 64)
    assert "values" not in out
    out["action_logprob"].sum().backward()
    assert model.projector.fc1.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_sampling_is_reproducible_with_a_generator(tiny):
    _, model, processor, act_tok = tiny
    batch = _inputs(processor)
    a, _ = model.generate_actions(**batch, action_tokenizer=act_tok, do_sample=True,
                                  generator=torch.Generator().manual_seed(7))
    b, _ = model.generate_actions(**batch, action_tokenizer=act_tok, do_sample=True,
                                  generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_value_head_follows_config(tiny, tiny_fused):
    _, model, _, _ = tiny
    assert not hasattr(model, "value_head")
    _, fused, processor, act_tok = tiny_fused
    assert isinstance(fused.value_head, nn.Linear) and fused.value_head.out_features == 1
    batch = _inputs(processor, n=3)
    ids, logprobs = fused.generate_actions(**batch, action_tokenizer=act_tok)
    out = fused.evaluate_actions(**batch, action_token_ids=ids, action_tokenizer=act_tok)
    assert out["values"].shape == (3,)
    torch.testing.assert_close(out["values"], fused.value_head(out["hidden"]).squeeze(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["token_logprobs"], logprobs, atol=1e-5, rtol=0)


def test_forward_with_labels_ignores_patches(tiny):
    _, model, processor, _ = tiny
    batch = _inputs(processor, n=2)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)


def test_right_padding_is_rejected(tiny):
    _, model, processor, act_tok = tiny
    batch = _inputs(processor, n=2)
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        model.generate_actions(**batch, action_tokenizer=act_tok)


def test_action_tokenizer_covers_the_tokenizer_tail(tiny):
    _, model, processor, act_tok = tiny
    n = len(processor.tokenizer)
    assert model.config.text_config.vocab_size == n
    assert act_tok.action_token_range == (n - 256, n - 1)
    assert isinstance(model, OpenVLAForActionPrediction) and not model.training


def test_patches_follow_each_rows_bos_and_positions_start_there(tiny):
    _, model, processor, _ = tiny
    batch = _inputs(processor, n=2)
    mask = batch["attention_mask"]
    with torch.no_grad():
        prompt = model.embed_prompt(**batch)
        patches = model.projector(model.vision_backbone(batch["pixel_values"]))
        text = model.get_input_embeddings()(batch["input_ids"])
    n_patches = patches.shape[1]
    for b in range(2):
        k = int((mask[b] == 0).sum())  # left pads of this row; its BOS sits at k
        assert torch.equal(prompt.embeds[b, k], text[b, k])
        assert torch.equal(prompt.embeds[b, k + 1 : k + 1 + n_patches], patches[b])
        assert torch.equal(prompt.embeds[b, k + 1 + n_patches :], text[b, k + 1 :])
        assert prompt.attention_mask[b].tolist() == [0] * k + [1] * (prompt.embeds.shape[1] - k)
        assert prompt.position_ids[b, k:].tolist() == list(range(prompt.embeds.shape[1] - k))
