"""Receiving a model file over HTTP: size-capped, named safely, checked to be a model before converting."""

from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile

from converters.registry import detect
from errors import ImpetusError

CHUNK = 1 << 20


def too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"The upload is larger than the limit of {limit} bytes (IMPETUS_UPLOAD_MAX_BYTES).")


def safe_name(filename: str | None) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(filename or "model").name).strip(".-")
    return name or "model"


async def receive_upload(request: Request, folder: Path, limit: int) -> Path:
    """Save the multipart field `file` under `folder`; 413 when over `limit`, 400 when not a model."""
    if int(request.headers.get("content-length") or 0) > limit + CHUNK:
        raise too_large(limit)
    form = await request.form(max_files=1, max_fields=8)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise HTTPException(400, "Send the model as a multipart form field named 'file'.")
    if upload.size is not None and upload.size > limit:
        raise too_large(limit)
    saved = await save(upload, folder / uuid.uuid4().hex / safe_name(upload.filename), limit)
    return checked_model(saved)


async def save(upload: UploadFile, path: Path, limit: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("wb") as out:
        while chunk := await upload.read(CHUNK):
            written += len(chunk)
            if written > limit:
                shutil.rmtree(path.parent, ignore_errors=True)
                raise too_large(limit)
            out.write(chunk)
    return path


def checked_model(path: Path) -> Path:
    try:
        detect(path)
    except ImpetusError as exc:
        shutil.rmtree(path.parent, ignore_errors=True)
        raise HTTPException(400, f"The upload is not a model Impetus can convert: {exc}") from exc
    return path
