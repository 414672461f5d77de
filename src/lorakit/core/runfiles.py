"""The names of the files in a run directory, written once: train, eval, data check, the dashboard
and the resume logic all read and write these."""

SETTINGS = "lorakit.yaml"  # the resolved config, beside every output
METRICS = "metrics.jsonl"  # one line per logged step, a summary line when a run stops
MANIFEST = "manifest.json"  # what a finished adapter was trained from, and its final numbers
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: its presence means the adapter is complete
TRAIN_LOG = "train.log"  # the output of a run started from the dashboard
EVAL = "eval.json"
FAILURES = "failures.jsonl"
DATA_CHECK = "data_check.json"  # `lorakit data check --output RUN/data_check.json`
