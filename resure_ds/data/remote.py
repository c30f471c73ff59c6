"""Paths in object stores: s3://, gs://, az://, hf://, https:// (anything fsspec reads), beside
local paths.

Every function here takes a local path or a URL; local paths keep the plain os calls. A URL's
backend (s3fs, gcsfs, adlfs, ...) is imported only when such a URL is used, and a missing one is one
error naming the package. Credentials and endpoints are the backend's own business (for S3: the
AWS_* environment, ~/.aws/credentials, an instance role; AWS_ENDPOINT_URL for a store on premises):
nothing here reads them, and what the recipe records of a URL (`shown`) drops any user:password@
and ?query (a presigned URL's signature) it carries.

A failure of the store (no such bucket or object, access denied, the connection dropped) comes
out as one DataError naming the URL and the likely fix (`store_errors`).
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import os
import posixpath
import re
import shutil
from typing import IO, Iterator

from ..errors import DataError
from ..models import cache_root

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "abfss": "adlfs", "hf": "huggingface_hub", "http": "aiohttp", "https": "aiohttp"}
CREDENTIALS_HINT = {"s3": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials "
                          "(AWS_ENDPOINT_URL for a store on premises)",
                    "gs": "GOOGLE_APPLICATION_CREDENTIALS or gcloud's default credentials",
                    "az": "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_KEY or a connection string",
                    "hf": "HF_TOKEN or huggingface-cli login"}


def scheme(path: str) -> str | None:
    """The URL scheme of a remote path (lower case), None for a local path (file:// is local)."""
    m = SCHEME.match(path)
    return None if m is None or m.group(1).lower() == "file" else m.group(1).lower()


def is_url(path: str) -> bool:
    return scheme(path) is not None


def local(path: str) -> str:
    """file:///x (and file://localhost/x) -> /x; anything else unchanged (file://host/x names another
    machine: it stays as written, and is then no such file here)."""
    if not path.lower().startswith("file://"):
        return path
    rest = path[len("file://"):]
    if rest.startswith("/"):
        return rest
    return rest[len("localhost"):] if rest.lower().startswith("localhost/") else path


ALIASES = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}  # one store, one name (the same backend)


def canonical(url: str) -> str:
    """A URL with its scheme in lower case and under its one name (S3:// and s3a:// -> s3://): fsspec
    knows no S3://, and a prepared_dir written s3a:// must not pass for another place than s3://."""
    if not is_url(url):
        return url
    head, rest = url.split("://", 1)
    return f"{ALIASES.get(head.lower(), head.lower())}://{rest}"


def normal(url: str) -> str:
    """A URL with its scheme canonical and its path's repeated slashes collapsed (s3://b//x -> s3://b/x),
    as a local path's are; a local path unchanged."""
    if not is_url(url):
        return url
    head, rest = canonical(url).split("://", 1)
    netloc, sep, tail = rest.partition("/")
    return f"{head}://{netloc}{sep}{re.sub('/+', '/', tail).lstrip('/')}"


def shown(path: str) -> str:
    """A URL as it may be written down (configs, manifests, logs): without user:password@ or a
    ?key=value query (a presigned signature)."""
    if not is_url(path):
        return path
    head, rest = path.split("://", 1)
    netloc, _, tail = rest.partition("/")
    netloc = netloc.rsplit("@", 1)[-1] if ":" in netloc.rsplit("@", 1)[0] else netloc
    tail = re.sub(r"\?[^/]*=.*$", "", tail)
    return f"{head}://{netloc}/{tail}" if tail else f"{head}://{netloc}"


def join(base: str, *names: str) -> str:
    return posixpath.join(base, *names) if is_url(base) else os.path.join(base, *names)


def _fs(url: str):
    """(fsspec filesystem, path within it) of a URL; a missing backend is one error naming it."""
    import fsspec

    sch = scheme(url)
    try:
        with store_errors(url, "connecting"):
            return fsspec.core.url_to_fs(canonical(url))
    except DataError:
        raise
    except ImportError as e:
        pkg = BACKENDS.get(sch)
        need = f"the {pkg} package ({e}); install it (pip install {pkg})" if pkg else \
            f"a package fsspec names: {e}; install it"
        raise DataError(f"{shown(url)}: reading {sch}:// needs {need}, or copy the data to a local folder") from None
    except ValueError as e:
        raise DataError(f"{shown(url)}: no fsspec backend reads {sch}:// ({e}); use s3://, gs://, az://, hf:// "
                        "or https://, or a local path") from None


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) < 300 else text[:300] + "..."


CLIENTS = {"botocore", "aiobotocore", "s3fs", "aiohttp", "gcsfs", "google", "adlfs", "azure", "huggingface_hub",
           "requests", "urllib3", "fsspec"}


def _from_store(e: BaseException) -> bool:
    """An error of the store or the connection to it (not a bug of ours, nor bad bytes in a file)."""
    if isinstance(e, gzip.BadGzipFile):
        return False
    return isinstance(e, (OSError, TimeoutError)) or type(e).__module__.split(".")[0] in CLIENTS


@contextlib.contextmanager
def store_errors(url: str, doing: str = "reading") -> Iterator[None]:
    """What a store's client raises -> one DataError naming the URL and the fix. A DataError (ours)
    passes; so does anything for a local path (the caller's own handling applies)."""
    if not is_url(url):
        yield
        return
    sch = scheme(url)
    creds = CREDENTIALS_HINT.get(sch, "the backend's usual credentials")
    try:
        yield
    except (DataError, ImportError):
        raise
    except OSError as e:
        if e.errno in LOCAL_ERRNOS or (isinstance(e, FileNotFoundError) and _is_local(e.filename)):
            raise DataError(local_error(e, f"{doing} {shown(url)}")) from None
        _store_error(e, url, doing, creds)
    except Exception as e:  # noqa: BLE001 -- each backend has its own errors for a dropped or refused connection
        _store_error(e, url, doing, creds)


LOCAL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
CREDENTIAL_ERRORS = ("ProfileNotFound", "SSOTokenLoadError", "TokenRetrievalError", "UnauthorizedSSOTokenError")


def _in_cache(filename) -> bool:
    if not isinstance(filename, str) or is_url(filename):
        return False
    root = os.path.abspath(cache_root())
    return os.path.abspath(filename).startswith(root + os.sep)


def _is_local(filename) -> bool:
    """A file of this machine (a store's errors name no filename, or a key, never an absolute path)."""
    return isinstance(filename, str) and not is_url(filename) and (os.path.isabs(filename) or _in_cache(filename))


def local_error(e: OSError, doing: str) -> str:
    """A local file's failure in a store's work; where it lies under RESURE_CACHE (the fetched copies),
    what that folder needs."""
    what = {errno.ENOSPC: "no space left", errno.EDQUOT: "over the disk quota", errno.EROFS: "read-only"}.get(
        e.errno, "a local file is missing")
    where = f" ({e.filename})" if e.filename else ""
    text = f"{doing}: {what} on this machine{where}: {e.strerror or e}"
    if e.filename is None or _in_cache(e.filename):
        return (f"{text}; the local copies of the store's data live under RESURE_CACHE ({cache_root()}): it needs "
                "room and must be writable (set RESURE_CACHE to another folder, or free space), then run again")
    if e.errno in LOCAL_ERRNOS:
        return f"{text}; that disk needs room and must be writable, then run again"
    return f"{text}; it is this machine's file, not the store's: check it, then run again"


def _store_error(e: BaseException, url: str, doing: str, creds: str) -> None:
    if isinstance(e, FileNotFoundError):
        raise DataError(f"{shown(url)}: no such object, folder or bucket while {doing} ({_describe(e)}); check "
                        "the URL (bucket and key)") from None
    if isinstance(e, PermissionError):
        raise DataError(f"{shown(url)}: access denied while {doing} ({_describe(e)}); check the credentials "
                        f"the backend finds: {creds}") from None
    if not _from_store(e):
        raise e  # a bug, not the store: keep its traceback
    name = type(e).__name__
    if ("credential" in name.lower() or name in CREDENTIAL_ERRORS or "signature" in str(e).lower()
            or "InvalidAccessKeyId" in str(e)):
        raise DataError(f"{shown(url)}: the store refused the credentials while {doing} ({name}: "
                        f"{_describe(e)}); check {creds}") from None
    raise DataError(f"{shown(url)}: the store failed while {doing} ({name}: {_describe(e)}); is the endpoint "
                    "reachable? Run again to resume (finished work is kept)") from None


def open_binary(path: str) -> IO[bytes]:
    """A file to read (a remote one buffered by io, which gives readline its size limit)."""
    if not is_url(path):
        return open(local(path), "rb")
    fs, p = _fs(path)
    with store_errors(path, "opening"):
        return io.BufferedReader(fs.open(p, "rb"), buffer_size=1 << 20)


def read_bytes(path: str) -> bytes:
    with store_errors(path), open_binary(path) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """A whole object (remote: one PUT, which a reader sees whole or not at all) or file."""
    if not is_url(path):
        with open(local(path), "wb") as f:
            f.write(data)
        return
    fs, p = _fs(path)
    with store_errors(path, "writing"):
        fs.pipe_file(p, data)


def put(local_file: str, url: str) -> None:
    fs, p = _fs(url)
    with store_errors(url, "uploading"):
        fs.put_file(local_file, p)


def get(url: str, local_file: str) -> None:
    fs, p = _fs(url)
    with store_errors(url, "downloading"):
        fs.get_file(p, local_file)


def _ask(path: str, on_disk, method: str, doing: str = "looking for"):
    """A question about one path: os's answer for a local one, the store's for a URL (its listing of
    the parent read afresh: another process may have written since)."""
    if not is_url(path):
        return on_disk(local(path))
    fs, p = _fs(path)
    with store_errors(path, doing):
        fs.invalidate_cache(posixpath.dirname(p))
        return getattr(fs, method)(p)


def exists(path: str) -> bool:
    return _ask(path, os.path.exists, "exists")


def isfile(path: str) -> bool:
    return _ask(path, os.path.isfile, "isfile")


def isdir(path: str) -> bool:
    return _ask(path, os.path.isdir, "isdir")


def _url(path: str, like: str) -> str:
    """A path fsspec listed -> a URL of like's scheme (listings drop the scheme)."""
    return f"{like.split('://', 1)[0]}://{path.lstrip('/')}"


def listdir(path: str) -> list[str]:
    """Names in a folder (not recursive)."""
    if not is_url(path):
        return os.listdir(local(path))
    fs, p = _fs(path)
    with store_errors(path, "listing"):
        fs.invalidate_cache(p)  # another process may have written since the last listing
        return sorted(posixpath.basename(x.rstrip("/")) for x in fs.ls(p, detail=False))


def walk_files(folder: str) -> list[str]:
    """Every file under a remote folder (recursive, in os.walk's order), as a local folder is read:
    folders whose names start with '.' skipped, files of any name kept. A key with a '.' or '..'
    part is refused (a path would read it as another place)."""
    fs, p = _fs(folder)
    with store_errors(folder, "listing"):
        found = fs.find(p)
    def walk_order(rel: str) -> list:  # os.walk's, as a local folder is read: a folder's files, then its folders
        parts = rel.split("/")
        return [(1, d) for d in parts[:-1]] + [(0, parts[-1])]

    base, rels = p.rstrip("/"), []
    for f in found:
        rel = f[len(base) + 1:] if f.startswith(base + "/") else posixpath.relpath(f, base)
        parts = rel.split("/")
        if any(part in (".", "..") for part in parts):
            raise DataError(f"{shown(_url(f, folder))}: a key with a '.' or '..' part, which a path reads as another "
                            "place; rename it in the store (or move it out of the folder)")
        if not any(part.startswith(".") for part in parts[:-1]):  # in a hidden folder: skipped
            rels.append(rel)
    return [_url(posixpath.join(base, r), folder) for r in sorted(rels, key=walk_order)]


def glob(pattern: str) -> list[str]:
    fs, p = _fs(pattern)
    with store_errors(pattern, "listing"):
        return sorted(_url(f, pattern) for f in fs.glob(p) if fs.isfile(f))


def size(path: str) -> int:
    return int(_ask(path, os.path.getsize, "size", "looking up"))


def remove(path: str, recursive: bool = False) -> None:
    if not is_url(path):
        (shutil.rmtree if recursive else os.remove)(local(path))
        return
    fs, p = _fs(path)
    with store_errors(path, "removing"):
        fs.rm(p, recursive=recursive)


def fingerprint(url: str) -> list:
    """A remote file's identity, as file_fingerprint is a local one's: [URL as shown, size, version],
    the version being the store's ETag (S3, GCS, Azure), else its modification time, else a hash of
    the first and last 64 KiB. An edited object changes it; nothing is read whole."""
    fs, p = _fs(url)
    with store_errors(url, "looking up"):
        info = fs.info(p)  # from this process's listing, if it has one (refresh reads it again)
        version = next((str(info[k]) for k in ("ETag", "etag", "e_tag", "md5", "last_commit", "LastModified",
                                                 "mtime", "last_modified", "updated") if info.get(k)), None)
        if version is None:
            with fs.open(p, "rb") as f:
                version = head_tail_digest(f, int(info["size"]))
    return [shown(url), int(info["size"]), version.strip('"')]


def refresh(urls: list[str]) -> None:
    """Forget this process's listings of these URLs' folders and read them again (one listing a
    folder), so that fingerprints taken next are the store's now: a fingerprint is answered from a
    listing cached when the folder was first listed, which would hide an object replaced since."""
    done = set()
    for url in (u for u in urls if is_url(u)):
        fs, p = _fs(url)
        folder = posixpath.dirname(p)
        if folder in done:
            continue
        done.add(folder)
        fs.invalidate_cache(folder)
        with contextlib.suppress(Exception):  # a backend that cannot list (https): its info asks the store
            fs.ls(folder, detail=True)


def head_tail_digest(f, size: int) -> str:
    """SHA-256 (16 hex digits) of a file's first and last 64 KiB: a file's identity without reading it
    whole (local files' fingerprints use it beside size and mtime, a store's objects without a version)."""
    h = hashlib.sha256()
    h.update(f.read(1 << 16))
    if size > 2 << 16:
        f.seek(-(1 << 16), os.SEEK_END)
        h.update(f.read())
    return h.hexdigest()[:16]
