#!/usr/bin/env python3
"""Self-checking records on a block device, for the VM torture scenarios.

  records.py write DEV ACKLOG FIRST_SEQ SLOTS [STOPFILE]
      Writes 4 KiB records FIRST_SEQ, FIRST_SEQ+1, ... with O_DIRECT, record
      `seq` at block `seq % SLOTS`, four at a time followed by fsync; after
      each fsync returns, appends those sequence numbers to ACKLOG (one a
      line, flushed): ACKLOG holds exactly the writes the device
      acknowledged. Runs until STOPFILE exists (exit 0) or an I/O error
      (exit 3, the error on stderr).
  records.py check DEV ACKLOG SLOTS
      For every slot, the newest acknowledged record must be there, or a
      newer one written to the same slot (a write in flight at a crash may
      land); every record found must be intact. Prints a summary; exit 1
      on any loss or damage.

A record: b"VMSREC01", seq (u64 LE), sha256 of the rest, random payload.
"""
import hashlib
import mmap
import os
import struct
import sys

BLOCK = 4096
MAGIC = b"VMSREC01"
BATCH = 4


def record(seq):
    payload = os.urandom(BLOCK - 48)
    head = MAGIC + struct.pack("<Q", seq)
    return head + hashlib.sha256(head + payload).digest() + payload


def parse(block):
    """(seq, intact) of a block, or None if it holds no record."""
    if block[:8] != MAGIC:
        return None
    seq = struct.unpack("<Q", block[8:16])[0]
    intact = hashlib.sha256(block[:16] + block[48:]).digest() == block[16:48]
    return seq, intact


def write(dev, acklog, first, slots, stopfile=None):
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK * BATCH)  # page-aligned, as O_DIRECT wants
    log = open(acklog, "a")
    seq = first
    try:
        while not (stopfile and os.path.exists(stopfile)):
            seqs = list(range(seq, seq + BATCH))
            for s in seqs:
                buf[:BLOCK] = record(s)
                os.pwritev(fd, [memoryview(buf)[:BLOCK]], (s % slots) * BLOCK)
            os.fsync(fd)
            log.write("".join(f"{s}\n" for s in seqs))
            log.flush()
            seq += BATCH
    except OSError as e:
        print(f"records: write of seq {seq}..{seq + BATCH - 1} failed: {e}", file=sys.stderr)
        return 3
    return 0


def check(dev, acklog, slots):
    newest = {}
    with open(acklog) as f:
        for line in f:
            line = line.strip()
            if line:
                s = int(line)
                slot = s % slots
                if s > newest.get(slot, -1):
                    newest[slot] = s
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 1 << 20)
    bad = []
    span = (1 << 20) // BLOCK
    for base in range(0, slots, span):
        n = min(span, slots - base)
        got = os.preadv(fd, [memoryview(buf)[: n * BLOCK]], base * BLOCK)
        if got != n * BLOCK:
            bad.append(f"short read at slot {base}")
            break
        for i in range(n):
            slot = base + i
            want = newest.get(slot)
            found = parse(buf[i * BLOCK:(i + 1) * BLOCK])
            if found is not None and not found[1]:
                bad.append(f"slot {slot}: record {found[0]} is damaged")
            elif want is None:
                continue
            elif found is None:
                bad.append(f"slot {slot}: acknowledged record {want} missing (no record)")
            elif found[0] < want or found[0] % slots != slot:
                bad.append(f"slot {slot}: acknowledged record {want} missing (found {found[0]})")
    acked = sum(1 for _ in open(acklog))
    if bad:
        print(f"records: {len(bad)} problems among {len(newest)} slots ({acked} acknowledged writes): " + "; ".join(bad[:8]))
        return 1
    print(f"records: all {len(newest)} slots hold their newest acknowledged record ({acked} acknowledged writes)")
    return 0


def main(argv):
    if len(argv) >= 5 and argv[1] == "write":
        return write(argv[2], argv[3], int(argv[4]), int(argv[5]), argv[6] if len(argv) > 6 else None)
    if len(argv) == 5 and argv[1] == "check":
        return check(argv[2], argv[3], int(argv[4]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
