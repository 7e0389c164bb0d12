"""The 1D image tokenizers: building blocks, API, training, committed checkpoints, rate-distortion benchmark."""
