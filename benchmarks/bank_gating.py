"""Bank gating throughput: the atomic Lua gate vs plain Redis SET of the same bytes.

Payloads are real bank entries: 288x288 pseudo-labels of the bundled photos, PNG-encoded
in a `BankEntry` with scores and a 3x3 block weight map, 3 candidates per image (one
teacher batch's PL set). Each repetition offers every image a fresh set of 3 candidates
(new label ids, new scores), so after the first one every gate call really ranks 6
entries, keeps 3 and deletes 3 payloads, updating indexes, counters and the event stream.
From the same client, on the same Redis (a private redis-server with AOF, as the pipeline
runs it, unless --redis-url is given):

* gate: `MemoryBank.gate(image, 3 entries)`, one EVALSHA per image;
* SET, pipelined: the same 3 serialized entries as 3 SETs in one round trip per image
  (the fair baseline: the gate also sends its 3 payloads in one round trip);
* SET, one call each: 3 round trips per image (informational).

Both serialise the protobuf messages in the timed part (same work). The result is gate
entries/s over pipelined-SET entries/s. Target: at least 0.5.

    python -m benchmarks.bank_gating [--fast] [--redis-url URL]
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import (
    compare,
    emit_result,
    header,
    make_parser,
    print_table,
    redis_session,
    reps_and_warmup,
    sample_images,
    unique_prefix,
)

TARGET = 0.5
CANDIDATES = 3
AUGS = ("identity", "hflip", "vflip")


def make_pl_images(n_images: int, size: int):
    """Per image, 3 PNG `Image` messages (the photo at three brightness offsets)."""
    from qualiteacher.services.bank.codec import encode_image

    out = []
    for img in sample_images(n_images, size):
        out.append([encode_image(np.clip(img.astype(np.int16) + d, 0, 255).astype(np.uint8))
                    for d in (0, 6, -6)])
    return out


def make_round(pl_images, round_index: int, rng: np.random.Generator) -> list[tuple[str, list]]:
    """One round of candidates: per image, 3 entries with new label ids and scores."""
    from qualiteacher.services.bank.codec import build_entry

    out = []
    for i, images in enumerate(pl_images):
        image_id = f"img{i}"
        entries = []
        for k, pl in enumerate(images):
            scores = rng.uniform(0.2, 0.9, size=3)
            entries.append(build_entry(
                image_id, f"{image_id}.v{round_index}.{AUGS[k]}", ensemble=float(rng.uniform(2, 9)),
                image=pl, teacher_version=round_index, augmentation=AUGS[k],
                raw_scores={"brisque": 150 * (1 - scores[0]), "niqe": 100 * (1 - scores[1]), "piqe": 100 * (1 - scores[2])},
                normalized_scores={"brisque": scores[0], "niqe": scores[1], "piqe": scores[2]},
                weights=rng.uniform(0.1, 2.0, size=(3, 3)), teacher_q_min=float(rng.uniform(0, 1)),
            ))
        out.append((image_id, entries))
    return out


def server_usec(client, fn, command: str) -> float:
    """Microseconds Redis itself spent in `command` while `fn` ran (INFO commandstats delta;
    EVALSHA's time includes the commands its script calls)."""
    def total() -> float:
        return float(client.info("commandstats").get(f"cmdstat_{command}", {}).get("usec", 0))

    before = total()
    fn()
    return total() - before


def main(argv: list[str] | None = None, *, redis_url: str | None = None) -> float:
    parser = make_parser(__doc__.splitlines()[0], redis=True)
    parser.add_argument("--images", type=int, default=None, help="images per repetition (default 32, fast 4)")
    parser.add_argument("--size", type=int, default=288)
    args = parser.parse_args(argv)
    reps, warmup = reps_and_warmup(args, full=(15, 1), fast=(2, 1))
    n_images = args.images or (4 if args.fast else 32)

    from qualiteacher.services.bank.store import MemoryBank
    from qualiteacher.services.redis_server import redact_url, redis_client

    pl_images = make_pl_images(n_images, args.size)
    rng = np.random.default_rng(0)
    # One round of fresh candidates for every gate call (warm-up and timed).
    rounds = iter([make_round(pl_images, r, rng) for r in range(warmup + reps + 1)])
    payload = np.mean([len(e.SerializeToString()) for _, es in make_round(pl_images, 0, rng) for e in es])

    with redis_session(redis_url or args.redis_url) as url:
        client = redis_client(url)
        prefix = unique_prefix("gate")
        bank = MemoryBank(client, prefix, top_k=3)
        header("Bank gating: Lua gate vs plain SET of the same BankEntry bytes", args.fast, [
            (f"redis {redact_url(url)} ({client.info('server')['redis_version']}, AOF "
            f"{'on' if client.config_get('appendonly').get('appendonly') in ('yes', b'yes') else 'off'}); "
            f"{n_images} images x {CANDIDATES} candidates per repetition; {args.size} px PNG PLs, "
            f"mean entry {payload / 1024:.1f} KiB; {warmup} warm-up + {reps} timed repetitions each, median"),
        ])

        def gate() -> None:
            for image_id, entries in next(rounds):
                bank.gate(image_id, entries)

        # The SET ways reuse one round's entries (same sizes); they overwrite their keys.
        set_round = make_round(pl_images, 10_000, rng)

        def set_pipelined() -> None:
            for image_id, entries in set_round:
                pipe = client.pipeline(transaction=False)
                for k, e in enumerate(entries):
                    pipe.set(f"{prefix}:set:{image_id}:{k}", e.SerializeToString())
                pipe.execute()

        def set_each() -> None:
            for image_id, entries in set_round:
                for k, e in enumerate(entries):
                    client.set(f"{prefix}:set1:{image_id}:{k}", e.SerializeToString())

        try:
            timings = compare({"gate (Lua, 1 call/image)": gate,
                               "SET pipelined (1 round trip/image)": set_pipelined,
                               "SET (1 call/entry)": set_each}, reps=reps, warmup=warmup)
            server = {"gate (Lua, 1 call/image)": server_usec(client, gate, "evalsha"),
                      "SET pipelined (1 round trip/image)": server_usec(client, set_pipelined, "set")}
            problems = bank.check_invariants()
            stats = bank.stats()
        finally:
            bank.clear()
            for key in client.scan_iter(match=f"{prefix}:set*", count=1000):
                client.delete(key)
            client.close()

    entries_per_rep = n_images * CANDIDATES
    rows = [[name, t.median * 1e3, t.spread, entries_per_rep / t.median,
             entries_per_rep * payload / t.median / 2**20,
             server[name] / n_images if name in server else ""] for name, t in timings.items()]
    print_table(["way", "median ms", "min-max ms", "entries/s", "MiB/s", "server us/image"], rows)
    print("server us/image: Redis's own time (INFO commandstats, one extra untimed pass); the rest of "
          "the wall time is the client (protobuf serialisation, redis-py), the socket and the AOF write")
    gate_t, set_p, set_1 = timings.values()
    c = stats["counters"]
    print(f"gate counters: {c['gate_calls']} calls, {c['admitted']} admitted, {c['evicted']} evicted, "
          f"{c['rejected']} rejected; bank invariants: {'ok' if not problems else problems[:3]}")
    ratio = set_p.median / gate_t.median
    print(f"gate / SET pipelined: {ratio:.2f}; gate / SET one call each: {set_1.median / gate_t.median:.2f} "
          f"(target >= {TARGET:g} of raw SET throughput)")
    emit_result("gate_vs_set", ratio, "ratio", TARGET)
    return ratio


if __name__ == "__main__":
    main()
