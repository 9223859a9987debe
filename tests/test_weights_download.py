"""`qualiteacher weights download` against a loopback HTTP server (http.server in a thread).

The files are small fakes whose sha256 the test computes and writes into their names (torch
hub's `name-<prefix>.pth`) or URL paths (OpenAI CLIP's `/<sha256>/RN50.pt`), so the checks are
the real ones. The real plan is only built (from the installed pyiqa / torchvision), never
fetched: no network is needed.
"""

from __future__ import annotations

import hashlib
import json
import socket
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from qualiteacher.pipelines.cli import main

from qualiteacher.iqa.download import (
    MIRROR_ENV,
    DownloadError,
    PlannedFile,
    build_plan,
    download,
    expected_sha256,
    file_state,
    mirror_from_env,
)
from qualiteacher.iqa.registry import METRICS
from qualiteacher.iqa.weights import read_manifest

MUSIQ_BYTES = b"fake MUSIQ parameters " * 300
CLIP_BYTES = b"fake CLIP RN50 " * 500


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Server:
    base: str
    files: dict[str, bytes] = field(default_factory=dict)  # path -> body
    short: set[str] = field(default_factory=set)  # paths whose body stops halfway
    seen: list[str] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: the server closes the connection after each response (a short body ends there).
    def do_GET(self) -> None:
        state: Server = self.server.state
        state.seen.append(self.path)
        body = state.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if self.path in state.short else body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[Server]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = Server(f"http://127.0.0.1:{httpd.server_address[1]}")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def dead_url() -> str:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def planned(name: str, relpath: str, url: str) -> PlannedFile:
    return PlannedFile(name, relpath, url, expected_sha256(url))


def fake_plan(server: Server, musiq: bytes = MUSIQ_BYTES, clip: bytes = CLIP_BYTES) -> list[PlannedFile]:
    """Two files in the two checksum conventions; the server holds `musiq` and `clip`."""
    hub_name = f"fake_musiq-{sha(MUSIQ_BYTES)[:8]}.pth"
    clip_path = f"/clip/models/{sha(CLIP_BYTES)}/RN50.pt"
    server.files[f"/weights/{hub_name}"] = musiq
    server.files[clip_path] = clip
    return [planned("musiq", f"hub/pyiqa/{hub_name}", f"{server.base}/weights/{hub_name}"),
            planned("clipiqa", "hub/clip/RN50.pt", f"{server.base}{clip_path}")]


def leftovers(weights_dir: Path) -> list[str]:
    """Every file in the folder but the lock: a refused download leaves none."""
    return sorted(str(p.relative_to(weights_dir)) for p in weights_dir.rglob("*")
                  if p.is_file() and p.name != ".download.lock")


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------- the transfer
def test_download_places_files_and_records_sha256(server, tmp_path, capsys):
    plan = fake_plan(server)
    assert plan[0].sha256 == sha(MUSIQ_BYTES)[:8] and plan[1].sha256 == sha(CLIP_BYTES)

    paths = download(plan, tmp_path)

    assert paths == [tmp_path / p.relpath for p in plan]
    assert paths[0].read_bytes() == MUSIQ_BYTES and paths[1].read_bytes() == CLIP_BYTES
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in paths)  # other users' workers read them
    assert leftovers(tmp_path) == sorted(["manifest.json", plan[0].relpath, plan[1].relpath])
    manifest = read_manifest(tmp_path)
    for item, body in zip(plan, (MUSIQ_BYTES, CLIP_BYTES), strict=True):
        assert manifest[item.relpath]["sha256"] == sha(body)
        assert manifest[item.relpath]["source"] == item.url and manifest[item.relpath]["metric"] == item.name
        assert file_state(item, tmp_path) == "present"
    out, err = capsys.readouterr()
    assert err == ""  # no progress bar off a TTY
    assert "fetched" in out and "sha256 checked" in out

    # Again: everything is in place, nothing is fetched.
    fetched = len(server.seen)
    download(plan, tmp_path)
    assert len(server.seen) == fetched and "ready" in capsys.readouterr().out


def test_checksum_mismatch_is_refused_and_nothing_is_left(server, tmp_path):
    plan = fake_plan(server, musiq=b"not the MUSIQ file the name promises")

    with pytest.raises(DownloadError) as exc:
        download(plan, tmp_path)

    message = one_line(exc)
    assert plan[0].filename in message and plan[0].url in message and "sha256" in message
    assert sha(MUSIQ_BYTES)[:8] in message
    assert leftovers(tmp_path) == []  # and it stopped: the CLIP file was not fetched either
    assert server.seen == [f"/weights/{plan[0].filename}"]


def test_interrupted_transfer_is_refused_and_nothing_is_left(server, tmp_path):
    plan = fake_plan(server)
    server.short.add(f"/weights/{plan[0].filename}")

    with pytest.raises(DownloadError) as exc:
        download(plan[:1], tmp_path)

    message = one_line(exc)
    half = len(MUSIQ_BYTES) // 2
    assert f"connection closed before the end (IncompleteRead({half} bytes read, {half} more expected))" in message
    assert plan[0].filename in message and plan[0].url in message
    assert leftovers(tmp_path) == []


def test_no_server_fails_in_one_line_naming_url_and_file(tmp_path):
    url = f"{dead_url()}/weights/fake_musiq-{sha(MUSIQ_BYTES)[:8]}.pth"
    item = planned("musiq", "hub/pyiqa/" + url.rsplit("/", 1)[1], url)

    with pytest.raises(DownloadError) as exc:
        download([item], tmp_path)

    message = one_line(exc)
    assert item.filename in message and url in message and "Connection refused" in message
    assert leftovers(tmp_path) == []


def test_http_error_is_one_line(server, tmp_path):
    item = planned("musiq", f"hub/pyiqa/gone-{sha(b'x')[:8]}.pth", f"{server.base}/gone-{sha(b'x')[:8]}.pth")
    with pytest.raises(DownloadError, match="HTTP 404") as exc:
        download([item], tmp_path)
    assert item.url in one_line(exc) and leftovers(tmp_path) == []


def test_a_file_with_the_wrong_checksum_is_replaced(server, tmp_path):
    plan = fake_plan(server)
    target = tmp_path / plan[1].relpath
    target.parent.mkdir(parents=True)
    target.write_bytes(b"a truncated copy from somewhere")
    assert file_state(plan[1], tmp_path) == "checksum mismatch"

    download(plan, tmp_path)

    assert target.read_bytes() == CLIP_BYTES and file_state(plan[1], tmp_path) == "present"


def test_mirror_serves_files_by_name_and_checksums_still_hold(server, tmp_path, monkeypatch):
    origin = dead_url()  # the sources are unreachable: only the mirror can serve
    hub_name = f"fake_musiq-{sha(MUSIQ_BYTES)[:8]}.pth"
    plan = [planned("musiq", f"hub/pyiqa/{hub_name}", f"{origin}/weights/{hub_name}"),
            planned("clipiqa", "hub/clip/RN50.pt", f"{origin}/clip/models/{sha(CLIP_BYTES)}/RN50.pt")]
    server.files[f"/mirror/{hub_name}"] = MUSIQ_BYTES
    server.files["/mirror/RN50.pt"] = CLIP_BYTES

    monkeypatch.setenv(MIRROR_ENV, f"{server.base}/mirror/")
    mirror = mirror_from_env(None)
    download(plan, tmp_path, mirror=mirror)

    assert server.seen == [f"/mirror/{hub_name}", "/mirror/RN50.pt"]
    assert (tmp_path / plan[1].relpath).read_bytes() == CLIP_BYTES
    record = read_manifest(tmp_path)["hub/clip/RN50.pt"]
    assert record["source"] == f"{server.base}/mirror/RN50.pt" and record["origin"] == plan[1].url

    # A mirror serves bytes but cannot choose them.
    server.files[f"/mirror/{hub_name}"] = b"something else"
    (tmp_path / plan[0].relpath).unlink()
    with pytest.raises(DownloadError, match="does not match"):
        download(plan, tmp_path, mirror=mirror)
    assert not (tmp_path / plan[0].relpath).exists()


def test_progress_bar_only_when_asked(server, tmp_path, capsys):
    """On a terminal (progress=None reads stderr.isatty()) a bar naming the file goes to stderr."""
    download(fake_plan(server)[:1], tmp_path, progress=True)
    assert "fake_musiq-" in capsys.readouterr().err


def test_mirror_option_wins_and_empty_means_none(monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, "http://env-mirror")
    assert mirror_from_env("http://flag-mirror") == "http://flag-mirror"
    assert mirror_from_env(None) == "http://env-mirror"
    monkeypatch.setenv(MIRROR_ENV, "")  # compose and ConfigMaps pass an empty value for "none"
    assert mirror_from_env(None) is None


def test_pods_starting_together_fetch_each_file_once(server, tmp_path):
    """Concurrent downloads into one folder take turns: one fetches, the other finds the files."""
    plan = fake_plan(server)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            download(plan, tmp_path, log=lambda _: None)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(server.seen) == sorted(p.url.removeprefix(server.base) for p in plan)
    assert all(file_state(p, tmp_path) == "present" for p in plan)


def test_a_url_without_a_checksum_is_refused():
    with pytest.raises(DownloadError, match="carries no checksum"):
        expected_sha256("https://example.org/models/RN50.pt")
    with pytest.raises(DownloadError, match="carries no checksum"):
        expected_sha256("https://example.org/models/musiq-ab.pth")  # too short a prefix to mean anything


# ---------------------------------------------------------------------------- the real plan
def test_real_plan_reads_urls_from_the_installed_packages():
    from pyiqa.archs import clip_model, musiq_arch

    musiq, clip = build_plan(["musiq", "clipiqa"])
    assert musiq.url == musiq_arch.default_model_urls["koniq10k"]
    assert clip.url == clip_model._MODELS["RN50"]
    # Where the loaders look (the registry's files), with the checksum each source carries.
    assert musiq.relpath == METRICS["musiq"].files[0].relpath and musiq.sha256 == "e95806b9"
    assert clip.relpath == METRICS["clipiqa"].files[0].relpath == "hub/clip/RN50.pt"
    assert len(clip.sha256) == 64 and clip.sha256 in clip.url

    everything = {p.name: p for p in build_plan()}
    assert set(everything) == {"musiq", "clipiqa", "topiq_nr", "vgg19"}
    assert everything["topiq_nr"].relpath == METRICS["topiq_nr"].files[0].relpath
    assert everything["vgg19"].relpath == "hub/checkpoints/vgg19-dcbb9e9d.pth"
    assert everything["vgg19"].source("http://m/") == "http://m/vgg19-dcbb9e9d.pth"
    assert len({p.filename for p in everything.values()}) == 4  # a flat mirror holds them all


def test_real_plan_refuses_what_it_cannot_download():
    with pytest.raises(ValueError, match="brisque"):
        build_plan(["brisque"])


def test_plan_stops_when_the_installed_package_disagrees(monkeypatch):
    """A pyiqa whose table lost the key, or names another file than the loader looks for."""
    from pyiqa.archs import musiq_arch

    urls = dict(musiq_arch.default_model_urls)
    monkeypatch.setattr(musiq_arch, "default_model_urls", {k: v for k, v in urls.items() if k != "koniq10k"})
    with pytest.raises(DownloadError, match=r"musiq_arch.default_model_urls\['koniq10k'\]"):
        build_plan(["musiq"])
    monkeypatch.setattr(musiq_arch, "default_model_urls", {**urls, "koniq10k": "https://h/musiq_koniq-0123abcd.pth"})
    with pytest.raises(DownloadError, match="registry.py disagree"):
        build_plan(["musiq"])


# ---------------------------------------------------------------------------- the CLI
def test_cli_without_network_fails_in_one_line(tmp_path, capsys):
    """The real plan through a mirror where nothing listens: exit 2, one line, no file."""
    mirror = dead_url()
    rc = main(["weights", "download", "--metrics", "clipiqa", "--weights-dir", str(tmp_path), "--mirror", mirror])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"{mirror}/RN50.pt" in err and "RN50.pt" in err
    assert leftovers(tmp_path) == []


def test_cli_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    rc = main(["weights", "download", "--metrics", "musiq", "--weights-dir", str(not_a_folder),
               "--mirror", dead_url()])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and str(not_a_folder) in err


def test_cli_refuses_a_mirror_file_that_is_not_the_real_one(server, tmp_path, capsys):
    server.files["/RN50.pt"] = CLIP_BYTES  # not OpenAI's RN50: its sha256 is not the one in pyiqa's URL
    rc = main(["weights", "download", "--metrics", "clipiqa", "--weights-dir", str(tmp_path),
               "--mirror", server.base])
    assert rc == 2 and "does not match" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_cli_status_shows_what_a_download_would_fetch(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    clip = tmp_path / "hub" / "clip" / "RN50.pt"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"not RN50")
    assert main(["weights", "status", "--json", "--weights-dir", str(tmp_path), "--mirror", "http://m/x"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["downloads"]}
    assert set(rows) == {"musiq", "clipiqa", "topiq_nr", "vgg19"}
    assert rows["clipiqa"]["state"] == "checksum mismatch" and rows["clipiqa"]["url"] == "http://m/x/RN50.pt"
    assert rows["musiq"]["state"] == "missing" and rows["musiq"]["file"] == "hub/pyiqa/musiq_koniq_ckpt-e95806b9.pth"

    assert main(["weights", "status", "--weights-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "weights download" in text and "https://openaipublic.azureedge.net/clip/models/" in text
