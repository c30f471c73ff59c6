"""Dialogue data: readers, validation, chat-template rendering, batching."""
