"""Host memory of loading a flow checkpoint for sampling: tarflow.load_flow against a plain torch.load.

    python bench/load_memory.py [--model S]

Writes a train_flow.py-style checkpoint of a flow of --model size (1000 classes, d = 32, 256 tokens)
with its EMA copy and one AdamW step's optimizer state, then loads it in a fresh process each way
and reports the growth of the process's peak resident memory (VmHWM, reset after the imports).
load_flow memory-maps the file and reads only the EMA weights; torch.load without mmap reads all
of it (weights, EMA, both AdamW moments). Prints a summary line and a JSON record (MB).
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tarflow import SIZES, TARFlow  # noqa: E402

MEASURE = """
import sys; sys.path.insert(0, {root!r})
import torch, tarflow
def peak():
    line = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
    return int(line.split()[1]) / 1024
open('/proc/self/clear_refs', 'w').write('5')
before = peak()
if {plain}:
    ckpt = torch.load({path!r}, map_location='cpu', weights_only=False)
else:
    flow, record = tarflow.load_flow({path!r})
print(peak() - before)
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="S", choices=list(SIZES))
    args = p.parse_args()
    torch.manual_seed(0)
    flow = TARFlow(32, 256, num_classes=1000, **SIZES[args.model])
    ema = copy.deepcopy(flow)
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4)
    flow(torch.randn(2, 256, 32), torch.tensor([0, 1]))[0].square().mean().backward()
    opt.step()
    weights_mb = sum(p.numel() for p in flow.parameters()) * 4 / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.pt")
        torch.save(dict(stage="flow", flow_kind="TARFlow", flow_config=flow.config(),
                        flow=flow.state_dict(), flow_ema=ema.state_dict(), optimizer=opt.state_dict(),
                        rng=None), path)
        file_mb = os.path.getsize(path) / 2**20
        grown = {}
        for name, plain in (("load_flow", False), ("torch.load", True)):
            script = MEASURE.format(root=ROOT, path=path, plain=plain)
            out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
            grown[name] = float(out.stdout.split()[-1])
    record = dict(model=args.model, weights_mb=round(weights_mb, 1), file_mb=round(file_mb, 1),
                  load_flow_mb=round(grown["load_flow"], 1), torch_load_mb=round(grown["torch.load"], 1))
    print(f"flow {args.model}: file {file_mb:.0f} MB (weights {weights_mb:.0f} MB each for flow and EMA, "
          f"two AdamW moments); peak host memory grows by {grown['load_flow']:.0f} MB with load_flow "
          f"against {grown['torch.load']:.0f} MB for torch.load of the whole file")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
