"""selfreplay: finetune language models without forgetting, by replaying sequences the frozen
pretrained model samples from itself (see README.md)."""

__version__ = "0.1.0"
