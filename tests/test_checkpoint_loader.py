"""Every checkpoint path mmcv takes goes through one weights-only loader: local files, http(s)://, open-mmlab://,
torchvision://, mmcls:// (served by a real loopback HTTP server); a pickled callable is refused before it runs."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mmcv.runner")

from httpserver import FileServer  # noqa: E402
from recnext_cli.compat import checkpoint  # noqa: E402
from recnext_cli.compat._util import original_of  # noqa: E402
from recnext_cli.errors import EnvironmentProblem, IntegrityError, UsageError  # noqa: E402


class RunsCode:
    """Pickles as a call of os.mkdir(marker): if a loader unpickles it, the marker folder appears."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _good_checkpoint() -> dict:
    meta = {"epoch": 12, "hook_msgs": {"best_score": np.float64(0.417)}, "seeds": np.arange(3)}
    return {"meta": meta, "state_dict": {"backbone.weight": torch.full((2, 3), 0.5), "head.bias": torch.ones(2)}}


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A loopback server with one good and one hostile checkpoint; torch.hub's and mmcv's homes in tmp_path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("MMCV_HOME", str(tmp_path / "mmcv_home"))
    marker = tmp_path / "code-ran"
    files = {
        "/good.pth": _saved(_good_checkpoint()),
        "/hostile.pth": _saved({"meta": {"x": RunsCode(marker)}, "state_dict": {"w": torch.zeros(1)}}),
    }
    with FileServer(files) as server:
        server.marker = marker
        yield server


@pytest.fixture
def patched_loader():
    from mmcv.runner.checkpoint import CheckpointLoader

    checkpoint.patch()
    assert checkpoint.patched()
    return CheckpointLoader


def _url_for(scheme: str, server, name: str, tmp_path, monkeypatch) -> str:
    """A `scheme` path that mmcv resolves to `name` on the loopback server, through each scheme's own URL table."""
    from mmcv.runner import checkpoint as mmcv_checkpoint

    url = f"{server.url}/{name}"
    if scheme == "http":
        return url
    if scheme == "open-mmlab":
        # mmcv reads extra open-mmlab:// names from $MMCV_HOME/open_mmlab.json.
        (tmp_path / "mmcv_home").mkdir(exist_ok=True)
        (tmp_path / "mmcv_home" / "open_mmlab.json").write_text(json.dumps({f"local/{name}": url}))
        return f"open-mmlab://local/{name}"
    # torchvision:// and mmcls:// names come from tables compiled into torchvision and mmcv: point one name here.
    table = {"torchvision": "get_torchvision_models", "mmcls": "get_mmcls_models"}[scheme]
    monkeypatch.setattr(mmcv_checkpoint, table, lambda: {"tiny_net": url})
    return f"{scheme}://tiny_net"


def test_mmcv_alone_unpickles_a_served_callable(served):
    # The defect this module fixes: mmcv's http loader runs torch.hub with weights_only=False.
    from mmcv.runner.checkpoint import CheckpointLoader

    original = original_of(CheckpointLoader._schemes["http://"])
    original(f"{served.url}/hostile.pth", map_location="cpu")
    assert served.marker.exists()


@pytest.mark.parametrize("scheme", ["http", "open-mmlab", "torchvision", "mmcls"])
def test_every_scheme_refuses_a_callable_and_loads_numpy_meta(scheme, served, patched_loader, tmp_path, monkeypatch):
    from mmcv.runner import _load_checkpoint

    with pytest.raises(IntegrityError, match="unsupported GLOBAL posix.mkdir whose module posix is blocked") as refused:
        _load_checkpoint(_url_for(scheme, served, "hostile.pth", tmp_path, monkeypatch), map_location="cpu")
    assert not served.marker.exists()
    assert "\n" not in str(refused.value)

    loaded = _load_checkpoint(_url_for(scheme, served, "good.pth", tmp_path, monkeypatch), map_location="cpu")
    if scheme == "mmcls":  # mmcv keeps the backbone of an mmcls checkpoint, without its prefix
        assert set(loaded["state_dict"]) == {"weight"}
    else:
        assert float(loaded["meta"]["hook_msgs"]["best_score"]) == pytest.approx(0.417)
        np.testing.assert_array_equal(loaded["meta"]["seeds"], np.arange(3))
        assert torch.equal(loaded["state_dict"]["head.bias"], torch.ones(2))


def test_a_model_loads_served_weights_through_load_checkpoint(served, patched_loader):
    from mmcv.runner import load_checkpoint

    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(3, 2, bias=False)
    load_checkpoint(model, f"{served.url}/good.pth", map_location="cpu")
    assert torch.equal(model.backbone.weight, torch.full((2, 3), 0.5))


def test_unreachable_and_missing_checkpoints_are_one_line(served, patched_loader, tmp_path):
    from mmcv.runner import _load_checkpoint

    from recnext_cli.errors import DownloadError

    with pytest.raises(DownloadError, match="cannot download checkpoint .*/absent.pth"):
        _load_checkpoint(f"{served.url}/absent.pth")
    with pytest.raises(UsageError, match=f"checkpoint {tmp_path / 'none.pth'} does not exist"):
        _load_checkpoint(str(tmp_path / "none.pth"))
    torn = tmp_path / "torn.pth"
    torn.write_bytes(_saved(_good_checkpoint())[:2000])
    with pytest.raises(IntegrityError, match=f"checkpoint {torn} is not a file recnext loads"):
        _load_checkpoint(str(torn))


@pytest.mark.parametrize("path", ["s3://bucket/model.pth", "pavi://model/1", "bucket1:s3://x.pth"])
def test_schemes_nothing_here_can_check_are_refused(path, patched_loader):
    from mmcv.runner import _load_checkpoint

    with pytest.raises(UsageError, match="recnext loads checkpoints from local paths, http"):
        _load_checkpoint(path)


def test_a_torch_too_old_for_safe_loading_is_refused(patched_loader, tmp_path, monkeypatch):
    from mmcv.runner import _load_checkpoint

    path = tmp_path / "good.pth"
    path.write_bytes(_saved(_good_checkpoint()))
    # torch <= 2.5.1's weights-only unpickler could be made to run code (CVE-2025-32434).
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(EnvironmentProblem, match="torch 2.5.1 .* cannot load checkpoints safely"):
        _load_checkpoint(str(path))


def test_a_forced_unsafe_default_does_not_reach_the_loader(patched_loader, tmp_path, monkeypatch):
    from mmcv.runner import _load_checkpoint

    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.pth"
    path.write_bytes(_saved({"x": RunsCode(marker)}))
    # This variable turns torch.load's default to a full unpickle; an explicit weights_only=True still wins.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(IntegrityError):
        _load_checkpoint(str(path))
    assert not marker.exists()
