"""Reads a `flatmin export --tensorboard` event file with TensorBoard's own reader and checks
every scalar against the run's metrics.jsonl (tags KIND/NAME at the record's step, values as
f32). Needs `pip install tensorboard`.

    python tools/check_tensorboard.py RUN TB_DIR/RUN_NAME/events.out.tfevents.flatmin
"""

import json
import struct
import sys

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util


def expected(run):
    want = []
    with open(f"{run}/metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            fields = {k: v for k, v in r.items() if k not in ("epoch", "step", "wall_s", "extra")}
            fields.update(r.get("extra", {}))
            for k, v in sorted(fields.items()):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    f32 = struct.unpack("<f", struct.pack("<f", float(v)))[0]
                    want.append((f"{r['kind']}/{k}", r["step"], f32))
    return sorted(want)


def main():
    run, events = sys.argv[1], sys.argv[2]
    got = []
    version = None
    for event in EventFileLoader(events).Load():
        if event.HasField("file_version"):
            version = event.file_version
        for v in event.summary.value:
            # The loader migrates simple_value scalars to the scalars plugin's tensors.
            x = float(tensor_util.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
            got.append((v.tag, event.step, x))
    assert version == "brain.Event:2", version
    want = expected(run)
    assert sorted(got) == want, (len(got), len(want), set(got) ^ set(want))
    print(f"ok: {len(got)} scalars read by tensorboard match {run}/metrics.jsonl")


if __name__ == "__main__":
    main()
