"""timm-named OpenVLA vision weights -> transformers towers: names, shapes, numbers, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from rlplat.policies.openvla.checkpoint_mapping import (
    FEATURIZER,
    FUSED_FEATURIZER,
    INDEX_FILENAME,
    load_openvla_checkpoint,
    map_openvla_state_dict,
    timm_dinov2_to_hf,
    timm_siglip_to_hf,
)

# A tiny ViT: 8x8 images, 4x4 patches -> 4 patch tokens of width 16, 2 heads, 2 blocks.
DEPTH, DIM, HEADS, PATCH, IMG = 2, 16, 2, 4, 8
SIGLIP_MLP = 24  # SigLIP-So400m's mlp_ratio is not 4 (1152 -> 4304); keep it non-4 here too.
REGISTERS = 2
LM_DIM = 16


def make_timm_vit_state(
    depth: int,
    dim: int,
    heads: int,
    patch: int,
    img: int,
    registers: int,
    layerscale: str | None,
    *,
    class_token: bool,
    no_embed_class: bool,
    mlp_hidden: int,
    attn_pool: bool = False,
    prefix: str = "",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random weights named and shaped like timm's ``VisionTransformer.state_dict()``.

    ``layerscale`` is the LayerScale parameter name (``"gamma"`` upstream, ``"scale_factor"``
    in openvla-7b) or None for no LayerScale. ``heads`` does not change any shape (timm's qkv is
    fused); it is kept so the call reads like the timm constructor.
    """
    del heads
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.3

    def linear(name: str, out_features: int, in_features: int) -> None:
        state[f"{name}.weight"] = rand(out_features, in_features)
        state[f"{name}.bias"] = rand(out_features)

    def norm(name: str) -> None:
        state[f"{name}.weight"] = 1 + rand(dim)
        state[f"{name}.bias"] = rand(dim)

    patches = (img // patch) ** 2
    prefix_tokens = int(class_token) + registers
    state: dict[str, torch.Tensor] = {}
    if class_token:
        state["cls_token"] = rand(1, 1, dim)
    if registers:
        state["reg_token"] = rand(1, registers, dim)
    state["pos_embed"] = rand(1, patches if no_embed_class else patches + prefix_tokens, dim)
    state["patch_embed.proj.weight"] = rand(dim, 3, patch, patch)
    state["patch_embed.proj.bias"] = rand(dim)
    for i in range(depth):
        block = f"blocks.{i}"
        norm(f"{block}.norm1")
        linear(f"{block}.attn.qkv", 3 * dim, dim)
        linear(f"{block}.attn.proj", dim, dim)
        norm(f"{block}.norm2")
        linear(f"{block}.mlp.fc1", mlp_hidden, dim)
        linear(f"{block}.mlp.fc2", dim, mlp_hidden)
        if layerscale:
            state[f"{block}.ls1.{layerscale}"] = rand(dim)
            state[f"{block}.ls2.{layerscale}"] = rand(dim)
    norm("norm")
    if attn_pool:
        state["attn_pool.latent"] = rand(1, 1, dim)
        linear("attn_pool.q", dim, dim)
        linear("attn_pool.kv", 2 * dim, dim)
        linear("attn_pool.proj", dim, dim)
        norm("attn_pool.norm")
        linear("attn_pool.mlp.fc1", mlp_hidden, dim)
        linear("attn_pool.mlp.fc2", dim, mlp_hidden)
    return {prefix + name: tensor for name, tensor in state.items()}


def siglip_state(prefix: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    """Like ``vit_so400m_patch14_siglip_224``: no class token, patches-only pos_embed, attn_pool."""
    return make_timm_vit_state(
        DEPTH, DIM, HEADS, PATCH, IMG, 0, None, class_token=False, no_embed_class=False,
        mlp_hidden=SIGLIP_MLP, attn_pool=True, prefix=prefix, seed=seed,
    )  # fmt: skip


def dinov2_state(
    registers: int = REGISTERS, layerscale: str = "scale_factor", prefix: str = "", seed: int = 1
) -> dict[str, torch.Tensor]:
    """Like ``vit_large_patch14_reg4_dinov2`` (registers -> no_embed_class) or plain DINOv2."""
    return make_timm_vit_state(
        DEPTH, DIM, HEADS, PATCH, IMG, registers, layerscale, class_token=True,
        no_embed_class=registers > 0, mlp_hidden=4 * DIM, prefix=prefix, seed=seed,
    )  # fmt: skip


def siglip_model(head: bool) -> SiglipVisionModel:
    # hidden_act="gelu": timm's SigLIP uses exact nn.GELU, not transformers' default tanh GELU.
    config = SiglipVisionConfig(
        hidden_size=DIM, intermediate_size=SIGLIP_MLP, num_hidden_layers=DEPTH,
        num_attention_heads=HEADS, image_size=IMG, patch_size=PATCH, hidden_act="gelu",
        vision_use_head=head,
    )  # fmt: skip
    return SiglipVisionModel(config).eval()


def dinov2_model(registers: int) -> nn.Module:
    common = dict(
        hidden_size=DIM, mlp_ratio=4, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        image_size=IMG, patch_size=PATCH,
    )  # fmt: skip
    if registers:
        config = Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        return Dinov2WithRegistersModel(config).eval()
    return Dinov2Model(Dinov2Config(**common)).eval()


def timm_reference(state: dict[str, torch.Tensor], image: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states after the embeddings and after each block, computed the way timm does."""

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (DIM,), state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6)

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])

    patch_weight, patch_bias = state["patch_embed.proj.weight"], state["patch_embed.proj.bias"]
    x = F.conv2d(image, patch_weight, patch_bias, stride=PATCH).flatten(2).transpose(1, 2)
    batch = len(image)
    prefix = [state[k].expand(batch, -1, -1) for k in ("cls_token", "reg_token") if k in state]
    if state["pos_embed"].shape[1] == x.shape[1]:  # no_embed_class: prefix tokens get no position
        x = torch.cat([*prefix, x + state["pos_embed"]], dim=1)
    else:
        x = torch.cat([*prefix, x], dim=1) + state["pos_embed"]
    hidden = [x]
    tokens, head_dim = x.shape[1], DIM // HEADS
    for i in range(DEPTH):
        b = f"blocks.{i}"
        qkv = linear(layer_norm(x, f"{b}.norm1"), f"{b}.attn.qkv")
        q, k, v = qkv.reshape(batch, tokens, 3, HEADS, head_dim).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * head_dim**-0.5).softmax(-1) @ v
        attn = linear(attn.transpose(1, 2).reshape(batch, tokens, DIM), f"{b}.attn.proj")
        x = x + attn * state.get(f"{b}.ls1.scale_factor", state.get(f"{b}.ls1.gamma", 1.0))
        mlp = linear(F.gelu(linear(layer_norm(x, f"{b}.norm2"), f"{b}.mlp.fc1")), f"{b}.mlp.fc2")
        x = x + mlp * state.get(f"{b}.ls2.scale_factor", state.get(f"{b}.ls2.gamma", 1.0))
        hidden.append(x)
    return hidden


def timm_attn_pool_reference(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """timm's final ``norm`` then ``AttentionPoolLatent`` (pool_type='token')."""

    def linear(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(t, state[f"{name}.weight"], state[f"{name}.bias"])

    x = F.layer_norm(x, (DIM,), state["norm.weight"], state["norm.bias"], eps=1e-6)
    batch, tokens, head_dim = x.shape[0], x.shape[1], DIM // HEADS
    q = linear(state["attn_pool.latent"].expand(batch, -1, -1), "attn_pool.q")
    q = q.reshape(batch, 1, HEADS, head_dim).transpose(1, 2)
    kv = linear(x, "attn_pool.kv").reshape(batch, tokens, 2, HEADS, head_dim)
    k, v = kv.permute(2, 0, 3, 1, 4)
    out = ((q @ k.transpose(-2, -1)) * head_dim**-0.5).softmax(-1) @ v
    out = linear(out.transpose(1, 2).reshape(batch, 1, DIM), "attn_pool.proj")
    norm_weight, norm_bias = state["attn_pool.norm.weight"], state["attn_pool.norm.bias"]
    normed = F.layer_norm(out, (DIM,), norm_weight, norm_bias, eps=1e-6)
    out = out + linear(F.gelu(linear(normed, "attn_pool.mlp.fc1")), "attn_pool.mlp.fc2")
    return out[:, 0]


def assert_loads_strictly(model: nn.Module, mapped: dict[str, torch.Tensor]) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in mapped.items()} == expected
    model.load_state_dict(mapped, strict=True)


@pytest.mark.parametrize("head", [False, True])
def test_siglip_maps_every_key_onto_transformers_names(head: bool) -> None:
    state = siglip_state(prefix="tower.")
    mapped, dropped = timm_siglip_to_hf(state, "tower.", "", head=head)
    assert_loads_strictly(siglip_model(head), mapped)
    pool_keys = sorted(k for k in state if k.startswith("tower.attn_pool."))
    assert sorted(dropped) == ([] if head else pool_keys)


@pytest.mark.parametrize("registers", [REGISTERS, 0])
def test_dinov2_maps_every_key_onto_transformers_names(registers: int) -> None:
    mapped, dropped = timm_dinov2_to_hf(dinov2_state(registers), "", "")
    assert_loads_strictly(dinov2_model(registers), mapped)
    assert dropped == []
    assert torch.equal(mapped["embeddings.mask_token"], torch.zeros(1, DIM))


def test_siglip_hidden_states_and_pool_match_timm_reference() -> None:
    state = siglip_state()
    model = siglip_model(head=True)
    model.load_state_dict(timm_siglip_to_hf(state, "", "", head=True)[0], strict=True)
    image = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(image, output_hidden_states=True)
        reference = timm_reference(state, image)
        pooled = timm_attn_pool_reference(state, reference[-1])
    assert len(out.hidden_states) == len(reference) == DEPTH + 1
    for ours, theirs in zip(out.hidden_states, reference, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("registers", "layerscale"), [(REGISTERS, "scale_factor"), (0, "gamma")])
def test_dinov2_hidden_states_match_timm_reference(registers: int, layerscale: str) -> None:
    state = dinov2_state(registers, layerscale)
    model = dinov2_model(registers)
    model.load_state_dict(timm_dinov2_to_hf(state, "", "")[0], strict=True)
    image = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(image, output_hidden_states=True)
        reference = timm_reference(state, image)
    # Same token order in both: [CLS, registers..., patches...].
    assert out.hidden_states[0].shape == (2, 1 + registers + (IMG // PATCH) ** 2, DIM)
    for ours, theirs in zip(out.hidden_states, reference, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "key",
    [
        FEATURIZER + "blocks.0.attn.q_norm.weight",
        FUSED_FEATURIZER + "norm_pre.weight",
        "projector.fc4.weight",
        "language_model.extra.weight",
        "vision_backbone.third_featurizer.pos_embed",
    ],
)
def test_unknown_key_raises_naming_it(key: str) -> None:
    state = {**dinov2_state(prefix=FEATURIZER), **siglip_state(prefix=FUSED_FEATURIZER)}
    state[key] = torch.zeros(DIM)
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        map_openvla_state_dict(state)


def tiny_openvla(dino_slot: str = "featurizer") -> nn.Module:
    """Module tree named like the real model: DINOv2 in ``featurizer``, SigLIP fused."""
    siglip_slot = "fused_featurizer" if dino_slot == "featurizer" else "featurizer"
    root = nn.Module()
    root.vision_backbone = nn.Module()
    setattr(root.vision_backbone, dino_slot, dinov2_model(REGISTERS))
    setattr(root.vision_backbone, siglip_slot, siglip_model(head=False))
    root.projector = nn.Module()
    root.projector.fc1 = nn.Linear(2 * DIM, 8 * DIM)
    root.projector.fc2 = nn.Linear(8 * DIM, LM_DIM)
    root.projector.fc3 = nn.Linear(LM_DIM, LM_DIM)
    llama = LlamaConfig(
        vocab_size=64, hidden_size=LM_DIM, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    root.language_model = LlamaForCausalLM(llama)
    return root


def write_two_shards(path: Path, state: dict[str, torch.Tensor]) -> None:
    """bf16 shards (as published) with keys interleaved, so towers straddle both files."""
    names = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k].to(torch.bfloat16).contiguous() for k in keys}, str(path / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    (path / INDEX_FILENAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def openvla_checkpoint_state() -> dict[str, torch.Tensor]:
    """The published layout: timm towers, then projector and Llama under their HF names."""
    torch.manual_seed(4)
    source = tiny_openvla()
    parts = ("projector.", "language_model.")
    passthrough = {k: v for k, v in source.state_dict().items() if k.startswith(parts)}
    return {
        **dinov2_state(prefix=FEATURIZER),
        **siglip_state(prefix=FUSED_FEATURIZER),
        **passthrough,
    }


def test_two_shard_checkpoint_streams_into_model(tmp_path: Path) -> None:
    state = openvla_checkpoint_state()
    write_two_shards(tmp_path, state)
    model = tiny_openvla()
    dropped = load_openvla_checkpoint(tmp_path, model)

    assert sorted(dropped) == sorted(k for k in state if ".attn_pool." in k)
    expected, _ = map_openvla_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()})
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor.float(), atol=0, rtol=0, msg=name)


def test_extra_model_tensors_must_be_named_to_stay_initialised(tmp_path: Path) -> None:
    write_two_shards(tmp_path, openvla_checkpoint_state())
    model = tiny_openvla()
    model.value_head = nn.Linear(LM_DIM, 1)
    expected = r"2 missing in checkpoint: value_head\.bias, value_head\.weight"
    with pytest.raises(RuntimeError, match=expected):
        load_openvla_checkpoint(tmp_path, model)
    before = model.value_head.weight.clone()
    load_openvla_checkpoint(tmp_path, model, missing_ok=("value_head.",))
    assert torch.equal(model.value_head.weight, before)


def test_checkpoint_with_swapped_towers_is_refused_with_a_hint(tmp_path: Path) -> None:
    write_two_shards(tmp_path, openvla_checkpoint_state())
    with pytest.raises(RuntimeError, match="DINOv2 at vision_backbone.featurizer"):
        load_openvla_checkpoint(tmp_path, tiny_openvla(dino_slot="fused_featurizer"))


def test_shape_mismatch_is_refused_before_reading_data(tmp_path: Path) -> None:
    write_two_shards(tmp_path, openvla_checkpoint_state())
    model = tiny_openvla()
    model.projector.fc3 = nn.Linear(LM_DIM, LM_DIM + 1)
    before = model.language_model.lm_head.weight.clone()
    expected = r"projector\.fc3\.weight: \(16, 16\) stored, \(17, 16\) in model"
    with pytest.raises(RuntimeError, match=expected):
        load_openvla_checkpoint(tmp_path, model)
    assert torch.equal(model.language_model.lm_head.weight, before)


def test_meta_model_is_refused(tmp_path: Path) -> None:
    write_two_shards(tmp_path, openvla_checkpoint_state())
    with torch.device("meta"):
        model = tiny_openvla()
    with pytest.raises(ValueError, match="meta device"):
        load_openvla_checkpoint(tmp_path, model)


def test_missing_weights_say_where_to_put_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="hf download openvla/openvla-7b"):
        load_openvla_checkpoint(tmp_path / "openvla-7b", nn.Module())
