"""Files written past the page cache (O_DIRECT): the trainer state, gigabytes per iteration that are read again only
after a kill, and a resident run's exported checkpoint, whose weights the next rollout takes from memory.

Written through the page cache, each state takes that much fresh memory for cached file pages. On a machine
that hands freed memory back to its host (this project's CPU machines: virtual machines with free page reporting)
every such page is faulted in again: 1 GB took 4 to 10 s there, against 0.2 s into pages freed a moment before,
and a resident iteration's training waited that long for the previous state's write. Written with O_DIRECT, the
data goes from two reused, page-aligned buffers straight to the device (1 GB in 0.6 s on the same machine), and
the cached pages of other files are not pushed out. One buffer is written while the caller fills (and hashes) the
other: SmolLM2's 540 MB checkpoint, hashed on the way, took 0.42 to 0.72 s so, against 0.67 to 1.4 s with one.

Where O_DIRECT is refused (tmpfs, macOS, some network file systems) the file is written the ordinary way.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor

ALIGNMENT = 4096  # the largest logical block size O_DIRECT asks offsets, lengths and buffers to be aligned to
BUFFER_BYTES = 8 * 2**20
_buffers = threading.local()  # two per writing thread, reused: their pages stay in memory
# Writes the full buffers while the caller fills (and hashes) the other one: an O_DIRECT write leaves the CPU idle
# until the device is done. One thread for every file: each file waits for its own writes.
_device = ThreadPoolExecutor(max_workers=1, thread_name_prefix="direct-io")


def _write_all(fd: int, buffer: mmap.mmap, length: int) -> None:
    written = 0
    with memoryview(buffer) as whole:
        while written < length:
            written += os.write(fd, whole[written:length])


class DirectFile:
    """A file opened for writing with O_DIRECT (or the ordinary way, where refused or `direct` is off): `write` takes
    bytes-like data of any size (what torch.save and a safetensors serialisation give it) and feeds it to `digest`
    (a hashlib object) on the way, so that a file's hash costs no second read; `close` pads the last block, then cuts
    the file to the bytes written. With O_DIRECT the data goes through two aligned buffers: one is written to the
    device in the background while the other fills."""

    def __init__(self, path: os.PathLike, direct: bool = True, digest=None):
        self.size, self.pending, self.current = 0, 0, 0
        self.digest = digest
        self.writing: Future | None = None  # the background write of the other buffer
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = direct and hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError:
            self.direct = False
            self.fd = os.open(path, flags, 0o644)
        if self.direct and not hasattr(_buffers, "pair"):
            _buffers.pair = (mmap.mmap(-1, BUFFER_BYTES), mmap.mmap(-1, BUFFER_BYTES))  # anonymous: page-aligned

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if not self.direct:
            if self.digest is not None:
                self.digest.update(view)
            os.write(self.fd, view)  # a regular file takes a whole write
        else:
            done = 0
            while done < len(view):
                take = min(len(view) - done, BUFFER_BYTES - self.pending)
                if self.digest is not None:  # hashed while in the CPU's cache, on its way into the buffer
                    self.digest.update(view[done:done + take])
                _buffers.pair[self.current][self.pending:self.pending + take] = view[done:done + take]
                self.pending += take
                done += take
                if self.pending == BUFFER_BYTES:
                    self._flush(BUFFER_BYTES)
        self.size += len(view)
        return len(view)

    def _flush(self, length: int) -> None:
        """Hand the current buffer to the device thread, then fill the other one once its own write is done."""
        self._wait()
        self.writing = _device.submit(_write_all, self.fd, _buffers.pair[self.current], length)
        self.current, self.pending = 1 - self.current, 0

    def _wait(self) -> None:
        if self.writing is not None:
            writing, self.writing = self.writing, None
            writing.result()

    def flush(self) -> None:
        """Nothing to do before close: the data waits in the aligned buffer for a whole block."""

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            if self.direct:
                if self.pending:
                    padded = -(-self.pending // ALIGNMENT) * ALIGNMENT
                    _buffers.pair[self.current][self.pending:padded] = bytes(padded - self.pending)
                    self._flush(padded)
                self._wait()  # no write of this file is left running, even when one failed
                os.ftruncate(self.fd, self.size)
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_safetensors(tensors: dict, path: os.PathLike, metadata: dict[str, str] | None = None, direct: bool = True,
                      digest=None) -> None:
    """`safetensors.torch.save_file`, written from the tensors' own memory (no serialised copy), past the page cache
    unless `direct` is off, and hashed into `digest` on the way: the format's header (its length, then JSON naming
    each tensor's dtype, shape and byte range, and the `metadata` strings), then the tensors' bytes in the header's
    order. `safetensors.torch.load_file` reads it."""
    import torch
    from safetensors.torch import _SIZE, _TYPES  # the library's own dtype names and sizes

    names = {dtype: name for name, dtype in _TYPES.items()}
    header, arrays, offset = ({"__metadata__": metadata} if metadata else {}), [], 0
    for name, tensor in sorted(tensors.items(), key=lambda item: (-_SIZE[item[1].dtype], item[0])):
        data = tensor.detach().cpu().contiguous()  # the library's order: every tensor aligned to its element size
        end = offset + data.numel() * _SIZE[data.dtype]
        header[name] = {"dtype": names[data.dtype], "shape": list(data.shape), "data_offsets": [offset, end]}
        arrays.append(data)
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data that follows to 8 bytes
    with DirectFile(path, direct, digest) as file:
        file.write(struct.pack("<Q", len(encoded)) + encoded)
        for data in arrays:
            if data.numel():
                file.write(data.reshape(-1).view(torch.uint8).numpy())


def write_torch(obj, path: os.PathLike, digest=None) -> None:
    """`torch.save(obj, path)`, written past the page cache (`torch.load` reads it) and hashed into `digest` on the
    way."""
    import torch

    with DirectFile(path, digest=digest) as file:
        torch.save(obj, file)
