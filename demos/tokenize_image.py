"""Tokenize a held-out photo into an ordered 1D token sequence and rebuild it from the first k tokens.

    python demos/tokenize_image.py                          # first committed checkpoint, else random init
    python demos/tokenize_image.py --checkpoint outputs/tokenizers/fsq_nested --photo chelsea
"""

import argparse

import torch

import vtok
from vtok.images import psnr
from vtok.tokenizers_img import ModelConfig, Tokenizer, available_tokenizers, pow2_lengths
from vtok.tokenizers_img.data import center_square, skimage_photos
from vtok.tokenizers_img.demo import reconstruction_grid


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a saved folder or committed name (default: first committed)")
    p.add_argument("--photo", default="coffee", help="a scikit-image photo (coffee and chelsea are held out)")
    p.add_argument("--size", type=int, default=32, help="image side for a random-init tokenizer")
    p.add_argument("--tokens", type=int, default=32, help="K for a random-init tokenizer")
    p.add_argument("--out", default="outputs/tokenize_image.png")
    args = p.parse_args(argv)

    name = args.checkpoint or next(iter(available_tokenizers()), None)
    if name is None:
        print("note: no committed tokenizer checkpoint yet; using a RANDOM-INIT tokenizer (reconstructions are grey)")
        torch.manual_seed(0)
        tok = Tokenizer(ModelConfig(image_size=args.size, patch_size=8, num_tokens=args.tokens, width=64,
                                    enc_depth=2, dec_depth=2)).eval()
    else:
        tok = vtok.load_tokenizer(name)
    side = tok.config.image_size
    pixels = center_square(skimage_photos((args.photo,))[0].pixels, side)
    image = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255.0   # [1, 3, H, W] in [0, 1]

    ids = tok.tokenize(image)                                # FSQ: [1, K] int64; binary: [1, K, bits] bool
    print(f"{args.photo} {side}x{side} -> {tok.num_tokens} tokens, {tok.bits_per_token:.2f} bits each")
    for k in pow2_lengths(tok.num_tokens):
        rec = tok.detokenize(ids[:, :k])                     # any prefix decodes to a full image
        print(f"k={k:3d}  {k * tok.bits_per_token / 8:7.1f} bytes  PSNR {psnr(rec[0], image[0]):6.2f} dB")
    print(f"wrote {reconstruction_grid(tok, image, args.out)}")


if __name__ == "__main__":
    main()
