"""Hooks into real models. ``vtok.hooks.encoders``: reduce tokens inside timm / open_clip ViTs."""

from vtok.hooks.encoders import Captured, capture, patch, supported, unpatch

__all__ = ["Captured", "capture", "patch", "supported", "unpatch"]
