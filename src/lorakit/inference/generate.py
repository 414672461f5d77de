"""Generation through transformers with the chat template the adapter was trained with."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import GenerateConfig
from ..data.template import ChatFormat
from ..models.adapter import Adapter, inference_system_prompt, open_adapter
from ..models.loading import load_model, load_tokenizer


@dataclass
class Generation:
    text: str
    stopped: bool  # ended with an end-of-turn/EOS token before max_new_tokens
    new_tokens: int


def sampling_kwargs(temperature: float, top_p: float, top_k: int) -> dict:
    """generate() arguments: greedy at temperature 0, else sampling with nucleus and top-k."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    return {"do_sample": False}


def load_for_inference(
    base_model: str = "", adapter: str | Adapter = "", trust_remote_code: bool = False, model=None
):
    """(model, tokenizer, chat format); with an adapter (a path or an opened Adapter), the base
    and tokenizer it was trained with."""
    from ..models.loading import resolve_base_model

    trained = adapter if isinstance(adapter, Adapter) else open_adapter(adapter)
    base = trained.resolve_base(base_model) if trained else resolve_base_model(base_model)
    tokenizer = load_tokenizer(base, trust_remote_code, str(trained.path) if trained else "")
    model = model if model is not None else load_model(base, trust_remote_code=trust_remote_code)
    if trained:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(trained.path))
    model.eval()
    return model, tokenizer, ChatFormat(tokenizer)


def generate_batch(
    model,
    tokenizer,
    chat: ChatFormat,
    conversations: list[list[dict]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 0.9,
    top_k: int = 40,
    batch_size: int = 8,
) -> list[Generation]:
    """Generate an answer for each conversation (left-padded batches, greedy unless temperature > 0)."""
    import torch

    stop = chat.stop_ids()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    results: list[Generation] = []
    for start in range(0, len(conversations), batch_size):
        prompts = [chat.encode_prompt(c) for c in conversations[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        sampling = sampling_kwargs(temperature, top_p, top_k)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=max_new_tokens,
                eos_token_id=stop,
                pad_token_id=pad,
                use_cache=True,
                **sampling,
            )
        for row in out[:, width:].tolist():
            end = next((k for k, t in enumerate(row) if t in stop), None)
            kept = row if end is None else row[:end]
            results.append(
                Generation(
                    tokenizer.decode(kept, skip_special_tokens=True).strip(), end is not None, len(kept)
                )
            )
    return results


def user_messages(system_prompt: str, prompt: str) -> list[dict]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]


def generate(cfg: GenerateConfig, prompt: str) -> str:
    trained = open_adapter(cfg.adapter)
    system = inference_system_prompt(cfg.system_prompt, trained)
    model, tokenizer, chat = load_for_inference(cfg.base_model, trained, cfg.trust_remote_code)
    [g] = generate_batch(
        model,
        tokenizer,
        chat,
        [user_messages(system, prompt)],
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_p,
        cfg.top_k,
    )
    return g.text


def generate_command(cfg: GenerateConfig, prompt: str) -> None:
    """`lorakit generate`: the answer on stdout."""
    print(generate(cfg, prompt))


def stream_tokens(
    model,
    input_ids: list[int],
    stop: list[int],
    pad: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
):
    """Yield generated token ids one by one (generate runs in a thread; errors are re-raised here)."""
    import queue
    import threading

    import torch
    from transformers.generation.streamers import BaseStreamer

    tokens: queue.Queue = queue.Queue()

    class Streamer(BaseStreamer):
        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # generate() first hands over the prompt
                self.prompt_seen = True
                return
            for t in value.view(-1).tolist():
                tokens.put(t)

        def end(self):
            tokens.put(None)

    failure: list[BaseException] = []
    sampling = sampling_kwargs(temperature, top_p, top_k)

    def run():
        try:
            with torch.no_grad():
                model.generate(
                    input_ids=torch.tensor([input_ids], device=model.device),
                    attention_mask=torch.ones((1, len(input_ids)), dtype=torch.long, device=model.device),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stop,
                    pad_token_id=pad,
                    streamer=Streamer(),
                    use_cache=True,
                    **sampling,
                )
        except BaseException as e:  # surfaced in the caller's thread
            failure.append(e)
            tokens.put(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while (t := tokens.get()) is not None:
        yield t
    thread.join()
    if failure:
        raise failure[0]


def stream_text(tokenizer, token_ids, stop: list[int]):
    """Turn a token stream into text pieces; yields (piece, finished_reason or None). The pieces
    are serve's (decoding.TextStream): never inside a multi-byte character, and together exactly
    the full decode."""
    from .decoding import TextStream

    text = TextStream(tokenizer, [])
    reason = "length"
    for t in token_ids:
        if t in stop:
            reason = "stop"
            break
        piece, _ = text.push(t)
        if piece:
            yield piece, None
    yield text.flush(), reason
