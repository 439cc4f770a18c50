"""Fused TDGD gates: torch.compile and Triton (interpreted on CPU) equal the PyTorch reference,
forward and backward, for every switch combination (Triton) / the two main ones (compile)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sinkrec.layers.fused_gates import fused_gates, gates_reference

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("_gates_parity.py")
sys.path.insert(0, str(SCRIPT.parent))
from _gates_parity import make_inputs


def _parity(*args: str) -> dict[str, float]:
    # a subprocess: TRITON_INTERPRET must be set before triton is first imported
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_matches_reference_forward_backward():
    errs = _parity("triton", "--all-flags")
    assert len(errs) == 10  # 8 memory-on combinations + 2 memory-off
    bad = {k: v for k, v in errs.items() if v > 1e-5}
    assert not bad, bad


def test_compile_matches_reference_forward_backward():
    errs = _parity("compile")
    assert len(errs) == 2
    bad = {k: v for k, v in errs.items() if v > 1e-5}
    assert not bad, bad


def test_reference_pads_freeze_the_state_and_switches_act():
    tensors, params, phi, mask = make_inputs()
    out = gates_reference(**tensors, phi=phi, mask=mask, **params)
    assert (out.g[~mask] == 0).all() and (out.beta[~mask] == 0).all()
    assert (out.g[mask] < 0).all() and (out.beta[mask] > 0).all()
    off = gates_reference(**tensors, phi=phi, mask=mask, **params, purify_write=False, diff_read=False)
    assert torch.equal(off.q, tensors["q"]) and torch.equal(off.v, tensors["v"])
    assert (off.beta[mask] > out.beta[mask]).all()  # purification only ever weakens the write
    no_time = gates_reference(**tensors, phi=phi, mask=mask, **params, temporal=False)
    assert not torch.allclose(no_time.g, out.g)
    gdn = gates_reference(**tensors, phi=phi, mask=mask, **params, memory=False)
    assert gdn.r is None and torch.equal(gdn.q, tensors["q"])


def test_dispatcher_rejects_unknown_backend():
    tensors, params, phi, mask = make_inputs()
    with pytest.raises(ValueError, match="gate_backend"):
        fused_gates(*tensors.values(), phi, mask, *params.values(), backend="cuda-magic")
