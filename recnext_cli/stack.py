"""The pinned mmdet 2.x stack and how `recnext setup` installs it: torch, mmcv 1.7.2 (its Python package with
recnext's torchvision-backed RoIAlign/NMS by default, or a cached compiled build), mmdet."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

from recnext_cli.cache import cache_root
from recnext_cli.errors import EnvironmentProblem

# The one place the stack's versions are pinned.
TORCH_VERSION = "2.14.1"
TORCHVISION_VERSION = "0.29.1"
MMCV_VERSION = "1.7.2"
MMDET_VERSION = "2.28.2"
# mmcv-full 1.7.2's setup.py imports pkg_resources, which setuptools 70+ no longer ships.
BUILD_SETUPTOOLS = "setuptools<70"

Report = Callable[[str], None]


# What an mmcv build holds: "python" (no compiled extension: recnext's provider supplies RoIAlign and NMS), "cpu"
# (mmcv-full's CPU kernels) or "cu<version>" (CPU and CUDA kernels).
PYTHON_ONLY = "python"


@dataclasses.dataclass(frozen=True)
class BuildKey:
    """What an mmcv wheel depends on; a cached wheel is reused only when all of it matches."""

    mmcv: str
    torch: str
    flavour: str
    python_tag: str

    @property
    def compiled(self) -> bool:
        return self.flavour != PYTHON_ONLY

    @property
    def slug(self) -> str:
        if not self.compiled:  # a pure-Python wheel, the same for every torch and Python
            return f"mmcv-{self.mmcv}_python"
        return f"mmcv-full-{self.mmcv}_torch-{self.torch}_{self.flavour}_{self.python_tag}".replace("+", "-")


@dataclasses.dataclass
class SetupOptions:
    compile_ops: bool = False
    force_rebuild: bool = False
    jobs: int = max(1, os.cpu_count() or 1)
    python: str = sys.executable


@dataclasses.dataclass
class SetupResult:
    steps: list[str]
    log_path: Path


def python_tag() -> str:
    return f"cp{sys.version_info.major}{sys.version_info.minor}"


def wheel_cache_dir() -> Path:
    return cache_root() / "wheels"


def log_dir() -> Path:
    return cache_root() / "logs"


def _run(cmd: list[str], log, env: dict | None = None) -> None:
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise EnvironmentProblem(
            f"`{' '.join(cmd[:6])} …` failed (exit {proc.returncode}); the full log is {log.name}"
        )


def _probe(python: str, code: str) -> str | None:
    """Run a snippet in the target interpreter; its stdout, or None when it fails."""
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def installed_version(python: str, dist: str) -> str | None:
    return _probe(python, f"import importlib.metadata as m; print(m.version({dist!r}))")


def torch_facts(python: str) -> dict | None:
    out = _probe(
        python,
        "import json, torch, os; print(json.dumps({'version': torch.__version__, 'cuda': torch.version.cuda, "
        "'include': os.path.join(os.path.dirname(torch.__file__), 'include')}))",
    )
    return json.loads(out) if out else None


def torch_needs_cxx20(include_dir: str) -> bool:
    """torch 2.14's ATen headers refuse anything older than C++20; older torch builds accept C++17."""
    header = Path(include_dir) / "ATen" / "ATen.h"
    return header.exists() and "202002L" in header.read_text(errors="replace")


def local_gpu_arch(python: str) -> str | None:
    return _probe(python, "import torch; m, n = torch.cuda.get_device_capability(0); print(f'{m}.{n}')")


def build_key(torch: dict, compile_ops: bool, cuda_kernels: bool = False) -> BuildKey:
    """The build `recnext setup` wants: Python-only by default; with --compile-ops, CPU kernels plus CUDA kernels
    where `cuda_kernels` (nvcc and a GPU are present)."""
    if not compile_ops:
        return BuildKey(MMCV_VERSION, "any", PYTHON_ONLY, "py3")
    flavour = f"cu{torch['cuda']}" if cuda_kernels else "cpu"
    return BuildKey(MMCV_VERSION, torch["version"], flavour, python_tag())


def cached_wheel(key: BuildKey) -> Path | None:
    folder = wheel_cache_dir() / key.slug
    wheels = sorted(folder.glob("mmcv*.whl")) if folder.is_dir() else []
    return wheels[0] if wheels else None


def _patch_cxx_standard(setup_py: Path) -> None:
    text = setup_py.read_text()
    patched = re.sub(r"-std=c\+\+1[47]", "-std=c++20", text)
    setup_py.write_text(patched)


def build_mmcv_wheel(key: BuildKey, torch: dict, options: SetupOptions, log, report: Report) -> Path:
    """Build mmcv from the registry's mmcv-full source archive into the wheel cache; return the wheel.

    A Python-only build (MMCV_WITH_OPS=0, mmcv's own switch, which also names the package `mmcv`) takes seconds;
    a compiled one takes minutes to tens of minutes."""
    with tempfile.TemporaryDirectory(prefix="recnext-mmcv-") as tmp:
        tmpdir = Path(tmp)
        tools = tmpdir / "build-tools"
        report(f"fetching mmcv-full {MMCV_VERSION} source and build tools")
        _run([options.python, "-m", "pip", "install", "--quiet", "--target", str(tools), BUILD_SETUPTOOLS, "wheel"], log)
        build_env = dict(os.environ)
        # An old setuptools on PYTHONPATH for the build only: torch itself needs a newer one in the environment.
        build_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tools), os.environ.get("PYTHONPATH")]))
        _run(
            [options.python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--no-build-isolation", f"mmcv-full=={MMCV_VERSION}", "-d", str(tmpdir / "src")],
            log, env=build_env,
        )
        archive = next((tmpdir / "src").glob("mmcv*full-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(tmpdir / "src", filter="data")
        source = next(p for p in (tmpdir / "src").iterdir() if p.is_dir())
        if not key.compiled:
            build_env.update(MMCV_WITH_OPS="0")
            # setup.py imports torch when it can, only to offer its compiled-ops build; a torch that another pip is
            # installing right now (setup_stack builds this wheel meanwhile) could fail that import half-way.
            (tools / "torch.py").write_text('raise ModuleNotFoundError("torch is hidden from mmcv\'s Python-only build")\n')
            report(f"building mmcv {MMCV_VERSION}'s Python package (no compiled ops)")
        else:
            if torch_needs_cxx20(torch["include"]):
                _patch_cxx_standard(source / "setup.py")
                log.write("patched setup.py: -std=c++20 (the installed torch's headers require it)\n")
            build_env.update(MMCV_WITH_OPS="1", MAX_JOBS=str(options.jobs))
            if key.flavour.startswith("cu"):
                arch = local_gpu_arch(options.python)
                build_env.update(FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=arch or "")
                report(f"compiling mmcv-full CPU + CUDA ops for sm_{arch} (tens of minutes)")
            else:
                # setup.py compiles CUDA kernels whenever torch sees a GPU; hide it for a CPU-ops build.
                build_env.update(FORCE_CUDA="0", CUDA_VISIBLE_DEVICES="")
                report(f"compiling mmcv-full CPU ops with {options.jobs} jobs (about 10 minutes on 2 cores)")
        out = tmpdir / "dist"
        _run([options.python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
             log, env=build_env)
        built = next(out.glob("mmcv*.whl"))
        target_dir = wheel_cache_dir() / key.slug
        staging = target_dir.with_name(target_dir.name + ".part")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.copy2(built, staging / built.name)
        (staging / "build.json").write_text(json.dumps(dataclasses.asdict(key), indent=2))
        shutil.rmtree(target_dir, ignore_errors=True)
        os.replace(staging, target_dir)
        return target_dir / built.name


@dataclasses.dataclass(frozen=True)
class InstalledStack:
    """What the target interpreter can import: versions are None where the import fails."""

    mmcv: str | None
    mmcv_flavour: str | None  # PYTHON_ONLY (recnext's provider), "cpu", or "cu<version>"
    mmdet: str | None


# Imports mmcv.ops (which proves a compiled build links against the installed torch) and mmdet in one process, with
# recnext's ops hook registered as the .pth file would, so a Python-only mmcv counts as working.
_PROBE = """
try:
    from recnext_cli.compat import ext_hook; ext_hook.install()
except Exception:
    pass
try:
    import sys, mmcv, mmcv.ops
    a = mmcv.__version__
    ext = sys.modules['mmcv._ext']
    cuda = '-' if getattr(ext, 'PROVIDER', None) else ext.get_compiling_cuda_version()
except Exception:
    a = cuda = None
try:
    import mmdet; b = mmdet.__version__
except Exception:
    b = None
print(a, cuda, b, sep='|')
"""


def probe_mmdet_stack(python: str) -> InstalledStack:
    out = _probe(python, _PROBE)
    mmcv, cuda, mmdet = (out or "None|None|None").splitlines()[-1].split("|")
    flavours = {"None": None, "-": PYTHON_ONLY, "not available": "cpu"}
    flavour = flavours.get(cuda, f"cu{cuda}")
    return InstalledStack(None if mmcv == "None" else mmcv, flavour, None if mmdet == "None" else mmdet)


def mmcv_install_needed(installed: InstalledStack, key: BuildKey, options: SetupOptions) -> bool:
    """Whether to (build and) install mmcv. A working mmcv 1.7.2 is kept, compiled or not, unless --compile-ops asks
    for kernels it lacks or --force-rebuild is given; a compiled CUDA build is never swapped for a CPU one."""
    if options.force_rebuild or installed.mmcv != MMCV_VERSION:
        return True
    if not key.compiled:
        return False
    if installed.mmcv_flavour == PYTHON_ONLY:
        return True
    return key.flavour != "cpu" and installed.mmcv_flavour != key.flavour


def site_packages(python: str) -> Path:
    out = _probe(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    if not out:
        raise EnvironmentProblem(f"cannot ask {python} where its site-packages are")
    return Path(out.splitlines()[-1])


def install_ops_hook(python: str) -> bool:
    """Write the one-line .pth file that registers recnext's mmcv ops finder at start-up; True when it changed."""
    from recnext_cli.compat.ext_hook import PTH_LINE, PTH_NAME

    target = site_packages(python) / PTH_NAME
    if target.is_file() and not target.is_symlink() and target.read_text() == PTH_LINE:
        return False
    staging = target.with_name(f".{PTH_NAME}.{os.getpid()}.part")
    staging.write_text(PTH_LINE)
    os.replace(staging, target)
    return True


def setup_stack(options: SetupOptions, report: Report) -> SetupResult:
    """Install torch, mmcv (built once per key and cached) and mmdet into `options.python`.

    Each step asks package metadata first and imports torch only where it must (a compiled build, the final check):
    an import of torch and mmdet costs seconds, and a fresh environment's set-up should take well under 3 minutes."""
    log_dir().mkdir(parents=True, exist_ok=True)
    log_path = log_dir() / f"setup-{time.strftime('%Y%m%d-%H%M%S')}.log"
    steps: list[str] = []
    python = options.python
    with open(log_path, "w") as log, concurrent.futures.ThreadPoolExecutor(max_workers=1) as background:
        pip = [python, "-m", "pip", "install", "--quiet"]
        torch_version = installed_version(python, "torch")
        mmcv_dists = [dist for dist in ("mmcv", "mmcv-full") if installed_version(python, dist)]
        early_build = None
        if torch_version != TORCH_VERSION or installed_version(python, "torchvision") != TORCHVISION_VERSION:
            # An installed mmcv may already work: setup_stack probes it once torch is in place, and builds only then.
            if not mmcv_dists:
                early_build = _start_python_only_build(background, options, log_path, report)
            report(f"installing torch {TORCH_VERSION} and torchvision {TORCHVISION_VERSION}")
            _run(pip + [f"torch=={TORCH_VERSION}", f"torchvision=={TORCHVISION_VERSION}"], log)
            steps.append(f"installed torch {TORCH_VERSION}, torchvision {TORCHVISION_VERSION}")
            torch_version = TORCH_VERSION
        torch = {"version": torch_version}
        cuda_kernels = False
        if options.compile_ops:
            torch = torch_facts(python)
            if torch is None:
                raise EnvironmentProblem(f"torch does not import in {python}; see {log_path}")
            cuda_kernels = bool(shutil.which("nvcc") and local_gpu_arch(python))
            if not cuda_kernels:
                report("no nvcc or no visible GPU: compiling CPU kernels only (GPU tensors use torchvision's kernels)")
        key = build_key(torch, options.compile_ops, cuda_kernels)
        if install_ops_hook(python):
            steps.append("registered recnext's RoIAlign/NMS provider for mmcv (a one-line .pth file in site-packages)")
        if mmcv_dists or installed_version(python, "mmdet"):
            installed = probe_mmdet_stack(python)
        else:  # a fresh environment: nothing to probe
            installed = InstalledStack(None, None, None)
        packages: list[str] = []
        if not mmcv_install_needed(installed, key, options):
            steps.append(f"mmcv {MMCV_VERSION} ({describe_flavour(installed.mmcv_flavour)}) already works with torch "
                         f"{torch['version']}")
        else:
            wheel = None
            if early_build is not None and not key.compiled:
                wheel = early_build.result()  # built while torch installed; its errors surface here
                steps.append(f"built {wheel.name} ({wheel.stat().st_size / 2**20:.1f} MB) into {wheel.parent}, "
                             "while torch installed")
            elif not options.force_rebuild:
                wheel = cached_wheel(key)
            if wheel is None:
                wheel = build_mmcv_wheel(key, torch, options, log, report)
                steps.append(f"built {wheel.name} ({wheel.stat().st_size / 2**20:.1f} MB) into {wheel.parent}")
            report(f"installing {wheel.name}")
            if mmcv_dists:
                # The two distributions own the same `mmcv` package directory: remove whichever is there first.
                _run([python, "-m", "pip", "uninstall", "--yes", "--quiet", *mmcv_dists], log)
            # Without its declared dependencies: mmcv-full's pull in OpenCV's GUI build; the headless one is enough.
            _run(pip + ["--no-deps", str(wheel)], log)
            packages += ["addict", "packaging", "pyyaml", "yapf>=0.43", "opencv-python-headless", "pillow"]
            steps.append(f"installed mmcv {MMCV_VERSION} ({describe_flavour(key.flavour)})")
        if installed.mmdet != MMDET_VERSION:
            packages.append(f"mmdet=={MMDET_VERSION}")
            steps.append(f"installed mmdet {MMDET_VERSION}")
        if packages:
            report(f"installing {', '.join(packages)}")
            _run(pip + packages, log)
            report("checking that mmcv.ops and mmdet import")
            after = probe_mmdet_stack(python)
            if (after.mmcv, after.mmdet) != (MMCV_VERSION, MMDET_VERSION):
                raise EnvironmentProblem(f"mmcv.ops or mmdet does not import after setup; see {log_path}")
    return SetupResult(steps=steps, log_path=log_path)


def _start_python_only_build(background: concurrent.futures.Executor, options: SetupOptions, log_path: Path,
                             report: Report) -> concurrent.futures.Future | None:
    """The Python-only mmcv wheel built on a thread while pip installs torch (about 20 s saved on a fresh set-up):
    it depends on no torch version. None when it is cached or a compiled build is asked for."""
    key = build_key({"version": TORCH_VERSION}, compile_ops=False)
    if options.compile_ops or options.force_rebuild or cached_wheel(key) is not None:
        return None

    def build() -> Path:
        with open(log_path.with_name(log_path.stem + "-mmcv.log"), "w") as build_log:
            return build_mmcv_wheel(key, {"version": TORCH_VERSION}, options, build_log, report)

    return background.submit(build)


def describe_flavour(flavour: str | None) -> str:
    if flavour == PYTHON_ONLY:
        return "Python package; RoIAlign and NMS from torchvision"
    if flavour == "cpu":
        return "compiled CPU kernels"
    return f"compiled CPU + CUDA kernels, {flavour}" if flavour else "not working"
