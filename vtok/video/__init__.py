"""Video input: decode sampled frames (decord, PyAV), and synthetic test videos.

    video = vtok.video.load("clip.mp4", num_frames=32, size=224)   # frames uint8 [32, 224, 224, 3]
    video.indices, video.timestamps                                # which frames, at which seconds
"""

from vtok.video.decode import BACKENDS, Video, load, probe, sample_indices

__all__ = ["BACKENDS", "Video", "load", "probe", "sample_indices"]
