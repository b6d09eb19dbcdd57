"""What `recnext bench latency` times and how: its settings, their parsing, and the checks that refuse bad ones."""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from recnext_cli import zoo
from recnext_cli.errors import UsageError

PARTS = ("backbone", "detector")
DTYPES = ("fp32", "fp16", "bf16")
_INPUT_SIZE = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")
# The backbone halves the resolution five times; mmdet pads detector inputs to multiples of 32 for the same reason.
MIN_SIDE = 32
DETECTOR_SIDE_MULTIPLE = 32


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """What to time and how: one value per `recnext bench latency` option."""

    part: str = "backbone"
    device: str = "cpu"
    input_size: tuple[int, int] = (512, 512)  # height, width
    batch: int = 1
    fused: bool = True
    dtype: str = "fp32"
    compile: bool = False
    warmup: int = 10
    iters: int = 50
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    profile: bool = False  # also list the operators that take the most time


def parse_input_size(text: str) -> tuple[int, int]:
    """"512x512" (height x width) or "512" (square) as (height, width)."""
    match = _INPUT_SIZE.fullmatch(text)
    if match:
        size = int(match.group(1)), int(match.group(2))
    elif text.strip().isdigit():
        size = int(text), int(text)
    else:
        raise UsageError(f"--input {text!r} is not HEIGHTxWIDTH; write it like 512x512")
    if min(size) < MIN_SIDE:
        raise UsageError(
            f"--input {text} is too small: RecNeXt halves the image 5 times, so each side needs >= {MIN_SIDE}"
        )
    return size


def resolve_models(names: Sequence[str]) -> list[str]:
    """Zoo names for the given names; no names or "all" mean every model with a COCO detector, in the README's order."""
    if not names or [name.lower() for name in names] == ["all"]:
        return list(zoo.DETECTION_MODELS)
    return list(dict.fromkeys(zoo.get_model(name).name for name in names))


def check_config(config: BenchConfig) -> None:
    """Refuse settings that cannot be timed, with a message saying what to pass instead."""
    if config.part not in PARTS:
        raise UsageError(f"--part {config.part!r} is not one of {', '.join(PARTS)}")
    if config.dtype not in DTYPES:
        raise UsageError(f"--dtype {config.dtype!r} is not one of {', '.join(DTYPES)}")
    if config.batch < 1 or config.iters < 1 or config.warmup < 0:
        raise UsageError("--batch and --iters must be at least 1 and --warmup at least 0")
    if config.threads is not None and config.threads < 1:
        raise UsageError("--threads must be at least 1")
    half = (config.dtype, config.device[:4])
    if config.part == "detector" and config.dtype != "fp32" and half not in (("fp16", "cuda"), ("bf16", "cpu")):
        raise UsageError(
            "--part detector runs in half precision as fp16 on --device cuda (mmdet's fp16 mode) or as a bf16 "
            "backbone on --device cpu; use one of those, --dtype fp32, or time --part backbone"
        )
    height, width = config.input_size
    if config.part == "detector" and (height % DETECTOR_SIDE_MULTIPLE or width % DETECTOR_SIDE_MULTIPLE):
        raise UsageError(
            f"--part detector needs --input sides that are multiples of {DETECTOR_SIDE_MULTIPLE} "
            f"(mmdet pads images so), got {height}x{width}"
        )
