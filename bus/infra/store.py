"""The object store: one S3 code path (the ``minio`` SDK) for MinIO, SeaweedFS, AWS, Ceph.

The SDK blocks, so every call runs in a thread pool sized for I/O; long transfers get
threads of their own. Big objects move in parts, so memory stays flat whatever the size.
S3 makes an object visible only once it is complete: no half-written result is ever seen.

Calls someone is waiting on (an upload being accepted) go through :attr:`ObjectStore.interactive`:
the same bucket through a client with short timeouts and no retried reads, so an S3 stall
fails them within a bound instead of hanging for as long as the stall.
"""

from __future__ import annotations

import asyncio
import copy
import io
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import IO, Any, BinaryIO, TypeVar, cast
from urllib.parse import urlsplit

import orjson
import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.datatypes import Object as S3Object
from minio.datatypes import PostPolicy
from minio.error import S3Error
from minio.helpers import DictType

from bus.core.envelope import ObjectRef
from bus.core.settings import S3Settings

T = TypeVar("T")

_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound"}
USER_METADATA = "x-amz-meta-"  # the header prefix S3 sends user metadata under
PART_SIZE = 8 * 1024 * 1024
READ_CHUNK = 256 * 1024
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 60.0  # the functions' calls: patient, and retried


class StoreError(Exception):
    pass


class StoreUnavailableError(StoreError):
    """The S3 server cannot be reached or refuses our credentials."""


class ObjectMissingError(StoreError):
    def __init__(self, bucket: str, key: str) -> None:
        super().__init__(f"object s3://{bucket}/{key} does not exist")
        self.key = key


class StoreBusyError(StoreError):
    """Every upload stream is taken; the client should try again shortly."""


class TooLargeError(StoreError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"larger than the limit of {limit} bytes")
        self.limit = limit


class ObjectStore:
    """Async facade over one bucket."""

    def __init__(
        self,
        client: Minio,
        bucket: str,
        executor: ThreadPoolExecutor,
        url: str,
        pools: tuple[urllib3.PoolManager, ...] = (),
        upload_streams: int = 32,
        presigner: Minio | None = None,
        interactive: Minio | None = None,
        public_url: str | None = None,
    ) -> None:
        self._client = client
        # Presigned URLs are signed for the host browsers use, which may differ from ours.
        self._presigner = presigner or client
        self._post_url = f"{(public_url or url).rstrip('/')}/{bucket}"
        self._pools = pools  # the clients' connection pools, cleared on close
        # Streaming uploads run as long as their client sends: they get threads of their
        # own, so slow clients never starve the short calls the functions make.
        self._upload_executor = ThreadPoolExecutor(upload_streams, thread_name_prefix="s3-upload")
        self._transfers = asyncio.Semaphore(upload_streams)
        self.bucket = bucket
        self._executor = executor
        self.url = url
        self._view = False
        self._interactive = self
        if interactive is not None:
            # The same store (executors, transfer slots) through the short-timeout client.
            view = copy.copy(self)
            view._client, view._view = interactive, True
            self._interactive = view._interactive = view

    @property
    def interactive(self) -> ObjectStore:
        """This store for calls someone is waiting on: short timeouts, no retried reads.

        In an S3 stall each call fails within about ``s3.interactive_timeout_s`` (with a
        ``urllib3`` error) instead of hanging; never close it, close the store.
        """
        return self._interactive

    @classmethod
    def connect(cls, s3: S3Settings) -> ObjectStore:
        """A store for ``s3`` (endpoint and credentials must be set)."""
        if not s3.endpoint or not s3.access_key or s3.secret_key is None:
            raise StoreError("S3 endpoint, access_key and secret_key must all be set")

        def client(http: urllib3.PoolManager) -> Minio:
            assert s3.secret_key is not None
            return Minio(
                s3.host_port,
                access_key=s3.access_key,
                secret_key=s3.secret_key.get_secret_value(),
                secure=s3.secure,
                # A fixed region avoids a GetBucketLocation round trip before presigning.
                region=s3.region or "us-east-1",
                http_client=http,
            )

        http = urllib3.PoolManager(
            maxsize=s3.io_threads,
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503)),
        )
        timeout_s = s3.interactive_timeout_s
        quick = urllib3.PoolManager(
            maxsize=s3.io_threads,
            timeout=urllib3.Timeout(connect=min(CONNECT_TIMEOUT_S, timeout_s), read=timeout_s),
            # One more try to connect; a read that timed out is not tried again (that
            # would multiply the bound), nor a 5xx (whose Retry-After could be long).
            retries=urllib3.Retry(total=1, connect=1, read=0, status=0, redirect=0),
        )
        presigner = None
        if s3.public_url and s3.public_url != s3.endpoint:
            public = urlsplit(s3.public_url)
            presigner = Minio(
                public.netloc,
                access_key=s3.access_key,
                secret_key=s3.secret_key.get_secret_value(),
                secure=public.scheme == "https",
                region=s3.region or "us-east-1",
            )
        executor = ThreadPoolExecutor(max_workers=s3.io_threads, thread_name_prefix="s3")
        return cls(
            client(http),
            s3.bucket,
            executor,
            s3.endpoint,
            (http, quick),
            s3.upload_streams,
            presigner,
            interactive=client(quick),
            public_url=s3.public_url,
        )

    async def close(self) -> None:
        """Cancel the calls not started; wait (off the event loop) for those under way."""
        if self._view:
            return
        self._upload_executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        for pool in self._pools:
            # Idle keep-alive connections would otherwise hold up the server's shutdown.
            pool.clear()

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    # --- lifecycle -------------------------------------------------------------------------
    async def ensure_bucket(self, timeout: float = 10.0) -> None:
        """Create the bucket if needed; fail within ``timeout`` naming the URL."""

        def ensure() -> None:
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        try:
            await asyncio.wait_for(self._run(ensure), timeout)
        except TimeoutError:
            raise StoreUnavailableError(
                f"S3 at {self.url} did not answer within {timeout:.0f} s"
            ) from None
        except S3Error as exc:
            raise StoreUnavailableError(
                f"S3 at {self.url} refused: {exc.code}: {exc.message}"
            ) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailableError(
                f"cannot reach S3 at {self.url}: {_root_cause(exc)}"
            ) from None

    # --- writes ----------------------------------------------------------------------------
    async def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
    ) -> ObjectRef:
        result = await self._run(
            self._client.put_object,
            self.bucket,
            key,
            io.BytesIO(data),
            len(data),
            content_type=content_type,
        )
        return ObjectRef(self.bucket, key, len(data), result.etag or "", content_type)

    async def put_json(self, key: str, doc: Any) -> ObjectRef:
        return await self.put_bytes(
            key, orjson.dumps(doc, option=orjson.OPT_INDENT_2), "application/json"
        )

    async def run_transfer(self, fn: Callable[[], T]) -> T:
        """Run a long blocking transfer (a client's upload body, a big put) on its own thread.

        Raise :class:`StoreBusyError` when every transfer thread is taken, so a crowd of
        slow clients is told to come back instead of queueing without bound.
        """
        if self._transfers.locked():
            raise StoreBusyError("every upload stream is busy; try again shortly")
        async with self._transfers:
            return await asyncio.get_running_loop().run_in_executor(self._upload_executor, fn)

    async def put_file(
        self,
        key: str,
        fp: IO[bytes],
        size: int,
        content_type: str,
        metadata: dict[str, str] | None = None,
    ) -> ObjectRef:
        """Upload ``size`` bytes of ``fp`` from its start (multipart past PART_SIZE), with
        ``metadata`` as the object's user metadata (US-ASCII; read back by :meth:`metadata`)."""

        def put() -> Any:
            fp.seek(0)
            return self._client.put_object(
                self.bucket,
                key,
                cast(BinaryIO, fp),
                size,
                content_type=content_type,
                metadata=None if metadata is None else _headers(metadata),
                part_size=PART_SIZE,
            )

        result = await self.run_transfer(put)
        return ObjectRef(self.bucket, key, size, result.etag or "", content_type)

    async def download_to(
        self, key: str, write: Callable[[bytes], object], max_bytes: int
    ) -> tuple[int, str]:
        """Feed an object to ``write`` chunk by chunk (on a transfer thread); return its size
        and ETag. Raise :class:`TooLargeError` past ``max_bytes``."""

        def download() -> tuple[int, str]:
            response = self._open(key)
            size = 0
            try:
                etag = (response.headers.get("ETag") or "").strip('"')
                for chunk in response.stream(READ_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLargeError(max_bytes)
                    write(chunk)
            finally:
                response.close()
                response.release_conn()
            return size, etag

        return await self.run_transfer(download)

    async def copy_if_unchanged(
        self,
        source: str,
        key: str,
        etag: str,
        size: int,
        content_type: str,
        metadata: dict[str, str] | None = None,
    ) -> ObjectRef | None:
        """Server-side copy of ``source`` to ``key`` if ``source`` still has ``etag``;
        None if it changed or went meanwhile (so what was checked is exactly what is
        copied, and nothing is copied otherwise). With ``metadata``, the copy's user
        metadata is exactly that (and its content type ``content_type``), not the
        source's."""
        # REPLACE takes the content type from the request too, so it is sent again.
        replaced = (
            None if metadata is None else _headers({"Content-Type": content_type, **metadata})
        )

        def copy() -> ObjectRef | None:
            try:
                result = self._client.copy_object(
                    self.bucket,
                    key,
                    CopySource(self.bucket, source, match_etag=etag),
                    metadata=replaced,
                    metadata_directive=REPLACE if replaced is not None else None,
                )
            except S3Error as exc:
                if exc.code == "PreconditionFailed" or exc.code in _MISSING_CODES:
                    return None
                raise
            return ObjectRef(self.bucket, key, size, result.etag or "", content_type)

        copied: ObjectRef | None = await self._run(copy)
        return copied

    def presigned_post(
        self, key: str, content_type: str, max_bytes: int, expires: timedelta
    ) -> tuple[str, dict[str, str]]:
        """A form that lets its holder POST one object to ``key`` until it expires (no I/O:
        signing). The S3 server refuses any other key or content type, an empty body and
        one over ``max_bytes``. Returns the URL and the fields to send before the file."""
        policy = PostPolicy(self.bucket, datetime.now(UTC) + expires)
        policy.add_equals_condition("key", key)
        policy.add_equals_condition("Content-Type", content_type)
        policy.add_content_length_range_condition(1, max_bytes)
        signed = self._presigner.presigned_post_policy(policy)
        return self._post_url, {"key": key, "Content-Type": content_type, **signed}

    def presigned_get(self, key: str, expires: timedelta) -> str:
        """A URL that lets its holder GET ``key`` until it expires (no I/O: signing, with a
        fixed region), for the host browsers reach S3 at (``s3.public_url``, else the
        endpoint)."""
        url: str = self._presigner.presigned_get_object(self.bucket, key, expires=expires)
        return url

    async def delete(self, key: str) -> None:
        await self._run(self._client.remove_object, self.bucket, key)

    # --- reads -----------------------------------------------------------------------------
    async def stat(self, key: str) -> ObjectRef | None:
        def stat() -> ObjectRef | None:
            st = self._stat_object(key)
            if st is None:
                return None
            return ObjectRef(
                self.bucket,
                key,
                st.size or 0,
                st.etag or "",
                st.content_type or "application/octet-stream",
            )

        result: ObjectRef | None = await self._run(stat)
        return result

    async def metadata(self, key: str) -> dict[str, str] | None:
        """The object's user metadata (names lower-cased, without ``x-amz-meta-``); None
        if there is no such object."""

        def metadata() -> dict[str, str] | None:
            st = self._stat_object(key)
            if st is None:
                return None
            return {
                name.lower().removeprefix(USER_METADATA): str(value)
                for name, value in (st.metadata or {}).items()
                if name.lower().startswith(USER_METADATA)
            }

        found: dict[str, str] | None = await self._run(metadata)
        return found

    def _stat_object(self, key: str) -> S3Object | None:
        try:
            return self._client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                return None
            raise

    async def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        def get() -> bytes:
            response = self._open(key)
            try:
                if max_bytes is not None:
                    data = response.read(max_bytes + 1)
                    if len(data) > max_bytes:
                        raise TooLargeError(max_bytes)
                    return bytes(data)
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        data: bytes = await self._run(get)
        return data

    async def get_json(self, key: str) -> Any:
        return orjson.loads(await self.get_bytes(key))

    async def iter_chunks(self, key: str, chunk_size: int = READ_CHUNK) -> AsyncIterator[bytes]:
        """Stream an object; raises :class:`ObjectMissingError` before the first chunk."""
        response = await self._run(self._open, key)
        stream: Iterator[bytes] = response.stream(chunk_size)
        try:
            while True:
                chunk = await self._run(next, stream, b"")
                if not chunk:
                    return
                yield chunk
        finally:
            response.close()
            response.release_conn()

    async def list_modified(self, prefix: str) -> dict[str, datetime]:
        """Every key under ``prefix`` with the time it was last written."""

        def listing() -> dict[str, datetime]:
            objects = self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
            return {
                o.object_name: o.last_modified
                for o in objects
                if o.object_name and o.last_modified is not None
            }

        found: dict[str, datetime] = await self._run(listing)
        return found

    async def list_keys(self, prefix: str) -> list[str]:
        def listing() -> list[str]:
            objects = self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
            return [o.object_name for o in objects if o.object_name]

        keys: list[str] = await self._run(listing)
        return keys

    def _open(self, key: str) -> Any:
        try:
            return self._client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING_CODES:
                raise ObjectMissingError(self.bucket, key) from None
            raise


def _headers(metadata: dict[str, str]) -> DictType:
    """``metadata`` as the SDK takes it (it sends names that are not headers as
    ``x-amz-meta-<name>``)."""
    return dict(metadata)


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        nxt = exc.__cause__ or exc.__context__
        assert nxt is not None
        exc = nxt
    return f"{type(exc).__name__}: {exc}"
