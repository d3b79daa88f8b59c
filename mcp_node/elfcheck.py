"""Is a program statically linked? Read from its ELF program headers (stdlib only).

A dynamically linked program names its loader in a ``PT_INTERP`` header. A guest
image holds the program alone, no loader and no libraries, so such a program cannot
start there (Nanos prints ``couldn't find program interpreter`` at every boot); the
deploy refuses it instead, naming the interpreter. A leaf: imports only ``errors``.
"""

from __future__ import annotations

import struct

from .errors import ValidationError

PT_INTERP = 3
_MAGIC = b"\x7fELF"
# ELF class (EI_CLASS) -> header size, program header entry size, and the offsets of
# e_phoff, e_phentsize, e_phnum in the header and p_offset, p_filesz in an entry
_LAYOUT = {
    1: (52, 32, (28, "I"), 42, (4, "I"), (16, "I")),   # ELFCLASS32
    2: (64, 56, (32, "Q"), 54, (8, "Q"), (32, "Q")),   # ELFCLASS64
}


def _shown(path: bytes) -> str:
    text = path.decode("utf-8", errors="replace")
    return text if text and text.isprintable() else repr(text)


def interpreter(data: bytes, what: str, field: str | None = None) -> str | None:
    """The interpreter ``data`` (an ELF file) names, None when it names none (static).
    ValidationError naming ``what`` (and ``field``) when it is no ELF or a cut one."""
    if len(data) < 16 or data[:4] != _MAGIC:
        raise ValidationError(f"{what} is not an ELF executable", field)
    layout = _LAYOUT.get(data[4])
    order = {1: "<", 2: ">"}.get(data[5])
    if layout is None or order is None:
        raise ValidationError(f"{what} is not a valid ELF (class {data[4]}, data "
                              f"encoding {data[5]})", field)
    ehsize, entsize, (phoff_at, word), phent_at, (off_at, _), (size_at, _) = layout
    if len(data) < ehsize:
        raise ValidationError(f"{what} is a truncated ELF (its header is cut short)", field)
    phoff = struct.unpack_from(order + word, data, phoff_at)[0]
    phentsize, phnum = struct.unpack_from(order + "HH", data, phent_at)
    if phnum and phentsize < entsize:
        raise ValidationError(f"{what} is not a valid ELF (program header entries of "
                              f"{phentsize} bytes)", field)
    if phoff + phnum * phentsize > len(data):
        raise ValidationError(f"{what} is a truncated ELF (its program headers are cut "
                              "short)", field)
    for i in range(phnum):
        at = phoff + i * phentsize
        if struct.unpack_from(order + "I", data, at)[0] != PT_INTERP:
            continue
        start = struct.unpack_from(order + word, data, at + off_at)[0]
        size = struct.unpack_from(order + word, data, at + size_at)[0]
        if start + size > len(data):
            raise ValidationError(f"{what} is a truncated ELF (its interpreter path is "
                                  "cut short)", field)
        return _shown(data[start:start + size].split(b"\0", 1)[0])
    return None


def check_static(data: bytes, what: str, field: str | None, needs: str) -> None:
    """Refuse a dynamically linked ``data``: ``needs`` says what wants a static ELF
    (e.g. "a Nanos unikernel"); the message says how to get one."""
    interp = interpreter(data, what, field)
    if interp is not None:
        raise ValidationError(
            f"{what} is dynamically linked (interpreter {interp}); {needs} needs a static "
            "ELF: link it statically (C: -static; Go: CGO_ENABLED=0; Rust: a musl target)",
            field)
