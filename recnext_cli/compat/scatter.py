"""mmcv's Scatter.forward hands torch's _get_stream a GPU index; since torch 2.0 it must be a torch.device."""

from __future__ import annotations

from recnext_cli.compat._util import is_marked, mark, torch_at_least


def fix_needed() -> bool:
    return torch_at_least("2.0")


def patched() -> bool:
    from mmcv.parallel._functions import Scatter

    return is_marked(Scatter.forward)


def _forward(target_gpus, input):
    import torch
    from mmcv.parallel import _functions as f

    input_device = f.get_input_device(input)
    streams = None
    if input_device == -1 and target_gpus != [-1]:
        # Copy CPU tensors to the GPUs on background streams, as mmcv intends.
        streams = [f._get_stream(torch.device("cuda", gpu)) for gpu in target_gpus]
    outputs = f.scatter(input, target_gpus, streams)
    if streams is not None:
        f.synchronize_stream(outputs, target_gpus, streams)
    return tuple(outputs) if isinstance(outputs, list) else (outputs,)


def patch() -> None:
    from mmcv.parallel._functions import Scatter

    Scatter.forward = staticmethod(mark(_forward, Scatter.forward))
