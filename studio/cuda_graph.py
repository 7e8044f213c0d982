"""Replay a fixed-shape GPU call as one CUDA graph (``torch.cuda.CUDAGraph``), to take the host off a call whose
operators the Python side cannot issue as fast as the GPU runs them.

The composer's main denoising pass is such a call (bench/README.md, "Composer A/B": 1.5 s of kernels in 3.2 s of
wall time on an H200): its per-concept attention, routed LoRA projections and isolation gathers are many small
operators, but the pass has static shapes and everything it reads besides the latent, the timestep and the prompt
embeddings (weights, region masks and layouts, the concepts' cached keys and values) is constant over a run.

``GraphedCall`` runs ``fn`` eagerly on its first call (the warm-up: the engine fills its caches, cuBLAS and cuDNN set
up), captures it on the second and replays the graph from then on, copying each call's tensors into the captured
inputs. A replay runs the kernels recorded at capture, not the Python: anything ``fn`` reads besides its tensor
arguments must not change between calls, and its Python branches are frozen as they were at capture. If the capture
fails, the call falls back to eager for the rest of its life and ``status`` says why; off a GPU it is always eager.
"""

from __future__ import annotations

from typing import Callable

import torch


class GraphedCall:
    """``fn(*tensors) -> tensor`` with fixed input shapes, replayed as a CUDA graph from its second call on."""

    def __init__(self, off: str | None = None):
        """``off``: a reason not to capture at all (then every call is eager and ``status`` says why)."""
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: list[torch.Tensor] = []
        self.static_out: torch.Tensor | None = None
        self.calls = 0
        self.replays = 0
        self.status = f"off: {off}" if off else "pending"

    def __call__(self, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.graph is not None:
            if [tuple(x.shape) for x in inputs] != [tuple(s.shape) for s in self.static_in]:
                raise ValueError("GraphedCall: input shapes changed after capture")
            for s, x in zip(self.static_in, inputs):
                s.copy_(x)
            self.graph.replay()
            self.replays += 1
            return self.static_out.clone()  # the next replay overwrites static_out
        if self.status.startswith("off") or not all(x.is_cuda for x in inputs):
            if self.status == "pending":
                self.status = "off: not on a GPU"
            return fn(*inputs)
        if self.calls == 1:  # warm-up: the engine's caches, cuBLAS/cuDNN handles
            return fn(*inputs)
        try:
            self.static_in = [x.clone() for x in inputs]
            graph = torch.cuda.CUDAGraph()
            # thread_local: a job on another thread of the app may use the GPU meanwhile without breaking the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.static_out = fn(*self.static_in)
        except Exception as e:  # an operator that cannot be captured: eager from now on, and say so
            self.static_in, self.static_out = [], None
            self.status = f"off: capture failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
            _reset_rng_after_failed_capture()
            torch.cuda.synchronize()
            return fn(*inputs)
        self.graph = graph
        self.status = "captured"
        graph.replay()
        self.replays += 1
        return self.static_out.clone()

    def stats(self) -> dict:
        return {"cuda_graph": self.status, "cuda_graph_replays": self.replays}


def _reset_rng_after_failed_capture() -> None:
    """A capture that raises leaves each CUDA generator marked as capturing, and every later random draw on the GPU
    in this process fails ("Offset increment outside graph capture encountered unexpectedly"; measured on an H200,
    torch 2.11). A fresh copy of each generator's state (same seed and offset) clears the mark."""
    for gen in torch.cuda.default_generators:
        try:
            gen.graphsafe_set_state(gen.clone_state())
        except (AttributeError, RuntimeError):  # an older torch without graph-safe generator states
            pass
