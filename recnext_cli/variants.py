"""The RecNeXt backbone sizes as data: stage widths and depths, channel-mixer expansion and checkpoint fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from types import MappingProxyType

# Torch-free on purpose: the zoo's records hold these, and `recnext list` / `download` must not import torch.


@dataclasses.dataclass(frozen=True)
class Variant:
    """One published RecNeXt size: widths and depths per stage, the channel-mixer expansion, and its fingerprint.

    fingerprint: what the backbone's state_dict keys and shapes hash to (backbone_fingerprint), so the structural
    check of a download needs no torch; tests/test_zoo.py recomputes it from the backbone in recnext_cli/nn.
    """

    name: str
    series: str  # "M": recursive convolution, "A": recursive linear attention
    widths: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    mlp_ratio: float
    fingerprint: str

    @property
    def title(self) -> str:
        return f"RecNeXt-{self.name.upper()}"

    def hidden(self, channels: int) -> int:
        return int(channels * self.mlp_ratio)


def backbone_fingerprint(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The SHA-256 of backbone `shapes` ({key without prefix: shape}) as Variant.fingerprint records it."""
    lines = "\n".join(f"{key}:{','.join(map(str, shape))}" for key, shape in sorted(shapes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _variant(name: str, widths, depths, fingerprint: str, mlp_ratio: float = 2.0) -> Variant:
    return Variant(name, name[0].upper(), tuple(widths), tuple(depths), mlp_ratio, fingerprint)


# a0-a2 keep the M-series ratio of 2: only the three COCO-sized A models use 1.875 in the published code.
VARIANTS: Mapping[str, Variant] = MappingProxyType({
    v.name: v
    for v in (
        _variant("m0", (40, 80, 160, 320), (2, 2, 9, 1),
                 "1593bcc6f0e4b65d6989c41a0703050e1b4e2df9bb3115334ca540bf6cba74a3"),
        _variant("m1", (48, 96, 192, 384), (3, 3, 15, 2),
                 "0a430c45800dd3d049ce2e8ce3fb222ffc4bc552deb62bb249db2baca83d65e8"),
        _variant("m2", (56, 112, 224, 448), (3, 3, 15, 2),
                 "2fb389bacd3414babab21fb7e6ff58c006b44856a30ed07bf9345fa7ccbc46cc"),
        _variant("m3", (64, 128, 256, 512), (3, 3, 13, 2),
                 "740e625dea88bd8b2912897d037387f723b5d7906396c64c17e69af89da66535"),
        _variant("m4", (64, 128, 256, 512), (5, 5, 25, 4),
                 "c1165101031fe695b640c63c87f5206677cb23736184cbe1b9052b5befe28420"),
        _variant("m5", (80, 160, 320, 640), (7, 7, 35, 2),
                 "86dd3b9f2dc612a14725f740f7328ace94e98159552b0a2d1b4bac604fb0bad1"),
        _variant("a0", (40, 80, 160, 320), (2, 2, 9, 1),
                 "3d889ae0941b030de49d364dff93d9669065d76dbe8885742ed911d71ebd74b4"),
        _variant("a1", (48, 96, 192, 384), (3, 3, 15, 2),
                 "fb6c10ef943cbae4528b3713ba9ffb26e93607c3b82fedad4f3bf58480de2762"),
        _variant("a2", (56, 112, 224, 448), (3, 3, 15, 2),
                 "5af7e2e78761e31060c1771879c48b5e7c5c561d87b361abe7e953b8dd20379c"),
        _variant("a3", (64, 128, 256, 512), (3, 3, 13, 2),
                 "63e65a74f500bcf9ba3994db1866216b9355682b982e31f35b080354245ef1e1", 1.875),
        _variant("a4", (64, 128, 256, 512), (5, 5, 25, 4),
                 "96d06aeece85b501248badca0af74967930c947df84058be0cfdbefa5c848617", 1.875),
        _variant("a5", (80, 160, 320, 640), (7, 7, 35, 2),
                 "14213998a85662007c57fd8069219af2bb280bae6ed55c84419261ab3f1facc1", 1.875),
    )
})


def variant_for_fingerprint(fingerprint: str) -> Variant | None:
    """The size whose backbone hashes to `fingerprint`, to name what a wrong download holds; None when none does."""
    return next((v for v in VARIANTS.values() if v.fingerprint == fingerprint), None)
