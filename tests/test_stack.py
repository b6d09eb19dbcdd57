"""How `recnext setup` keys, patches and finds its mmcv-full builds."""

from __future__ import annotations

import sys

from recnext_cli import stack


def _torch(version="2.14.1", cuda="13.0"):
    return {"version": version, "cuda": cuda, "include": "/nonexistent"}


def test_build_key_separates_torch_cuda_and_python():
    cpu = stack.build_key(_torch(), cuda_ops=False)
    gpu = stack.build_key(_torch(), cuda_ops=True)
    older = stack.build_key(_torch("2.13.0+cpu", None), cuda_ops=False)
    assert cpu.flavour == "cpu" and gpu.flavour == "cu13.0"
    assert len({cpu.slug, gpu.slug, older.slug}) == 3
    assert stack.python_tag() in cpu.slug and "+" not in older.slug


def test_cached_wheel_is_found_only_under_its_own_key(tmp_path, monkeypatch):
    monkeypatch.setenv("RECNEXT_HOME", str(tmp_path))
    key = stack.build_key(_torch(), cuda_ops=False)
    assert stack.cached_wheel(key) is None
    folder = stack.wheel_cache_dir() / key.slug
    folder.mkdir(parents=True)
    wheel = folder / "mmcv_full-1.7.2-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"wheel")
    assert stack.cached_wheel(key) == wheel
    assert stack.cached_wheel(stack.build_key(_torch("2.15.0"), cuda_ops=False)) is None
    # an interrupted build leaves only a .part folder, which is never mistaken for a finished one
    other = stack.build_key(_torch("2.16.0"), cuda_ops=False)
    part = stack.wheel_cache_dir() / (other.slug + ".part")
    part.mkdir()
    (part / wheel.name).write_bytes(b"half")
    assert stack.cached_wheel(other) is None


def test_cxx_standard_is_raised_everywhere_it_is_set(tmp_path):
    setup_py = tmp_path / "setup.py"
    setup_py.write_text("a = ['-std=c++14']\nb = ['-std=c++17']\nc = ['-Wall', '-std=c++17']\nd = '/std:c++17'\n")
    stack._patch_cxx_standard(setup_py)
    text = setup_py.read_text()
    assert "-std=c++14" not in text and "-std=c++17" not in text
    assert text.count("-std=c++20") == 3 and "/std:c++17" in text


def test_cxx20_detection_reads_the_aten_header(tmp_path):
    header = tmp_path / "ATen" / "ATen.h"
    header.parent.mkdir()
    header.write_text("#if !defined(_MSC_VER) && __cplusplus < 201703L\n#error C++17\n#endif\n")
    assert not stack.torch_needs_cxx20(str(tmp_path))
    header.write_text("#if !defined(_MSC_VER) && __cplusplus < 202002L\n#error C++20\n#endif\n")
    assert stack.torch_needs_cxx20(str(tmp_path))


def test_probe_reads_a_broken_stack_as_missing(tmp_path):
    shadow = tmp_path / "mmcv"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('broken build')\n")
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\nPYTHONPATH={tmp_path} exec {sys.executable} \"$@\"\n")
    fake_python.chmod(0o755)
    installed = stack.probe_mmdet_stack(str(fake_python))
    assert installed.mmcv is None and installed.mmcv_flavour is None


def _installed(version="1.7.2", flavour="cpu"):
    return stack.InstalledStack(version, flavour, "2.28.2")


def test_a_working_build_is_kept_and_cuda_ops_are_added_only_when_asked():
    cpu_key = stack.build_key(_torch(), cuda_ops=False)
    cuda_key = stack.build_key(_torch(), cuda_ops=True)
    plain, cuda = stack.SetupOptions(), stack.SetupOptions(cuda_ops=True)
    assert not stack.mmcv_install_needed(_installed(), cpu_key, plain)
    assert not stack.mmcv_install_needed(_installed(flavour="cu13.0"), cpu_key, plain)  # never downgraded
    assert stack.mmcv_install_needed(_installed(), cuda_key, cuda)
    assert not stack.mmcv_install_needed(_installed(flavour="cu13.0"), cuda_key, cuda)
    assert stack.mmcv_install_needed(_installed(version=None, flavour=None), cpu_key, plain)  # ops fail to load
    assert stack.mmcv_install_needed(_installed(version="1.7.1"), cpu_key, plain)
    assert stack.mmcv_install_needed(_installed(), cpu_key, stack.SetupOptions(force_rebuild=True))
