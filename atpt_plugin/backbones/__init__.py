"""Model families the adapter can read: open_clip CLIP (ViT and ResNet towers)."""
