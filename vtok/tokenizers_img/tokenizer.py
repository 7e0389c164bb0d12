"""``Tokenizer``: images ``[B, 3, H, W]`` ↔ an ordered 1D sequence of K discrete tokens, decodable from any prefix.

    tok = vtok.load_tokenizer("outputs/tokenizers/fsq_nested")
    ids = tok.tokenize(images, k=8)      # FSQ: int64 [B, 8]; binary: bool [B, 8, bits]
    rec = tok.detokenize(ids)            # [B, 3, H, W] in [0, 1]
    rec = tok.detokenize(ids, sampler="flow", steps=16, generator=g)   # models built with flow_head=True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vtok.images import patchify, unpatchify
from vtok.tokenizers_img.binary import BinaryQuantizer, BitEmbedding
from vtok.tokenizers_img.config import ModelConfig
from vtok.tokenizers_img.flow import FlowHead
from vtok.tokenizers_img.fsq import FSQ
from vtok.tokenizers_img.model import ResamplerDecoder, ResamplerEncoder
from vtok.tokenizers_img.selected import TokenSelection, decode_selection, select

FORMAT = "vtok-tokenizer"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


@dataclass
class TokenizerOutput:
    """Training forward result: ``recon`` like the input, ``penalty`` the binary confidence term (0 for FSQ),
    ``flow_loss`` the rectified-flow loss (None without a flow head)."""

    recon: Tensor
    penalty: Tensor
    flow_loss: Tensor | None = None


class Tokenizer(nn.Module):
    """1D resampler tokenizer for images (FlexTok-style registers, FSQ or binary tokens)."""

    kind = "image"

    def __init__(self, config: ModelConfig, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        if config.kind != self.kind:
            raise ValueError(f"{type(self).__name__} needs config.kind={self.kind!r}, got {config.kind!r}")
        self.config, self.meta = config, dict(meta or {})
        c = config
        self.encoder = ResamplerEncoder(c.patch_dim, c.n_patches, c.num_tokens, c.width, c.enc_depth, c.heads,
                                        c.mlp_ratio, c.code_dim)
        if c.quantizer == "fsq":
            self.quantizer: nn.Module = FSQ(c.fsq_levels)
            self.embed: nn.Module = nn.Linear(c.code_dim, c.width)
        else:
            self.quantizer = BinaryQuantizer(c.bits, c.tau)
            self.embed = BitEmbedding(c.bits, c.width)
        self.decoder = ResamplerDecoder(c.patch_dim, c.n_patches, c.num_tokens, c.width, c.dec_depth, c.heads,
                                        c.mlp_ratio)
        self.flow = FlowHead(c.patch_dim, c.width) if c.flow_head else None

    # ---- geometry (overridden by the video tokenizer) ----
    @property
    def input_shape(self) -> tuple[int, ...]:
        """Expected shape of one input without the batch dim."""
        return (3, self.config.image_size, self.config.image_size)

    def to_patches(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` → ``[B, N, patch_dim]``."""
        return patchify(x, self.config.patch_size)

    def from_patches(self, p: Tensor) -> Tensor:
        """``[B, N, patch_dim]`` → ``[B, 3, H, W]``."""
        _, h, w = self.config.grid
        return unpatchify(p, (h, w), self.config.patch_size)

    # ---- properties ----
    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def bits_per_token(self) -> float:
        """FSQ: ``log2(prod(levels))``; binary: ``bits``."""
        return self.config.bits_per_token

    @property
    def codebook_size(self) -> int | None:
        """Number of FSQ codes, or None for binary tokens."""
        return self.quantizer.codebook_size if isinstance(self.quantizer, FSQ) else None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- training forward ----
    def centred_patches(self, images: Tensor) -> Tensor:
        """Images in [0, 1] → patches ``[B, N, patch_dim]`` centred to [-1, 1] (what the encoder and flow head see)."""
        return self.to_patches(images) * 2.0 - 1.0

    def encode(self, images: Tensor, k: int | None = None) -> Tensor:
        """Pre-quantisation latents ``[B, k, code_dim]`` of the first ``k`` tokens."""
        return self.encoder(self.centred_patches(images), k)

    def forward(self, images: Tensor, keep: Tensor | None = None,
                generator: torch.Generator | None = None) -> TokenizerOutput:
        """Reconstruct ``images`` from their K tokens with the tokens where ``keep`` is False masked out.

        ``keep`` is ``[B, K]`` (one reconstruction, like ``images``) or ``[R, B, K]``: R reconstructions of the
        same quantised tokens, ``recon [R, B, ...]``, for a loss over several prefix lengths at one encoder cost.
        """
        patches = self.centred_patches(images)
        z = self.encoder(patches)
        if isinstance(self.quantizer, FSQ):
            q, _ = self.quantizer(z)
            penalty = z.new_zeros(())
        else:
            q, p = self.quantizer(z, generator)
            penalty = BinaryQuantizer.confidence_penalty(p)
        if keep is None:
            keep = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
        if keep.dim() not in (2, 3) or keep.shape[-2:] != z.shape[:2]:
            raise ValueError(f"keep must be [B, K] or [R, B, K] with B, K = {tuple(z.shape[:2])}, "
                             f"got {tuple(keep.shape)}")
        r = 1 if keep.dim() == 2 else keep.shape[0]
        feats = self.decoder.features(self.embed(q).repeat(r, 1, 1), keep.reshape(-1, keep.shape[-1]))
        recon = self.from_patches(self.decoder.head(feats))
        flow_loss = None
        if self.flow is not None:
            flow_loss = self.flow.loss(patches.repeat(r, 1, 1), feats, generator)
        return TokenizerOutput(recon if keep.dim() == 2 else recon.unflatten(0, (r, -1)), penalty, flow_loss)

    # ---- public API ----
    @torch.no_grad()
    def tokenize(self, images: Tensor, k: int | None = None, *, keep: Any = None, method: str | None = None,
                 **options: Any) -> Tensor | TokenSelection:
        """Images in [0, 1] → the first ``k`` tokens (default K): FSQ int64 ``[B, k]``, binary bool ``[B, k, bits]``.

        With ``keep`` (a ratio, a count, or one per image) and optionally ``method`` (default ``"prefix"``; any
        ``vtok.methods()`` name, e.g. ``"adaptive_length"``, ``"random"``, ``"tome"``) and its options, the tokens go
        through ``vtok.compress`` and a :class:`~vtok.tokenizers_img.selected.TokenSelection` comes back (a length
        per image; ``detokenize`` takes it)."""
        if keep is not None or method is not None:
            if k is not None:
                raise ValueError("pass either k (a prefix length) or keep= / method=, not both")
            if keep is None:
                raise ValueError(f"method={method!r} needs keep= (a ratio in (0, 1], a count, or one per image)")
            self._check_images(images)
            return select(self, images.to(self.device, torch.float32), keep, method or "prefix", **options)
        self._check_images(images)
        k = self._check_k(k)
        z = self.encode(images.to(self.device, torch.float32), k)
        if isinstance(self.quantizer, FSQ):
            return self.quantizer(z)[1]
        return z > 0  # sigmoid(z) > 0.5

    @torch.no_grad()
    def latents(self, images: Tensor) -> Tensor:
        """Images in [0, 1] → the quantised codes of all K tokens ``[B, K, code_dim]`` (float: FSQ codes in
        [-1, 1], binary bits in {0, 1}): the tokens to give ``vtok.compress``."""
        self._check_images(images)
        return self._ids_to_codes(self.tokenize(images))

    @torch.no_grad()
    def prefix_errors(self, images: Tensor, lengths: list[int] | None = None, codes: Tensor | None = None) -> Tensor:
        """Mean squared pixel error ``[B, K]`` of the reconstruction from the first ``j + 1`` tokens, for every
        ``j`` (``adaptive_length``'s ``prefix_error``). ``lengths`` (e.g. ``pow2_lengths(K)``): decode only those
        prefixes and interpolate linearly in between, a cheaper proxy (6 decodes instead of 32 at K = 32).
        ``codes``: ``latents(images)`` when already computed (saves encoding the images again)."""
        self._check_images(images)
        x = images.to(self.device, torch.float32)
        K = self.num_tokens
        ks = list(range(1, K + 1)) if lengths is None else sorted({self._check_k(int(v)) for v in lengths} | {K})
        codes = self.latents(x) if codes is None else codes.to(self.device)
        if codes.shape[:2] != (x.shape[0], K):
            raise ValueError(f"codes must be latents(images) of shape [{x.shape[0]}, {K}, ...], got "
                             f"{tuple(codes.shape)}")
        emb = self.embed(codes)
        out = torch.empty(x.shape[0], len(ks), device=self.device)
        for i, k in enumerate(ks):
            keep = (torch.arange(K, device=self.device) < k).expand(x.shape[0], -1)
            rec = self.from_patches(self.decoder.head(self.decoder.features(emb, keep))).clamp(0.0, 1.0)
            out[:, i] = (rec - x).pow(2).flatten(1).mean(1)
        if lengths is None:
            return out
        at = torch.tensor(ks, dtype=torch.float32, device=self.device)
        j = torch.arange(1, K + 1, dtype=torch.float32, device=self.device)
        hi = torch.searchsorted(at, j).clamp(max=len(ks) - 1)
        lo = (hi - 1).clamp(min=0)
        w = torch.where(at[hi] > at[lo], (j - at[lo]) / (at[hi] - at[lo]).clamp_min(1e-9), torch.zeros_like(j))
        w = torch.where(j <= at[0], torch.ones_like(j), w)
        lo = torch.where(j <= at[0], hi, lo)
        return out[:, lo] * (1 - w) + out[:, hi] * w

    @torch.no_grad()
    def detokenize(self, ids: Tensor | TokenSelection, sampler: str = "mean", steps: int = 16,
                   generator: torch.Generator | None = None) -> Tensor:
        """Any prefix of tokens (``1..K`` of them) → images in [0, 1], shaped like the tokenizer's input.

        ``sampler="mean"``: the deterministic (MSE) decoder. ``sampler="flow"`` (models built with
        ``flow_head=True``): a sample from the rectified-flow head, ``steps`` Euler steps from noise drawn with
        ``generator`` — sharper at short prefixes, different for every draw.
        """
        if sampler not in ("mean", "flow"):
            raise ValueError(f"sampler must be 'mean' or 'flow', got {sampler!r}")
        if isinstance(ids, TokenSelection):
            if sampler != "mean":
                raise ValueError("a TokenSelection decodes with sampler='mean' only")
            if ids.num_tokens != self.num_tokens:
                raise ValueError(f"ids is a selection of K={ids.num_tokens} tokens, this tokenizer has "
                                 f"K={self.num_tokens}")
            return decode_selection(self, ids)
        if sampler == "flow" and self.flow is None:
            raise ValueError("sampler='flow' needs a tokenizer built with ModelConfig(flow_head=True); this one "
                             "has only the deterministic decoder (use sampler='mean')")
        codes = self._ids_to_codes(ids)
        b, k = codes.shape[:2]
        emb = torch.zeros(b, self.num_tokens, self.config.width, device=self.device)
        emb[:, :k] = self.embed(codes)
        keep = (torch.arange(self.num_tokens, device=self.device) < k).expand(b, -1)
        feats = self.decoder.features(emb, keep)
        if sampler == "mean":
            return self.from_patches(self.decoder.head(feats)).clamp(0.0, 1.0)
        patches = self.flow.sample(feats, self.config.patch_dim, steps, generator)
        return self.from_patches((patches + 1.0) / 2.0).clamp(0.0, 1.0)

    def reconstruct(self, images: Tensor, k: int | None = None) -> Tensor:
        """``detokenize(tokenize(images, k))``."""
        return self.detokenize(self.tokenize(images, k))

    # ---- checks ----
    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor in [0, 1], got dtype {images.dtype}")
        want = self.input_shape
        if images.dim() != len(want) + 1 or tuple(images.shape[1:]) != want or images.shape[0] < 1:
            names = "[B, 3, T, H, W]" if len(want) == 4 else "[B, 3, H, W]"
            raise ValueError(f"images must be {names} with (3, …) = {want} per sample, got shape "
                             f"{list(images.shape)}")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"images must have values in [0, 1], got range [{lo:.3g}, {hi:.3g}]")

    def _check_k(self, k: int | None) -> int:
        if k is None:
            return self.num_tokens
        if isinstance(k, Tensor) and k.numel() == 1:
            k = int(k)
        if not isinstance(k, int) or isinstance(k, bool):
            raise TypeError(f"k must be an int in 1..{self.num_tokens} or None, got {type(k).__name__}")
        if not 1 <= k <= self.num_tokens:
            raise ValueError(f"k must be in 1..{self.num_tokens} (K), got {k}")
        return k

    def _ids_to_codes(self, ids: Tensor) -> Tensor:
        """Validated ids → float codes ``[B, k, code_dim]`` on the model's device."""
        if not isinstance(ids, Tensor):
            raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
        K = self.num_tokens
        if isinstance(self.quantizer, FSQ):
            if ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
                raise TypeError(f"FSQ ids must be an integer tensor [B, k], got dtype {ids.dtype}")
            if ids.dim() != 2 or ids.shape[0] < 1 or not 1 <= ids.shape[1] <= K:
                raise ValueError(f"FSQ ids must be [B, k] with k in 1..{K}, got shape {list(ids.shape)}")
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"ids must be in [0, {self.codebook_size}) (codebook size), got range [{lo}, {hi}]")
            return self.quantizer.indices_to_codes(ids.to(self.device))
        bits = self.config.bits
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"binary ids must be a bool tensor [B, k, {bits}], got dtype {ids.dtype}")
        if ids.dim() != 3 or ids.shape[0] < 1 or not 1 <= ids.shape[1] <= K:
            raise ValueError(f"binary ids must be [B, k, {bits}] with k in 1..{K}, got shape {list(ids.shape)}")
        if ids.shape[2] != bits:
            raise ValueError(f"binary ids must have bits={bits} per token (last dim), got {ids.shape[2]}")
        if ids.dtype != torch.bool and (int(ids.min()) < 0 or int(ids.max()) > 1):
            raise ValueError("binary ids must hold only 0 and 1")
        return ids.to(self.device, torch.float32)

    # ---- persistence ----
    def save(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into folder ``path`` (atomically, file by file)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = path / (WEIGHTS_FILE + ".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, path / WEIGHTS_FILE)
        doc = {"format": FORMAT, "version": 1, "model": self.config.to_dict(), "meta": self.meta}
        atomic_write_text(path / CONFIG_FILE, json.dumps(doc, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a folder written by :meth:`save` (image or video tokenizer, chosen by the config)."""
        from vtok.tokenizers_img.hub import load_folder

        return load_folder(path)

    def load_weights(self, path: str | Path) -> None:
        self.load_state_dict(load_file(str(Path(path) / WEIGHTS_FILE)))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
