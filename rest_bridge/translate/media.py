"""Media in chat content (images, audio) checked at the door, before anything reaches the engine.

- http(s) URLs: only hosts listed in `--allowed-media-domains` (nothing is fetched for
  strangers); other schemes are refused.
- `data:` URLs and `input_audio`: the base64 text is measured before it is decoded, so an
  oversize upload is refused without allocating its decoded bytes; images are then sized
  from their header (PNG, JPEG, GIF, WebP) and refused above `--max-image-pixels`, never
  decoded to pixels here.
"""
from __future__ import annotations

import base64
import binascii
import struct
from urllib.parse import urlsplit

from rest_bridge.chat_options import ChatOptions
from rest_bridge.errors import invalid_request

AUDIO_FORMATS = frozenset({"wav", "mp3", "flac", "ogg", "m4a", "webm", "pcm16"})


def check_media_url(url: str, kind: str, options: ChatOptions, param: str) -> None:
    """`kind` is "image" or "audio"; raises a 400 naming `param` when the URL is refused."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        media_type, payload = _split_data_url(url, param)
        if not media_type.startswith(f"{kind}/"):
            raise invalid_request(
                f"a data: URL for {kind} input must have a {kind}/* media type, got "
                f"{media_type or 'none'!r}", param=param)
        data = decode_base64_limited(payload, options.max_media_bytes, param)
        if kind == "image":
            check_image_size(data, options.max_image_pixels, param)
        return
    if scheme in ("http", "https"):
        host = (urlsplit(url).hostname or "").lower()
        if not _host_allowed(host, options.allowed_media_domains):
            raise invalid_request(
                f"{kind} URLs from host {host or '(none)'!r} are not allowed: the server "
                "accepts data: URLs, or hosts listed in --allowed-media-domains", param=param)
        return
    raise invalid_request(
        f"{kind} URLs must be data: or http(s) URLs, got scheme {scheme or '(none)'!r}",
        param=param)


def check_input_audio(data: str, audio_format: str, options: ChatOptions, param: str) -> None:
    if audio_format.lower() not in AUDIO_FORMATS:
        names = ", ".join(sorted(AUDIO_FORMATS))
        raise invalid_request(
            f"input_audio format {audio_format!r} is not one of {names}", param=f"{param}.format")
    decode_base64_limited(data, options.max_media_bytes, f"{param}.data")


def decode_base64_limited(payload: str, max_bytes: int, param: str) -> bytes:
    # Four base64 characters carry three bytes: measure before decoding.
    if (len(payload) // 4) * 3 > max_bytes + 3:
        raise invalid_request(
            f"media item is larger than the server's limit of {max_bytes} bytes", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_request("media data is not valid base64", param=param) from None
    if len(data) > max_bytes:
        raise invalid_request(
            f"media item is larger than the server's limit of {max_bytes} bytes", param=param)
    return data


def check_image_size(data: bytes, max_pixels: int, param: str) -> None:
    size = image_dimensions(data)
    if size is None:
        raise invalid_request(
            "image data is not a PNG, JPEG, GIF or WebP image (or its header is damaged)",
            param=param)
    width, height = size
    if width * height > max_pixels:
        raise invalid_request(
            f"image of {width}x{height} pixels exceeds the server's limit of {max_pixels} "
            "pixels", param=param)


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, GIF, JPEG or WebP image; None otherwise."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data.startswith(b"\xff\xd8"):
        return _jpeg_dimensions(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        return _webp_dimensions(data)
    return None


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    position = 2
    while position + 9 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        # SOF0..SOF15 carry the frame size, except DHT (C4), JPG (C8) and DAC (CC).
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return width, height
        position += 2 + length
    return None


def _webp_dimensions(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def _split_data_url(url: str, param: str) -> tuple[str, str]:
    header, sep, payload = url[len("data:"):].partition(",")
    fields = header.split(";")
    if not sep or "base64" not in (f.strip().lower() for f in fields[1:]):
        raise invalid_request("data: URLs must be base64-encoded ('data:TYPE;base64,...')",
                              param=param)
    return fields[0].strip().lower(), payload.strip()


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    for domain in allowed:
        domain = domain.lower()
        if domain.startswith(".") and (host.endswith(domain) or host == domain[1:]):
            return True
        if host == domain:
            return True
    return False
