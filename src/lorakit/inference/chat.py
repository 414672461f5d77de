"""`lorakit chat`: talk to a model (and adapter) in the terminal, with streamed answers.

An interactive single process: it prints with print(), never the rank-aware say()."""

from __future__ import annotations

from ..core.config import ChatConfig

HELP = "commands: /reset (forget the conversation), /system TEXT (new system prompt), /exit"


def chat(cfg: ChatConfig) -> None:
    from ..models.adapter import inference_system_prompt, open_adapter
    from .generate import load_for_inference, stream_text, stream_tokens

    trained = open_adapter(cfg.adapter)
    system = inference_system_prompt(cfg.system_prompt, trained)
    model, tokenizer, fmt = load_for_inference(cfg.base_model, trained, cfg.trust_remote_code)
    stop = fmt.stop_ids()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    history: list[dict] = []
    print(f"lorakit chat ({cfg.adapter or cfg.base_model or 'SmolLM2-135M-Instruct'}); {HELP}", flush=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if command.startswith("/system"):
            system = command[len("/system") :].strip()
            history = []
            print(f"(system prompt set{': ' + system if system else ' to none'}; conversation cleared)")
            continue
        if command.startswith("/"):
            print(HELP)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        ids = fmt.encode_prompt(messages)
        answer = []
        tokens = stream_tokens(
            model, ids, stop, pad, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k
        )
        for piece, reason in stream_text(tokenizer, tokens, stop):
            answer.append(piece)
            print(piece, end="", flush=True)
            if reason == "length":
                print(" [... max_new_tokens reached]", end="")
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(answer)})
