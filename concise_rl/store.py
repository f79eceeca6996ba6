"""The artifact store: copies of registered checkpoints and evaluation outputs.

A store is a local directory (the default, ``<CONCISE_RL_HOME>/store``) or an S3
bucket prefix, ``s3://BUCKET/PREFIX``, reached through boto3 (AWS or any
S3-compatible server via ``store.endpoint_url``). Three operations:

* :meth:`ArtifactStore.upload_dir` copies a folder to a URI and writes a manifest
  (every file's size and sha256) *last*, so a folder without a manifest is an
  upload that never finished;
* :meth:`ArtifactStore.download_dir` refuses a URI without a manifest and checks
  every file against it before the folder appears at its destination;
* :meth:`ArtifactStore.verify` re-reads a stored folder and checks it in place.

Large files go up in parts (``multipart_threshold_mb`` / ``multipart_chunk_mb``).
Every request is retried by botocore (standard mode); a file transfer that still
fails on a connection error is retried ``max_attempts`` times with exponential
backoff, then fails with a :class:`StoreError` that names the endpoint and what to
check. Credentials come from boto3's own chain and are never read or logged here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from concise_rl import paths
from concise_rl.config import StoreConfig, redact_url
from concise_rl.files import atomic_file, atomic_write_bytes, replaced_dir

log = logging.getLogger(__name__)

MANIFEST = "concise-rl-manifest.json"
MANIFEST_FORMAT = "concise-rl-manifest/1"
MAX_BACKOFF_S = 30.0
_HASH_BLOCK = 1 << 20

T = TypeVar("T")


class StoreError(RuntimeError):
    """The store could not be reached, or what it holds is incomplete or corrupt."""


class ManifestError(StoreError):
    """A manifest that cannot be read or lists an unsafe file name."""


@dataclass(frozen=True)
class Upload:
    uri: str  # the folder; its manifest is at uri + "/" + MANIFEST
    manifest: dict[str, Any]
    digest: str  # sha256 of the manifest's file table: names the content
    skipped: bool  # the same content was already committed there


# ----------------------------------------------------------------------------- manifests
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def build_manifest(local_dir: str | Path) -> dict[str, Any]:
    """Size and sha256 of every file under ``local_dir`` (symlinks followed; an old manifest left out)."""
    root = Path(local_dir)
    if not root.is_dir():
        raise StoreError(f"{root} is not a directory; nothing to upload")
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST:
            files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if not files:
        raise StoreError(f"{root} holds no files; nothing to upload")
    return {"format": MANIFEST_FORMAT, "files": files, "total_bytes": sum(f["size"] for f in files.values())}


def manifest_digest(manifest: dict[str, Any]) -> str:
    blob = json.dumps(manifest["files"], sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _parse_manifest(blob: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(blob)
        files = manifest["files"]
        ok = manifest.get("format") == MANIFEST_FORMAT and isinstance(files, dict) and all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise ManifestError(f"{where} is not a {MANIFEST_FORMAT} manifest; refusing to use the folder")
    for rel in files:
        _safe_relpath(rel, where)
    return manifest


def _safe_relpath(rel: str, where: str) -> PurePosixPath:
    """A manifest entry as a relative path that stays inside the folder."""
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts or "\\" in rel or rel == MANIFEST:
        raise ManifestError(f"{where} lists an unsafe file name {rel!r}; refusing to use the folder")
    return path


def _check_file(path: Path, entry: dict[str, Any], name: str) -> None:
    size = path.stat().st_size
    digest = sha256_file(path) if size == entry["size"] else None
    if size != entry["size"] or digest != entry["sha256"]:
        got = f"size {size}" if digest is None else f"sha256 {digest[:16]}..."
        want = f"size {entry['size']}" if digest is None else f"sha256 {entry['sha256'][:16]}..."
        raise StoreError(
            f"{name} does not match its manifest ({got}, expected {want}): the stored copy is corrupt or was "
            f"changed after upload; refusing to use it"
        )


# ----------------------------------------------------------------------------- URIs
def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"{uri}: a file:// URI must name a local path (file:///PATH)")
        return Path(unquote(parts.path))
    return Path(uri).expanduser().resolve()


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StoreError(f"{uri}: an S3 URI needs a bucket, s3://BUCKET/PREFIX")
    return bucket, key.strip("/")


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` appended as path segments (S3 keys or local subfolders)."""
    parts = tuple(p.strip("/") for p in parts if p.strip("/"))
    for part in parts:
        if ".." in PurePosixPath(part).parts or "\\" in part:
            raise StoreError(f"{part!r} would lead out of {uri}; store keys are relative paths without '..'")
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *parts])
    return _local_path(uri).joinpath(*parts).as_uri()


# ----------------------------------------------------------------------------- backends
class _Missing(Exception):
    """An object the manifest lists is not in the store."""


class _LocalFolder:
    """One folder of a local-directory store; keys are paths relative to it."""

    def __init__(self, uri: str):
        self.root = _local_path(uri)
        self.uri = self.root.as_uri()

    def name(self, key: str) -> str:
        return str(self.root / key)

    def put_file(self, src: Path, key: str) -> None:
        with atomic_file(self.root / key) as tmp:
            shutil.copyfile(src, tmp)

    def put_bytes(self, data: bytes, key: str) -> None:
        atomic_write_bytes(self.root / key, data)

    def get_bytes(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError:
            return None

    def get_file(self, key: str, dst: Path) -> None:
        src = self.root / key
        if not src.is_file():
            raise _Missing(key)
        shutil.copyfile(src, dst)

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def sizes(self) -> dict[str, int]:
        if not self.root.is_dir():
            return {}
        return {p.relative_to(self.root).as_posix(): p.stat().st_size for p in self.root.rglob("*") if p.is_file()}

    def check(self, key: str, entry: dict[str, Any]) -> None:
        src = self.root / key
        if not src.is_file():
            raise _Missing(key)
        _check_file(src, entry, self.name(key))


class _S3Folder:
    """One prefix of an S3 bucket; keys are relative to it."""

    def __init__(self, store: ArtifactStore, uri: str):
        self.store = store
        self.bucket, self.prefix = _split_s3(uri)
        self.uri = uri.rstrip("/")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def name(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def put_file(self, src: Path, key: str) -> None:
        self.store._retry(
            f"upload of {src} to {self.name(key)}",
            lambda: self.store.client.upload_file(str(src), self.bucket, self._key(key), Config=self.store.transfer),
        )

    def put_bytes(self, data: bytes, key: str) -> None:
        self.store._retry(
            f"upload of {self.name(key)}",
            lambda: self.store.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data),
        )

    def get_bytes(self, key: str) -> bytes | None:
        def get() -> bytes | None:
            try:
                return self.store.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            except Exception as exc:  # noqa: BLE001 - anything but "not found" goes on to _retry
                if _not_found(exc):
                    return None
                raise

        return self.store._retry(f"read of {self.name(key)}", get)

    def get_file(self, key: str, dst: Path) -> None:
        def get() -> None:
            try:
                self.store.client.download_file(self.bucket, self._key(key), str(dst), Config=self.store.transfer)
            except Exception as exc:  # noqa: BLE001 - sorted out by _not_found / _retry
                if _not_found(exc):
                    raise _Missing(key) from None
                raise

        self.store._retry(f"download of {self.name(key)}", get)

    def delete(self, key: str) -> None:
        self.store._retry(
            f"delete of {self.name(key)}",
            lambda: self.store.client.delete_object(Bucket=self.bucket, Key=self._key(key)),
        )

    def sizes(self) -> dict[str, int]:
        def listing() -> dict[str, int]:
            out = {}
            start = f"{self.prefix}/" if self.prefix else ""
            for page in self.store.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(start):]] = obj["Size"]
            return out

        return self.store._retry(f"listing of {self.uri}", listing)

    def check(self, key: str, entry: dict[str, Any]) -> None:
        def stream() -> tuple[int, str]:
            try:
                body = self.store.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            except Exception as exc:  # noqa: BLE001 - anything but "not found" goes on to _retry
                if _not_found(exc):
                    raise _Missing(key) from None
                raise
            h, size = hashlib.sha256(), 0
            for block in body.iter_chunks(_HASH_BLOCK):
                h.update(block)
                size += len(block)
            return size, h.hexdigest()

        size, digest = self.store._retry(f"download of {self.name(key)}", stream)
        if (size, digest) != (entry["size"], entry["sha256"]):
            raise StoreError(
                f"{self.name(key)} does not match its manifest (size {size}, sha256 {digest[:16]}...; expected "
                f"size {entry['size']}, sha256 {entry['sha256'][:16]}...): the stored copy is corrupt or was "
                f"changed after upload; refusing to use it"
            )


def _not_found(exc: BaseException) -> bool:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


# ----------------------------------------------------------------------------- the store
class ArtifactStore:
    """A configured store. URIs passed to its methods may be local or s3:// whatever its root is."""

    def __init__(self, cfg: StoreConfig | None = None):
        self.cfg = cfg or StoreConfig()
        self.root = self.cfg.uri if self.cfg.uri and is_s3(self.cfg.uri) else _local_path(
            self.cfg.uri or str(paths.store())).as_uri()
        self._client = None
        self._transfer = None

    # -- S3 plumbing, created on first use so a local store never imports boto3
    @property
    def endpoint(self) -> str:
        if self.cfg.endpoint_url:
            return redact_url(self.cfg.endpoint_url)
        return f"AWS S3 ({self.cfg.region})" if self.cfg.region else "AWS S3"

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            options: dict[str, Any] = {
                "retries": {"mode": "standard", "max_attempts": 3},
                "connect_timeout": self.cfg.timeout_s,
                "read_timeout": self.cfg.timeout_s,
            }
            if self.cfg.endpoint_url:
                # S3-compatible servers: path-style buckets, and checksums only where S3 requires them
                # (several servers refuse the CRC headers newer botocore adds); sha256 manifests check content.
                options |= {"s3": {"addressing_style": "path"}, "request_checksum_calculation": "when_required",
                            "response_checksum_validation": "when_required"}
            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.cfg.endpoint_url, region_name=self.cfg.region, config=Config(**options)
            )
        return self._client

    @property
    def transfer(self):
        if self._transfer is None:
            from boto3.s3.transfer import TransferConfig

            mb = 1024 * 1024
            self._transfer = TransferConfig(
                multipart_threshold=self.cfg.multipart_threshold_mb * mb,
                multipart_chunksize=self.cfg.multipart_chunk_mb * mb,
                max_concurrency=self.cfg.max_concurrency,
                preferred_transfer_client="classic",
            )
        return self._transfer

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried with exponential backoff on connection errors; other S3 errors fail at once."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

        attempts = self.cfg.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except (_Missing, StoreError):
                raise
            except (NoCredentialsError, PartialCredentialsError) as exc:
                raise StoreError(
                    f"{what}: no usable AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    f"or AWS_PROFILE, or configure ~/.aws/credentials"
                ) from None
            except Exception as exc:  # noqa: BLE001 - classified below
                client_error = exc if isinstance(exc, ClientError) else exc.__context__
                if isinstance(client_error, ClientError) and not _transient(client_error):
                    raise StoreError(f"{what} was refused by {self.endpoint}: {self._scrub(client_error)}. "
                                     f"{_client_error_hint(client_error)}") from None
                if not isinstance(exc, (BotoCoreError, ClientError, ConnectionError)) and not _transfer_error(exc):
                    raise  # not a transfer problem (a local disk error, a bug): no point in retrying
                if attempt == attempts:
                    raise StoreError(
                        f"{what} failed {attempts} times against {self.endpoint}: {self._scrub(exc)}. "
                        f"Check that the endpoint is up and reachable from this machine (store.endpoint_url, "
                        f"store.region), that the bucket exists, and that the credentials are valid; raise "
                        f"store.max_attempts for a flaky link"
                    ) from None
                delay = min(self.cfg.retry_base_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
                log.warning("%s failed (try %d of %d, %s): %s; retrying in %.3g s",
                            what, attempt, attempts, self.endpoint, self._scrub(exc), delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _scrub(self, exc: BaseException) -> str:
        """An error's text without the user:password part of the endpoint, should it have one."""
        text, endpoint = str(exc), self.cfg.endpoint_url or ""
        if endpoint and redact_url(endpoint) != endpoint:
            text = text.replace(endpoint.rstrip("/"), redact_url(endpoint).rstrip("/"))
        return text

    def _folder(self, uri: str) -> _LocalFolder | _S3Folder:
        return _S3Folder(self, uri) if is_s3(uri) else _LocalFolder(uri)

    # -- the interface
    def uri(self, *parts: str) -> str:
        """A URI under the store's root."""
        return join(self.root, *parts)

    def read_manifest(self, uri: str) -> dict[str, Any] | None:
        """The committed manifest of the folder at ``uri``, or None if there is none."""
        folder = self._folder(uri)
        blob = folder.get_bytes(MANIFEST)
        return None if blob is None else _parse_manifest(blob, folder.name(MANIFEST))

    def upload_dir(self, local_dir: str | Path, uri: str, manifest: dict[str, Any] | None = None) -> Upload:
        """Copy every file of ``local_dir`` to ``uri``, then commit the manifest.

        A folder already committed there with the same content is left alone
        (``skipped``). Before anything else is written the old manifest is removed,
        so a failed upload never leaves a manifest that vouches for mixed files.
        ``manifest``: one already built for ``local_dir`` (saves hashing it again).
        """
        local_dir = Path(local_dir)
        manifest = manifest or build_manifest(local_dir)
        digest = manifest_digest(manifest)
        folder = self._folder(uri)
        start = time.monotonic()
        try:
            existing = self.read_manifest(uri)
        except ManifestError:
            existing = None  # an unreadable manifest is replaced like a stale one
        if existing is not None and manifest_digest(existing) == digest:
            stored = folder.sizes()
            if all(stored.get(rel) == e["size"] for rel, e in manifest["files"].items()):
                log.info("%s already holds this content (manifest %s...)", folder.uri, digest[:12])
                return Upload(folder.uri, existing, digest, skipped=True)
        folder.delete(MANIFEST)
        for rel in manifest["files"]:
            folder.put_file(local_dir / rel, rel)
        folder.put_bytes(json.dumps(manifest, indent=1, sort_keys=True).encode(), MANIFEST)
        log.info("uploaded %d files (%.1f MB) from %s to %s in %.1f s", len(manifest["files"]),
                 manifest["total_bytes"] / 1e6, local_dir, folder.uri, time.monotonic() - start)
        return Upload(folder.uri, manifest, digest, skipped=False)

    def download_dir(self, uri: str, dest: str | Path) -> dict[str, Any]:
        """Copy the folder at ``uri`` to ``dest`` (replaced), every file checked against the manifest.

        Files land in a temporary sibling of ``dest`` first; on any error it is
        removed and ``dest`` is left as it was.
        """
        folder = self._folder(uri)
        manifest = self.read_manifest(uri)
        if manifest is None:
            raise StoreError(
                f"{folder.name(MANIFEST)} does not exist: the upload to {folder.uri} never finished (the manifest "
                f"is written last) or the URI is wrong; refusing to download"
            )
        dest = Path(dest)
        with replaced_dir(dest, unique=True) as tmp:
            for rel, entry in manifest["files"].items():
                target = tmp / _safe_relpath(rel, folder.name(MANIFEST))
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    folder.get_file(rel, target)
                except _Missing:
                    raise StoreError(
                        f"{folder.name(rel)} is listed in the manifest but missing from the store; refusing to "
                        f"download {folder.uri}"
                    ) from None
                _check_file(target, entry, folder.name(rel))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        log.info("downloaded %s to %s (%d files checked)", folder.uri, dest, len(manifest["files"]))
        return manifest

    def verify(self, uri: str) -> dict[str, Any]:
        """Re-read every file of the folder at ``uri`` and check it against its manifest; returns the manifest."""
        folder = self._folder(uri)
        manifest = self.read_manifest(uri)
        if manifest is None:
            raise StoreError(f"{folder.name(MANIFEST)} does not exist: {folder.uri} is not a committed upload")
        for rel, entry in manifest["files"].items():
            try:
                folder.check(rel, entry)
            except _Missing:
                raise StoreError(f"{folder.name(rel)} is listed in the manifest but missing from the store") from None
        return manifest

    def write_text(self, uri: str, text: str) -> None:
        """Write one small object (a pointer) at ``uri``, replacing it whole."""
        parent, _, name = uri.rstrip("/").rpartition("/")
        self._folder(parent).put_bytes(text.encode("utf-8"), name)

    def read_text(self, uri: str) -> str | None:
        """The small object at ``uri``, or None when there is none."""
        parent, _, name = uri.rstrip("/").rpartition("/")
        blob = self._folder(parent).get_bytes(name)
        return None if blob is None else blob.decode("utf-8")

    def delete_dir(self, uri: str) -> None:
        """Remove the folder at ``uri``: its manifest first, so a half-deleted folder is never trusted."""
        folder = self._folder(uri)
        folder.delete(MANIFEST)
        for key in folder.sizes():
            folder.delete(key)
        if isinstance(folder, _LocalFolder):
            shutil.rmtree(folder.root, ignore_errors=True)

    def upload_checkpoint(self, local_dir: str | Path, *, model_name: str, phase: str) -> Upload:
        """Upload a model folder to ``checkpoints/MODEL/PHASE-DIGEST``: the path names the content."""
        manifest = build_manifest(local_dir)
        digest = manifest_digest(manifest)
        return self.upload_dir(local_dir, self.uri("checkpoints", model_name, f"{phase}-{digest[:16]}"), manifest)


def _transient(exc) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    code = exc.response.get("Error", {}).get("Code", "")
    return status >= 500 or code in ("SlowDown", "RequestTimeout", "RequestTimeoutException", "InternalError")


def _transfer_error(exc: BaseException) -> bool:
    """boto3/s3transfer wrappers around a failed transfer (they carry no botocore type)."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError

    return isinstance(exc, (RetriesExceededError, S3UploadFailedError))


def _client_error_hint(exc) -> str:
    code = exc.response.get("Error", {}).get("Code", "")
    if code in ("NoSuchBucket",):
        return "Create the bucket or fix store.uri"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "ExpiredToken"):
        return "Check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and their permissions"
    return "Check store.uri, store.endpoint_url and store.region"


def open_store(cfg: StoreConfig | None = None) -> ArtifactStore:
    """The store a config describes (the stages call this, so a test can hand them its own)."""
    return ArtifactStore(cfg)
