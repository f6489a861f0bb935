"""Files for fine-tuning (OpenAI's Files API): upload with validation, list, retrieve, download, delete.

A ``.jsonl`` upload must hold one training record per line (``axl_mesh.training_records``: ``source_code``/
``target_code``, ``prompt``/``completion`` or ``text``), checked by the parser the trainer reads it with; anything
else is plain text or code. Every upload is checked now (size, UTF-8, empty, each JSONL line), so a bad file fails
here with the line named, not hours later in the trainer. The upload is copied to its file one line at a time as it
is checked: never the whole file in memory, let alone as bytes, text and a list of lines at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from axl_mesh.errors import APIError, InvalidRequestError, NotFoundError
from axl_mesh.jobs import FILE_KIND, JobsSettings, JobStore, new_id, now, open_store, rq_connection, valid_id
from axl_mesh.jobs_protocol import FileDeleted, FileList, FileObject, FilePurpose
from axl_mesh.model_store import ModelStore
from axl_mesh.training_records import TrainingRecordError, jsonl_line, parse_training_record

router = APIRouter(prefix="/v1/files", tags=["files"])

FILE = FILE_KIND


# --- the job system as the gateway's routes see it (shared by the files, fine-tuning and quantization routes) ---


@dataclass
class JobsContext:
    settings: JobsSettings
    store: JobStore
    models: ModelStore
    rq: Any  # the bytes Redis client RQ wants


def get_jobs(request: Request) -> JobsContext:
    """Built on first use from AXL_* variables (the job settings are their own class; the gateway's stay apart)."""
    ctx = getattr(request.app.state, "axl_jobs", None)
    if ctx is None:
        settings = JobsSettings()
        store = open_store(settings)
        ctx = JobsContext(
            settings,
            store,
            ModelStore(settings.resolved_model_store_dir, redis_client=store.redis),
            rq_connection(settings),
        )
        request.app.state.axl_jobs = ctx
    return ctx


JobsDep = Annotated[JobsContext, Depends(get_jobs)]


def get_file_record(ctx: JobsContext, file_id: str, param: str = "file_id") -> FileObject:
    record = ctx.store.read(FILE, file_id, FileObject) if valid_id("file", file_id) else None
    if record is None:
        raise NotFoundError(f"No such File object: {file_id}", param=param)
    return record


# --- validation ---------------------------------------------------------------------------------------------------


class UploadCheck:
    """Validates an upload one line at a time as it is copied, so only one line is ever in memory.

    Lines are split at ``\\n`` (a UTF-8 continuation byte is never ``\\n``); a JSONL line is then one line, as
    the trainer reads it (``axl_mesh.training_records.jsonl_lines``), and a text file's lines are split further as
    ``str.splitlines`` does (its line count), so the line numbers in errors are the trainer's.
    """

    def __init__(self, filename: str, limit: int) -> None:
        self.jsonl = filename.lower().endswith(".jsonl")
        self.limit = limit
        self.size = 0
        self.lines = 0
        self.records = 0
        self.blank = True

    def feed(self, raw: bytes) -> None:
        """One line as read (with its ``\\n``, if any); raises the 400/413 the client should see."""
        offset = self.size
        self.size += len(raw)
        if self.size > self.limit:
            raise APIError(
                413, f"File is larger than the limit of {self.limit} bytes.", param="file", code="file_too_large"
            )
        if self.blank and raw.strip():
            self.blank = False
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequestError(
                f"File is not valid UTF-8: line {self.lines + 1}, byte offset {offset + exc.start}.",
                param="file",
                code="invalid_encoding",
            ) from None
        lines = [jsonl_line(text)] if self.jsonl else text.removesuffix("\n").splitlines() or [""]
        for line in lines:
            self.lines += 1
            if self.jsonl and line.strip():
                try:  # the trainer's own parser: a line it would refuse is refused now
                    parse_training_record(line)
                except TrainingRecordError as exc:
                    raise InvalidRequestError(
                        f"Invalid JSONL on line {self.lines}: {exc}", param="file", code="invalid_jsonl"
                    ) from None
                self.records += 1

    def result(self) -> tuple[str, int]:
        """(format, lines or records) once every line was fed."""
        if self.blank:
            raise InvalidRequestError("File is empty.", param="file", code="empty_file")
        return ("jsonl", self.records) if self.jsonl else ("text", self.lines)


def copy_checked(source: BinaryIO, target: BinaryIO, filename: str, limit: int) -> tuple[str, int, int]:
    """Copy an upload line by line while validating it: (format, lines or records, bytes)."""
    check = UploadCheck(filename, limit)
    while raw := source.readline(limit + 1 - check.size):
        check.feed(raw)
        target.write(raw)
    fmt, lines = check.result()
    return fmt, lines, check.size


# --- routes ---------------------------------------------------------------------------------------------------------


@router.post("", response_model=FileObject)
def upload_file(ctx: JobsDep, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> FileObject:
    """Upload a training or validation file (purpose ``fine-tune``): JSONL pairs or plain text/code."""
    if purpose != FilePurpose.FINE_TUNE:
        raise InvalidRequestError(f"purpose must be 'fine-tune', got {purpose!r}.", param="purpose")
    limit = ctx.settings.max_file_bytes
    filename = os.path.basename(file.filename or "upload.txt")[:255] or "upload.txt"
    file_id = new_id("file")
    path = ctx.settings.uploaded_file(file_id, "jsonl" if filename.lower().endswith(".jsonl") else "text")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as target:
            fmt, lines, size = copy_checked(file.file, target, filename, limit)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    record = FileObject(
        id=file_id, created_at=int(now()), filename=filename, purpose=purpose, bytes=size, format=fmt, lines=lines
    )
    ctx.store.create(FILE, record)
    return record


@router.get("", response_model=FileList)
def list_files(
    ctx: JobsDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    purpose: str | None = None,
) -> FileList:
    """Uploaded files, newest first."""
    records, has_more = ctx.store.read_page(FILE, after, limit, FileObject)
    return FileList(data=[r for r in records if purpose is None or r.purpose == purpose], has_more=has_more)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: str, ctx: JobsDep) -> FileObject:
    """One file's metadata."""
    return get_file_record(ctx, file_id)


@router.get("/{file_id}/content")
def file_content(file_id: str, ctx: JobsDep) -> FileResponse:
    """The file's bytes as uploaded."""
    record = get_file_record(ctx, file_id)
    return FileResponse(
        ctx.settings.uploaded_file(record.id, record.format),
        media_type="application/octet-stream",
        filename=record.filename,
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: str, ctx: JobsDep) -> FileDeleted:
    """Delete a file (jobs already queued with it fail with a clear error when they start)."""
    record = get_file_record(ctx, file_id)
    ctx.store.delete(FILE, file_id)
    ctx.settings.uploaded_file(record.id, record.format).unlink(missing_ok=True)
    return FileDeleted(id=file_id)
