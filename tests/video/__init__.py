"""Video: decoding, temporal strategies, the video pipeline, CLI and benchmark."""
