"""Server optimizers: how a round's mean increment moves the global state (Reddi et al., ICLR 2021).

FedAvg adds the mean increment as it is: G_{t+1} = G_t + Δ_t. The others treat -Δ_t as a
pseudo-gradient of the round:

    fedavgm:  m_t = β1 m_{t-1} + Δ_t;                      G_{t+1} = G_t + η m_t      (Hsu et al. 2019)
    fedadam:  m_t = β1 m_{t-1} + (1 - β1) Δ_t;
              v_t = β2 v_{t-1} + (1 - β2) Δ_t²;            G_{t+1} = G_t + η m_t / (√v_t + τ)
    fedyogi:  as fedadam, v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)

They act on the average alone, so they work under secure aggregation too. Tensors marked exact (the
running statistics of batch norm) are not gradients: they always take the plain mean. The slots
(m, v) are flat float32 vectors beside the global state, durable with it (aggregator/store.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
# Defaults of Reddi et al. (2021), whose grid put η and τ near these for their tasks.
DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01}


def slot_names(kind: str) -> tuple[str, ...]:
    """The state vectors an optimizer keeps between rounds."""
    return {"fedavg": (), "fedavgm": ("m",), "fedadam": ("m", "v"), "fedyogi": ("m", "v")}[kind]


def exact_mask(specs: Sequence[tuple[int, int, bool]]) -> np.ndarray:
    """A flat bool vector, True where the manifest's tensor is exact (running statistics)."""
    return np.concatenate([np.full(n, exact, dtype=bool) for _, n, exact in specs])


def step(
    kind: str,
    state: np.ndarray,
    mean: np.ndarray,
    slots: dict[str, np.ndarray],
    exact: np.ndarray,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> dict[str, np.ndarray]:
    """Apply one round's ``mean`` increment to ``state`` in place; returns the new slots.

    state: float32 (n,); mean: float32 or float64 (n,); slots: the previous ones (missing: zeros);
    exact: bool (n,), values that take the plain mean.
    """
    if kind not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {kind!r}; choose from {', '.join(SERVER_OPTIMIZERS)}")
    delta = np.asarray(mean, dtype=np.float32)
    if kind == "fedavg":
        state += delta
        return {}
    zeros = np.zeros_like(state)
    m = slots.get("m", zeros).astype(np.float32, copy=True)
    if kind == "fedavgm":
        m *= beta1
        m += delta
        update = lr * m
        out = {"m": m}
    else:
        v = slots.get("v", zeros).astype(np.float32, copy=True)
        m *= beta1
        m += (1.0 - beta1) * delta
        square = delta * delta
        if kind == "fedadam":
            v *= beta2
            v += (1.0 - beta2) * square
        else:
            v -= (1.0 - beta2) * square * np.sign(v - square)
        update = lr * m / (np.sqrt(v) + tau)
        out = {"m": m, "v": v}
    np.copyto(update, delta, where=exact)
    state += update
    return out


__all__ = ["DEFAULT_SERVER_LR", "SERVER_OPTIMIZERS", "exact_mask", "slot_names", "step"]
