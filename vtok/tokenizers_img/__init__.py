"""1D ordered image tokenizers: FlexTok-style causal registers, FSQ or binary tokens, nested / tail dropout.

    tok = vtok.load_tokenizer("outputs/tokenizers/fsq_nested")   # or a committed checkpoint name
    ids = tok.tokenize(images, k=8)                               # images [B, 3, H, W] in [0, 1]
    rec = tok.detokenize(ids)                                     # any prefix length 1..K
"""

from vtok.tokenizers_img.binary import BinaryQuantizer, BitEmbedding
from vtok.tokenizers_img.config import ModelConfig, RunConfig, TrainConfig
from vtok.tokenizers_img.fsq import FSQ
from vtok.tokenizers_img.hub import CHECKPOINT_DIR, available_tokenizers, load_tokenizer
from vtok.tokenizers_img.length import pow2_lengths, prefix_mask, sample_lengths
from vtok.tokenizers_img.masks import register_attention_mask
from vtok.tokenizers_img.tokenizer import Tokenizer
from vtok.tokenizers_img.video import VideoTokenizer

__all__ = ["CHECKPOINT_DIR", "FSQ", "BinaryQuantizer", "BitEmbedding", "ModelConfig", "RunConfig", "TrainConfig",
           "Tokenizer", "VideoTokenizer", "available_tokenizers", "load_tokenizer", "pow2_lengths", "prefix_mask",
           "register_attention_mask", "sample_lengths"]
