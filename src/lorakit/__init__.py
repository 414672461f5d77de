"""lorakit: from a JSONL file of instruction samples to a fine-tuned, evaluated and served LLM.

The Python API mirrors the CLI: one package per stage, each command a function taking its config.

    from lorakit.core.config import TrainConfig
    from lorakit.training.train import train
    train(TrainConfig(dataset="train.jsonl", output_dir="out", lora_r=16))
"""

__version__ = "0.1.0"
