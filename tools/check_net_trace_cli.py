"""End-to-end check of `flatmin trace --model NET.json --method exact --dtype f64 --bn-mode eval`
against PyTorch's exact trace, with inputs that are not in the repo: the three exported networks
of make_net_fixtures.py (a VGG-style CNN with BatchNorm, a GELU/tanh MLP after average pooling,
a ResNet with a projection shortcut) built with other seeds, exported by export_torch, their
float64 state saved with safetensors, and real CIFAR-10 records.

Reference: make_net_fixtures.exact_trace (one double backward per parameter element, eval mode).
flatmin: the binary on the network file, the weights file and a CIFAR-10 batch file of the same
records. Prints the relative error per network (bound 1e-8) and exits non-zero above it.

Run (from the workspace root, after `cargo build --release`; torch, numpy, safetensors):
    python tools/check_net_trace_cli.py --data ../shared/data/cifar10-subset/test_batch.bin
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_torch  # noqa: E402
from check_hvp_cli import write_records  # noqa: E402
from make_net_fixtures import CASES, INPUT_SHAPE, build, exact_trace  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a CIFAR-10 batch file")
    ap.add_argument("--binary", default="target/release/flatmin")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--start", type=int, default=100)
    ap.add_argument("--seed-offset", type=int, default=1000)
    a = ap.parse_args()
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        batch, x, y = write_records(a.data, a.start, a.images, tmp)
        for name, factory, seed in CASES:
            module = build(factory, seed + a.seed_offset)
            net = os.path.join(tmp, f"{name}.json")
            weights = os.path.join(tmp, f"{name}.safetensors")
            export_torch.export(module, net, input_shape=INPUT_SHAPE)
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, weights)
            reference = sum(d.sum().item() for d in exact_trace(module, x, y).values())
            out = subprocess.run([a.binary, "trace", "--model", net, "--weights", weights,
                                  "--data", batch, "--method", "exact", "--dtype", "f64",
                                  "--bn-mode", "eval", "--json"],
                                 check=True, capture_output=True, text=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
            rel = abs(got["trace"] - reference) / abs(reference)
            worst = max(worst, rel)
            print(f"{name}: PyTorch {reference!r}, flatmin {got['trace']!r} ({got['method']}), "
                  f"relative error {rel:.1e}")
    print(f"worst relative error {worst:.1e} (bound 1e-8)")
    return 0 if worst <= 1e-8 else 1


if __name__ == "__main__":
    sys.exit(main())
