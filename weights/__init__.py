"""Pretrained checkpoints: weights/README.md says what they are; weights/download.py fetches and checks them."""
