"""Writes the tiny `torch.save` fixtures of cli/tests/fixtures that flatmin must recognise as
PyTorch files (not safetensors) and answer with the one-line conversion command:

    torch_zip.pt      torch.save's default zip archive
    torch_legacy.pt   the legacy pickle stream (_use_new_zipfile_serialization=False)

Run with a Python that has torch:  python tools/make_torch_fixtures.py
"""

import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "cli", "tests", "fixtures")


def main():
    os.makedirs(OUT, exist_ok=True)
    state = {"model.layers.0.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    torch.save(state, os.path.join(OUT, "torch_zip.pt"))
    torch.save(state, os.path.join(OUT, "torch_legacy.pt"), _use_new_zipfile_serialization=False)


if __name__ == "__main__":
    main()
