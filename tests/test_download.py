"""Tests for weights/download.py against a local stand-in for the hub (the real one is not reachable here).

FakeHub serves `/<repo>/resolve/<revision>/<file>` the way the hub does for LFS files: a 302 to a storage URL
carrying `X-Linked-Etag` (sha256) and `X-Linked-Size`; the storage URL honours `Range` (or can be told not to)
and can cut a response short, like a dropped connection.
"""
import hashlib
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from weights import download as dl


class FakeHub:
    def __init__(self):
        self.files = {}            # "/repo/resolve/rev/name" -> bytes
        self.linked = {}           # same key -> (etag, size) sent on the redirect
        self.honor_range = True
        self.cut_after = None      # next GET of a body sends only this many bytes, then hangs up
        self.storage = ""          # prefix of the redirect target: "" keeps it on this host
        self.requests = []         # (method, path, Range header or None)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.respond(body=False)

            def do_GET(self):
                self.respond(body=True)

            def respond(self, body):
                hub.requests.append((self.command, self.path, self.headers.get("Range")))
                if self.path in hub.linked:  # an LFS file: redirect to storage, with its metadata on the redirect
                    etag, size = hub.linked[self.path]
                    self.send_response(302)
                    self.send_header("Location", hub.storage + "/storage" + self.path)
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("X-Linked-Size", str(size))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path in hub.files:  # a plain-git file is served at the resolve URL itself
                    self.serve(hub.files[self.path], body)
                elif self.path.startswith("/storage/") and self.path.removeprefix("/storage") in hub.linked:
                    self.serve(hub.files[self.path.removeprefix("/storage")], body)
                else:
                    self.send_error(404)

            def serve(self, data, body):
                start = 0
                rng = self.headers.get("Range")
                if rng and hub.honor_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not body:
                    return
                payload = data[start:]
                if hub.cut_after is not None:
                    payload, hub.cut_after = payload[:hub.cut_after], None
                    self.close_connection = True
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def add(self, repo, name, data, revision="main", etag=None, size=None, linked=True):
        path = f"/{repo}/resolve/{revision}/{name}"
        self.files[path] = data
        if linked:
            self.linked[path] = (etag or hashlib.sha256(data).hexdigest(), len(data) if size is None else size)
        return self.url + path

    def gets(self):
        return [r for r in self.requests if r[0] == "GET"]


@pytest.fixture
def hub():
    h = FakeHub()
    yield h
    h.server.shutdown()
    h.server.server_close()


DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.mark.parametrize("storage", ["same host", "other host"])
def test_good_checksum_lands_atomically(hub, tmp_path, monkeypatch, storage):
    if storage == "other host":  # as on the real hub, whose storage is a CDN: HEAD must stop at the redirect
        hub.storage = hub.url.replace("127.0.0.1", "localhost")
    url = hub.add("org/model", "model.safetensors", DATA)
    dest = tmp_path / "ckpt" / "model.safetensors"
    replaced = []

    def spy_replace(src, dst):  # the final name must not exist until the verified .part is renamed onto it
        assert not os.path.exists(dst) and str(src).endswith(".part")
        assert hashlib.sha256(open(src, "rb").read()).hexdigest() == SHA
        replaced.append((src, dst))
        os.rename(src, dst)

    monkeypatch.setattr(dl.os, "replace", spy_replace)
    assert dl.download_file(url, dest) == dest
    assert replaced and dest.read_bytes() == DATA
    assert not (tmp_path / "ckpt" / "model.safetensors.part").exists()
    heads = [path for method, path, _ in hub.requests if method == "HEAD"]
    assert heads[0] == "/org/model/resolve/main/model.safetensors"
    if storage == "other host":
        assert heads == ["/org/model/resolve/main/model.safetensors"]


@pytest.mark.parametrize("where", ["hub header", "pin"])
def test_bad_checksum_raises_and_leaves_no_file(hub, tmp_path, where):
    wrong = hashlib.sha256(b"something else").hexdigest()
    url = hub.add("org/model", "model.safetensors", DATA, etag=wrong if where == "hub header" else None,
                  linked=where == "hub header")
    dest = tmp_path / "model.safetensors"
    with pytest.raises(dl.DownloadError, match="sha256 mismatch for model.safetensors") as e:
        dl.download_file(url, dest, sha256=wrong if where == "pin" else None)
    assert wrong in str(e.value) and SHA in str(e.value)
    assert not dest.exists() and not (tmp_path / "model.safetensors.part").exists()


def test_interrupted_download_resumes_with_range(hub, tmp_path):
    url = hub.add("org/model", "model.safetensors", DATA)
    dest = tmp_path / "model.safetensors"
    part = tmp_path / "model.safetensors.part"
    hub.cut_after = 123_456
    with pytest.raises(dl.DownloadError, match="run the same command again to resume"):
        dl.download_file(url, dest)
    assert part.stat().st_size == 123_456 and not dest.exists()

    dl.download_file(url, dest)
    assert hub.gets()[-1][2] == "bytes=123456-"
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == SHA and not part.exists()


def test_server_ignoring_range_restarts_from_zero(hub, tmp_path):
    url = hub.add("org/model", "model.safetensors", DATA)
    dest = tmp_path / "model.safetensors"
    (tmp_path / "model.safetensors.part").write_bytes(b"\x00" * 1000)  # appending to this would corrupt the file
    hub.honor_range = False
    dl.download_file(url, dest)
    assert hub.gets()[-1][2] == "bytes=1000-"  # asked to resume, was answered 200 with the whole file
    assert dest.read_bytes() == DATA and not (tmp_path / "model.safetensors.part").exists()


def test_pin_disagreeing_with_hub_stops_before_downloading(hub, tmp_path):
    url = hub.add("org/model", "model.safetensors", DATA)
    with pytest.raises(dl.DownloadError, match="pinned to"):
        dl.download_file(url, tmp_path / "model.safetensors", sha256="0" * 64)
    assert hub.gets() == []


def test_unreachable_endpoint_gives_offline_message(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on: connection refused, no network needed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.raises(dl.DownloadError) as e:
        dl.download(["bert"], tmp_path, endpoint=endpoint)
    msg = str(e.value)
    assert "could not reach" in msg and endpoint in msg and "copied by hand" in msg
    assert str(tmp_path / "bert-base-uncased") in msg and "vocab.txt" in msg
    assert str(tmp_path / "clip-vit-base-patch16") in msg and str(tmp_path / "ast-finetuned-audioset") in msg
    # the command line prints it as one error, no traceback, and exits 1
    assert dl.main(["--dest", str(tmp_path), "--only", "bert", "--endpoint", endpoint]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Could not download") and "Traceback" not in err


def test_a_tilde_in_dest_is_the_home_folder(tmp_path, monkeypatch):
    """`--dest=~/w` reaches the script unexpanded (bash expands `--dest ~/w` only): not a folder named "~"."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(dl.DownloadError) as e:
        dl.download(["bert"], "~/w", endpoint=f"http://127.0.0.1:{port}")
    assert str(tmp_path / "home" / "w" / "bert-base-uncased") in str(e.value) and not (tmp_path / "~").exists()


@pytest.mark.parametrize("how", ["--endpoint", "HF_ENDPOINT"])
def test_cli_fetches_into_checkpoint_folders(hub, tmp_path, monkeypatch, how):
    config = b'{"hidden_size": 8}'
    toy = dl.Checkpoint(repo="org/toy-model", folder="toy-model", files=("model.safetensors", "config.json"),
                        about="test", pinned_at="abc", pins={"config.json": (len(config), None)})
    monkeypatch.setattr(dl, "CHECKPOINTS", {"toy": toy})
    hub.add("org/toy-model", "model.safetensors", DATA)
    hub.add("org/toy-model", "config.json", config, linked=False)  # plain-git file: size only
    argv = ["--dest", str(tmp_path), "--only", "toy"]
    if how == "--endpoint":
        argv += ["--endpoint", hub.url]
    else:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
    assert dl.main(argv) == 0
    assert (tmp_path / "toy-model" / "model.safetensors").read_bytes() == DATA
    assert (tmp_path / "toy-model" / "config.json").read_bytes() == config


def test_plain_file_is_checked_by_size(hub, tmp_path):
    url = hub.add("org/model", "config.json", b"{}", linked=False)  # no X-Linked-*: its Content-Length counts
    with pytest.raises(dl.DownloadError, match="publishes size 2 but config.json is pinned to 3"):
        dl.download_file(url, tmp_path / "config.json", size=3)
    assert hub.gets() == [] and not (tmp_path / "config.json").exists()


def test_unknown_checkpoint_name_is_refused_before_any_request(tmp_path):
    with pytest.raises(ValueError, match="known: clip, bert, ast"):
        dl.download(["vit"], tmp_path, endpoint="http://127.0.0.1:9")  # nothing listens there: never asked
    assert list(tmp_path.iterdir()) == []
