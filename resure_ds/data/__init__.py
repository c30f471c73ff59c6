"""Records -> validated dialogues -> chat-template rendering with exact turn spans -> token shards
-> plan (order, packing, cursor) -> batches. See docs/architecture.md."""

IGNORE = -100  # the label of a position that trains nothing (PyTorch's cross-entropy ignore_index)
