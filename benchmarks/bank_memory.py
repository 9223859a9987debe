"""Bank bytes per entry at 288x288, measured with Redis MEMORY USAGE.

The bank is filled through the real gate (`MemoryBank.gate`, 3 candidates per image: PNG
pseudo-labels of the bundled photos, scores, 3x3 block weight map, as the scorer builds
them), then every key of its prefix is measured with MEMORY USAGE (`MemoryBank.memory_usage`,
so indexes, counters, seen sets and the event stream count too) and divided by the number
of entries held.

Beside it, the reference code's layout of one bank candidate (its `Memory_bank`: float32
tensors for the PL (3xHxW), the transmission map (1xHxW) and the block weight mask
(1xHxW), plus scalar scores), stored as raw float32 bytes in the same Redis and measured
the same way: 1.58 MiB of data per entry (4.75 MiB per image with top-3), which Redis's
allocator rounds up a little more. A worst case for PNG is shown too: entries whose PL
is uniform noise (incompressible), gated into a second prefix.

Target: at most 0.6 MiB per entry.

    python -m benchmarks.bank_memory [--fast] [--redis-url URL]
"""

from __future__ import annotations

import numpy as np

from benchmarks.bank_gating import make_pl_images, make_round
from benchmarks.common import (
    emit_result,
    header,
    make_parser,
    print_table,
    redis_session,
    unique_prefix,
)

TARGET_MIB = 0.6
MIB = 2**20


def reference_candidate_bytes(size: int, rng: np.random.Generator) -> bytes:
    """The reference's per-candidate tensors as raw float32: PL, transmission, mask."""
    pl = rng.random((3, size, size), dtype=np.float32)
    transmission = rng.random((1, size, size), dtype=np.float32)
    mask = rng.random((1, size, size), dtype=np.float32)
    scores = rng.random(3, dtype=np.float32)
    return b"".join(a.tobytes() for a in (pl, transmission, mask, scores))


def main(argv: list[str] | None = None, *, redis_url: str | None = None) -> float:
    parser = make_parser(__doc__.splitlines()[0], redis=True)
    parser.add_argument("--images", type=int, default=None, help="images in the bank (default 40, fast 3)")
    parser.add_argument("--rounds", type=int, default=None, help="gate rounds per image (default 3, fast 2)")
    parser.add_argument("--size", type=int, default=288)
    args = parser.parse_args(argv)
    n_images = args.images or (3 if args.fast else 40)
    n_rounds = args.rounds or (2 if args.fast else 3)

    from qualiteacher.services.bank.codec import encode_image
    from qualiteacher.services.bank.store import MemoryBank
    from qualiteacher.services.redis_server import redact_url, redis_client

    rng = np.random.default_rng(0)
    pl_images = make_pl_images(n_images, args.size)
    with redis_session(redis_url or args.redis_url) as url:
        client = redis_client(url)
        prefix = unique_prefix("mem")
        bank = MemoryBank(client, prefix, top_k=3)
        header("Bank memory per entry (Redis MEMORY USAGE) vs the reference float32 layout", args.fast, [
            (f"redis {redact_url(url)}; {n_images} images of {args.size} px, {n_rounds} gate rounds of 3 "
            f"candidates each (so the bank holds its steady-state top-3 after evictions)"),
        ])
        ref_keys = []
        try:
            for r in range(n_rounds):
                for image_id, entries in make_round(pl_images, r, rng):
                    bank.gate(image_id, entries)
            stats = bank.stats()
            n_entries = stats["entries"]
            total = bank.memory_usage()
            payload_keys = list(client.scan_iter(match=f"{prefix}:e:*", count=1000))
            payload_total = sum(int(client.memory_usage(k, samples=0) or 0) for k in payload_keys)
            payload_bytes = [len(client.get(k)) for k in payload_keys]
            problems = bank.check_invariants()
            # Reference layout, same Redis, same measurement (a few candidates suffice).
            n_ref = min(6, n_entries)
            for i in range(n_ref):
                key = f"{prefix}:ref:{i}"
                client.set(key, reference_candidate_bytes(args.size, rng))
                ref_keys.append(key)
            ref_total = sum(int(client.memory_usage(k, samples=0) or 0) for k in ref_keys)
            # Worst case for PNG: noise PLs.
            noise_bank = MemoryBank(client, prefix + "n", top_k=3)
            noise = [[encode_image(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8))
                      for _ in range(3)] for _ in range(2)]
            for image_id, entries in make_round(noise, 0, rng):
                noise_bank.gate(image_id, entries)
            noise_per_entry = noise_bank.memory_usage() / noise_bank.stats()["entries"]
        finally:
            bank.clear()
            MemoryBank(client, prefix + "n", top_k=3).clear()
            if ref_keys:
                client.delete(*ref_keys)
            client.close()

    per_entry = total / n_entries
    per_ref = ref_total / len(ref_keys)
    rows = [
        ["bank, all keys of the prefix", n_entries, total / MIB, per_entry / MIB, 3 * per_entry / MIB],
        ["  of which entry payloads (PNG BankEntry)", len(payload_keys), payload_total / MIB,
         payload_total / len(payload_keys) / MIB, 3 * payload_total / len(payload_keys) / MIB],
        ["worst case: noise PLs (incompressible PNG)", 6, 6 * noise_per_entry / MIB, noise_per_entry / MIB,
         3 * noise_per_entry / MIB],
        ["reference layout (float32 PL + transmission + mask)", len(ref_keys), ref_total / MIB,
         per_ref / MIB, 3 * per_ref / MIB],
    ]
    print_table(["layout", "entries", "total MiB", "MiB/entry", "MiB/image (top-3)"], rows)
    print(f"{stats['images']} images, {n_entries} entries; serialized entry {np.mean(payload_bytes) / 1024:.1f} KiB "
          f"on average (min {min(payload_bytes) / 1024:.1f}, max {max(payload_bytes) / 1024:.1f}); "
          f"raw uint8 PL would be {3 * args.size**2 / 1024:.1f} KiB; invariants {'ok' if not problems else problems[:3]}")
    print(f"bank / reference per entry: {per_entry / per_ref:.3f} ({per_ref / per_entry:.1f}x smaller); "
          f"target <= {TARGET_MIB} MiB/entry")
    emit_result("bank_bytes_per_entry", per_entry / MIB, "MiB", TARGET_MIB)
    return per_entry / MIB


if __name__ == "__main__":
    main()
