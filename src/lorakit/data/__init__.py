"""Rows -> samples -> token ids: sources, formats, duplicates and split, the chat template's mask,
encoding (in memory or streamed), the encoded-data cache, and `lorakit data check/convert`."""
