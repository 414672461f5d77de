"""`lorakit plan`: memory (weights, optimizer, traced activations) and speed before a run; `--fit`."""
