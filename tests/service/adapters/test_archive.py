"""``service.adapters.archive``: the zip reader refuses what an upload must not do (no torch)."""

from __future__ import annotations

import struct

import pytest

from service.adapters.archive import ArchiveError, ArchiveLimits, read_archive, write_archive
from tests.service.helpers import zip_bytes

CENTRAL_HEADER = b"PK\x01\x02"


def _patch_central(data: bytes, *, size: int | None = None, flags: int | None = None) -> bytes:
    """Rewrite the first central directory entry's uncompressed size or flag bits."""
    out = bytearray(data)
    at = data.index(CENTRAL_HEADER)
    if flags is not None:
        struct.pack_into("<H", out, at + 8, flags)
    if size is not None:
        struct.pack_into("<I", out, at + 24, size)
    return bytes(out)


def test_round_trip_and_folder_prefix_dropped() -> None:
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\x00" * 10}
    assert read_archive(write_archive(files)) == files
    nested = zip_bytes({f"a/b/{k}": v for k, v in files.items()} | {"a/b/README.md": b"x"})
    assert read_archive(nested) == files  # README skipped, folder dropped


def test_write_is_deterministic() -> None:
    files = {"b.json": b"{}", "a.safetensors": b"123"}
    assert write_archive(files) == write_archive(dict(reversed(files.items())))


@pytest.mark.parametrize("size", [100, 20_000], ids=["declared-smaller", "declared-larger"])
def test_a_header_that_lies_about_its_size(size: int) -> None:
    data = _patch_central(zip_bytes({"adapter_config.json": b"x" * 10_000}), size=size)
    with pytest.raises(ArchiveError) as info:
        read_archive(data)
    assert info.value.code == "invalid_archive"


def test_encrypted_members_are_refused() -> None:
    data = _patch_central(zip_bytes({"adapter_config.json": b"{}"}), flags=0x1)
    with pytest.raises(ArchiveError) as info:
        read_archive(data)
    assert info.value.code == "unsafe_member"


def test_small_files_may_compress_well() -> None:
    # JSON compresses far beyond the ratio limit, but below the floor that is no bomb.
    files = {"adapter_config.json": b" " * 100_000}
    assert read_archive(zip_bytes(files)) == files


def test_limits_apply_to_read_members_only() -> None:
    limits = ArchiveLimits(max_member_bytes=1000, max_total_bytes=1500)
    ok = zip_bytes({"a.json": b"1" * 900, "big.txt": b"2" * 10_000})  # .txt is never unpacked
    assert read_archive(ok, limits) == {"a.json": b"1" * 900}
    with pytest.raises(ArchiveError, match="unpacks to 1001 bytes"):
        read_archive(zip_bytes({"a.json": b"1" * 1001}), limits)
    with pytest.raises(ArchiveError, match="1800 bytes"):
        read_archive(zip_bytes({"a.json": b"1" * 900, "b.json": b"1" * 900}), limits)
