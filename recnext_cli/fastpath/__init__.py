"""The inference fast path: a RecNeXt model rewritten for latency with outputs equal to the eager fp32 model's.

The modules below each hold one part; this package re-exports the names the commands, benchmarks/ and tests import.
device.py resolves --device / --dtype, plan.py chooses the rewrites, rewrites.py holds the rewritten modules, and
prepare.py applies them to a backbone, its inputs or a detector.
"""

from __future__ import annotations

from recnext_cli.fastpath.device import (
    BF16_CPU_FLAGS,
    DTYPES,
    cpu_flags,
    resolve_device,
    resolve_dtype,
)
from recnext_cli.fastpath.plan import PUBLISHED, FastPath, choose_fast_path
from recnext_cli.fastpath.prepare import (
    DetectorFeatures,
    FrozenCompiled,
    prepare_for_inference,
    prepare_input,
    speed_up_detector,
)
from recnext_cli.fastpath.rewrites import (
    ChannelsLastLinearAttention,
    ChannelsLastRecAttn,
    FusedDownsample,
    FusedMlp,
    FusedResidualBlock,
    FusedStem,
    OneDnnConv,
    SplitChannelDoublingConv,
)

__all__ = [
    "BF16_CPU_FLAGS",
    "DTYPES",
    "PUBLISHED",
    "ChannelsLastLinearAttention",
    "ChannelsLastRecAttn",
    "DetectorFeatures",
    "FastPath",
    "FrozenCompiled",
    "FusedDownsample",
    "FusedMlp",
    "FusedResidualBlock",
    "FusedStem",
    "OneDnnConv",
    "SplitChannelDoublingConv",
    "choose_fast_path",
    "cpu_flags",
    "prepare_for_inference",
    "prepare_input",
    "resolve_device",
    "resolve_dtype",
    "speed_up_detector",
]
