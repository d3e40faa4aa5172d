"""The object store: one S3 code path (the ``minio`` SDK) for MinIO, SeaweedFS, AWS, Ceph.

The SDK blocks, so every call runs in a thread pool sized for I/O. Streaming puts pull
chunks from an async iterator one at a time, so memory stays flat whatever the size.
S3 makes an object visible only once it is complete: no half-written result is ever seen.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar, cast

import orjson
import urllib3
from minio import Minio
from minio.error import S3Error

from bus.envelope import ObjectRef
from bus.settings import S3Settings

T = TypeVar("T")

_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "NoSuchBucket", "ResourceNotFound"}
PART_SIZE = 8 * 1024 * 1024
READ_CHUNK = 256 * 1024


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


@dataclass(frozen=True, slots=True)
class StoredStream:
    ref: ObjectRef
    sha256: str


class ObjectStore:
    """Async facade over one bucket."""

    def __init__(
        self,
        client: Minio,
        bucket: str,
        executor: ThreadPoolExecutor,
        url: str,
        http: urllib3.PoolManager | None = None,
        upload_streams: int = 32,
    ) -> None:
        self._client = client
        self._http = http
        # Streaming uploads run as long as their client sends: they get threads of their
        # own, so slow clients never starve the short calls the functions make.
        self._upload_executor = ThreadPoolExecutor(upload_streams, thread_name_prefix="s3-upload")
        self._upload_slots = upload_streams
        self.bucket = bucket
        self._executor = executor
        self.url = url

    @classmethod
    def connect(cls, s3: S3Settings) -> ObjectStore:
        """A store for ``s3`` (endpoint and credentials must be set)."""
        if not s3.endpoint or not s3.access_key or s3.secret_key is None:
            raise StoreError("S3 endpoint, access_key and secret_key must all be set")
        http = urllib3.PoolManager(
            maxsize=s3.io_threads,
            timeout=urllib3.Timeout(connect=3.0, read=60.0),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(500, 502, 503)),
        )
        client = Minio(
            s3.host_port,
            access_key=s3.access_key,
            secret_key=s3.secret_key.get_secret_value(),
            secure=s3.secure,
            # A fixed region avoids a GetBucketLocation round trip before presigning.
            region=s3.region or "us-east-1",
            http_client=http,
        )
        executor = ThreadPoolExecutor(max_workers=s3.io_threads, thread_name_prefix="s3")
        return cls(client, s3.bucket, executor, s3.endpoint, http, s3.upload_streams)

    def close(self) -> None:
        self._upload_executor.shutdown(wait=False, cancel_futures=True)
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._http is not None:
            # Idle keep-alive connections would otherwise hold up the server's shutdown.
            self._http.clear()

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

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterator[bytes],
        content_type: str,
        max_bytes: int,
    ) -> StoredStream:
        """Upload from an async iterator; raise :class:`TooLargeError` past ``max_bytes``.

        On any error the multipart upload is aborted, so nothing becomes visible.
        """
        if self._upload_slots <= 0:
            raise StoreBusyError("every upload stream is busy; try again shortly")
        loop = asyncio.get_running_loop()
        reader = _AsyncChunkReader(chunks, loop, max_bytes)
        self._upload_slots -= 1
        try:
            result = await loop.run_in_executor(
                self._upload_executor,
                lambda: self._client.put_object(
                    self.bucket,
                    key,
                    cast(BinaryIO, reader),  # a read()-only file object is all it uses
                    -1,
                    content_type=content_type,
                    part_size=PART_SIZE,
                ),
            )
        finally:
            self._upload_slots += 1
        ref = ObjectRef(self.bucket, key, reader.size, result.etag or "", content_type)
        return StoredStream(ref, reader.sha256.hexdigest())

    async def delete(self, key: str) -> None:
        await self._run(self._client.remove_object, self.bucket, key)

    # --- reads -----------------------------------------------------------------------------
    async def stat(self, key: str) -> ObjectRef | None:
        def stat() -> ObjectRef | None:
            try:
                st = self._client.stat_object(self.bucket, key)
            except S3Error as exc:
                if exc.code in _MISSING_CODES:
                    return None
                raise
            return ObjectRef(
                self.bucket,
                key,
                st.size or 0,
                st.etag or "",
                st.content_type or "application/octet-stream",
            )

        result: ObjectRef | None = await self._run(stat)
        return result

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


class _AsyncChunkReader(io.RawIOBase):
    """A blocking file object (for the SDK's thread) fed by an async iterator on the loop."""

    def __init__(
        self, chunks: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop, max_bytes: int
    ) -> None:
        self._chunks = chunks
        self._loop = loop
        self._max = max_bytes
        self._buffer = bytearray()
        self._done = False
        self.size = 0
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bytes:
        future = asyncio.run_coroutine_threadsafe(_anext_or_empty(self._chunks), self._loop)
        return future.result()

    def read(self, size: int = -1) -> bytes:
        while not self._done and (size < 0 or len(self._buffer) < size):
            chunk = self._next_chunk()
            if not chunk:
                self._done = True
                break
            self.size += len(chunk)
            if self.size > self._max:
                raise TooLargeError(self._max)
            self.sha256.update(chunk)
            self._buffer += chunk
        take = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        out = bytes(self._buffer[:take])
        del self._buffer[:take]
        return out


async def _anext_or_empty(chunks: AsyncIterator[bytes]) -> bytes:
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return b""


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        nxt = exc.__cause__ or exc.__context__
        assert nxt is not None
        exc = nxt
    return f"{type(exc).__name__}: {exc}"
