"""Reading request bodies into memory, with the size cap enforced while streaming.

Chunked uploads carry no Content-Length, so the cap is counted on the bytes as they arrive.
Multipart bodies are parsed here (python-multipart's streaming parser) rather than by Starlette's
form parser, because that one spools large files to temporary files on disk and nothing uploaded
may be stored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import InvalidRequest, MalformedDicom, PayloadTooLarge, UnsupportedMediaType

DICOM_MEDIA_TYPES = ("application/dicom", "application/octet-stream")


@dataclass
class Part:
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    @property
    def field_name(self) -> str | None:
        _, options = parse_options_header(self.headers.get("content-disposition", ""))
        name = options.get(b"name")
        return name.decode("latin-1") if name is not None else None


def media_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    """('multipart/related', {'boundary': ..., 'type': ...}) from a Content-Type header."""
    main, options = parse_options_header(content_type or "")
    return main.decode("latin-1").lower(), {
        k.decode("latin-1").lower(): v.decode("latin-1") for k, v in options.items()
    }


def check_declared_length(content_length: str | None, max_bytes: int) -> None:
    if content_length and content_length.isdigit() and int(content_length) > max_bytes:
        raise PayloadTooLarge(f"The body is {int(content_length)} bytes; the limit is {max_bytes}.")


async def read_body(stream: AsyncIterator[bytes], max_bytes: int) -> bytes:
    # Chunks joined once at the end: growing one buffer chunk by chunk re-copies megabytes per upload
    # on the event loop (py-spy put it at a sixth of the loop's time with 4 MiB bodies).
    chunks: list[bytes] = []
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > max_bytes:
            raise PayloadTooLarge(f"The body exceeds the limit of {max_bytes} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_multipart(stream: AsyncIterator[bytes], boundary: str, max_bytes: int) -> list[Part]:
    """All parts of a multipart body, in order."""
    parts: list[Part] = []
    header_field, header_value = bytearray(), bytearray()

    def on_header_end() -> None:
        parts[-1].headers[header_field.decode("latin-1").strip().lower()] = header_value.decode("latin-1").strip()
        header_field.clear()
        header_value.clear()

    callbacks = {
        "on_part_begin": lambda: parts.append(Part()),
        "on_part_data": lambda data, start, end: parts[-1].body.extend(data[start:end]),
        "on_header_field": lambda data, start, end: header_field.extend(data[start:end]),
        "on_header_value": lambda data, start, end: header_value.extend(data[start:end]),
        "on_header_end": on_header_end,
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > max_bytes:
                raise PayloadTooLarge(f"The body exceeds the limit of {max_bytes} bytes.")
            parser.write(chunk)
        parser.finalize()
    except PayloadTooLarge:
        raise
    except Exception as exc:  # python-multipart raises its own error types on broken framing
        raise MalformedDicom(f"The multipart body could not be parsed: {exc}") from None
    return parts


async def read_single_dicom(stream: AsyncIterator[bytes], content_type: str | None, max_bytes: int) -> bytes:
    """The one DICOM file of a /v1/predict request: a raw body or the multipart field `file`."""
    kind, options = media_type(content_type)
    if kind in DICOM_MEDIA_TYPES:
        return await read_body(stream, max_bytes)
    if kind == "multipart/form-data":
        if not options.get("boundary"):
            raise UnsupportedMediaType("multipart/form-data without a boundary parameter.")
        parts = await read_multipart(stream, options["boundary"], max_bytes)
        files = [part for part in parts if part.field_name == "file"]
        if len(files) != 1:
            raise InvalidRequest(f"Expected exactly one form field named 'file', got {len(files)}.")
        return bytes(files[0].body)
    raise UnsupportedMediaType(
        f"Content-Type {kind or '(none)'} is not accepted; "
        "send application/dicom or multipart/form-data with a 'file' field."
    )
