"""The evaluation models (eval ViT, small VLMs, real towers), their training scripts and the benchmark scripts."""
