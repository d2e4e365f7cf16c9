"""Adapter archives: writing export zips and reading uploaded ones safely. Pure: no torch.

An uploaded zip is untrusted. :func:`read_archive` refuses, before decompressing anything:
path traversal (``../``, absolute paths, drive letters), symlinks, encrypted members,
duplicate names, too many members, members spread over several folders, pickle files
(``.bin``/``.pt``/...: loading them can run code), declared sizes over the limits and
suspicious compression ratios (zip bombs). Members are then read with a hard cap, so a
header that lies about its size cannot make it decompress more. Only ``.json`` and
``.safetensors`` members are read; anything else (``README.md`` from ``save_pretrained``)
is skipped.
"""

from __future__ import annotations

import io
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass

from service.errors import ServiceError

# PEFT's folder layout (``core.io.peft``) exists for these methods only.
PEFT_METHODS = ("lora", "prompt_tuning")

# loraplex's own format, for every method: the stored config JSON and safetensors as they are.
LORAPLEX_CONFIG_FILE = "loraplex_adapter.json"
LORAPLEX_WEIGHTS_FILE = "loraplex_adapter.safetensors"

READ_SUFFIXES = (".json", ".safetensors")
# torch.save / pickle formats (``core.io.peft.PICKLE_SUFFIXES`` plus joblib/numpy pickles).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
# Finder and Windows add these to zips; they carry nothing and are skipped.
_JUNK_DIRS = ("__MACOSX",)
_JUNK_FILES = (".DS_Store", "Thumbs.db")
_DRIVE = re.compile(r"^[A-Za-z]:")
_ENCRYPTED_FLAG = 0x1
# Fixed timestamp: the same adapter always exports to the same bytes.
_EPOCH = (1980, 1, 1, 0, 0, 0)


class ArchiveError(ServiceError):
    """An upload that is not a safe, readable adapter archive; the fault is its ``file``."""

    default_code = "invalid_archive"
    default_param = "file"


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 32
    # Uncompressed bytes of the members that are read, each and all together.
    max_member_bytes: int = 256 * 1024 * 1024
    max_total_bytes: int = 256 * 1024 * 1024
    # Safetensors of trained weights barely compress (~1.1x); JSON does a few times. A
    # ratio this high over more than ``ratio_floor_bytes`` is a bomb, not an adapter.
    max_ratio: float = 100.0
    ratio_floor_bytes: int = 1024 * 1024


def write_archive(files: dict[str, bytes]) -> bytes:
    """A zip of ``files`` at its root (unzip into a folder → a PEFT adapter folder)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            zf.writestr(info, files[name])
    return buf.getvalue()


def _safe_parts(name: str) -> tuple[str, ...]:
    """The member's path parts, or ArchiveError if it could land outside the folder."""
    if "\x00" in name:
        raise ArchiveError(f"member name {name!r} contains a NUL byte", code="unsafe_path")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        raise ArchiveError(f"member {name!r} has an absolute path", code="unsafe_path")
    parts = tuple(p for p in unified.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"member {name!r} points outside the archive ('..')", code="unsafe_path")
    return parts


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    # Unix mode bits live in the high 16 bits of external_attr (create_system 3 = Unix).
    return stat.S_ISLNK(info.external_attr >> 16)


def _members(zf: zipfile.ZipFile, limits: ArchiveLimits) -> list[tuple[zipfile.ZipInfo, str]]:
    """Checked ``(info, file name)`` of every regular member worth looking at."""
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise ArchiveError(
            f"archive has {len(infos)} members; at most {limits.max_members} are allowed",
            code="too_many_members",
        )
    members: list[tuple[zipfile.ZipInfo, str]] = []
    seen: set[str] = set()
    folders: set[tuple[str, ...]] = set()
    for info in infos:
        parts = _safe_parts(info.filename)
        if _is_symlink(info):
            raise ArchiveError(f"member {info.filename!r} is a symbolic link", code="unsafe_member")
        if info.flag_bits & _ENCRYPTED_FLAG:
            raise ArchiveError(f"member {info.filename!r} is encrypted", code="unsafe_member")
        if info.is_dir() or not parts:
            continue
        if parts[0] in _JUNK_DIRS or parts[-1] in _JUNK_FILES:
            continue
        key = "/".join(parts)
        if key in seen:
            raise ArchiveError(f"member {key!r} appears twice", code="duplicate_member")
        seen.add(key)
        folders.add(parts[:-1])
        members.append((info, parts[-1]))
    if len(folders) > 1:
        shown = ", ".join(sorted("/".join(f) or "(root)" for f in folders)[:4])
        raise ArchiveError(
            f"adapter files must sit together in one folder; found several: {shown}",
            code="multiple_folders",
        )
    pickles = [name for _, name in members if name.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ArchiveError(
            f"{pickles[0]!r} is a pickle file, which is refused (loading it can run code); "
            "save the adapter with safetensors (PEFT's default, safe_serialization=True)",
            code="pickle_refused",
        )
    return [(i, n) for i, n in members if n.lower().endswith(READ_SUFFIXES)]


def _check_sizes(members: list[tuple[zipfile.ZipInfo, str]], limits: ArchiveLimits) -> None:
    for info, name in members:
        if info.file_size > limits.max_member_bytes:
            raise ArchiveError(
                f"{name!r} unpacks to {info.file_size} bytes; at most "
                f"{limits.max_member_bytes} are allowed",
                code="archive_too_large",
            )
    total = sum(info.file_size for info, _ in members)
    if total > limits.max_total_bytes:
        raise ArchiveError(
            f"archive unpacks to {total} bytes; at most {limits.max_total_bytes} are allowed",
            code="archive_too_large",
        )
    packed = sum(info.compress_size for info, _ in members)
    if total > limits.ratio_floor_bytes and total > limits.max_ratio * max(packed, 1):
        raise ArchiveError(
            f"archive unpacks {total / max(packed, 1):.0f}x its packed size; refusing a "
            "likely zip bomb",
            code="suspicious_compression",
        )


def _read_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> bytes:
    # One byte past the declared size tells a lying header from an honest one without ever
    # holding more than that. zipfile also checks the CRC when the member ends.
    with zf.open(info) as member:
        data = member.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise ArchiveError(
            f"{name!r} does not unpack to the size its header declares", code="invalid_archive"
        )
    return data


def read_archive(data: bytes, limits: ArchiveLimits = ArchiveLimits()) -> dict[str, bytes]:
    """``{file name: bytes}`` of the ``.json`` and ``.safetensors`` files of an uploaded zip.

    Names are the bare file names: the single folder they may sit in is dropped.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise ArchiveError(f"the file is not a readable zip archive ({exc})") from None
    with zf:
        members = _members(zf, limits)
        _check_sizes(members, limits)
        files: dict[str, bytes] = {}
        for info, name in members:
            try:
                files[name] = _read_capped(zf, info, name)
            except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
                raise ArchiveError(f"{name!r} is corrupt ({exc})") from None
            except NotImplementedError as exc:  # a compression method zipfile lacks
                raise ArchiveError(f"{name!r}: {exc}", code="unsupported_compression") from None
    return files


def archive_format(files: dict[str, bytes]) -> str:
    """Which format an archive holds: ``peft`` or ``loraplex`` (ArchiveError if neither)."""
    if LORAPLEX_CONFIG_FILE in files:
        return "loraplex"
    if "adapter_config.json" in files:
        return "peft"
    shown = ", ".join(sorted(files)[:6]) or "no .json or .safetensors files"
    raise ArchiveError(
        "archive holds neither a PEFT adapter (adapter_config.json + "
        f"adapter_model.safetensors) nor a loraplex export ({LORAPLEX_CONFIG_FILE}); "
        f"found: {shown}",
        code="unknown_archive_format",
    )
