"""Every random number generator a training process uses, as JSON (no pickle in checkpoints)."""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _from_b64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture() -> dict[str, Any]:
    """Python's, NumPy's, torch's CPU and (if present) every CUDA device's generator state."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},  # fmt: skip
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state((nps["name"], np.array(nps["keys"], dtype=np.uint32), nps["pos"],
                         nps["has_gauss"], nps["cached"]))  # fmt: skip
    torch.set_rng_state(_from_b64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_b64(s) for s in state["cuda"]])


def from_legacy(state: dict[str, Any]) -> dict[str, Any]:
    """The RNG entry of a checkpoint written before this format (training_state.pt)."""
    out = capture()
    out["torch"] = _b64(state["torch"])
    out["python"] = {"version": 3, "state": [int(v) for v in state["python"]], "gauss": None}
    if "cuda" in state:
        out["cuda"] = [_b64(s) for s in state["cuda"]]
    return out
