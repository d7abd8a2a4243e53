#!/usr/bin/env python3
"""Jane Austen's novels out of Debian's r-cran-janeaustenr.

The package keeps the six novels as R data in a lazy-load database:
`data/Rdata.rdx`, a gzip'd R serialisation of the index (for each object
its offset and length in `Rdata.rdb`), and `data/Rdata.rdb`, where each
object is a 4-byte big-endian length followed by a zlib stream of its own
R serialisation. Each novel is a character vector, one element per line
of the Project Gutenberg text. This reads the XDR serialisation format
(version 2 or 3) far enough for that: vectors, pairlists of attributes,
symbols and references to them.

    python3 scripts/austen.py DATA_DIR [NOVEL OUT]

DATA_DIR is the package's `data/` folder. Without NOVEL it lists the
novels with their sizes; with it, writes the text (lines joined with
newlines) to OUT.
"""

import gzip
import struct
import sys
import zlib

NILVALUE, SPECIAL_ENVS = 254, {241, 242, 247, 251, 252, 253}
SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC, REF = 1, 2, 9, 10, 13, 14, 16, 19, 255
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10


class Reader:
    """One R serialisation (XDR format), read item by item."""

    def __init__(self, data):
        self.data, self.pos, self.refs = data, 0, []
        if data[:2] != b"X\n":
            raise ValueError(f"not an XDR R serialisation (starts {data[:2]!r})")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # the writer's R version, the oldest reader's
        if version == 3:
            self.take(self.int())  # the native encoding's name
        elif version != 2:
            raise ValueError(f"R serialisation version {version} is not supported")

    def int(self):
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def take(self, n):
        if self.pos + n > len(self.data):
            raise ValueError("truncated R serialisation")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def item(self):
        """The next object: None, str, a list, or (value, attributes) when
        it has attributes (a dict of tag name -> value)."""
        flags = self.int()
        kind = flags & 0xFF
        if kind == NILVALUE or kind in SPECIAL_ENVS:
            return None
        if kind == REF:
            return self.refs[(flags >> 8) - 1]
        if kind == SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == CHAR:
            n = self.int()
            return None if n == -1 else self.take(n).decode("utf-8", "replace")
        if kind == LIST:
            return self.pairlist(flags)
        if kind in (LGL, INT):
            n = self.int()
            value = list(struct.unpack(f">{n}i", self.take(4 * n)))
        elif kind == REAL:
            n = self.int()
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind in (STR, VEC):
            value = [self.item() for _ in range(self.int())]
        else:
            raise ValueError(f"R object type {kind} is not supported")
        if flags & HAS_ATTR:
            return value, self.item()
        return value

    def pairlist(self, flags):
        out = {}
        while True:
            if flags & HAS_ATTR:
                self.item()
            tag = self.item() if flags & HAS_TAG else None
            out[tag] = self.item()
            flags = self.int()
            if flags & 0xFF == NILVALUE:
                return out
            if flags & 0xFF != LIST:
                raise ValueError("a pairlist's tail is not a pairlist")


def index(data_dir):
    """{name: (offset, length)} of the objects in `Rdata.rdb`."""
    with open(f"{data_dir}/Rdata.rdx", "rb") as f:
        top, top_attrs = Reader(gzip.decompress(f.read())).item()
    parts = dict(zip(top_attrs["names"], top))
    spans, attrs = parts["variables"]
    return {name: tuple(span) for name, span in zip(attrs["names"], spans)}


def novel(data_dir, name):
    """The novel's text, its lines joined by newlines."""
    spans = index(data_dir)
    if name not in spans:
        raise SystemExit(f"no novel {name!r}; the package has: {', '.join(sorted(spans))}")
    offset, length = spans[name]
    with open(f"{data_dir}/Rdata.rdb", "rb") as f:
        f.seek(offset)
        blob = f.read(length)
    (size,) = struct.unpack(">I", blob[:4])
    raw = zlib.decompress(blob[4:])
    if len(raw) != size:
        raise ValueError(f"{name}: {len(raw)} bytes decompressed, the database says {size}")
    lines = Reader(raw).item()
    if isinstance(lines, tuple):
        lines = lines[0]
    return "\n".join(line or "" for line in lines) + "\n"


def main():
    if len(sys.argv) == 2:
        for name in sorted(index(sys.argv[1])):
            text = novel(sys.argv[1], name)
            print(f"{name}\t{len(text)} characters\t{len(text.split())} words")
    elif len(sys.argv) == 4:
        text = novel(sys.argv[1], sys.argv[2])
        with open(sys.argv[3], "w", encoding="utf-8") as f:
            f.write(text)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
