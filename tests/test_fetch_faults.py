"""The fault suite: well over 100 faulty transfers against the real loopback server. No run may leave a corrupt or
spliced file in the cache (final file, manifest record or parked .part), and every run must end within its deadline."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time

import pytest

from httpserver import Fault, FileServer, checkpoint_bytes, etag, last_modified, tls_context
from recnext_cli import cache, fetch, zoo
from recnext_cli.fetch import transport
from recnext_cli.errors import RecnextError

M3 = zoo.get_checkpoint("m3")
PATH = f"/{M3.release_tag}/{M3.file_name}"
V1 = checkpoint_bytes("m3", "coco", seed=0, pad=60_000)
V2 = checkpoint_bytes("m3", "coco", seed=1, pad=60_000)  # another version of the same length
CHUNK = 16 * 1024
DEADLINE = 3.0
TRICKLE_DEADLINE = 0.4
# What a run may take beyond its deadline: hashing and reading the finished file, after the network part is over.
SLACK = 0.5


@dataclasses.dataclass(frozen=True)
class Run:
    """One `ensure_file` call: the faults the server applies to its requests, and the cache it must leave."""

    faults: tuple[Fault, ...] = ()
    expect: str | None = "V1"  # the final file afterwards: "V1", "V2" or None (absent)
    fails: bool = False  # whether the call raises a RecnextError
    retries: int = 5
    force: bool = False
    message: str = ""  # what the error must say, where it matters which failure it is
    publish: bytes | None = None  # the server switches to this version before the run


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    runs: tuple[Run, ...]
    validators: str = "both"
    supports_range: bool = True
    pinned: bool = False
    deadline: float = DEADLINE
    max_bytes: int | None = None  # transport.MAX_DOWNLOAD_BYTES for this scenario
    other_server: bool = False  # a second loopback server (another port: another host) serves the files too
    tls: bool = False  # the first server speaks https (with a certificate the client is told to trust)


def _cuts(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(1, len(V1) - 1) for _ in range(count)]


def _scenarios() -> list[Scenario]:
    rng = random.Random(12)
    validators = ("both", "etag", "last-modified")
    found = []
    for i in range(24):
        faults = tuple(Fault(cut_after=cut) for cut in _cuts(rng, 1 + i % 3))
        found.append(Scenario(f"drop-{i}", (Run(faults),), validators[i % 3]))
    for i in range(16):
        faults = tuple(Fault(truncate_after=cut) for cut in _cuts(rng, 1 + i % 3))
        found.append(Scenario(f"truncate-{i}", (Run(faults),), validators[i % 3]))
    for i in range(6):
        # A flipped byte in a body that arrives whole: the pin refuses it, nothing is cached.
        found.append(Scenario(f"wrong-bytes-whole-{i}", (Run((Fault(corrupt_at=_cuts(rng, 1)[0]),), None, True),),
                              pinned=True))
    for i in range(6):
        # A flipped byte in the part kept before a cut (a reset may lose the last chunks read, so well before it):
        # the resumed file fails the pin.
        cut = rng.randrange(6 * CHUNK, len(V1) - 1)
        run = Run((Fault(cut_after=cut, corrupt_at=rng.randrange(0, cut - 4 * CHUNK)),), None, True)
        found.append(Scenario(f"wrong-bytes-kept-{i}", (run,), validators[i % 3], pinned=True))
    for i in range(4):
        # Unpinned: a good first download is recorded; a later forced one with a flipped byte is refused, V1 stays.
        runs = (Run(), Run((Fault(corrupt_at=_cuts(rng, 1)[0]),), "V1", True, force=True))
        found.append(Scenario(f"wrong-bytes-after-record-{i}", runs))
    for i in range(12):
        # The file changes between two attempts of one run: the resume must not splice V1's head to V2's tail.
        run = Run((Fault(cut_after=_cuts(rng, 1)[0]), Fault(publish=V2)), "V2")
        found.append(Scenario(f"changed-between-attempts-{i}", (run,), validators[i % 3]))
    for i in range(8):
        # ... or between two runs: the first gives up with a parked .part, the second finds V2 published.
        runs = (Run((Fault(cut_after=_cuts(rng, 1)[0]), Fault(status=503)), None, True, retries=0), Run(publish=V2, expect="V2"))
        found.append(Scenario(f"changed-between-runs-{i}", runs, validators[i % 3]))
    for i in range(5):
        # A broken server that answers a resume with a tail of the new version although If-Range named the old one.
        run = Run((Fault(cut_after=_cuts(rng, 1)[0]), Fault(publish=V2, ignore_if_range=True)), "V2")
        found.append(Scenario(f"if-range-ignored-{i}", (run,)))
    for i in range(5):
        # A server without ETag or Last-Modified: nothing can prove a resume is the same version, so none happens.
        runs = (Run((Fault(cut_after=_cuts(rng, 1)[0]), Fault(status=503)), None, True, retries=0), Run(publish=V2, expect="V2"))
        found.append(Scenario(f"no-validators-{i}", runs, validators="none"))
    for i in range(6):
        faults = tuple(Fault(cut_after=cut) for cut in _cuts(rng, 1 + i % 2))
        found.append(Scenario(f"range-ignored-{i}", (Run(faults),), supports_range=False))
    for i in range(4):
        # Range ignored and always cut at the same place: the bytes are received again and again but never kept.
        cut, = _cuts(rng, 1)
        run = Run(tuple(Fault(cut_after=cut) for _ in range(50)), None, True, retries=3)
        found.append(Scenario(f"range-ignored-always-cut-{i}", (run,), supports_range=False))
    for i in range(4):
        run = Run(tuple(Fault(delay=0.05) for _ in range(3)), None, True, message="gave up on")
        found.append(Scenario(f"trickle-past-deadline-{i}", (run,), validators[i % 3], deadline=TRICKLE_DEADLINE))
    for framing in ("chunked", "unframed"):
        # Without a length, a body the deadline cut must not pass for a complete one.
        run = Run(tuple(Fault(delay=0.05, **{framing: True}) for _ in range(3)), None, True, message="gave up on")
        found.append(Scenario(f"trickle-{framing}-past-deadline", (run,), deadline=TRICKLE_DEADLINE))
    for i in range(2):
        found.append(Scenario(f"trickle-within-deadline-{i}", (Run((Fault(delay=0.002),)),)))
    for i in range(6):
        faults = (Fault(redirect="OTHER"),) + tuple(Fault(cut_after=cut) for cut in _cuts(rng, i % 3))
        found.append(Scenario(f"redirect-other-host-{i}", (Run(faults),), other_server=True))
    found.append(Scenario("redirect-to-plain-http-elsewhere", (Run((Fault(redirect="http://192.0.2.1:9"),), None, True),)))
    found.append(Scenario("redirect-to-file-scheme", (Run((Fault(redirect="file:///etc"),), None, True),)))
    found.append(Scenario("redirect-loop", (Run(tuple(Fault(redirect="SELF") for _ in range(20)), None, True),)))
    for i in range(2):
        found.append(Scenario(f"https-redirect-to-http-{i}", (Run((Fault(redirect="OTHER"),), None, True),),
                              other_server=True, tls=True))
    for i in range(2):
        faults = (Fault(cut_after=_cuts(rng, 1)[0]),) * i
        found.append(Scenario(f"https-direct-{i}", (Run(faults),), tls=True))
    for framing in ("chunked", "unframed"):
        run = Run(tuple(Fault(delay=0.05, **{framing: True}) for _ in range(3)), None, True, message="gave up on")
        found.append(Scenario(f"https-trickle-{framing}-past-deadline", (run,), deadline=TRICKLE_DEADLINE, tls=True))
    for i in range(3):
        found.append(Scenario(f"oversized-announced-{i}", (Run((), None, True),), max_bytes=len(V1) - 1 - i * 1000))
    for i in range(3):
        found.append(Scenario(f"oversized-chunked-{i}", (Run((Fault(chunked=True),), None, True),),
                              max_bytes=len(V1) // (2 + i)))
    for i in range(2):
        # The server announces more than it sends: a short body, resumed, within the cap.
        found.append(Scenario(f"announced-more-than-sent-{i}", (Run((Fault(content_length=len(V1) + 10 + i),)),)))
    for i in range(2):
        # Pinned size: a body that announces another size is refused before it is read.
        found.append(Scenario(f"pinned-size-mismatch-{i}", (Run(publish=V1 + b"\0" * (1 + i), expect=None, fails=True),),
                              pinned=True))
    for i in range(3):
        faults = tuple(Fault(status=500 + i) for _ in range(1 + i))
        found.append(Scenario(f"server-error-then-ok-{i}", (Run(faults),)))
    for i in range(2):
        run = Run(tuple(Fault(status=503) for _ in range(10)), None, True, retries=2)
        found.append(Scenario(f"server-error-persistent-{i}", (run,)))
    return found


SCENARIOS = _scenarios()


def test_the_suite_has_at_least_100_faulty_transfers():
    assert sum(len(scenario.runs) for scenario in SCENARIOS) >= 100
    assert len({scenario.name for scenario in SCENARIOS}) == len(SCENARIOS)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return tls_context(tmp_path_factory.mktemp("tls"))


def cache_problems(versions: list[bytes]) -> list[str]:
    """Every entry of the checkpoint cache that is not a whole served version, or a prefix of the version it names."""
    directory = cache.checkpoints_dir()
    if not directory.exists():
        return []
    by_validator = {value: body for body in versions for value in (etag(body), last_modified(body))}
    problems = []
    manifest = cache.read_manifest()
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if entry.is_symlink():
            problems.append(f"{name} is a link")
        elif name == M3.file_name:
            content = entry.read_bytes()
            if content not in versions:
                problems.append(f"{name} is no served version ({len(content)} bytes)")
            record = manifest.get(name)
            if record is None or (record.sha256, record.size) != (hashlib.sha256(content).hexdigest(), len(content)):
                problems.append(f"the manifest record of {name} does not describe it")
        elif name == f"{M3.file_name}.part":
            sidecar = directory / f"{name}.json"
            if not sidecar.exists():
                problems.append(f"{name} has no sidecar")
                continue
            version = by_validator.get(json.loads(sidecar.read_text())["version"][1])
            content = entry.read_bytes()
            if version is None or version[:len(content)] != content:
                problems.append(f"{name} is not a prefix of the version its sidecar names")
        elif name not in ("manifest.json", f"{M3.file_name}.part.json") and not name.endswith(".lock"):
            problems.append(f"{name} was left behind")
    return problems


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.name)
def test_a_faulty_transfer_leaves_no_corrupt_file_and_ends_in_time(scenario, tmp_path, monkeypatch, request):
    monkeypatch.setenv("RECNEXT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECNEXT_OFFLINE", raising=False)
    monkeypatch.setattr(transport, "CHUNK_SIZE", CHUNK)
    monkeypatch.setattr(transport, "BACKOFF_SECONDS", 0.001)
    if scenario.max_bytes is not None:
        monkeypatch.setattr(transport, "MAX_DOWNLOAD_BYTES", scenario.max_bytes)
    checkpoint = dataclasses.replace(M3, sha256=hashlib.sha256(V1).hexdigest(), size=len(V1)) if scenario.pinned else M3
    tls = None
    if scenario.tls:
        tls, cert = request.getfixturevalue("certificate")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    with FileServer({PATH: V1}, CHUNK, tls) as server, FileServer({PATH: V1}, CHUNK) as other:
        monkeypatch.setenv("RECNEXT_BASE_URL", server.url)
        server.validators = other.validators = scenario.validators
        server.supports_range = other.supports_range = scenario.supports_range
        versions = [V1]
        for number, run in enumerate(scenario.runs):
            monkeypatch.setattr(transport, "RETRIES", run.retries)
            if run.publish is not None:
                server.files[PATH] = other.files[PATH] = run.publish
                versions.append(run.publish)
            places = {"OTHER": other.url, "SELF": server.url}
            server.faults = [dataclasses.replace(f, redirect=places.get(f.redirect, f.redirect)) for f in run.faults]
            versions += [fault.publish for fault in run.faults if fault.publish is not None]
            start = time.monotonic()
            try:
                fetch.ensure_file(checkpoint, force=run.force, timeout=scenario.deadline)
                failed = None
            except RecnextError as exc:
                failed = exc
            elapsed = time.monotonic() - start
            problems = cache_problems(versions)
            # Kept with the test report (e.g. --junitxml) for the suite's figures.
            request.node.user_properties.append((f"run{number}", json.dumps(
                {"seconds": round(elapsed, 3), "deadline": scenario.deadline, "corrupt": len(problems)}
            )))
            assert problems == []
            assert elapsed <= scenario.deadline + SLACK, f"run {number} took {elapsed:.2f} s"
            assert (failed is not None) == run.fails, f"run {number}: {failed}"
            assert run.message in str(failed or "")
            final = cache.checkpoint_path(M3.file_name)
            content = final.read_bytes() if final.exists() else None
            assert content == {"V1": V1, "V2": V2, None: None}[run.expect], f"run {number}"
        if scenario.name.startswith(("redirect-to-", "https-redirect-to-http")):
            assert other.log == []  # refused before any connection to where it pointed
        if scenario.name.startswith("redirect-other-host"):
            assert {entry.authorization for entry in other.log} == {None}
        if scenario.name.startswith(("oversized-announced", "pinned-size-mismatch")):
            assert not fetch_part_exists()


def fetch_part_exists() -> bool:
    part = cache.checkpoint_path(M3.file_name).with_name(f"{M3.file_name}.part")
    return part.exists()
