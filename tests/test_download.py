"""Tests for pipeline_steps.download_data against a local HTTP server on 127.0.0.1 (no internet)."""

import hashlib
import io
import json
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from pipeline_steps import download_data

WANTED = {f"{split}_{kind}" for split in ("train", "dev", "test") for kind in ("ims.npy", "caps.txt")}


def _npy(rows, seed):
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(seed).random((rows, 36, 8), dtype=np.float32))
    return buf.getvalue()


def _release_files():
    """SCAN layout: data/f30k_precomp (wanted) and data/coco_precomp (must not be extracted)."""
    files = {}
    for i, split in enumerate(("train", "dev", "test")):
        for ds in ("f30k_precomp", "coco_precomp"):
            files[f"data/{ds}/{split}_ims.npy"] = _npy(2, i)
            files[f"data/{ds}/{split}_caps.txt"] = "".join(f"{ds} caption {k}\n" for k in range(10)).encode()
    return files


def _zip_bytes(files, compression=zipfile.ZIP_STORED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _sha(data):
    return hashlib.sha256(data).hexdigest()


ZIP = _zip_bytes(_release_files())


class Server:
    """Serves `routes` {path: bytes}; mode: 'range' (honours Range), 'ignore' (always 200 full),
    'cut' (first request: half the body under a full Content-Length, then the connection closes;
    later requests honour Range), 'cut-ignore' (cut first, then ignore Range)."""

    def __init__(self, routes, mode="range"):
        self.routes, self.mode, self.requests = routes, mode, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Range")))
                body = outer.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                first = len(outer.requests) == 1
                rng = self.headers.get("Range")
                if rng and outer.mode in ("range", "cut") and not (first and outer.mode == "cut"):
                    start = int(rng.split("=")[1].rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    body = body[start:]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if first and outer.mode.startswith("cut"):
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                else:
                    self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve():
    servers = []

    def start(routes, mode="range"):
        servers.append(Server(routes, mode))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def _run(tmp_path, source, *extra, extract=("data/f30k_precomp",)):
    argv = [
        *source,
        "--dest",
        str(tmp_path / "data"),
        "--stamp",
        str(tmp_path / "stamp.json"),
        "--timeout",
        "5",
        *extra,
    ]
    if extract:
        argv += ["--extract", *extract]
    return download_data.main(argv)


def _dl(tmp_path, urls, *extra):
    return _run(tmp_path, ["--urls", *urls, "--archive", str(tmp_path / "res" / "scan.zip")], *extra)


def _assert_extracted(tmp_path):
    folder = tmp_path / "data" / "f30k_precomp"
    files = _release_files()
    assert {p.name for p in folder.iterdir()} == WANTED
    for name in WANTED:
        assert (folder / name).read_bytes() == files[f"data/f30k_precomp/{name}"]
    assert not (tmp_path / "data" / "coco_precomp").exists()
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["f30k_precomp"]  # no temp left
    return json.loads((tmp_path / "stamp.json").read_text())


def test_download_checks_sha_and_extracts_only_wanted_folder(tmp_path, serve):
    server = serve({"/data.zip": ZIP})
    assert _dl(tmp_path, [server.url("/data.zip")], "--sha256", _sha(ZIP).upper()) == 0
    stamp = _assert_extracted(tmp_path)
    assert (tmp_path / "res" / "scan.zip").read_bytes() == ZIP
    assert not (tmp_path / "res" / "scan.zip.part").exists()
    assert stamp["mode"] == "download" and stamp["source"] == server.url("/data.zip")
    assert stamp["sha256"] == _sha(ZIP)
    assert stamp["extracted"] == {"data/f30k_precomp": str(tmp_path / "data" / "f30k_precomp")}
    files = _release_files()
    assert stamp["files"] == {f"f30k_precomp/{n}": len(files[f"data/f30k_precomp/{n}"]) for n in WANTED}


def test_cut_download_resumes_with_range(tmp_path, serve):
    server = serve({"/data.zip": ZIP}, mode="cut")
    assert _dl(tmp_path, [server.url("/data.zip")], "--sha256", _sha(ZIP)) == 0
    assert server.requests == [("/data.zip", None), ("/data.zip", f"bytes={len(ZIP) // 2}-")]
    assert (tmp_path / "res" / "scan.zip").read_bytes() == ZIP
    _assert_extracted(tmp_path)


def test_cut_download_resumes_in_next_run(tmp_path, serve):
    server = serve({"/data.zip": ZIP}, mode="cut")
    with pytest.raises(SystemExit, match="every mirror failed"):
        _dl(tmp_path, [server.url("/data.zip")], "--retries", "1")
    part = tmp_path / "res" / "scan.zip.part"
    assert part.read_bytes() == ZIP[: len(ZIP) // 2]
    assert not (tmp_path / "res" / "scan.zip").exists() and not (tmp_path / "stamp.json").exists()
    assert _dl(tmp_path, [server.url("/data.zip")], "--retries", "1") == 0
    assert server.requests[1] == ("/data.zip", f"bytes={len(ZIP) // 2}-")
    assert (tmp_path / "res" / "scan.zip").read_bytes() == ZIP and not part.exists()


def test_server_ignoring_range_restarts_from_zero(tmp_path, serve):
    server = serve({"/data.zip": ZIP}, mode="cut-ignore")
    assert _dl(tmp_path, [server.url("/data.zip")], "--sha256", _sha(ZIP)) == 0
    assert server.requests[1] == ("/data.zip", f"bytes={len(ZIP) // 2}-")
    assert (tmp_path / "res" / "scan.zip").read_bytes() == ZIP
    # A stale .part of foreign bytes must not be appended to when the range is ignored.
    (tmp_path / "res" / "scan.zip").unlink()
    (tmp_path / "res" / "scan.zip.part").write_bytes(b"x" * 100)
    server.mode = "ignore"
    assert _dl(tmp_path, [server.url("/data.zip")]) == 0
    assert (tmp_path / "res" / "scan.zip").read_bytes() == ZIP


def test_checksum_mismatch_leaves_nothing(tmp_path, serve):
    server = serve({"/data.zip": ZIP})
    wrong = _sha(b"something else")
    with pytest.raises(SystemExit) as err:
        _dl(tmp_path, [server.url("/data.zip")], "--sha256", wrong)
    msg = str(err.value)
    assert msg.startswith("error: ") and "sha256" in msg
    assert server.url("/data.zip") in msg and wrong in msg and _sha(ZIP) in msg
    assert not (tmp_path / "res" / "scan.zip").exists()
    assert not (tmp_path / "res" / "scan.zip.part").exists()
    assert not (tmp_path / "data").exists() and not (tmp_path / "stamp.json").exists()


def test_mirror_fallback(tmp_path, serve, caplog):
    server = serve({"/data.zip": ZIP})
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{sock.getsockname()[1]}/data.zip"
    urls = [server.url("/missing.zip"), refused, server.url("/data.zip")]
    assert _dl(tmp_path, urls, "--sha256", _sha(ZIP)) == 0
    assert _assert_extracted(tmp_path)["source"] == urls[2]
    failed = [r.getMessage() for r in caplog.records if "mirror failed" in r.getMessage()]
    assert len(failed) == 2 and "404" in failed[0] and refused in failed[1]


def _tar_with_link(target, through=False):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in _release_files().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("data/f30k_precomp/link")
        link.type, link.linkname = tarfile.SYMTYPE, target
        tf.addfile(link)
        if through:  # an entry whose path goes through a symlink entry (basis of link-chain escapes)
            evil = tarfile.TarInfo("data/f30k_precomp/link/evil.txt")
            tf.addfile(evil, io.BytesIO(b""))
    return buf.getvalue()


@pytest.mark.parametrize(
    "kind, entry",
    [
        ("zip", "data/f30k_precomp/../../evil.txt"),
        ("zip", "ABSOLUTE"),
        ("tar", "../../../evil.txt"),
        ("tar", "../coco_precomp/train_caps.txt"),
        ("tar", "/etc/passwd"),
        ("tar-through", "."),
    ],
)
def test_unsafe_entries_are_refused(tmp_path, kind, entry):
    entry = str(tmp_path / "evil.txt") if entry == "ABSOLUTE" else entry
    if kind == "zip":
        archive, data = tmp_path / "bad.zip", _zip_bytes({**_release_files(), entry: b"evil"})
    else:
        archive, data = tmp_path / "bad.tar", _tar_with_link(entry, through=kind == "tar-through")
    archive.write_bytes(data)
    with pytest.raises(SystemExit) as err:
        _run(tmp_path, ["--adopt-archive", str(archive)])
    assert str(archive) in str(err.value) and ("link" if kind != "zip" else entry) in str(err.value)
    assert not list(tmp_path.rglob("evil.txt")) and not list(tmp_path.rglob("link"))
    assert not (tmp_path / "data").exists() and not (tmp_path / "stamp.json").exists()


def _archive_with(tmp_path, fmt, extra):
    """The release plus the entries `extra` ({name: bytes}) as a zip or a tar, written to disk."""
    files = {**_release_files(), **extra}
    archive = tmp_path / f"hostile.{fmt}"
    if fmt == "zip":
        archive.write_bytes(_zip_bytes(files))
    else:
        with tarfile.open(archive, "w") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return archive


# Names that must never write outside the extracted folder. ESCAPE stands for an absolute folder
# outside it (the audit's repro: the folder prefix, a double slash, then an absolute path).
HOSTILE_NAMES = [
    "data/f30k_precomp//ESCAPE/evil.txt",
    "data/f30k_precomp///ESCAPE/evil.txt",
    "data/f30k_precomp/./../ESCAPE_REL/evil.txt",
    "data/f30k_precomp/sub/../../../evil.txt",
    "data/f30k_precomp\\..\\..\\evil.txt",
    "data/f30k_precomp/\\ESCAPE/evil.txt",
    "data/f30k_precomp/./evil.txt",
    "/ESCAPE/evil.txt",
    "C:\\evil.txt",
]


@pytest.mark.parametrize("fmt", ["zip", "tar"])
@pytest.mark.parametrize("template", HOSTILE_NAMES)
def test_hostile_entry_names_are_refused_in_both_formats(tmp_path, fmt, template):
    outside = tmp_path / "outside"
    outside.mkdir()
    name = template.replace("ESCAPE", str(outside).lstrip("/"))
    archive = _archive_with(tmp_path, fmt, {name: b"evil"})
    with pytest.raises(SystemExit) as err:
        _run(tmp_path, ["--adopt-archive", str(archive)])
    message = str(err.value)
    assert message.startswith(f"error: {archive}: refusing entry ") and "\n" not in message
    assert not list(outside.rglob("*")) and not list(tmp_path.rglob("evil.txt"))
    assert not (tmp_path / "data").exists() and not (tmp_path / "stamp.json").exists()


@pytest.mark.parametrize("fmt", ["zip", "tar"])
@pytest.mark.parametrize(
    "name",
    [
        "data/f30k_precomp/\u2215etc\u2215evil.txt",  # division slash, not a separator
        "data/f30k_precomp/\uff0e\uff0e/evil.txt",  # fullwidth dots, not '..'
        "data/f30k_precomp/\u2024\u2024/evil.txt",  # one-dot leaders
        "data/f30k_precomp/sub folder/evil.txt",
        "data/f30k_precomp/C:/evil.txt",  # a drive only as the first component
    ],
)
def test_look_alike_names_stay_inside_the_folder(tmp_path, fmt, name):
    """Characters that only look like separators or dots are plain file-name characters: the
    entry is extracted, and it lands inside the extracted folder."""
    archive = _archive_with(tmp_path, fmt, {name: b"evil"})
    assert _run(tmp_path, ["--adopt-archive", str(archive)]) == 0
    folder = (tmp_path / "data" / "f30k_precomp").resolve()
    found = [p.resolve() for p in tmp_path.rglob("*") if p.is_file() and p.read_bytes() == b"evil"]
    assert len(found) == 1 and folder in found[0].parents


def test_a_symlinked_parent_inside_the_folder_is_never_written_through(tmp_path, monkeypatch):
    """The final check resolves each target: even if an entry's parent became a symlink to
    somewhere else (here planted between the checks and the unpacking), nothing lands there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = _archive_with(tmp_path, "tar", {"data/f30k_precomp/sub/evil.txt": b"evil"})
    original = download_data._inside

    def plant(archive_, name, root, relative):
        if relative.startswith("sub/") and not (root / "sub").exists():
            (root / "sub").symlink_to(outside, target_is_directory=True)
        return original(archive_, name, root, relative)

    monkeypatch.setattr(download_data, "_inside", plant)
    with pytest.raises(SystemExit, match="resolves to .*outside"):
        _run(tmp_path, ["--adopt-archive", str(archive)])
    assert not list(outside.rglob("*"))
    assert not (tmp_path / "data" / "f30k_precomp").exists()


def test_a_root_directory_entry_of_a_tar_is_accepted(tmp_path):
    """`tar -C dir .` writes a './' entry first; it is a plain directory, not a hostile name."""
    archive = tmp_path / "rooted.tar"
    with tarfile.open(archive, "w") as tf:
        root = tarfile.TarInfo("./")
        root.type = tarfile.DIRTYPE
        tf.addfile(root)
        for name, data in _release_files().items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert _run(tmp_path, ["--adopt-archive", str(archive)]) == 0
    _assert_extracted(tmp_path)


def test_present_archive_is_not_fetched_again(tmp_path, serve):
    server = serve({"/data.zip": ZIP})
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "scan.zip").write_bytes(ZIP)
    assert _dl(tmp_path, [server.url("/data.zip")], "--sha256", _sha(ZIP)) == 0
    assert server.requests == []
    _assert_extracted(tmp_path)


def test_adopt_folder_links_without_copy(tmp_path):
    src = tmp_path / "scratch" / "my_f30k"
    src.mkdir(parents=True)
    for name in WANTED:
        (src / name).write_bytes(b"12345")
    for _ in range(2):  # a rerun replaces the link in place
        assert _run(tmp_path, ["--adopt-folder", str(src)]) == 0
    link = tmp_path / "data" / "f30k_precomp"
    assert link.is_symlink() and link.resolve() == src.resolve()
    stamp = json.loads((tmp_path / "stamp.json").read_text())
    assert stamp["mode"] == "adopt-folder" and stamp["source"] == str(src.resolve())
    assert stamp["files"] == {f"f30k_precomp/{n}": 5 for n in WANTED}


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_adopt_archive_extracts_without_copy(tmp_path, suffix):
    archive = tmp_path / "staged" / f"data{suffix}"
    archive.parent.mkdir()
    if suffix == ".zip":
        archive.write_bytes(ZIP)
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for name, data in _release_files().items():
                info = tarfile.TarInfo(f"./{name}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    sha = _sha(archive.read_bytes())
    assert _run(tmp_path, ["--adopt-archive", str(archive), "--sha256", sha]) == 0
    stamp = _assert_extracted(tmp_path)
    assert stamp["mode"] == "adopt-archive" and stamp["sha256"] == sha
    assert {p.name for p in tmp_path.iterdir()} == {"data", "stamp.json", "staged"}
    assert [p.name for p in archive.parent.iterdir()] == [archive.name]
    with pytest.raises(SystemExit, match="sha256 mismatch"):
        _run(tmp_path, ["--adopt-archive", str(archive), "--sha256", "0" * 64])


BOMB = "data/f30k_precomp/zeros.bin"


def _bomb_zip(tmp_path):
    """The release plus 4 MB of zeros, deflated about 1000x (archive of a few hundred KB)."""
    archive = tmp_path / "staged" / "bomb.zip"
    archive.parent.mkdir(exist_ok=True)
    archive.write_bytes(_zip_bytes({**_release_files(), BOMB: bytes(4 << 20)}, zipfile.ZIP_DEFLATED))
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(BOMB)
    return archive, info.file_size / info.compress_size


def _assert_nothing_extracted(tmp_path):
    assert list((tmp_path / "data").iterdir()) == []  # no extracted files, no .*.tmp-* folder
    assert not (tmp_path / "stamp.json").exists()


def test_zip_bomb_entry_is_refused(tmp_path):
    archive, ratio = _bomb_zip(tmp_path)
    assert ratio > 500
    (tmp_path / "data").mkdir()
    for cap in ([], ["--max-ratio", str(ratio * 0.99)]):
        with pytest.raises(SystemExit) as err:
            _run(tmp_path, ["--adopt-archive", str(archive), *cap])
        message = str(err.value)
        assert message.startswith(f"error: {archive}: refusing entry '{BOMB}': ")
        assert f"ratio of {ratio:.0f}" in message and "\n" not in message
        _assert_nothing_extracted(tmp_path)
    # A cap above its ratio lets the entry through (the option is honoured).
    assert _run(tmp_path, ["--adopt-archive", str(archive), "--max-ratio", str(ratio * 1.01)]) == 0
    assert (tmp_path / "data" / "f30k_precomp" / "zeros.bin").read_bytes() == bytes(4 << 20)


def test_max_ratio_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        _run(tmp_path, ["--adopt-archive", str(tmp_path / "x.zip"), "--max-ratio", "0"])
    assert err.value.code == 2  # an argparse usage error, before the archive is even looked at
    assert "--max-ratio must be positive" in capsys.readouterr().err


def test_deflated_zip_with_large_entries_extracts(tmp_path):
    files = _release_files()
    big = np.random.default_rng(3).random((2 << 20) // 4, dtype=np.float32).tobytes()  # ~1.1x
    text = "".join(f"a man riding a horse number {k}\n" for k in range(60_000)).encode()  # ~2 MB
    files.update({"data/f30k_precomp/big_ims.bin": big, "data/f30k_precomp/big_caps.txt": text})
    archive = tmp_path / "normal.zip"
    archive.write_bytes(_zip_bytes(files, zipfile.ZIP_DEFLATED))
    assert _run(tmp_path, ["--adopt-archive", str(archive)]) == 0
    folder = tmp_path / "data" / "f30k_precomp"
    assert {p.name for p in folder.iterdir()} == WANTED | {"big_ims.bin", "big_caps.txt"}
    for name in WANTED | {"big_ims.bin", "big_caps.txt"}:
        assert (folder / name).read_bytes() == files[f"data/f30k_precomp/{name}"]


def _tar_gz(path):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in _release_files().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz"])
def test_free_space_is_checked_before_extracting(tmp_path, monkeypatch, suffix):
    archive = tmp_path / f"data{suffix}"
    if suffix == ".zip":
        archive.write_bytes(ZIP)
    else:
        _tar_gz(archive)
    total = sum(len(data) for name, data in _release_files().items() if name.startswith("data/f30k_precomp/"))
    need = total + download_data.SPACE_MARGIN_MIN  # a tiny archive: the minimum margin applies
    asked, free = [], {"bytes": need - 1}
    monkeypatch.setattr(download_data, "free_bytes", lambda path: asked.append(path) or free["bytes"])
    with pytest.raises(SystemExit) as err:
        _run(tmp_path, ["--adopt-archive", str(archive)])
    message = str(err.value)
    assert message.startswith(f"error: {archive}: refusing to extract data/f30k_precomp into ")
    assert f"{total} bytes" in message and f"{need} bytes" in message
    assert f"{need - 1} bytes" in message and "\n" not in message
    assert asked == [tmp_path]  # DEST does not exist yet: its nearest existing parent
    assert not (tmp_path / "data").exists() and not (tmp_path / "stamp.json").exists()
    free["bytes"] = need  # just enough
    assert _run(tmp_path, ["--adopt-archive", str(archive)]) == 0
    _assert_extracted(tmp_path)


def test_entry_is_never_written_past_its_declared_size(tmp_path):
    class Bar:
        def update(self, n):
            pass

    out = io.BytesIO()
    with pytest.raises(SystemExit) as err:
        download_data._copy_entry(io.BytesIO(b"x" * 10), out, 5, "a.zip", "data/f/x.npy", Bar())
    assert str(err.value) == (
        "error: a.zip: refusing entry 'data/f/x.npy': it unpacks to more than its declared 5 bytes"
    )
    assert out.getvalue() == b""
    out = io.BytesIO()
    download_data._copy_entry(io.BytesIO(b"x" * 10), out, 10, "a.zip", "data/f/x.npy", Bar())
    assert out.getvalue() == b"x" * 10
