"""An S3 bucket (or any S3-compatible endpoint) as a Store.

Compare-and-swap rides on S3 conditional writes: `IfNoneMatch="*"` creates only if absent,
`IfMatch=<etag>` replaces only the version that was read. S3 evaluates the condition and the
write as one step, so two writers can never both win.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

from mlops.errors import ConfigError, ConflictError, InfraError
from mlops.registry.store import Blob

# 412: the condition was false. 409: another conditional write to the same key was in flight.
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", "Unknown"))


class S3Store:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        max_attempts: int = 3,
    ) -> None:
        if not bucket:
            raise ConfigError("S3 store needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # botocore's defaults (60 s reads, legacy retries with long backoff) can stall a CI job for
        # minutes on a dead endpoint; a bounded failure becomes InfraError (exit 4) and the
        # workflow decides whether to retry.
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "max_attempts": max_attempts},
        )
        # A session per store: boto3's default session is not safe to create clients from threads.
        session = boto3.session.Session()
        self.client: Any = session.client(
            "s3",
            # None lets boto3 apply AWS_ENDPOINT_URL / its config files itself.
            endpoint_url=endpoint_url or os.environ.get("MLOPS_S3_ENDPOINT_URL") or None,
            region_name=region or session.region_name or "us-east-1",
            config=config,
        )

    @classmethod
    def from_uri(cls, uri: str) -> S3Store:
        if not uri.startswith("s3://"):
            raise ConfigError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        return cls(bucket, prefix)

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ConfigError(f"invalid store key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, op: str, key: str, *, conditional: bool = False) -> Iterator[None]:
        """One-line errors naming bucket, key and code; never request headers or credentials."""
        where = f"s3://{self.bucket}/{self._key(key) if key else self.prefix}".rstrip("/")
        try:
            yield
        except ClientError as e:
            code = _code(e)
            # If-Match on a key that no longer exists is a lost race too (S3 answers 404 there).
            if conditional and (code in _CONFLICT_CODES or code in _MISSING_CODES):
                raise ConflictError(f"{where} changed since it was read (compare-and-swap lost)") from e
            if code in _MISSING_CODES:
                raise InfraError(f"{where} is missing") from e
            raise InfraError(f"S3 {op} {where} failed: {code}") from e
        except (NoCredentialsError, PartialCredentialsError) as e:
            # not worth a retry: nothing will appear by itself (in Actions: vars.AWS_ROLE_ARN + id-token)
            raise ConfigError(
                f"no AWS credentials for {where}: set them up (environment, profile, or OIDC in CI)"
            ) from e
        except BotoCoreError as e:
            raise InfraError(
                f"S3 {op} {where} failed: {type(e).__name__} (endpoint {self.client.meta.endpoint_url})"
            ) from e
        except Boto3Error as e:  # upload_file wraps the ClientError it hit
            cause = e.__context__
            code = _code(cause) if isinstance(cause, ClientError) else type(e).__name__
            raise InfraError(f"S3 {op} {where} failed: {code}") from e

    def _get_object(self, key: str) -> Any | None:
        """get_object's response, or None when the key is missing (inside an `_errors` block)."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if _code(e) in _MISSING_CODES:
                return None
            raise

    def get(self, key: str) -> Blob | None:
        with self._errors("get", key):
            resp = self._get_object(key)
            return None if resp is None else Blob(resp["Body"].read(), resp["ETag"].strip('"'))

    def iter_chunks(self, key: str, size: int) -> Iterator[bytes] | None:
        """The object streamed in `size` pieces (None when missing): a reader of captured traffic
        never holds a large object whole (mlops/monitor/traffic.py)."""
        with self._errors("get", key):
            resp = self._get_object(key)
        if resp is None:
            return None
        body = resp["Body"]

        def chunks() -> Iterator[bytes]:
            with self._errors("get", key):
                yield from body.iter_chunks(size)

        return chunks()

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        # A retried conditional put whose first attempt landed but whose reply was lost comes back
        # as a conflict; callers re-read and retry, which is safe for pointer moves.
        extra: dict[str, str] = {}
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        if if_match is not None:
            extra["IfMatch"] = f'"{if_match}"'
        with self._errors("put", key, conditional=bool(extra)):
            resp = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
        return str(resp["ETag"]).strip('"')

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str) -> list[str]:
        # A prefix names a directory, as in LocalStore: "runs" must not match "runs2/x".
        parts = [p for p in (self.prefix, prefix.strip("/")) if p]
        full = "/".join(parts) + "/" if parts else ""
        root = self.prefix + "/" if self.prefix else ""
        out: list[str] = []
        with self._errors("list", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                out.extend(obj["Key"].removeprefix(root) for obj in page.get("Contents", []))
        return sorted(out)

    def put_file(self, key: str, path: Path) -> None:
        with self._errors("upload", key):
            self.client.upload_file(str(path), self.bucket, self._key(key))

    def get_file(self, key: str, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Download beside the destination and rename, so a reader never sees a partial file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with self._errors("download", key):
                self.client.download_file(self.bucket, self._key(key), tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def local_path(self, key: str) -> Path | None:
        return None
