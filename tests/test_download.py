"""data_prep.download against a real local HTTP server serving real PTB-XL sample files.

A handwritten handler (Range support, injectable faults, request log) lets us check the behaviours
that matter on a flaky network: resume after a cut, re-fetch of corrupted files, cheap reruns,
fast offline failure, bounded parallelism; plus zip extraction that cannot escape its folder.
"""
from __future__ import annotations

import re
import shutil
import socket
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from data_prep.download import DownloadError, extract_zip_safely, fetch_ptbxl, main
from shared.io import sha256_file

from conftest import SAMPLE  # noqa: E402  (missing sample: the fixtures fail loudly, nothing is skipped)

RECORDS100 = [f"records100/00000/{i:05d}_lr.{ext}" for i in range(1, 11) for ext in ("hea", "dat")]
RECORDS500 = [f"records500/00000/{i:05d}_hr.{ext}" for i in range(1, 3) for ext in ("hea", "dat")]
METADATA = ["ptbxl_database.csv", "scp_statements.csv", "LICENSE.txt"]
FILES_100 = METADATA + RECORDS100
CUT_FILE = "records100/00000/00002_lr.dat"
BAD_FILE = "records100/00000/00003_lr.dat"


@pytest.fixture(scope="session")
def served_root(tmp_path_factory) -> Path:
    """A PTB-XL-shaped folder of real files whose SHA256SUMS lines are the published ones."""
    root = tmp_path_factory.mktemp("served")
    copied = METADATA + RECORDS100 + RECORDS500
    for rel in copied:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLE / rel, root / rel)
    lines = [ln for ln in (SAMPLE / "SHA256SUMS.txt").read_text().splitlines()
             if ln.split(" ", 1)[1] in set(copied)]
    assert len(lines) == len(copied)
    (root / "SHA256SUMS.txt").write_text("\n".join(lines) + "\n")
    return root


@dataclass
class ServerState:
    root: Path
    requests: list = field(default_factory=list)        # (path, Range header or None)
    faults: dict = field(default_factory=dict)           # path -> list of "cut"/"corrupt", one per request
    delay: float = 0.0
    inflight: int = 0
    max_inflight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gets(self, path: str) -> list:
        return [r for p, r in self.requests if p == path]


class Handler(BaseHTTPRequestHandler):
    """Serve files from state.root with single-range support and per-request fault injection."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        st: ServerState = self.server.state
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        rng = self.headers.get("Range")
        with st.lock:
            st.requests.append((rel, rng))
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
            fault = st.faults[rel].pop(0) if st.faults.get(rel) else None
        try:
            time.sleep(st.delay)
            path = st.root / rel
            data = path.read_bytes() if path.is_file() else None
        finally:
            with st.lock:  # count as in flight until the response starts, so a worker's next request can't overlap
                st.inflight -= 1
        if data is None:
            return self.send_error(404)
        size, start = len(data), 0
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            start = int(m.group(1))
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = data[start:]
        if fault == "corrupt":
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "cut":  # honest Content-Length, half the bytes, then hang up
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(served_root):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.state = ServerState(served_root)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def fetch(server, dest, **kw):
    return fetch_ptbxl(dest, 100, base_url=server.url, timeout=5.0, **kw)


def assert_complete(dest: Path, served_root: Path):
    for rel in FILES_100:
        assert sha256_file(dest / rel) == sha256_file(served_root / rel), rel
    assert not list(dest.rglob("*.part"))
    assert not (dest / "records500").exists()


def test_complete_run_then_cheap_rerun(server, served_root, tmp_path):
    dest = tmp_path / "ptbxl"
    assert fetch(server, dest) == dest
    assert_complete(dest, served_root)
    st = server.state
    assert sorted(p for p, _ in st.requests) == sorted(["SHA256SUMS.txt"] + FILES_100)
    assert not any(p.startswith("records500/") for p, _ in st.requests)
    listed = {ln.split(" ", 1)[1] for ln in (dest / "SHA256SUMS.txt").read_text().splitlines()}
    assert listed == set(FILES_100)

    st.requests.clear()
    fetch(server, dest)
    assert [p for p, _ in st.requests] == ["SHA256SUMS.txt"]


def test_cut_transfer_is_resumed_with_range(server, served_root, tmp_path):
    server.state.faults[CUT_FILE] = ["cut"]
    dest = tmp_path / "ptbxl"
    fetch(server, dest)
    assert_complete(dest, served_root)
    half = (served_root / CUT_FILE).stat().st_size // 2
    assert server.state.gets(CUT_FILE) == [None, f"bytes={half}-"]


def test_corrupted_download_is_fetched_again(server, served_root, tmp_path):
    server.state.faults[BAD_FILE] = ["corrupt"]
    dest = tmp_path / "ptbxl"
    fetch(server, dest)
    assert_complete(dest, served_root)
    assert server.state.gets(BAD_FILE) == [None, None]


def test_corrupted_local_file_is_replaced(server, served_root, tmp_path):
    dest = tmp_path / "ptbxl"
    (dest / BAD_FILE).parent.mkdir(parents=True)
    (dest / BAD_FILE).write_bytes(b"not an ECG")
    fetch(server, dest)
    assert_complete(dest, served_root)
    assert server.state.gets(BAD_FILE) == [None]


def test_always_corrupt_gives_up_naming_the_file(server, tmp_path):
    server.state.faults[BAD_FILE] = ["corrupt"] * 3
    with pytest.raises(DownloadError, match=re.escape(BAD_FILE) + r".*sha256 mismatch"):
        fetch(server, tmp_path / "ptbxl", retries=2)
    assert not (tmp_path / "ptbxl" / BAD_FILE).exists()


def test_parallelism_is_bounded(server, served_root, tmp_path):
    server.state.delay = 0.05
    fetch(server, tmp_path / "ptbxl", workers=2)
    assert server.state.max_inflight == 2  # parallel, but never more than `workers`


def test_unsafe_manifest_path_is_refused(server, tmp_path, served_root):
    sums = tmp_path / "served_evil"
    shutil.copytree(served_root, sums)
    with open(sums / "SHA256SUMS.txt", "a") as f:
        f.write("0" * 64 + " records100/../../evil.txt\n")
    server.state.root = sums
    with pytest.raises(DownloadError, match=r"\.\."):
        fetch(server, tmp_path / "ptbxl")
    assert not (tmp_path / "evil.txt").exists()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_offline_fails_fast_with_hint(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="PTBXL_DIR") as exc:
        fetch_ptbxl(tmp_path / "ptbxl", 100, base_url=closed_port_url())
    assert time.monotonic() - t0 < 5
    assert "cannot reach" in str(exc.value) and "\n" not in str(exc.value)


def test_cli_offline_exits_2_with_one_line(tmp_path, capsys):
    assert main(["--dest", str(tmp_path / "d"), "--sampling-rate", "100", "--base-url", closed_port_url()]) == 2
    err = capsys.readouterr().err.strip()
    assert "PTBXL_DIR" in err and "\n" not in err


# --------------------------------------------------------------------------- zip extraction

def make_zip(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            info = name if isinstance(name, zipfile.ZipInfo) else zipfile.ZipInfo(name)
            zf.writestr(info, data)
    return path


def symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16)
    return info


@pytest.mark.parametrize("bad", ["../evil.txt", "/tmp/evil-abs.txt", "ptb-xl/../../evil.txt", "symlink"])
def test_zip_with_escaping_member_is_refused(tmp_path, bad):
    bad_member = symlink_info("ptb-xl/link") if bad == "symlink" else bad
    zpath = make_zip(tmp_path / "evil.zip", {
        "ptb-xl/ptbxl_database.csv": b"ecg_id\n1\n",   # good members first: nothing may be written
        bad_member: b"/etc/passwd" if bad == "symlink" else b"pwned",
    })
    dest = tmp_path / "out" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(DownloadError, match="evil.zip.*refusing member"):
        extract_zip_safely(zpath, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "out" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/evil-abs.txt").exists()


def test_good_zip_with_top_folder_is_extracted(tmp_path):
    top = "ptb-xl-a-large-publicly-available-electrocardiography-dataset-1.0.3"
    zpath = make_zip(tmp_path / "ptbxl.zip", {
        f"{top}/ptbxl_database.csv": (SAMPLE / "ptbxl_database.csv").read_bytes(),
        f"{top}/scp_statements.csv": (SAMPLE / "scp_statements.csv").read_bytes(),
        f"{top}/records100/00000/00001_lr.hea": (SAMPLE / RECORDS100[0]).read_bytes(),
    })
    dest = tmp_path / "dest"
    out = extract_zip_safely(zpath, dest)
    assert out == dest / top
    assert (out / "ptbxl_database.csv").read_bytes() == (SAMPLE / "ptbxl_database.csv").read_bytes()
    assert [p.name for p in dest.iterdir()] == [top]  # no temp folder left behind
    assert extract_zip_safely(zpath, dest) == out    # re-extracting replaces cleanly


def test_zip_without_ptbxl_is_refused_and_leaves_nothing(tmp_path):
    zpath = make_zip(tmp_path / "other.zip", {"stuff/readme.txt": b"hi"})
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match="no ptbxl_database.csv"):
        extract_zip_safely(zpath, dest)
    assert list(dest.iterdir()) == []
