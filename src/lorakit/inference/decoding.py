"""From logits to text: the sampling settings, the sampler and the streaming detokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


class TextStream:
    """Token ids -> text deltas for one choice, with stop strings.

    A delta never ends inside a multi-byte character (it waits for the next token), and text that
    could be the start of a stop string is held back until it is known not to be one: the deltas
    concatenate to exactly the non-streamed answer.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the answer)."""
        self.ids.append(token)
        text = self._decode()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            delta, self.sent = text[self.sent : cut], max(self.sent, cut)
            return delta, True
        if text.endswith("\ufffd"):
            return "", False
        safe = len(text) - self._held(text)
        delta = text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta, False

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        return max(
            (k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
            default=0,
        )

    def flush(self) -> str:
        """The text still held back, at the end of the answer."""
        text = self._decode()
        delta, self.sent = text[self.sent :], len(text)
        return delta


def sample(logits, s: Sampling, generator) -> int:
    """The next token from one row's logits [vocab]: argmax at temperature 0, else temperature,
    top-k and top-p (nucleus) sampling, as transformers' generate() applies them."""
    import torch

    if s.temperature <= 0 or generator is None:
        return int(torch.argmax(logits))
    logits = logits / s.temperature
    if 0 < s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(ordered, -1).cumsum(-1)
        drop = cumulative - torch.softmax(ordered, -1) > s.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))
