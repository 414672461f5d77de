"""Writes the bundled demo dataset: assemble one 65816 (SNES CPU) instruction into its bytes.

Deterministic (fixed seed). Train and test rows use disjoint (instruction, operand) pairs, so the
test split measures whether the model learned the opcode table, not memorised rows.
Run: python scripts/make_demo_data.py
"""

import json
import random
from pathlib import Path

IMMEDIATE = {
    "LDA": "A9",
    "LDX": "A2",
    "LDY": "A0",
    "ADC": "69",
    "SBC": "E9",
    "CMP": "C9",
    "AND": "29",
    "ORA": "09",
    "EOR": "49",
    "CPX": "E0",
    "CPY": "C0",
}
DIRECT = {
    "LDA": "A5",
    "STA": "85",
    "LDX": "A6",
    "STX": "86",
    "LDY": "A4",
    "STY": "84",
    "INC": "E6",
    "DEC": "C6",
}
IMPLIED = {
    "INX": "E8",
    "INY": "C8",
    "DEX": "CA",
    "DEY": "88",
    "NOP": "EA",
    "RTS": "60",
    "RTL": "6B",
    "CLC": "18",
    "SEC": "38",
    "PHA": "48",
    "PLA": "68",
    "XBA": "EB",
    "TAX": "AA",
    "TXA": "8A",
    "TAY": "A8",
    "TYA": "98",
    "SEI": "78",
    "CLI": "58",
    "PHP": "08",
    "PLP": "28",
}
INSTRUCTIONS = [
    "Assemble this 65816 instruction into machine code. Answer with the hex bytes only.",
    "Give the machine-code bytes (hex) for this SNES 65816 instruction.",
    "Encode the following 65816 assembly instruction as hex bytes.",
]


def rows(rng: random.Random) -> list[dict]:
    out = []
    for mnemonic, opcode in IMMEDIATE.items():
        for value in rng.sample(range(256), 12):
            out.append((f"{mnemonic} #${value:02X}", f"{opcode} {value:02X}"))
    for mnemonic, opcode in DIRECT.items():
        for value in rng.sample(range(256), 10):
            out.append((f"{mnemonic} ${value:02X}", f"{opcode} {value:02X}"))
    for mnemonic, opcode in IMPLIED.items():
        out.append((mnemonic, opcode))
    rng.shuffle(out)
    return [{"instruction": rng.choice(INSTRUCTIONS), "input": asm, "output": code} for asm, code in out]


def main() -> None:
    rng = random.Random(65816)
    data = rows(rng)
    # Held-out rows: operand forms only (implied instructions have a single form, all in train).
    test = [r for r in data if " " in r["input"]][:40]
    train = [r for r in data if r not in test]
    assets = Path(__file__).resolve().parent.parent / "src" / "lorakit" / "assets"
    for name, split in (("demo_train.jsonl", train), ("demo_test.jsonl", test)):
        (assets / name).write_text("".join(json.dumps(r) + "\n" for r in split))
        print(f"{name}: {len(split)} rows")


if __name__ == "__main__":
    main()
