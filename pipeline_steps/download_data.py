"""Fetch (or adopt) the SCAN precomputed-feature release and extract only the wanted precomp folders.

Sources (one of): `--urls` (mirrors in order; resumable download into `<archive>.part`, sha256
checked before the rename onto `--archive`; a complete `--archive` is not fetched again),
`--adopt-archive` (an archive on disk, extracted in place) or `--adopt-folder` (a precomp folder,
linked as DEST/<name>); nothing is copied. Unsafe entries (absolute, `..`, links leaving the folder)
are refused before anything is written; each folder is unpacked beside DEST and renamed onto
DEST/<last component>. `--stamp` (JSON: source, sha256, folders, files and sizes) is written last.

Size limits, also checked before anything is written (an archive could be a bomb, or the disk too
small for a 33 GB COCO folder, which would otherwise fail midway and fill the disk on the way):
- the declared unpacked size of the chosen entries, plus a margin of 5% (at least 64 MiB) for
  file-system overhead and the pipeline's next outputs, must fit in the free space of DEST's file
  system (or of its nearest existing parent);
- a zip entry may not unpack to more than `--max-ratio` (default 200) times its compressed size,
  the mark of a zip bomb: SCAN's float features compress about 1.1x and its text about 4x. Entries
  up to 1 MiB are exempt (however well they compress, they cannot fill a disk). A tar archive is
  compressed as one stream, so it has no per-entry ratio; the free-space check covers it, since
  tar headers declare each entry's size;
- no entry is written past its declared size: a stream that yields more is refused.

Example:
    python -m pipeline_steps.download_data \
        --urls https://iudata.blob.core.windows.net/scan/data.zip \
               https://scanproject.blob.core.windows.net/scan-data/data.zip \
        --archive resources/scan_data.zip --extract data/f30k_precomp \
        --dest resources/data --stamp resources/data/f30k_precomp.download.json
"""

import argparse
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pipeline_steps.common.atomic import remove_stale_temporaries, temporary_path, write_text_atomic
from pipeline_steps.common.errors import one_line_errors

log = logging.getLogger("download_data")
CHUNK = 1 << 20
DEFAULT_MAX_RATIO = 200.0  # zip bombs deflate ~1000x; SCAN's features ~1.1x, its text ~4x
RATIO_EXEMPT_BYTES = 1 << 20  # smaller entries cannot fill a disk, whatever their ratio
SPACE_MARGIN_FRACTION = 0.05  # free space asked for beyond the unpacked size (block rounding,
SPACE_MARGIN_MIN = 64 << 20  # metadata, the pipeline's next outputs): 5%, at least 64 MiB


class MirrorError(Exception):
    """One mirror failed (connection, HTTP status, short body or checksum); the next is tried."""


def _bar(total, initial, desc):
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        mininterval=5,
        file=sys.stderr,
    )


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_once(url, part, timeout):
    """One HTTP request: resume `part` with a Range request if it exists; raise on a short body."""
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "aoq-pipeline-download/1", "Accept-Encoding": "identity"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        total = (err.headers.get("Content-Range") or "").rpartition("/")[2]
        if err.code == 416 and start and total == str(start):
            return  # the .part already holds the whole file
        if err.code == 416 and start:
            part.unlink()  # a .part that does not fit this file: start over on the next attempt
        raise MirrorError(f"HTTP {err.code} {err.reason}") from None
    with resp:
        length = resp.headers.get("Content-Length")
        if start and resp.status == 206:
            if not (resp.headers.get("Content-Range") or "").startswith(f"bytes {start}-"):
                raise MirrorError(f"bad Content-Range {resp.headers.get('Content-Range')!r}")
            mode = "ab"
        else:  # 200: the server ignored the range (or there was none) -> start from zero
            if start:
                log.info("%s: server ignored Range, restarting from byte 0", url)
            start, mode = 0, "wb"
        expected = int(length) if length is not None else None
        got = 0
        with (
            open(part, mode) as out,
            _bar(None if expected is None else start + expected, start, part.name) as bar,
        ):
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    if expected is not None and got < expected:
        raise MirrorError(f"connection closed after {start + got} of {start + expected} bytes")


def download(urls, archive, sha256, timeout, retries):
    """Fetch `archive` from the first mirror that delivers it; return (url, sha256 of the file)."""
    archive, failures = Path(archive), []
    part = archive.with_name(archive.name + ".part")
    archive.parent.mkdir(parents=True, exist_ok=True)
    for url in urls:
        try:
            for attempt in range(1, retries + 1):
                size = part.stat().st_size if part.exists() else -1
                try:
                    _fetch_once(url, part, timeout)
                    break
                except (MirrorError, OSError, http.client.HTTPException) as err:  # OSError: URLError,
                    # timeouts, resets; HTTPException: IncompleteRead, bad status lines
                    moved = (part.stat().st_size if part.exists() else -1) != size
                    if attempt == retries or not moved:
                        raise MirrorError(str(getattr(err, "reason", err))) from None
                    log.info("%s: attempt %d interrupted (%s); resuming", url, attempt, err)
            actual = sha256_file(part)
            if sha256 and actual != sha256:
                part.unlink()
                raise MirrorError(f"sha256 mismatch: expected {sha256}, got {actual} (deleted {part})")
        except MirrorError as err:
            log.warning("mirror failed: %s: %s", url, err)
            failures.append(f"{url}: {err}")
            continue
        os.replace(part, archive)
        log.info("downloaded %s from %s", archive, url)
        return url, actual
    raise SystemExit(f"error: {archive}: every mirror failed: " + "; ".join(failures))


def _members(archive):
    """(name, kind, size, linkname, handle) for every entry; kind in file/dir/symlink/hardlink/other."""
    if zipfile.is_zipfile(archive):
        zf = zipfile.ZipFile(archive)
        return zf, [
            (i.filename, "dir" if i.is_dir() else "file", i.file_size, None, i) for i in zf.infolist()
        ]
    try:
        tf = tarfile.open(archive)
    except (tarfile.TarError, OSError) as err:
        raise SystemExit(f"error: {archive}: not a readable zip or tar archive ({err})") from None
    kinds = {"reg": "file", "dir": "dir", "sym": "symlink", "lnk": "hardlink"}
    out = []
    for m in tf.getmembers():
        kind = next((k for attr, k in kinds.items() if getattr(m, "is" + attr)()), "other")
        name = m.name[2:] if m.name.startswith("./") else m.name
        out.append((name, kind, m.size, m.linkname or None, m))
    return tf, out


def _normalize(path):
    """Resolve '.' and '..' lexically; None if the path climbs above its root or is absolute."""
    parts = []
    for part in PurePosixPath(path.replace("\\", "/")).parts:
        if part == "/" or part.endswith(":"):
            return None
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part != ".":
            parts.append(part)
    return "/".join(parts)


def _link_target(name, kind, linkname):
    """Archive-relative path a link entry points to (None if it leaves the archive)."""
    if kind == "hardlink":
        return _normalize(linkname)
    return _normalize(str(PurePosixPath(name).parent / linkname)) if linkname else None


def _entry_problem(name):
    """Why an entry's name is not a plain relative path inside the archive (None if it is).

    Backslashes count as separators (archives made on Windows). A name with an empty component
    ('a//b', a leading '/'), a '.' or '..' component, a drive ('C:'), or a NUL is refused: after a
    folder prefix is cut, 'folder//abs/path' would otherwise become an absolute path. The root
    entry of a tar made with `tar -C folder .` ('./', '.') is a plain directory and passes.
    """
    if "\0" in name:
        return "NUL character in its name"
    parts = re.split(r"[/\\]", name.removesuffix("/").removesuffix("\\"))
    if parts[0] == "" or parts[0].endswith(":"):
        return "absolute path"
    if "" in parts:
        return "empty path component (a double slash)"
    if ".." in parts:
        return "'..' component"
    if "." in parts:
        return "'.' component"
    return None


def _check(archive, name, kind, linkname, prefix=""):
    """Refuse an entry that could write (or point) outside the extraction folder."""

    def bad(problem):
        raise SystemExit(f"error: {archive}: refusing entry {name!r}: {problem}")

    problem = None if kind == "dir" and name in ("", ".", "./") else _entry_problem(name)
    if problem:
        bad(problem)
    if kind == "other":
        bad("device, fifo or other special file")
    if kind in ("symlink", "hardlink"):
        target = _link_target(name, kind, linkname)
        if target is None or not (target + "/").startswith(prefix):
            bad(f"link to {linkname!r} points outside {prefix or 'the archive'}")


def _inside(archive, name, root, relative):
    """root/relative, after checking that its resolved parent lies inside the resolved root.

    The last line of defence, whatever the name's form: symlinked parents, look-alike characters
    or anything the lexical checks missed cannot place a file outside the folder being extracted.
    """
    target = root.joinpath(*re.split(r"[/\\]", relative.strip("/\\")))
    real_root = Path(os.path.realpath(root))
    real_parent = Path(os.path.realpath(target.parent))
    if real_parent != real_root and real_root not in real_parent.parents:
        raise SystemExit(
            f"error: {archive}: refusing entry {name!r}: it resolves to {real_parent}, outside {root}"
        )
    return target


def free_bytes(path):
    """Free bytes on the file system holding `path` (a module function, so tests can patch it)."""
    return shutil.disk_usage(path).free


def _nearest_existing(path):
    """`path` or its nearest existing parent: DEST itself is only created after the checks."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def _size(n):
    """Bytes exactly (comparable with df -B1) and in GiB (readable)."""
    return f"{n} bytes ({n / (1 << 30):.2f} GiB)"


def _check_space(archive, plan, dest):
    """Refuse if the declared sizes of the chosen entries, plus a margin, exceed DEST's free space.

    All of it is needed at once: an older extracted folder is only removed after the new one is
    complete. For a tar archive this is the only bomb guard (see the module docstring).
    """
    total = sum(m[2] for _, chosen in plan.values() for m in chosen if m[1] == "file")
    need = total + max(int(total * SPACE_MARGIN_FRACTION), SPACE_MARGIN_MIN)
    where = _nearest_existing(dest)
    free = free_bytes(where)
    if need > free:
        raise SystemExit(
            f"error: {archive}: refusing to extract {', '.join(plan)} into {dest}: "
            f"the entries unpack to {_size(total)}, {_size(need)} with the margin, "
            f"but {where} has {_size(free)} free"
        )


def _check_ratio(archive, name, info, max_ratio):
    """Refuse a zip entry that unpacks to more than `max_ratio` times its compressed size."""
    if not isinstance(info, zipfile.ZipInfo) or info.file_size <= RATIO_EXEMPT_BYTES:
        return  # tar: one compressed stream, no per-entry ratio (the free-space check covers it)
    ratio = info.file_size / max(info.compress_size, 1)
    if ratio > max_ratio:
        raise SystemExit(
            f"error: {archive}: refusing entry {name!r}: it unpacks {info.file_size} "
            f"bytes from {info.compress_size}, a compression ratio of {ratio:.0f} "
            f"(over --max-ratio {max_ratio:g}; a zip bomb?)"
        )


def extract(archive, folders, dest, max_ratio=DEFAULT_MAX_RATIO):
    """Extract the entries under each archive folder to DEST/<last component>; return {folder: path}.

    Every entry is checked (paths, links, compression ratio, total size against free space)
    before anything is written.
    """
    archive, dest = Path(archive), Path(dest)
    handle, members = _members(archive)
    with handle:
        for name, kind, _, linkname, _ in members:
            _check(archive, name, kind, linkname)
        plan = {}
        for folder in folders:
            prefix = folder.strip("/") + "/"
            chosen = [m for m in members if m[0].startswith(prefix) and m[0] != prefix]
            if not chosen:
                raise SystemExit(f"error: {archive}: no entries under {prefix!r}")
            links = {m[0].rstrip("/") for m in chosen if m[1] == "symlink"}
            for name, kind, _, linkname, info in chosen:
                _check(archive, name, kind, linkname, prefix)
                if any(str(up) in links for up in PurePosixPath(name).parents):
                    raise SystemExit(
                        f"error: {archive}: refusing entry {name!r}: its path goes through a symlink entry"
                    )
                _check_ratio(archive, name, info, max_ratio)
            plan[folder] = (prefix, chosen)
        _check_space(archive, plan, dest)
        dest.mkdir(parents=True, exist_ok=True)
        done = {}
        for folder, (prefix, chosen) in plan.items():
            final = dest / PurePosixPath(folder.strip("/")).name
            tmp = temporary_path(final)
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                _unpack(archive, handle, prefix, chosen, tmp)
                _replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("extracted %s:%s -> %s", archive, prefix, final)
            done[folder] = str(final)
    return done


def _unpack(archive, handle, prefix, chosen, tmp):
    tmp.mkdir(parents=True)
    with _bar(sum(m[2] for m in chosen if m[1] == "file"), 0, f"extract {prefix}") as bar:
        for name, kind, size, linkname, info in chosen:
            target = _inside(archive, name, tmp, name[len(prefix) :])
            if kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.is_file():
                target.unlink()  # a later entry of the same name wins, never written through
            if kind == "symlink":  # re-aim at the same entry in the extracted (stripped) layout
                rel = _link_target(name, kind, linkname)[len(prefix) :] or "."
                os.symlink(os.path.relpath(rel, os.path.dirname(name[len(prefix) :]) or "."), target)
            elif kind == "hardlink":
                os.link(tmp / _link_target(name, kind, linkname)[len(prefix) :], target)
            else:
                src = handle.open(info) if isinstance(handle, zipfile.ZipFile) else handle.extractfile(info)
                with src, open(target, "wb") as out:
                    _copy_entry(src, out, size, archive, name, bar)


def _copy_entry(src, out, size, archive, name, bar):
    """Copy one entry's bytes from `src` to `out`, never writing more than its declared `size`.

    The free-space check trusted the declared sizes, so a stream that yields more (a forged
    header, a reader that does not stop) is refused rather than written.
    """
    written = 0
    while chunk := src.read(min(CHUNK, size - written + 1)):  # +1: one byte too many shows it
        written += len(chunk)
        if written > size:
            raise SystemExit(
                f"error: {archive}: refusing entry {name!r}: it unpacks to more "
                f"than its declared {size} bytes"
            )
        out.write(chunk)
        bar.update(len(chunk))


def _old_name(final):
    """Where an older folder waits for removal while `final` is replaced."""
    return final.with_name(f"{final.name}-old")


def _replace(new, final):
    """Rename `new` onto `final`, moving an older folder or link out of the way first."""
    old = None
    if final.is_symlink() or final.is_file():
        final.unlink()
    elif final.exists():
        old = temporary_path(_old_name(final))
        os.replace(final, old)
    os.replace(new, final)
    if old:
        shutil.rmtree(old)


def adopt_folder(path, dest, name):
    """Link DEST/<name> -> PATH (absolute) without copying; return the link path."""
    path, final = Path(path).resolve(), Path(dest) / name
    if not path.is_dir():
        raise SystemExit(f"error: {path}: --adopt-folder is not a directory")
    if final.resolve() == path:
        return str(final)  # the folder already sits at its place
    if final.exists() and not final.is_symlink():
        raise SystemExit(
            f"error: {final}: exists and is not a link; move it away or adopt it "
            f"in place (--adopt-folder {final})"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(final)
    tmp.unlink(missing_ok=True)
    os.symlink(path, tmp, target_is_directory=True)
    _replace(tmp, final)
    log.info("linked %s -> %s", final, path)
    return str(final)


def _file_list(folders):
    files = {}
    for folder in folders:
        root = Path(folder)
        for p in sorted(root.rglob("*")):
            if p.is_file():
                files[str(PurePosixPath(root.name, *p.relative_to(root).parts))] = p.stat().st_size
    return files


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--urls", nargs="+", help="mirrors of the archive, tried in order")
    source.add_argument("--adopt-archive", help="extract from this archive on disk (no download, no copy)")
    source.add_argument("--adopt-folder", help="link this existing precomp folder (no copy)")
    parser.add_argument("--sha256", help="expected sha256 (hex) of the archive")
    parser.add_argument("--archive", help="where the downloaded archive is kept (with --urls)")
    parser.add_argument("--extract", nargs="+", default=[], help="archive folders, e.g. data/f30k_precomp")
    parser.add_argument("--dest", required=True, help="extraction target folder")
    parser.add_argument("--stamp", required=True, help="JSON record, written last")
    parser.add_argument("--timeout", type=float, default=60.0, help="connection timeout (s)")
    parser.add_argument("--retries", type=int, default=3, help="resumed attempts per mirror")
    parser.add_argument(
        "--max-ratio",
        type=float,
        default=DEFAULT_MAX_RATIO,
        help="refuse a zip entry over 1 MiB that unpacks to more than this many times "
        "its compressed size (a zip bomb; SCAN's features compress ~1.1x, its "
        "text ~4x; default %(default)g)",
    )
    args = parser.parse_args(argv)
    if not args.max_ratio > 0:
        parser.error("--max-ratio must be positive")
    if args.urls and not args.archive:
        parser.error("--urls needs --archive")
    if not args.adopt_folder and not args.extract:
        parser.error("--extract is required unless --adopt-folder is given")
    if args.adopt_folder and len(args.extract) > 1:
        parser.error("--adopt-folder links one folder: give at most one --extract name")
    args.sha256 = args.sha256 and args.sha256.strip().lower()
    if args.sha256 and not re.fullmatch(r"[0-9a-f]{64}", args.sha256):
        parser.error("--sha256 must be 64 hex digits")
    return args


def _obtain_archive(args):
    """(archive, source, sha256) for --adopt-archive, or for --urls (fetched unless complete)."""
    if args.adopt_archive:
        archive = Path(args.adopt_archive)
        if not archive.is_file():
            raise SystemExit(f"error: {archive}: --adopt-archive file not found")
        source, digest = str(archive.resolve()), sha256_file(archive)
    else:
        archive, source, digest = Path(args.archive), None, None
        if archive.is_file():
            digest = sha256_file(archive)
            if args.sha256 in (None, digest):
                log.info("%s: already present (sha256 %s), not downloading", archive, digest)
                source = str(archive.resolve())
            else:
                log.warning(
                    "%s: present but sha256 %s != expected %s; removing it, downloading again",
                    archive,
                    digest,
                    args.sha256,
                )
                archive.unlink()
        if source is None:
            source, digest = download(args.urls, archive, args.sha256, args.timeout, args.retries)
    if args.sha256 and digest != args.sha256:
        raise SystemExit(f"error: {archive}: sha256 mismatch: expected {args.sha256}, got {digest}")
    return archive, source, digest


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    finals = [Path(args.dest) / PurePosixPath(f.strip("/")).name for f in args.extract]
    # A killed extraction leaves a folder of several GB (the .part download is kept on purpose).
    remove_stale_temporaries(args.stamp, *finals, *map(_old_name, finals))
    if args.adopt_folder:
        src = Path(args.adopt_folder).resolve()
        name = PurePosixPath(args.extract[0].strip("/")).name if args.extract else src.name
        folders = {args.adopt_folder: adopt_folder(src, args.dest, name)}
        record = {"mode": "adopt-folder", "source": str(src), "archive": None, "sha256": None}
    else:
        archive, source, digest = _obtain_archive(args)
        record = {
            "mode": "adopt-archive" if args.adopt_archive else "download",
            "source": source,
            "archive": str(archive),
            "sha256": digest,
        }
        folders = extract(archive, args.extract, args.dest, max_ratio=args.max_ratio)
    record["extracted"] = folders
    record["files"] = _file_list(folders.values())
    write_text_atomic(args.stamp, json.dumps(record, indent=2) + "\n")
    log.info("wrote %s (%d files)", args.stamp, len(record["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
