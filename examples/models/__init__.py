"""Example models (Flax): readable, one file each, with loaders for real pretrained weights."""
