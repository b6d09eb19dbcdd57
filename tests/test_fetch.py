"""Downloads against a real local HTTP server: resume, retries, faults, integrity, offline mode and concurrent processes."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from httpserver import Fault, FileServer, checkpoint_bytes, etag, last_modified, tls_context
from recnext_cli import cache, fetch, zoo
from recnext_cli.fetch import checks, transport
from recnext_cli.errors import DownloadError, IntegrityError, UsageError

M3 = zoo.get_checkpoint("m3")
M3_PRETRAIN = zoo.get_checkpoint("m3", pretrain=True)
CHUNK = 64 * 1024
BACKOFF = 0.001


def url_path(checkpoint: zoo.Checkpoint) -> str:
    return f"/{checkpoint.release_tag}/{checkpoint.file_name}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers() -> list[str]:
    """Files in the checkpoint cache other than lock files."""
    return sorted(path.name for path in cache.checkpoints_dir().iterdir() if path.suffix != ".lock")


def recorded(file_name: str) -> tuple[str, int] | None:
    record = cache.recorded(file_name)
    return None if record is None else (record.sha256, record.size)


def parked(checkpoint: zoo.Checkpoint = M3) -> Path:
    path = cache.checkpoint_path(checkpoint.file_name)
    return path.with_name(f"{path.name}.part")


def stop_after(server, monkeypatch, cut: int) -> int:
    """Run a download that the server cuts at `cut` and that gives up on the next failure; returns the bytes it parked."""
    monkeypatch.setattr(transport, "RETRIES", 0)
    server.faults = [Fault(cut_after=cut), Fault(status=503)]
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        fetch.ensure_file(M3)
    monkeypatch.setattr(transport, "RETRIES", 5)
    return parked().stat().st_size


@pytest.fixture
def good() -> bytes:
    # About 1.6 MB: large enough to be cut several times in the middle.
    return checkpoint_bytes("m3", "coco", pad=300_000)


@pytest.fixture
def server(monkeypatch, tmp_path, good):
    monkeypatch.setenv("RECNEXT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RECNEXT_OFFLINE", raising=False)
    monkeypatch.setattr(transport, "CHUNK_SIZE", CHUNK)
    monkeypatch.setattr(transport, "BACKOFF_SECONDS", BACKOFF)
    with FileServer({url_path(M3): good}) as files:
        monkeypatch.setenv("RECNEXT_BASE_URL", files.url)
        yield files


def test_clean_download_is_verified_recorded_and_then_served_from_the_cache(server, good):
    reports = []
    path = fetch.ensure_file(M3, lambda done, total: reports.append((done, total)))
    assert path == cache.checkpoint_path(M3.file_name)
    assert path.read_bytes() == good
    assert reports[-1] == (len(good), len(good))
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    record = cache.recorded(M3.file_name)
    assert (record.sha256, record.size, record.source) == (sha256(good), len(good), server.url + url_path(M3))
    assert record.first_seen
    assert leftovers() == ["manifest.json", M3.file_name]
    requests_so_far = len(server.log)
    assert fetch.ensure_file(M3) == path
    assert len(server.log) == requests_so_far


def test_connection_cut_three_times_resumes_where_it_stopped(server, good):
    server.faults = [Fault(cut_after=300_000), Fault(cut_after=250_000), Fault(cut_after=200_000)]
    path = fetch.ensure_file(M3)
    assert path.read_bytes() == good
    assert [entry.status for entry in server.log] == [200, 206, 206, 206]
    for previous, resumed in zip(server.log, server.log[1:]):
        reached = (previous.range_start or 0) + previous.sent
        # A reset loses at most the chunk the client was in the middle of reading; nothing before it is asked again.
        assert reached - CHUNK <= resumed.range_start <= reached
    assert server.bytes_sent() - len(good) <= 3 * CHUNK
    # Every resume names the version its kept bytes belong to.
    assert {entry.if_range for entry in server.log[1:]} == {etag(good)}
    # The digest recorded for a resumed download covers the bytes kept from before each cut too.
    assert cache.recorded(M3.file_name).sha256 == sha256(good)


def test_a_later_run_resumes_what_an_earlier_run_left(server, good, monkeypatch):
    monkeypatch.setattr(transport, "RETRIES", 0)
    server.faults = [Fault(cut_after=400_000), Fault(status=503)]
    with pytest.raises(DownloadError, match="run the same command again to resume"):
        fetch.ensure_file(M3)
    path = cache.checkpoint_path(M3.file_name)
    kept = parked().stat().st_size
    assert 0 < kept <= 400_000
    assert not path.exists()
    fetch.ensure_file(M3)
    assert (server.log[-1].range_start, server.log[-1].if_range, server.log[-1].status) == (kept, etag(good), 206)
    assert path.read_bytes() == good
    assert cache.recorded(M3.file_name).sha256 == sha256(good)
    assert leftovers() == ["manifest.json", M3.file_name]


@pytest.mark.parametrize("validators", ["both", "etag", "last-modified"])
def test_a_file_republished_between_runs_is_fetched_whole_not_spliced(server, good, monkeypatch, validators):
    # Issue 12, point 1: cut at 1.2 MB, publish another file of the same length, run again.
    server.validators = validators
    kept = stop_after(server, monkeypatch, cut=1_200_000)
    assert kept > 1_000_000
    republished = checkpoint_bytes("m3", "coco", seed=1, pad=300_000)
    assert len(republished) == len(good)
    server.files[url_path(M3)] = republished
    assert fetch.ensure_file(M3).read_bytes() == republished
    expected = etag(good) if validators != "last-modified" else last_modified(good)
    assert (server.log[-1].range_start, server.log[-1].if_range, server.log[-1].status) == (kept, expected, 200)
    assert recorded(M3.file_name) == (sha256(republished), len(republished))
    assert leftovers() == ["manifest.json", M3.file_name]


def test_a_server_that_sends_no_validator_gets_no_resume(server, good, monkeypatch):
    server.validators = "none"
    server.faults = [Fault(cut_after=600_000)]
    assert fetch.ensure_file(M3).read_bytes() == good
    assert [(entry.range_start, entry.status) for entry in server.log] == [(None, 200), (None, 200)]
    assert not parked().exists()


def test_a_server_that_ignores_if_range_cannot_splice_either(server, good, monkeypatch):
    kept = stop_after(server, monkeypatch, cut=700_000)
    republished = checkpoint_bytes("m3", "coco", seed=1, pad=300_000)
    # It answers the resume with a tail of the new version, naming that version's ETag.
    server.faults = [Fault(publish=republished, ignore_if_range=True)]
    assert fetch.ensure_file(M3).read_bytes() == republished
    assert [(entry.range_start, entry.status) for entry in server.log[-2:]] == [(kept, 206), (None, 200)]


def test_a_parked_download_expires(server, good, monkeypatch):
    stop_after(server, monkeypatch, cut=700_000)
    old = time.time() - fetch.PARKED_SECONDS - 60
    os.utime(parked(), (old, old))
    assert fetch.ensure_file(M3).read_bytes() == good
    assert server.log[-1].range_start is None
    assert leftovers() == ["manifest.json", M3.file_name]


def test_a_part_beside_another_parts_sidecar_is_not_resumed(server, good, monkeypatch):
    # Two writers parking at once where locks are no-ops can cross their renames: one's bytes, the other's sidecar.
    stop_after(server, monkeypatch, cut=700_000)
    other = parked().with_name("other.part")
    os.replace(parked(), other)
    os.replace(f"{parked()}.json", f"{other}.json")
    stop_after(server, monkeypatch, cut=300_000)
    os.replace(f"{other}.json", f"{parked()}.json")
    assert fetch.ensure_file(M3).read_bytes() == good
    assert server.log[-1].range_start is None


def test_a_writer_killed_outright_leaves_bytes_the_next_run_resumes(server, good, monkeypatch):
    path = cache.checkpoint_path(M3.file_name)
    # What SIGKILLed writers leave: their private files with sidecars. Made here by real stopped downloads.
    leftovers_of_killed = []
    for name, cut in (("0123456789ab", 700_000), ("ba9876543210", 100_000)):
        kept = stop_after(server, monkeypatch, cut=cut)
        private = path.with_name(f"{path.name}.{name}.part")
        os.replace(f"{parked()}.json", f"{private}.json")
        os.replace(parked(), private)
        leftovers_of_killed.append((kept, private))
    live = path.with_name(f"{path.name}.live00000000.part")  # another writer, still appending
    live.write_bytes(good[:50_000])
    hour_ago = time.time() - 3600
    for _, abandoned in leftovers_of_killed:
        os.utime(abandoned, (hour_ago, hour_ago))
    sent = server.bytes_sent()
    assert fetch.ensure_file(M3).read_bytes() == good
    largest = leftovers_of_killed[0][0]
    assert server.log[-1].range_start == largest
    assert server.bytes_sent() - sent == len(good) - largest
    assert not any(abandoned.exists() for _, abandoned in leftovers_of_killed)
    assert live.read_bytes() == good[:50_000]


def test_a_500_is_retried_after_a_backoff(server, good, monkeypatch):
    sleeps = []
    monkeypatch.setattr(transport, "wait_before_retry", sleeps.append)
    server.faults = [Fault(status=500)]
    assert fetch.ensure_file(M3).read_bytes() == good
    assert [entry.status for entry in server.log] == [500, 200]
    assert sleeps == [BACKOFF]


def test_persistent_5xx_gives_up_with_exponential_backoff(server, monkeypatch):
    sleeps = []
    monkeypatch.setattr(transport, "wait_before_retry", sleeps.append)
    monkeypatch.setattr(transport, "RETRIES", 3)
    server.faults = [Fault(status=502)] * 4
    with pytest.raises(DownloadError, match="502"):
        fetch.ensure_file(M3)
    assert sleeps == [BACKOFF, 2 * BACKOFF, 4 * BACKOFF]
    assert leftovers() == []


def test_404_fails_at_once_with_the_address_and_leaves_nothing(server):
    del server.files[url_path(M3)]
    with pytest.raises(DownloadError) as failure:
        fetch.ensure_file(M3)
    assert "404" in str(failure.value) and server.url + url_path(M3) in str(failure.value)
    assert len(server.log) == 1
    assert leftovers() == []
    assert cache.recorded(M3.file_name) is None


def test_bytes_that_differ_from_the_pinned_digest_never_enter_the_cache(server, good):
    pinned = dataclasses.replace(M3, sha256=sha256(good))
    corrupted = bytearray(good)
    corrupted[len(good) // 2] ^= 0xFF
    server.files[url_path(M3)] = bytes(corrupted)
    with pytest.raises(IntegrityError, match="pins"):
        fetch.ensure_file(pinned)
    assert leftovers() == []
    assert cache.recorded(M3.file_name) is None


def test_bytes_that_differ_from_the_recorded_digest_are_refused(server, good):
    path = fetch.ensure_file(M3)
    path.unlink()
    server.files[url_path(M3)] = checkpoint_bytes("m3", "coco", seed=1, pad=300_000)
    with pytest.raises(IntegrityError, match="recorded"):
        fetch.ensure_file(M3)
    assert not path.exists()
    assert cache.recorded(M3.file_name).sha256 == sha256(good)


def test_force_refuses_changed_bytes_unless_the_new_digest_is_accepted(server, good):
    path = fetch.ensure_file(M3)
    republished = checkpoint_bytes("m3", "coco", seed=1, pad=300_000)
    server.files[url_path(M3)] = republished
    with pytest.raises(IntegrityError, match="--accept-new-digest"):
        fetch.ensure_file(M3, force=True)
    assert path.read_bytes() == good
    assert cache.recorded(M3.file_name).sha256 == sha256(good)
    fetch.ensure_file(M3, force=True, accept_new_digest=True)
    assert path.read_bytes() == republished
    assert recorded(M3.file_name) == (sha256(republished), len(republished))


def test_offline_mode_never_opens_a_connection(server, good, monkeypatch):
    def refuse(*args):
        raise AssertionError("a connection was opened in offline mode")

    monkeypatch.setenv("RECNEXT_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(DownloadError) as failure:
        fetch.ensure_file(M3)
    message = str(failure.value)
    assert "RECNEXT_OFFLINE" in message and "recnext download m3" in message
    assert str(cache.checkpoint_path(M3.file_name)) in message
    assert server.log == []


def test_offline_mode_serves_a_verified_cached_file(server, good, monkeypatch):
    path = fetch.ensure_file(M3)
    monkeypatch.setenv("RECNEXT_OFFLINE", "1")
    assert fetch.ensure_file(M3) == path
    assert len(server.log) == 1


def test_a_server_that_ignores_range_makes_the_download_start_over(server, good):
    server.supports_range = False
    server.faults = [Fault(cut_after=500_000)]
    assert fetch.ensure_file(M3).read_bytes() == good
    assert [entry.status for entry in server.log] == [200, 200]
    assert server.log[1].range_start > 0
    assert server.bytes_sent() == 500_000 + len(good)


def test_a_body_shorter_than_its_content_length_is_detected_and_resumed(server, good):
    server.faults = [Fault(truncate_after=700_000)]
    assert fetch.ensure_file(M3).read_bytes() == good
    assert [(entry.status, entry.range_start) for entry in server.log] == [(200, None), (206, 700_000)]


def test_bodies_that_always_stop_short_leave_no_complete_looking_file(server, monkeypatch):
    monkeypatch.setattr(transport, "RETRIES", 2)
    server.faults = [Fault(truncate_after=0)] * 3
    with pytest.raises(DownloadError):
        fetch.ensure_file(M3)
    assert len(server.log) == 3
    assert leftovers() == []


def test_kept_bytes_of_no_known_version_are_dropped(server, good):
    path = cache.checkpoint_path(M3.file_name)
    path.parent.mkdir(parents=True)
    parked().write_bytes(b"x" * (len(good) + 10))
    assert fetch.ensure_file(M3).read_bytes() == good
    assert [(entry.range_start, entry.status) for entry in server.log] == [(None, 200)]


def test_kept_bytes_that_are_already_the_whole_file_are_only_verified(server, good, monkeypatch):
    real_check = checks.check_structure

    def interrupted(path, checkpoint):
        monkeypatch.setattr(checks, "check_structure", real_check)
        raise KeyboardInterrupt  # Ctrl-C while the complete file was being checked

    monkeypatch.setattr(checks, "check_structure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch.ensure_file(M3)
    assert parked().read_bytes() == good
    assert fetch.ensure_file(M3).read_bytes() == good
    assert [entry.status for entry in server.log] == [200, 416]
    assert server.bytes_sent() == len(good)


def test_a_wrong_backbone_is_refused_and_not_recorded(server):
    server.files[url_path(M3)] = checkpoint_bytes("m4", "coco")
    with pytest.raises(IntegrityError, match="does not hold a RecNeXt-M3 coco checkpoint: it holds a RecNeXt-M4 backbone"):
        fetch.ensure_file(M3)
    assert leftovers() == []
    assert cache.recorded(M3.file_name) is None


def test_an_imagenet_file_is_refused_where_a_coco_checkpoint_belongs(server):
    server.files[url_path(M3)] = checkpoint_bytes("m3", "imagenet")
    with pytest.raises(IntegrityError, match="no 'state_dict' state dict"):
        fetch.ensure_file(M3)


def test_pretrain_checkpoint_downloads_by_model_name(server):
    pretrain = checkpoint_bytes("m3", "imagenet")
    server.files[url_path(M3_PRETRAIN)] = pretrain
    path = fetch.ensure_file(zoo.get_checkpoint("m3", pretrain=True, offers_pretrain=True))
    assert path.name == "recnext_m3_distill_300e.pth"
    assert path.read_bytes() == pretrain


def test_a_corrupted_cached_file_fails_verification_and_is_fetched_again(server, good):
    path = fetch.ensure_file(M3)
    damaged = bytearray(good)
    damaged[1000] ^= 0xFF
    path.write_bytes(bytes(damaged))
    state = fetch.verify_cached(M3)
    assert state.status == fetch.FAILED and "recorded" in state.detail
    assert fetch.ensure_file(M3).read_bytes() == good
    assert len(server.log) == 2


def test_a_file_placed_by_hand_is_checked_and_trusted_on_first_use(server, good, monkeypatch):
    monkeypatch.setenv("RECNEXT_OFFLINE", "1")
    path = cache.checkpoint_path(M3.file_name)
    path.parent.mkdir(parents=True)
    path.write_bytes(checkpoint_bytes("m4", "coco"))
    with pytest.raises(DownloadError, match="failed its check .*RecNeXt-M3"):
        fetch.ensure_file(M3)
    path.write_bytes(good)
    assert fetch.ensure_file(M3) == path
    assert recorded(M3.file_name) == (sha256(good), len(good))
    assert cache.recorded(M3.file_name).source == ""
    assert server.log == []


def test_cached_state_reads_only_the_manifest_and_size(server, good):
    assert fetch.cached_state(M3).status == fetch.MISSING
    path = fetch.ensure_file(M3)
    assert fetch.cached_state(M3).status == fetch.VERIFIED
    with path.open("ab") as out:
        out.write(b"!")
    assert fetch.cached_state(M3).status == fetch.FAILED
    cache.manifest_path().unlink()
    assert fetch.cached_state(M3).status == fetch.UNVERIFIED


def test_mmdet_numpy_meta_loads_under_numpy_1_and_2_names(tmp_path):
    data = checkpoint_bytes("m3", "coco", numpy_meta=True)
    numpy2 = tmp_path / "numpy2.pth"
    numpy2.write_bytes(data)
    fetch.check_structure(numpy2, M3)
    numpy1 = tmp_path / "numpy1.pth"
    numpy1.write_bytes(_rename_in_pickle(data, b"numpy._core.multiarray", b"numpy.core.multiarray"))
    fetch.check_structure(numpy1, M3)


def test_pickled_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    path = tmp_path / "evil.pth"
    torch.save({"meta": RunsCode(), "state_dict": {}}, path)
    with pytest.raises(IntegrityError, match="names the Python object posix.mkdir, which recnext never loads"):
        fetch.check_structure(path, M3)
    assert not marker.exists()


def _rename_in_pickle(checkpoint: bytes, old: bytes, new: bytes) -> bytes:
    """The same checkpoint with a module name rewritten in its pickle, as an older numpy would have written it."""
    source = zipfile.ZipFile(io.BytesIO(checkpoint))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for member in source.infolist():
            content = source.read(member)
            if member.filename.endswith("data.pkl"):
                assert old in content
                content = content.replace(old, new)
            target.writestr(member, content)
    return out.getvalue()


WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from recnext_cli import cache, fetch, zoo

    ready, count, locks = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if locks == "no-op":
        # What a file system with silently ineffective locks (Lustre, GPFS) does to every lock.
        class NoLock:
            def __init__(self, path): pass
            def acquire(self, timeout=None): pass
            def release(self): pass
        cache.FileLock = NoLock
    (ready / sys.argv[4]).touch()
    while len(list(ready.iterdir())) < count:
        time.sleep(0.01)
    print(fetch.ensure_file(zoo.get_checkpoint("m3", offers_pretrain=True)))
    """
)


def _download_in_processes(server, tmp_path, locks: str, count: int = 4) -> list[str]:
    ready = tmp_path / "ready"
    ready.mkdir()
    server.chunk_delay = 0.005
    env = {**os.environ, "RECNEXT_HOME": os.environ["RECNEXT_HOME"], "RECNEXT_BASE_URL": server.url}
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(ready), str(count), locks, str(i)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(count)
    ]
    results = [worker.communicate(timeout=120) for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * count, [err for _, err in results]
    return [out.strip() for out, _ in results]


@pytest.mark.slow
def test_four_processes_share_one_download(server, good, tmp_path):
    paths = _download_in_processes(server, tmp_path, locks="file")
    assert set(paths) == {str(cache.checkpoint_path(M3.file_name))}
    assert Path(paths[0]).read_bytes() == good
    assert len(server.log) == 1 and server.bytes_sent() == len(good)
    assert recorded(M3.file_name) == (sha256(good), len(good))
    assert leftovers() == ["manifest.json", M3.file_name]


@pytest.mark.slow
def test_writers_without_working_locks_still_leave_one_good_file(server, good, tmp_path):
    paths = _download_in_processes(server, tmp_path, locks="no-op", count=3)
    assert set(paths) == {str(cache.checkpoint_path(M3.file_name))}
    assert Path(paths[0]).read_bytes() == good
    assert len(server.log) >= 2  # the writers really overlapped
    assert recorded(M3.file_name) == (sha256(good), len(good))
    assert leftovers() == ["manifest.json", M3.file_name]


# Transport policy: where bytes may come from, how long and how many.


@pytest.mark.parametrize("base", ["http://example.com/releases", "ftp://127.0.0.1/x", "file:///tmp/releases", "https://"])
def test_a_base_url_that_is_not_https_or_loopback_is_refused_before_any_connection(server, monkeypatch, base):
    monkeypatch.setenv("RECNEXT_BASE_URL", base)
    with pytest.raises(UsageError, match="set RECNEXT_BASE_URL to an https mirror"):
        fetch.ensure_file(M3)
    assert not cache.checkpoints_dir().exists()


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "localhost"])
def test_plain_http_is_allowed_from_loopback_and_elsewhere_only_on_request(monkeypatch, host):
    monkeypatch.delenv("RECNEXT_ALLOW_HTTP", raising=False)
    fetch.check_source(f"http://{host}:8080/releases/v1.0/x.pth")
    with pytest.raises(UsageError, match="plain http"):
        fetch.check_source("http://mirror.example/v1.0/x.pth")
    monkeypatch.setenv("RECNEXT_ALLOW_HTTP", "1")
    fetch.check_source("http://mirror.example/v1.0/x.pth")


def test_a_redirect_to_another_host_gets_no_credentials_or_cookies(server, good, monkeypatch):
    with FileServer({url_path(M3): good}) as other:
        user_url = server.url.replace("http://", "http://user:secret@")
        monkeypatch.setenv("RECNEXT_BASE_URL", user_url)
        server.faults = [Fault(redirect=other.url, set_cookie="session=abc; Path=/")]
        other.faults = [Fault(cut_after=300_000), Fault(redirect=server.url)]
        assert fetch.ensure_file(M3).read_bytes() == good
    assert server.log[0].authorization.startswith("Basic ")
    assert [(entry.authorization, entry.cookie) for entry in other.log] == [(None, None)] * len(other.log)
    # Back on the first host after a detour, the URL's credentials apply again; the cookie was never kept.
    assert server.log[1].authorization == server.log[0].authorization and server.log[1].cookie is None


def test_a_redirect_from_https_to_http_is_refused(server, good, monkeypatch, tmp_path):
    context, certificate = tls_context(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate))
    with FileServer({url_path(M3): good}, tls=context) as secure:
        monkeypatch.setenv("RECNEXT_BASE_URL", secure.url)
        secure.faults = [Fault(redirect=server.url)]
        with pytest.raises(DownloadError, match="from https to an insecure address; refused"):
            fetch.ensure_file(M3)
        assert server.log == []
        assert fetch.ensure_file(M3).read_bytes() == good
        assert secure.url.startswith("https://")


def test_a_body_announced_over_the_cap_is_refused_before_it_is_read(server, good, monkeypatch):
    monkeypatch.setattr(transport, "MAX_DOWNLOAD_BYTES", len(good) - 1)
    reports = []
    with pytest.raises(DownloadError, match=f"announces {len(good)} bytes, over the {len(good) - 1}-byte cap"):
        fetch.ensure_file(M3, reports.append)
    assert reports == [] and leftovers() == []


def test_a_body_without_length_is_cut_at_the_cap(server, good, monkeypatch):
    monkeypatch.setattr(transport, "MAX_DOWNLOAD_BYTES", 500_000)
    server.faults = [Fault(chunked=True)]
    with pytest.raises(DownloadError, match="sent more than 500000 bytes"):
        fetch.ensure_file(M3)
    assert leftovers() == []


def test_a_pinned_size_caps_the_body_before_it_is_read(server, good):
    pinned = dataclasses.replace(M3, sha256=sha256(good), size=len(good) - 100)
    with pytest.raises(IntegrityError, match=f"announces {len(good)} bytes where the zoo pins {len(good) - 100}"):
        fetch.ensure_file(pinned)
    assert leftovers() == []


def test_retries_count_kept_bytes_not_received_ones(server, good, monkeypatch):
    # Issue 12, point 3: Range ignored and every attempt cut at 500 kB used to retry for ever.
    monkeypatch.setattr(transport, "RETRIES", 3)
    server.supports_range = False
    server.faults = [Fault(cut_after=500_000)] * 100
    with pytest.raises(DownloadError, match="gave up: 4 attempts in a row kept no new bytes"):
        fetch.ensure_file(M3)
    assert len(server.log) == 5  # the first attempt keeps bytes; four more keep none beyond them
    assert server.bytes_sent() <= 5 * 500_000


def test_a_trickle_gives_up_at_the_deadline_and_keeps_its_bytes(server, good):
    server.chunk_delay = 0.05
    start = time.monotonic()
    with pytest.raises(DownloadError, match=r"gave up on .* after 0.5 s .*bytes received are kept"):
        fetch.ensure_file(M3, timeout=0.5)
    assert time.monotonic() - start < 0.5 + 0.3
    kept = parked().stat().st_size
    assert kept > 0
    server.chunk_delay = 0
    assert fetch.ensure_file(M3).read_bytes() == good
    assert server.log[-1].range_start == kept


def test_the_deadline_comes_from_the_environment(server, monkeypatch):
    server.chunk_delay = 0.05
    monkeypatch.setenv("RECNEXT_DOWNLOAD_TIMEOUT", "0.3")
    with pytest.raises(DownloadError, match="after 0.3 s"):
        fetch.ensure_file(M3)


@pytest.mark.parametrize("value", ["soon", "0", "-5", "nan", "inf"])
def test_a_deadline_that_is_not_a_positive_number_is_refused(monkeypatch, value):
    monkeypatch.setenv("RECNEXT_DOWNLOAD_TIMEOUT", value)
    with pytest.raises(UsageError, match=f"RECNEXT_DOWNLOAD_TIMEOUT '{value}' is not a positive number of seconds"):
        fetch.download_timeout()
    with pytest.raises(UsageError, match=f"--timeout '{value}'"):
        fetch.download_timeout(value)


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from filelock import FileLock
    lock = FileLock(sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    lock.release()
    """
)


def hold_lock(seconds: float) -> subprocess.Popen:
    path = cache.checkpoint_path(M3.file_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, f"{path}.lock", str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_lock_held_too_long_is_waited_for_visibly_then_given_up(server):
    holder = hold_lock(30)
    try:
        waits = []
        start = time.monotonic()
        with pytest.raises(DownloadError, match=r"another process has held .*\.lock for 0.5 s .* gave up waiting"):
            fetch.ensure_file(M3, timeout=0.5, on_wait=lambda: waits.append(time.monotonic()))
        assert time.monotonic() - start < 0.5 + 0.3
        assert len(waits) == 1 and waits[0] - start < 0.2
        assert server.log == []
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_released_in_time_lets_the_download_go_on(server, good):
    holder = hold_lock(0.3)
    waits = []
    assert fetch.ensure_file(M3, timeout=5, on_wait=lambda: waits.append(1)).read_bytes() == good
    assert waits == [1]
    holder.wait()
