"""`lorakit train`: the run (prepare -> fit -> finish), the Trainer and its callbacks, the loss,
batching, checkpoints and resume, monitoring, the efficiency record, the multi-process launch."""
