"""Load the published ``openvla/openvla-7b`` safetensors into transformers-native vision towers.

The released checkpoint stores its two vision towers as timm ``VisionTransformer`` weights and
its projector and Llama-2 already in transformers naming. This module renames (and where needed
splits or merges) the timm tensors into the parameter names of transformers'
``Dinov2WithRegistersModel`` / ``Dinov2Model`` and ``SiglipVisionModel``, checks that nothing is
dropped by accident, and streams the shards into a model tensor by tensor.

Facts this mapping relies on (reference, code written independently), openvla/openvla:

- ``prismatic/extern/hf/configuration_prismatic.py``: ``dinosiglip-vit-so-224px`` ->
  ``timm_model_ids = ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"]``,
  ``image_sizes = [224, 224]``, ``timm_override_act_layers = [None, None]``.
- ``prismatic/extern/hf/modeling_prismatic.py``: ``vision_backbone.featurizer`` is built from
  ``timm_model_ids[0]`` (**DINOv2**) and ``vision_backbone.fused_featurizer`` from
  ``timm_model_ids[1]`` (**SigLIP**); the first three ``pixel_values`` channels go to the
  featurizer; features are concatenated ``[featurizer, fused_featurizer]`` on the channel axis
  (so ``projector.fc1`` expects DINOv2's 1024 columns first); both towers return the patch
  tokens (prefix tokens removed, no final norm) of the second-to-last block
  (``get_intermediate_layers(n={depth - 2})``), so SigLIP's ``attn_pool`` head, both final
  ``norm`` layers and both last blocks never touch an action. timm's ``LayerScale.gamma`` is
  renamed to ``scale_factor`` before saving, so the published keys are ``ls1.scale_factor``.

timm (huggingface/pytorch-image-models, ``timm/models/vision_transformer.py``): ``Attention.qkv``
is one ``Linear(dim, 3 * dim)`` whose output rows are ``[q; k; v]`` (each head-major);
``vit_large_patch14_reg4_dinov2`` uses ``reg_tokens=4, no_embed_class=True`` so ``pos_embed``
covers the patches only and the class and register tokens get no position embedding; SigLIP
(``class_token=False, global_pool='map'``) has a patches-only ``pos_embed`` and an
``AttentionPoolLatent`` head (``timm/layers/attention_pool.py``) whose ``kv`` rows are ``[k; v]``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import Tensor, nn

logger = logging.getLogger(__name__)

INDEX_FILENAME = "model.safetensors.index.json"
SINGLE_FILENAME = "model.safetensors"

# Where OpenVLA keeps each part of the model; the vision slots hold timm weights.
FEATURIZER = "vision_backbone.featurizer."
FUSED_FEATURIZER = "vision_backbone.fused_featurizer."
PROJECTOR = "projector."
LANGUAGE_MODEL = "language_model."

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_PROJECTOR_KEY = re.compile(r"fc[123]\.(weight|bias)")
# Llama's rotary ``inv_freq`` is recomputed from the config; older transformers saved it.
_LM_DROPPED = re.compile(r".*\.rotary_emb\.inv_freq")


@dataclass(frozen=True)
class Rule:
    """How one target tensor is made: ``target = convert(*[state[s] for s in sources])``."""

    target: str
    sources: tuple[str, ...]
    convert: Callable[..., Tensor]


def _same(tensor: Tensor) -> Tensor:
    return tensor


def _qkv_part(index: int) -> Callable[[Tensor], Tensor]:
    """Row block ``index`` (0: q, 1: k, 2: v) of timm's fused qkv weight or bias."""

    def part(qkv: Tensor) -> Tensor:
        if qkv.shape[0] % 3:
            raise ValueError(f"fused qkv has {qkv.shape[0]} rows, not a multiple of 3")
        return qkv.chunk(3, dim=0)[index]

    return part


def _concat_rows(*tensors: Tensor) -> Tensor:
    return torch.cat(tensors, dim=0)


def _drop_batch_dim(pos_embed: Tensor) -> Tensor:
    # timm: Parameter (1, N, D); SigLIP: nn.Embedding weight (N, D).
    return pos_embed[0]


def _with_class_slot(pos_embed: Tensor) -> Tensor:
    """timm ``pos_embed`` -> HF DINOv2 ``position_embeddings`` (1, 1 + patches, D).

    HF always adds a position embedding to the CLS token (slot 0) and never to registers. timm
    models built with ``no_embed_class=True`` (all DINOv2-with-registers ids) store patches only
    (a square count) and add nothing to CLS, so a zero slot reproduces them exactly; models with
    ``no_embed_class=False`` already store ``1 + patches`` rows and pass through.
    """
    count = pos_embed.shape[1]
    if math.isqrt(count) ** 2 != count:
        return pos_embed
    zero = torch.zeros_like(pos_embed[:, :1])
    return torch.cat([zero, pos_embed], dim=1)


def _zero_mask_token(cls_token: Tensor) -> Tensor:
    # HF DINOv2 carries a (1, D) mask token used only with ``bool_masked_pos``; timm has none.
    # HF initialises it to zeros, so zeros it is.
    return torch.zeros_like(cls_token[0])


@dataclass(frozen=True)
class _TowerNames:
    """transformers names of the pieces a timm ViT tower is made of."""

    layer: str  # format string with {i}
    block: Mapping[str, str]  # timm block suffix (without .weight/.bias) -> HF suffix
    qkv: tuple[str, str, str]  # HF q, k, v projection names, relative to the layer
    top: Mapping[str, str]  # timm top-level module -> HF module


_SIGLIP = _TowerNames(
    layer="encoder.layers.{i}.",
    block={
        "norm1": "layer_norm1",
        "attn.proj": "self_attn.out_proj",
        "norm2": "layer_norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    },
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    top={"patch_embed.proj": "embeddings.patch_embedding", "norm": "post_layernorm"},
)

_DINOV2 = _TowerNames(
    layer="encoder.layer.{i}.",
    block={
        "norm1": "norm1",
        "attn.proj": "attention.o_proj",
        "norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        # timm's LayerScale: ``gamma`` upstream, ``scale_factor`` in the published checkpoint.
        "ls1.gamma": "layer_scale1.lambda1",
        "ls1.scale_factor": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
        "ls2.scale_factor": "layer_scale2.lambda1",
    },
    qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    top={"patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"},
)

# SigLIP ``attn_pool`` (timm AttentionPoolLatent) -> ``head`` (SiglipMultiheadAttentionPoolingHead).
_SIGLIP_HEAD = {
    "attn_pool.proj": "head.attention.out_proj",
    "attn_pool.norm": "head.layernorm",
    "attn_pool.mlp.fc1": "head.mlp.fc1",
    "attn_pool.mlp.fc2": "head.mlp.fc2",
}


def _split_param(name: str) -> tuple[str, str]:
    """``"a.b.weight"`` -> ``("a.b", "weight")``; a name without weight/bias -> ``(name, "")``."""
    module, _, leaf = name.rpartition(".")
    if leaf in ("weight", "bias"):
        return module, leaf
    return name, ""


def _join(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if leaf else module


def _unknown(key: str, tower: str) -> KeyError:
    return KeyError(
        f"checkpoint key {key!r} has no {tower} mapping; refusing to drop it silently. "
        "If it is a new timm variant, extend policies/openvla/checkpoint_mapping.py."
    )


def _plan_blocks(
    names: _TowerNames, key: str, local: str, prefix_out: str, tower: str
) -> list[Rule] | None:
    """Rules for one ``blocks.{i}.*`` key, or None when ``local`` is not a block key."""
    match = _BLOCK.fullmatch(local)
    if match is None:
        return None
    layer = prefix_out + names.layer.format(i=int(match.group(1)))
    module, leaf = _split_param(match.group(2))
    if module == "attn.qkv" and leaf:
        return [
            Rule(layer + _join(hf, leaf), (key,), _qkv_part(part))
            for part, hf in enumerate(names.qkv)
        ]
    if module in names.block:
        return [Rule(layer + _join(names.block[module], leaf), (key,), _same)]
    raise _unknown(key, tower)


def plan_siglip(
    keys: Iterable[str], prefix_in: str, prefix_out: str, *, head: bool = False
) -> tuple[list[Rule], list[str]]:
    """Rules mapping the timm SigLIP keys under ``prefix_in`` onto ``SiglipVisionModel`` names.

    Args:
        keys: All checkpoint keys; only those starting with ``prefix_in`` are used.
        prefix_in: timm tower prefix, e.g. ``"vision_backbone.fused_featurizer."``.
        prefix_out: Prefix of the ``SiglipVisionModel`` in the target model.
        head: Map timm's ``attn_pool`` onto the HF ``head`` (``vision_use_head=True``); when
            False those keys are returned as dropped (OpenVLA never uses the pooled output).

    Returns:
        The rules and the deliberately dropped checkpoint keys.

    Raises:
        KeyError: A key under ``prefix_in`` that has no SigLIP counterpart (named in the message).
    """
    tower = "SigLIP"
    local_keys = {key[len(prefix_in) :]: key for key in keys if key.startswith(prefix_in)}
    rules: list[Rule] = []
    dropped: list[str] = []
    for local, key in local_keys.items():
        block_rules = _plan_blocks(_SIGLIP, key, local, prefix_out, tower)
        if block_rules is not None:
            rules += block_rules
            continue
        module, leaf = _split_param(local)
        if local == "pos_embed":
            target = prefix_out + "embeddings.position_embedding.weight"
            rules.append(Rule(target, (key,), _drop_batch_dim))
        elif module in _SIGLIP.top:
            rules.append(Rule(prefix_out + _join(_SIGLIP.top[module], leaf), (key,), _same))
        elif local.startswith("attn_pool.") and not head:
            dropped.append(key)
        elif module in _SIGLIP_HEAD:
            rules.append(Rule(prefix_out + _join(_SIGLIP_HEAD[module], leaf), (key,), _same))
        elif local == "attn_pool.latent":
            rules.append(Rule(prefix_out + "head.probe", (key,), _same))
        elif module == "attn_pool.q" and leaf:
            # nn.MultiheadAttention packs [q; k; v]; timm keeps q and [k; v] apart.
            kv = f"{prefix_in}attn_pool.kv.{leaf}"
            if kv[len(prefix_in) :] not in local_keys:
                raise KeyError(f"checkpoint key {key!r} needs its partner {kv!r}, which is missing")
            target = f"{prefix_out}head.attention.in_proj_{leaf}"
            rules.append(Rule(target, (key, kv), _concat_rows))
        elif module == "attn_pool.kv" and leaf:
            if f"attn_pool.q.{leaf}" not in local_keys:
                raise KeyError(f"checkpoint key {key!r} has no attn_pool.q.{leaf} partner")
            continue  # consumed together with attn_pool.q
        else:
            raise _unknown(key, tower)
    return rules, dropped


def plan_dinov2(
    keys: Iterable[str], prefix_in: str, prefix_out: str
) -> tuple[list[Rule], list[str]]:
    """Rules mapping timm DINOv2 keys under ``prefix_in`` onto ``Dinov2(WithRegisters)Model`` names.

    A ``reg_token`` in the checkpoint maps to ``embeddings.register_tokens``, which only
    ``Dinov2WithRegistersModel`` has. ``embeddings.mask_token`` (absent in timm) is emitted as
    zeros. See ``_with_class_slot`` for the position-embedding convention.

    Returns:
        The rules and the deliberately dropped checkpoint keys (none for DINOv2 today).

    Raises:
        KeyError: A key under ``prefix_in`` that has no DINOv2 counterpart (named in the message).
    """
    tower = "DINOv2"
    rules: list[Rule] = []
    for key in keys:
        if not key.startswith(prefix_in):
            continue
        local = key[len(prefix_in) :]
        block_rules = _plan_blocks(_DINOV2, key, local, prefix_out, tower)
        if block_rules is not None:
            rules += block_rules
            continue
        module, leaf = _split_param(local)
        if local == "cls_token":
            rules.append(Rule(prefix_out + "embeddings.cls_token", (key,), _same))
            rules.append(Rule(prefix_out + "embeddings.mask_token", (key,), _zero_mask_token))
        elif local == "reg_token":
            rules.append(Rule(prefix_out + "embeddings.register_tokens", (key,), _same))
        elif local == "pos_embed":
            target = prefix_out + "embeddings.position_embeddings"
            rules.append(Rule(target, (key,), _with_class_slot))
        elif module in _DINOV2.top:
            rules.append(Rule(prefix_out + _join(_DINOV2.top[module], leaf), (key,), _same))
        else:
            raise _unknown(key, tower)
    return rules, []


def apply_rules(rules: Iterable[Rule], state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Run ``rules`` on an in-memory state dict."""
    return {rule.target: rule.convert(*(state[s] for s in rule.sources)) for rule in rules}


def timm_siglip_to_hf(
    state: Mapping[str, Tensor], prefix_in: str, prefix_out: str, *, head: bool = False
) -> tuple[dict[str, Tensor], list[str]]:
    """timm SigLIP tensors under ``prefix_in`` -> ``SiglipVisionModel`` tensors (``prefix_out``).

    Returns ``(mapped, dropped_keys)``; see ``plan_siglip`` for ``head`` and the errors.
    """
    rules, dropped = plan_siglip(state.keys(), prefix_in, prefix_out, head=head)
    return apply_rules(rules, state), dropped


def timm_dinov2_to_hf(
    state: Mapping[str, Tensor], prefix_in: str, prefix_out: str
) -> tuple[dict[str, Tensor], list[str]]:
    """timm DINOv2 tensors under ``prefix_in`` -> ``Dinov2(WithRegisters)Model`` tensors.

    Returns ``(mapped, dropped_keys)``; see ``plan_dinov2`` for the conventions and errors.
    """
    rules, dropped = plan_dinov2(state.keys(), prefix_in, prefix_out)
    return apply_rules(rules, state), dropped


def plan_openvla(
    keys: Iterable[str], *, siglip_head: bool = False
) -> tuple[list[Rule], list[str]]:
    """Rules for a whole OpenVLA checkpoint; vision slots keep their names, towers change naming.

    Each vision slot is identified by its content: a timm tower with a ``cls_token`` is DINOv2,
    one without is SigLIP (``class_token=False``). In ``openvla-7b`` that makes ``featurizer``
    DINOv2 and ``fused_featurizer`` SigLIP; the slot names stay because the pixel-channel order
    and the projector's input columns are tied to them.

    Raises:
        KeyError: Any key outside the known parts, or unknown inside one (named in the message).
    """
    keys = list(keys)
    rules: list[Rule] = []
    dropped: list[str] = []
    for slot in (FEATURIZER, FUSED_FEATURIZER):
        tower = [key for key in keys if key.startswith(slot)]
        if not tower:
            continue
        if slot + "cls_token" in tower:
            slot_rules, slot_dropped = plan_dinov2(tower, slot, slot)
        else:
            slot_rules, slot_dropped = plan_siglip(tower, slot, slot, head=siglip_head)
        rules += slot_rules
        dropped += slot_dropped
    for key in keys:
        if key.startswith((FEATURIZER, FUSED_FEATURIZER)):
            continue
        if key.startswith(PROJECTOR) and _PROJECTOR_KEY.fullmatch(key[len(PROJECTOR) :]):
            rules.append(Rule(key, (key,), _same))
        elif key.startswith(LANGUAGE_MODEL) and _LM_DROPPED.fullmatch(key):
            dropped.append(key)
        elif key.startswith(LANGUAGE_MODEL + "model.") or key == LANGUAGE_MODEL + "lm_head.weight":
            rules.append(Rule(key, (key,), _same))
        else:
            raise KeyError(
                f"checkpoint key {key!r} is not part of an OpenVLA model (expected "
                f"{FEATURIZER}*, {FUSED_FEATURIZER}*, {PROJECTOR}fc1|fc2|fc3.*, "
                f"{LANGUAGE_MODEL}model.* or {LANGUAGE_MODEL}lm_head.weight); refusing to drop it"
            )
    return rules, dropped


def map_openvla_state_dict(
    state: Mapping[str, Tensor], *, siglip_head: bool = False
) -> tuple[dict[str, Tensor], list[str]]:
    """Map a whole OpenVLA checkpoint's tensors to the transformers-native model's names.

    Args:
        state: Checkpoint tensors by published name.
        siglip_head: Keep SigLIP's ``attn_pool`` as the HF ``head`` instead of dropping it.

    Returns:
        ``(mapped, dropped)``: tensors by target name, and the checkpoint keys left out on
        purpose (SigLIP ``attn_pool.*`` unless ``siglip_head``; stale Llama ``inv_freq``).

    Raises:
        KeyError: A checkpoint key this mapping does not know (named in the message).
    """
    rules, dropped = plan_openvla(state.keys(), siglip_head=siglip_head)
    return apply_rules(rules, state), dropped


class _ShardedSafetensors:
    """Lazy reader over a safetensors checkpoint: one shard handle each, one tensor at a time."""

    def __init__(self, path: Path) -> None:
        index = path / INDEX_FILENAME
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (path / SINGLE_FILENAME).is_file():
            from safetensors import safe_open

            with safe_open(path / SINGLE_FILENAME, framework="pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), SINGLE_FILENAME)
        else:
            problem = f"no {INDEX_FILENAME} or {SINGLE_FILENAME}"
            raise FileNotFoundError(_where_to_put_weights(path, problem))
        missing = sorted({shard for shard in weight_map.values() if not (path / shard).is_file()})
        if missing:
            problem = f"shards missing: {', '.join(missing)}"
            raise FileNotFoundError(_where_to_put_weights(path, problem))
        self.path = path
        self.weight_map = weight_map
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}

    def __enter__(self) -> _ShardedSafetensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _handle(self, key: str):  # noqa: ANN202 - safetensors' handle type is not public
        from safetensors import safe_open

        shard = self.weight_map[key]
        if shard not in self._handles:
            handle = safe_open(self.path / shard, framework="pt")
            self._handles[shard] = self._stack.enter_context(handle)
        return self._handles[shard]

    def meta(self, key: str) -> Tensor:
        """A meta tensor with the stored shape and dtype (reads only the header)."""
        piece = self._handle(key).get_slice(key)
        dtype = _SAFETENSORS_DTYPES[piece.get_dtype()]
        return torch.empty(piece.get_shape(), dtype=dtype, device="meta")

    def get(self, key: str) -> Tensor:
        """The stored tensor, read from its shard."""
        return self._handle(key).get_tensor(key)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _where_to_put_weights(path: Path, problem: str) -> str:
    return (
        f"OpenVLA weights not found in {path} ({problem}). On a machine with network access run "
        f"`hf download openvla/openvla-7b --local-dir {path}` (or copy the "
        f"model-*.safetensors shards and {INDEX_FILENAME} there), then pass policy.path={path}."
    )


def _key_report(missing: list[str], unexpected: list[str], shown: int = 8) -> str:
    lines = []
    groups = (("missing in checkpoint", missing), ("unexpected (not in model)", unexpected))
    for label, keys in groups:
        if keys:
            more = f" ... and {len(keys) - shown} more" if len(keys) > shown else ""
            lines.append(f"{len(keys)} {label}: {', '.join(keys[:shown])}{more}")
    hint = ""
    registers = "embeddings.register_tokens"
    if FEATURIZER + registers in unexpected and FUSED_FEATURIZER + registers in missing:
        hint = (
            " The model puts DINOv2 at fused_featurizer; openvla-7b has DINOv2 at "
            "vision_backbone.featurizer (fed pixel channels 0:3, concatenated first) and SigLIP "
            "at vision_backbone.fused_featurizer."
        )
    return "; ".join(lines) + "." + hint


def load_openvla_checkpoint(
    path: str | Path, model: nn.Module, *, missing_ok: tuple[str, ...] = ()
) -> list[str]:
    """Stream an ``openvla-7b``-style safetensors checkpoint into ``model``, strictly.

    Reads ``model.safetensors.index.json`` (or a single ``model.safetensors``), plans the name
    mapping, checks names and shapes against ``model.state_dict()`` before reading any tensor
    data, then reads, converts and copies one tensor at a time (peak extra memory: one tensor).
    SigLIP's ``attn_pool`` is loaded iff the model's SigLIP tower has a ``head``.

    Args:
        path: Folder holding the checkpoint files.
        model: Module whose names follow the checkpoint (``vision_backbone.featurizer``, ...).
        missing_ok: Prefixes of model tensors the checkpoint does not hold and that keep their
            initial values (e.g. ``("value_head.",)`` for an RL value head). Every other model
            tensor must be loaded.

    Returns:
        The checkpoint keys deliberately not loaded.

    Raises:
        FileNotFoundError: The folder lacks the checkpoint files (the message says how to get them).
        ValueError: The model still has tensors on the meta device.
        KeyError: A checkpoint key has no known mapping.
        RuntimeError: Missing / unexpected keys or shape mismatches against ``model``.
    """
    path = Path(path).expanduser()
    targets = model.state_dict(keep_vars=True)
    on_meta = [name for name, tensor in targets.items() if tensor.is_meta]
    if on_meta:
        # copy_ into a meta tensor is a silent no-op; refuse rather than "load" nothing.
        raise ValueError(
            f"{len(on_meta)} model tensors are on the meta device (e.g. {on_meta[0]}); "
            "materialise the model first, e.g. model.to_empty(device='cpu')"
        )
    siglip_head = any(
        name.startswith((FEATURIZER + "head.", FUSED_FEATURIZER + "head.")) for name in targets
    )
    with _ShardedSafetensors(path) as reader:
        rules, dropped = plan_openvla(reader.weight_map, siglip_head=siglip_head)
        planned = {rule.target for rule in rules}
        missing = sorted(name for name in set(targets) - planned if not name.startswith(missing_ok))
        unexpected = sorted(planned - set(targets))
        if missing or unexpected:
            report = _key_report(missing, unexpected)
            raise RuntimeError(f"checkpoint {path} does not fit {type(model).__name__}: {report}")
        mismatched = []
        for rule in rules:
            shape = rule.convert(*(reader.meta(s) for s in rule.sources)).shape
            expected = targets[rule.target].shape
            if shape != expected:
                stored, wanted = tuple(shape), tuple(expected)
                mismatched.append(f"{rule.target}: {stored} stored, {wanted} in model")
        if mismatched:
            shown = "; ".join(mismatched[:8])
            raise RuntimeError(f"checkpoint {path}: {len(mismatched)} shape mismatches: {shown}")
        with torch.no_grad():
            for rule in rules:
                targets[rule.target].copy_(rule.convert(*(reader.get(s) for s in rule.sources)))
    if dropped:
        logger.info("OpenVLA checkpoint: %d keys deliberately left out: %s", len(dropped), dropped)
    return dropped
