"""One `lorakit improve` round on the demo task, end to end (a few minutes on a 2-core CPU).

1. A thin slice of the demo training data: every row of the store and memory mnemonics (STA,
   STX, STY, INC, DEC) removed, so the student has never seen their opcodes.
2. The student: SmolLM2-135M-Instruct trained on it with the demo's settings.
3. The teacher: scripts/demo_teacher.py, a scripted OpenAI-compatible HTTP server that answers
   each group with correct rows made by the demo data generator (a stand-in for a real model).
4. `lorakit improve`: eval -> synth (checked by scripts/verify_demo_sample.py) -> retrain from
   scratch on thin + new rows -> eval on the same 40 held-out rows.

Run: python scripts/improve_demo.py [OUTPUT_DIR]   (default outputs/improve-demo)
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_teacher  # noqa: E402

from lorakit.core.config import ImproveConfig, TrainConfig
from lorakit.core.fields import as_config
from lorakit.data.sources import demo_path
from lorakit.models.loading import hardware_supports_bf16
from lorakit.workflows.demo import demo_settings

LEFT_OUT = ("STA", "STX", "STY", "INC", "DEC")


def main() -> None:
    from lorakit.core.config import DemoConfig
    from lorakit.training.train import train
    from lorakit.workflows.improve import improve

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/improve-demo")
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in demo_path("train").read_text().splitlines()]
    thin = [r for r in rows if r["input"].split()[0] not in LEFT_OUT]
    (out / "thin.jsonl").write_text("".join(json.dumps(r) + "\n" for r in thin))
    print(f"thin slice: {len(thin)} of {len(rows)} training rows (no {', '.join(LEFT_OUT)})", flush=True)
    t0 = time.time()
    student = out / "student"
    if not (student / "adapter_config.json").is_file():
        cfg = DemoConfig(**demo_settings())
        cfg = dataclasses.replace(
            cfg, dataset=str(out / "thin.jsonl"), output_dir=str(student), bf16=hardware_supports_bf16()
        )
        train(as_config(cfg, TrainConfig))
    t1 = time.time()
    server, teacher = demo_teacher.start()
    result = improve(
        ImproveConfig(
            adapter=str(student),
            eval_dataset=str(demo_path("test")),
            output_dir=str(out / "improve"),
            teacher_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
            teacher_model=demo_teacher.MODEL,
            verify=f"{sys.executable} {Path(__file__).resolve().parent / 'verify_demo_sample.py'}",
            max_new_tokens=24,
            rounds=1,
        )
    )
    t2 = time.time()
    server.shutdown()
    summary = json.loads((result / "improve.json").read_text())
    print(
        f"improve demo: held-out exact match {summary['before']['exact_match']:.1%} -> "
        f"{summary['after']['exact_match']:.1%} (student trained in {t1 - t0:.0f} s, improve round {t2 - t1:.0f} s, "
        f"{len(teacher.requests)} teacher requests); report: {result / 'improve.md'}"
    )


if __name__ == "__main__":
    main()
