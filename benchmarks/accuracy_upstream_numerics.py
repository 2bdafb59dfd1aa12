"""scripts/accuracy_table.py for fastround with upstream's rotation numerics everywhere, not only while SignRound
tunes: a diagnostic for the rotated rows of docs/accuracy.md, whose remaining gaps to upstream this attributes.

* quarot: a full-size deterministic online R1 rotates its weights with the staged bf16 butterfly (upstream's
  matmul_hadU; apply_quarot(tuning=True), RTN included) and its hooks keep that numerics when the model is scored.
* hadamard / random_hadamard (per-linear transform): outside SignRound's tuning the online hook computes upstream's
  activation transform (LinearRotation's tuning product without autocast: a bf16 matmul by the bf16-rounded matrix
  for hadamard, an fp32 matmul for random_hadamard) instead of the FWHT; the weights are fastround's as usual.

Same arguments as scripts/accuracy_table.py (use --tool fastround), e.g.
    OMP_NUM_THREADS=1 python benchmarks/accuracy_upstream_numerics.py --nsamples 32 --seqlen 256 run --batch_size 8 \\
        --heldout_chars 20000 --no-check_saved --schemes W4A16,MXFP4 --tool fastround --methods RTN \\
        --rotations hadamard,random_hadamard,quarot --json /tmp/upstream-numerics.json
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

import fastround.quarot as Q
import fastround.rotation as R

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

_apply_quarot = Q.apply_quarot
_online = R.LinearRotation.online


def apply_quarot_staged(model: torch.nn.Module, config: Any = None, tuning: bool = False) -> Q.QuaRotPlan:
    return _apply_quarot(model, config, tuning=True)


def online_as_upstream(self: R.LinearRotation, x: torch.Tensor) -> torch.Tensor:
    if self.tuning_dtype is not None:  # SignRound is tuning: already upstream's products
        return _online(self, x)
    self.tuning_dtype = torch.float32 if self.random else torch.bfloat16
    try:
        return _online(self, x)
    finally:
        self.tuning_dtype = None


def main() -> None:
    Q.apply_quarot = apply_quarot_staged  # compressor.quantize imports it at call time
    Q.QuaRotPlan.use_tuning_numerics = lambda self, on: None  # the staged hooks stay for scoring
    R.LinearRotation.online = online_as_upstream
    import accuracy_table

    accuracy_table.main(sys.argv[1:])


if __name__ == "__main__":
    main()
