"""Writes the bundled demo dataset: assemble one 65816 (SNES CPU) instruction into its bytes.

Deterministic (fixed seed). Held-out rows use operand values that no training row has (with any
mnemonic), so the test split measures whether the model learned the opcode table and copies the
operand, not whether it memorised rows or operands. Implied instructions (no operand) are all
in training.
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


HELD_OUT_OPERANDS = 20  # operand values reserved for the test split
TEST_ROWS = 40
TRAIN_ROWS = 192


def asm_rows(values: list[int], per_mnemonic: tuple[int, int], rng: random.Random) -> list[tuple[str, str]]:
    """(assembly, bytes) for every operand mnemonic with operands drawn from `values`
    (`per_mnemonic` = how many for immediate and direct mnemonics)."""
    out = []
    for table, n, form in ((IMMEDIATE, per_mnemonic[0], "#$"), (DIRECT, per_mnemonic[1], "$")):
        for mnemonic, opcode in table.items():
            for value in rng.sample(values, n):
                out.append((f"{mnemonic} {form}{value:02X}", f"{opcode} {value:02X}"))
    return out


def as_rows(pairs: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    return [{"instruction": rng.choice(INSTRUCTIONS), "input": asm, "output": code} for asm, code in pairs]


def main() -> None:
    rng = random.Random(65816)
    held = sorted(rng.sample(range(256), HELD_OUT_OPERANDS))
    seen = [v for v in range(256) if v not in held]
    operand_pairs = asm_rows(seen, (10, 8), rng)
    rng.shuffle(operand_pairs)
    train_pairs = operand_pairs[: TRAIN_ROWS - len(IMPLIED)] + [(m, op) for m, op in IMPLIED.items()]
    test_pairs = rng.sample(asm_rows(held, (HELD_OUT_OPERANDS, HELD_OUT_OPERANDS), rng), TEST_ROWS)
    rng.shuffle(train_pairs)
    train, test = as_rows(train_pairs, rng), as_rows(test_pairs, rng)
    assets = Path(__file__).resolve().parent.parent / "src" / "lorakit" / "assets"
    for name, split in (("demo_train.jsonl", train), ("demo_test.jsonl", test)):
        (assets / name).write_text("".join(json.dumps(r) + "\n" for r in split))
        print(f"{name}: {len(split)} rows")


if __name__ == "__main__":
    main()
