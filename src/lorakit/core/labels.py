"""The label of a token that carries no loss: what PyTorch's cross_entropy ignores by default
(ignore_index=-100), and what Hugging Face's models and collators use. Written once, here.
"""

from __future__ import annotations

IGNORE_INDEX = -100
