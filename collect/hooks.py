"""Forward hooks that record what collection needs, and nothing else.

Three points per decoder layer, found through the architecture adapter:
- the decoder layer's input (the block input, before its first norm): predictor input;
- the down projection's input: the per-neuron MLP activation (labels; with collect.record_down_input also
  kept itself, for the output-error loss);
- the attention output projection's input: the heads' outputs side by side.
Hooks only hand the tensors, flattened to [tokens, features], to a callback; what to keep is
decided by the caller (collect.py with labels.py), so the recorder stays free of tensor math.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dejavu.models.adapters import Adapter

# (layer index, point name, [tokens, features]) -> None
Sink = Callable[[int, str, torch.Tensor], None]

BLOCK_INPUT = "block_input"
MLP_ACT = "mlp_act"
HEAD_OUT = "head_out"


def _first_tensor(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if name in kwargs and isinstance(kwargs[name], torch.Tensor):
        return kwargs[name]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    raise RuntimeError(f"hook found no input tensor (args: {len(args)}, kwargs: {sorted(kwargs)})")


class ActivationRecorder:
    """Context manager: while active, every forward pass feeds `sink` per layer and point."""

    def __init__(self, adapter: Adapter, sink: Sink):
        self.adapter = adapter
        self.sink = sink
        self._handles: list = []

    def _hook(self, layer_idx: int, point: str, kw_name: str):
        def hook(module, args, kwargs):
            x = _first_tensor(args, kwargs, kw_name)
            self.sink(layer_idx, point, x.reshape(-1, x.shape[-1]))

        return hook

    def __enter__(self) -> ActivationRecorder:
        for i, layer in enumerate(self.adapter.decoder_layers()):
            for module, point, kw_name in (
                (layer, BLOCK_INPUT, "hidden_states"),
                (self.adapter.down_proj(layer), MLP_ACT, "input"),
                (self.adapter.o_proj(layer), HEAD_OUT, "input"),
            ):
                self._handles.append(
                    module.register_forward_pre_hook(self._hook(i, point, kw_name), with_kwargs=True)
                )
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
