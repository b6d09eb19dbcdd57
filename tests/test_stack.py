"""How `recnext setup` keys, patches and finds its mmcv-full builds."""

from __future__ import annotations

import sys

from recnext_cli import stack


def _torch(version="2.14.1", cuda="13.0"):
    return {"version": version, "cuda": cuda, "include": "/nonexistent"}


def test_build_key_separates_torch_cuda_and_python():
    cpu = stack.build_key(_torch(), compile_ops=True)
    gpu = stack.build_key(_torch(), compile_ops=True, cuda_kernels=True)
    older = stack.build_key(_torch("2.13.0+cpu", None), compile_ops=True)
    assert cpu.flavour == "cpu" and gpu.flavour == "cu13.0"
    assert len({cpu.slug, gpu.slug, older.slug}) == 3
    assert stack.python_tag() in cpu.slug and "+" not in older.slug


def test_the_python_only_build_is_one_wheel_for_every_torch():
    plain = stack.build_key(_torch(), compile_ops=False)
    assert plain.flavour == stack.PYTHON_ONLY and not plain.compiled
    assert plain == stack.build_key(_torch("2.13.0+cpu", None), compile_ops=False)
    # asking for CUDA kernels without --compile-ops changes nothing
    assert plain == stack.build_key(_torch(), compile_ops=False, cuda_kernels=True)
    assert plain.slug != stack.build_key(_torch(), compile_ops=True).slug


def test_cached_wheel_is_found_only_under_its_own_key(tmp_path, monkeypatch):
    monkeypatch.setenv("RECNEXT_HOME", str(tmp_path))
    key = stack.build_key(_torch(), compile_ops=True)
    assert stack.cached_wheel(key) is None
    folder = stack.wheel_cache_dir() / key.slug
    folder.mkdir(parents=True)
    wheel = folder / "mmcv_full-1.7.2-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"wheel")
    assert stack.cached_wheel(key) == wheel
    assert stack.cached_wheel(stack.build_key(_torch("2.15.0"), compile_ops=True)) is None
    # an interrupted build leaves only a .part folder, which is never mistaken for a finished one
    other = stack.build_key(_torch("2.16.0"), compile_ops=True)
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


def test_a_working_build_is_kept_and_kernels_are_compiled_only_when_asked():
    plain_key = stack.build_key(_torch(), compile_ops=False)
    cpu_key = stack.build_key(_torch(), compile_ops=True)
    cuda_key = stack.build_key(_torch(), compile_ops=True, cuda_kernels=True)
    plain, compiled = stack.SetupOptions(), stack.SetupOptions(compile_ops=True)
    python_only = _installed(flavour=stack.PYTHON_ONLY)
    # the default keeps any working 1.7.2: the Python package with the provider, or a compiled build
    assert not stack.mmcv_install_needed(python_only, plain_key, plain)
    assert not stack.mmcv_install_needed(_installed(), plain_key, plain)
    assert not stack.mmcv_install_needed(_installed(flavour="cu13.0"), plain_key, plain)
    # --compile-ops replaces the Python package, adds CUDA kernels where they can be built, never downgrades
    assert stack.mmcv_install_needed(python_only, cpu_key, compiled)
    assert not stack.mmcv_install_needed(_installed(), cpu_key, compiled)
    assert not stack.mmcv_install_needed(_installed(flavour="cu13.0"), cpu_key, compiled)
    assert stack.mmcv_install_needed(_installed(), cuda_key, compiled)
    assert not stack.mmcv_install_needed(_installed(flavour="cu13.0"), cuda_key, compiled)
    # broken, other versions, or --force-rebuild: always
    assert stack.mmcv_install_needed(_installed(version=None, flavour=None), plain_key, plain)
    assert stack.mmcv_install_needed(_installed(version="1.7.1"), plain_key, plain)
    assert stack.mmcv_install_needed(python_only, plain_key, stack.SetupOptions(force_rebuild=True))


def test_the_ops_hook_file_is_written_once_and_replaces_a_planted_link(tmp_path, monkeypatch):
    monkeypatch.setattr(stack, "site_packages", lambda python: tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "recnext_mmcv_ops.pth").symlink_to(victim)
    assert stack.install_ops_hook(sys.executable)
    hook = tmp_path / "recnext_mmcv_ops.pth"
    assert not hook.is_symlink() and hook.read_text().startswith("import ") and hook.read_text().count("\n") == 1
    assert victim.read_text() == "keep me"
    assert not stack.install_ops_hook(sys.executable)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recnext_mmcv_ops.pth", "victim.txt"]
