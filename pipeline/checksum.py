"""`sum64`: the fast checksum of a shard that is checked on every transfer (stream reads, cache fetches).

Why a second checksum beside sha256: the stream path reads every shard again each epoch, and
sha256 (1.6 GB/s on one core here, with SHA extensions) was a third of that path's CPU on 2 cores,
the difference between ~56% and ~80% of the link's rate. `sum64` is one matrix-vector product
in numpy, ~13 GB/s. It is not cryptographic: it catches broken transfers and a set rebuilt under
the same URL, not a forger. sha256 stays the set's identity: `shard verify` and every local read
(the loader's data pass) check it; a manifest without `sum64` (older builds) is checked by sha256
everywhere.

Definition (stable across machines and numpy versions): the bytes, zero-padded to whole blocks of
`BLOCK_WORDS` little-endian 64-bit words; each block reduced to sum(key[j] * word[j]) mod 2**64 with
fixed odd keys (SHAKE-256 of `KEY_SEED`); the first 16 hex digits of the sha256 of the byte length
(8 bytes, little-endian) followed by the block sums. Any change within one 8-byte word is always
caught (an odd key is invertible mod 2**64); moved, dropped or repeated blocks change the sequence
of block sums; other changes slip through only if their keyed sums cancel exactly mod 2**64.
"""
import hashlib
import mmap

import numpy as np

BLOCK_WORDS = 1 << 16  # 512 KiB blocks: the keys stay in cache, the block sums are few (~330 a shard)
KEY_SEED = b"tinyin sum64 v1"
_KEYS = np.frombuffer(hashlib.shake_256(KEY_SEED).digest(8 * BLOCK_WORDS), "<u8") | np.uint64(1)


def sum64(data):
    """The `sum64` hex digest (16 digits) of a bytes-like object (bytes, memoryview, mmap, array)."""
    raw = np.frombuffer(data, np.uint8)
    whole = len(raw) // (8 * BLOCK_WORDS) * (8 * BLOCK_WORDS)
    blocks = raw[:whole].view("<u8").reshape(-1, BLOCK_WORDS)
    sums = np.einsum("ij,j->i", blocks, _KEYS)  # integer products wrap mod 2**64
    if whole < len(raw):  # the ragged tail, zero-padded to a whole block
        tail = np.zeros(8 * BLOCK_WORDS, np.uint8)
        tail[:len(raw) - whole] = raw[whole:]
        sums = np.append(sums, tail.view("<u8") @ _KEYS)
    return hashlib.sha256(len(raw).to_bytes(8, "little") + sums.astype("<u8").tobytes()).hexdigest()[:16]


def file_sum64(path):
    """The `sum64` of a file (mapped, not read into a buffer)."""
    with open(path, "rb") as f:
        if not f.seek(0, 2):
            return sum64(b"")
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            return sum64(mapped)
