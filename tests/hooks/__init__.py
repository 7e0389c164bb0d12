"""vtok.patch / unpatch / capture on timm and open_clip encoders."""
