"""The bank monitor against a real Redis: every endpoint, limits, ids, PNGs, 503, token, page.

The bank is filled the way the scorers fill it (``build_entry`` + ``MemoryBank.gate``,
drops recorded, inputs in the ``InputStore``) from scikit-image's sample photos with
synthetic degradations, so the page shows real pictures. The browser test drives Debian's
Chromium (installed by `make browser`) through chromedriver's W3C WebDriver HTTP API (httpx,
no selenium) and saves screenshots under its tmp dir.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from qualiteacher.services.bank.codec import build_entry
from qualiteacher.services.bank.inputs import InputStore
from qualiteacher.services.bank.store import MemoryBank
from qualiteacher.services.monitor import create_app
from qualiteacher.services.redis_server import EmbeddedRedis, free_port, redis_client
from qualiteacher.services.training_stream import TrainingStream

from tests.redis_fixtures import unique_prefix
from tests.serving import served_app

METRICS = ("brisque", "niqe", "piqe")
BAD_IDS = ["a:b", "*", "a*", "a b", "{x}", "-x", ".x", "x" * 129, "qt:counters", "é"]


# ---------------------------------------------------------------------------- bank filling
def _photos(n: int, size: int = 96) -> list[tuple[str, np.ndarray]]:
    from qualiteacher.data.samples import load_sample, sample_names, square_resize

    names = sample_names()[:n]
    return [(name.replace("_", "-"), square_resize(load_sample(name), size)) for name in names]


def fill_bank(bank: MemoryBank, n_images: int = 8, seed: int = 0) -> dict[str, dict]:
    """Gate PL sets for ``n_images`` photos (two teacher versions, so some are evicted).

    Returns, per image id, its input and the PL arrays by label id.
    """
    from qualiteacher.data.degradations import TASKS, degrade

    rng = np.random.default_rng(seed)
    inputs = InputStore(bank.client, bank.prefix)
    made: dict[str, dict] = {}
    augs = ("hflip", "vflip", "rot90")
    for i, (image_id, clean) in enumerate(_photos(n_images)):
        task = TASKS[i % len(TASKS)]
        degraded = degrade(clean, task, np.random.default_rng(seed + i))
        inputs.put_many({image_id: degraded})
        pls: dict[str, np.ndarray] = {}
        quality = rng.uniform(-0.3, 0.1)  # some images are harder than others
        for version in (1, 2):
            entries = []
            for j, aug in enumerate(augs):
                alpha = 0.3 + 0.25 * version + 0.04 * j
                pl = np.clip((1 - alpha) * degraded + alpha * clean + rng.normal(0, 2, clean.shape), 0, 255)
                pl = pl.astype(np.uint8)
                norm = {m: float(np.clip(alpha + quality - 0.05 + 0.1 * rng.random(), 0, 1)) for m in METRICS}
                raw = {"brisque": 150 * (1 - norm["brisque"]), "niqe": 100 * (1 - norm["niqe"]),
                       "piqe": 100 * (1 - norm["piqe"])}
                ensemble = 10 * (0.4 * norm["brisque"] + 0.3 * norm["niqe"] + 0.3 * norm["piqe"])
                label = f"{image_id}.v{version}.{aug}"
                pls[label] = pl
                entries.append(build_entry(
                    image_id, label, ensemble=ensemble, image=pl, teacher_version=version, augmentation=aug,
                    raw_scores=raw, normalized_scores=norm, weights=rng.uniform(0.5, 1.5, (2, 2)),
                    teacher_q_min=0.2, created_at_ms=int(time.time() * 1000) - 1000 * (60 - 10 * version),
                ))
            bank.gate(image_id, entries)
        made[image_id] = {"input": degraded, "pls": pls}
    bank.record_drop("metric_disagreement", 3)
    bank.record_drop("augmentation_instability", 2)
    bank.record_drop("stale", 1)
    bank.status.set_teacher_version(2)
    bank.status.set_scorer_count(2)
    return made


PROBE_SIDE, PROBE_IMAGES, TRAIN_STEPS = 96, 3, 40


def fill_training(client, prefix: str, steps: int = TRAIN_STEPS) -> TrainingStream:
    """The training log as the student's rank 0 writes it (`TrainingStream`, the core's tags):
    decaying losses, a teacher version pushed every 5 steps, rates; and probes of sample photos
    after the last push: the degraded inputs, and blends towards the clean photo at 3, 5 and 7."""
    from qualiteacher.data.degradations import degrade
    from qualiteacher.imageio import encode_png
    from qualiteacher.probe import side_by_side
    from qualiteacher.training_log import step_scalars

    rng = np.random.default_rng(11)
    stream = TrainingStream(client, prefix)
    for step in range(1, steps + 1):
        decay = np.exp(-step / 12)
        losses = {"total": 0.05 + 0.4 * decay + 0.01 * rng.random(), "supervised": 0.03 + 0.2 * decay,
                  "pixel": 0.02 + 0.15 * decay, "pref_rank": 0.69 - 0.3 * (1 - decay),
                  "consistency": 0.01 * rng.random(), "q_high": 0.5 + 0.2 * (1 - decay), "q_low": 0.45}
        scalars = step_scalars(losses, lr=2e-4, teacher_version=step // 5)
        scalars.update({"train/steps_per_s": 2.0 + 0.3 * rng.random(), "bank/labelled_sets_per_s": 5.0 + rng.random()})
        stream.add(step, scalars)
    clean = np.stack([img for _, img in _photos(PROBE_IMAGES, PROBE_SIDE)])
    degraded = np.stack([degrade(img, "haze", np.random.default_rng(i)) for i, img in enumerate(clean)])
    probes = {"input": degraded}
    for score in (3, 5, 7):
        probes[str(score)] = np.clip(degraded + score / 10 * (clean.astype(float) - degraded), 0, 255).astype(np.uint8)
    stream.put_probes(steps, steps // 5, {name: encode_png(side_by_side(batch)) for name, batch in probes.items()},
                      PROBE_IMAGES, PROBE_SIDE, PROBE_SIDE)
    return stream


@pytest.fixture(scope="module")
def filled(redis_server: EmbeddedRedis) -> Iterator[tuple[MemoryBank, dict]]:
    bank = MemoryBank(redis_server.client(), prefix=unique_prefix(), top_k=3)
    made = fill_bank(bank)
    fill_training(bank.client, bank.prefix)
    assert bank.check_invariants() == []
    yield bank, made
    bank.clear()
    bank.client.close()


@pytest.fixture(scope="module")
def api(filled, redis_url) -> Iterator[TestClient]:
    bank, _ = filled
    with TestClient(create_app(redis_url, prefix=bank.prefix)) as client:
        yield client


def _png(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(resp.content), formats=["PNG"]) as img:
        return np.asarray(img)


# ---------------------------------------------------------------------------- JSON endpoints
def test_healthz(api, filled):
    r = api.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["redis"] == "up" and body["prefix"] == filled[0].prefix
    assert body["latency_ms"] >= 0


def test_stats_match_the_bank(api, filled):
    bank, made = filled
    s = api.get("/bank/stats").json()
    ref = bank.stats()
    assert s["images"] == len(made) == ref["images"]
    assert s["entries"] == 3 * len(made) == ref["entries"]
    assert s["histogram"] == ref["histogram"] and sum(s["histogram"]["counts"]) == s["entries"]
    assert s["drops"] == {"augmentation_instability": 2, "metric_disagreement": 3, "stale": 1} and s["dropped_total"] == 6
    assert s["counters"] == ref["counters"]
    gated = ref["counters"]["gate_calls"]
    assert s["drop_rate"] == pytest.approx(6 / (6 + gated))
    assert s["gating_rate"] == pytest.approx(ref["counters"]["admitted"] / ref["counters"]["candidates"])
    assert s["teacher_version"] == 2 and s["scorer_count"] == 2 and s["top_k"] == 3
    assert s["events"] == gated and s["last_event_ms"] <= s["time_ms"]


def test_images_sorted_and_paged(api, filled):
    bank, made = filled
    first = api.get("/bank/images", params={"limit": 3}).json()
    assert first["total"] == len(made) and first["limit"] == 3 and first["sort"] == "score"
    seen, offset = [], 0
    while True:
        page = api.get("/bank/images", params={"offset": offset, "limit": 3}).json()
        if not page["items"]:
            break
        seen += page["items"]
        offset += 3
    assert [i["image_id"] for i in seen] == [i for i, _, _ in bank.list_images(0, 100)]
    scores = [i["best_score"] for i in seen]
    assert scores == sorted(scores, reverse=True)
    for item in seen:
        entries = bank.entries(item["image_id"])
        assert item["entries"] == len(entries) == 3
        assert item["best_label_id"] == entries[0].label_id
        assert item["best_score"] == pytest.approx(entries[0].ensemble)
        assert item["thumbnail_url"] == f"/bank/images/{item['image_id']}/entries/0.png?size=160"
    by_id = api.get("/bank/images", params={"sort": "id", "limit": 200}).json()["items"]
    assert [i["image_id"] for i in by_id] == sorted(made)
    recent = api.get("/bank/images", params={"sort": "recent", "limit": 200}).json()["items"]
    assert [i["image_id"] for i in recent] == list(reversed(list(made)))
    assert api.get("/bank/images", params={"offset": 1000}).json()["items"] == []


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 201}, {"limit": 10**6}, {"offset": -1},
                                    {"sort": "bogus"}, {"limit": "x"}])
def test_images_limits(api, params):
    r = api.get("/bank/images", params=params)
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_request"


def test_images_max_page(api, filled):
    assert api.get("/bank/images", params={"limit": 200}).status_code == 200


def test_image_detail(api, filled):
    bank, made = filled
    image_id = next(iter(made))
    d = api.get(f"/bank/images/{image_id}").json()
    entries = bank.entries(image_id)
    assert d["image_id"] == image_id and d["input_url"] == f"/bank/images/{image_id}/input.png"
    assert [e["label_id"] for e in d["entries"]] == [e.label_id for e in entries]
    assert [e["rank"] for e in d["entries"]] == [0, 1, 2]
    ens = [e["ensemble"] for e in d["entries"]]
    assert ens == sorted(ens, reverse=True)
    for e, ref in zip(d["entries"], entries):
        assert set(e["raw_scores"]) == set(e["normalized_scores"]) == set(METRICS)
        assert e["normalized_scores"] == pytest.approx(dict(ref.normalized_scores))
        assert e["raw_scores"] == pytest.approx(dict(ref.raw_scores))
        assert e["level"] == pytest.approx(min(ref.ensemble, 7.0))
        assert e["teacher_version"] == 2  # version 2's PLs are better: they evicted version 1's
        assert e["age_s"] >= 10 and (e["width"], e["height"], e["channels"]) == (96, 96, 3)
        assert e["weights"]["rows"] == 2 and len(e["weights"]["values"]) == 4
        assert e["image_url"] == f"/bank/images/{image_id}/entries/{e['rank']}.png"


def test_unknown_image_is_404(api):
    for path in ("/bank/images/nope", "/bank/images/nope/entries/0.png", "/bank/images/nope/input.png"):
        r = api.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"] == "not_found"


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_rejected(api, bad):
    from urllib.parse import quote

    q = quote(bad, safe="")
    for path in (f"/bank/images/{q}", f"/bank/images/{q}/entries/0.png", f"/bank/images/{q}/input.png"):
        r = api.get(path)
        assert r.status_code == 422, (path, r.status_code, r.text)
        assert r.json()["error"] == "invalid_id"


@pytest.mark.parametrize("path", ["/bank/images/../../etc/passwd", "/bank/images/%2E%2E%2Fx", "/bank/images/a%2Fb",
                                  "/bank/images/..%2F..%2Fetc%2Fpasswd/input.png", "/bank/images/%00",
                                  "/static/..%2F..%2Fapp.py", "/static/../app.py"])
def test_traversal_never_reaches_other_data(api, path):
    r = api.get(path)
    assert r.status_code in (404, 422), (path, r.status_code)
    assert r.headers["content-type"].startswith("application/json")


def test_entry_png_is_the_stored_pl(api, filled):
    bank, made = filled
    image_id = next(iter(made))
    for rank, entry in enumerate(bank.entries(image_id)):
        arr = _png(api.get(f"/bank/images/{image_id}/entries/{rank}.png"))
        np.testing.assert_array_equal(arr, made[image_id]["pls"][entry.label_id])
    thumb = _png(api.get(f"/bank/images/{image_id}/entries/0.png", params={"size": 32}))
    assert thumb.shape == (32, 32, 3)
    assert _png(api.get(f"/bank/images/{image_id}/entries/0.png", params={"size": 512})).shape == (96, 96, 3)


def test_entry_png_limits_and_etag(api, filled):
    image_id = next(iter(filled[1]))
    base = f"/bank/images/{image_id}/entries"
    assert api.get(f"{base}/3.png").status_code == 404
    assert api.get(f"{base}/64.png").status_code == 422
    assert api.get(f"{base}/-1.png").status_code == 422
    assert api.get(f"{base}/x.png").status_code == 422
    for size in (0, 8, 513, 100000):
        assert api.get(f"{base}/0.png", params={"size": size}).status_code == 422, size
    r = api.get(f"{base}/0.png", params={"size": 64})
    etag = r.headers["etag"]
    again = api.get(f"{base}/0.png", params={"size": 64}, headers={"If-None-Match": etag})
    assert again.status_code == 304 and not again.content


def test_raw_payload_served_as_png(bank, redis_url):
    arr = np.random.default_rng(3).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    bank.gate("raw-img", [build_entry("raw-img", "raw-img.v1.hflip", ensemble=5.0, image=arr, image_format="raw")])
    with TestClient(create_app(redis_url, prefix=bank.prefix)) as c:
        np.testing.assert_array_equal(_png(c.get("/bank/images/raw-img/entries/0.png")), arr)
        assert _png(c.get("/bank/images/raw-img/entries/0.png", params={"size": 16})).shape == (11, 16, 3)
        d = c.get("/bank/images/raw-img").json()
        assert d["input_url"] is None and len(d["entries"]) == 1
        assert c.get("/bank/images/raw-img/input.png").status_code == 404


def test_input_png(api, filled):
    _, made = filled
    image_id = next(iter(made))
    np.testing.assert_array_equal(_png(api.get(f"/bank/images/{image_id}/input.png")), made[image_id]["input"])
    assert _png(api.get(f"/bank/images/{image_id}/input.png", params={"size": 48})).shape == (48, 48, 3)


# ---------------------------------------------------------------------------- training
def test_training_endpoint_matches_the_stream(api, filled, redis_url):
    import json

    bank, _ = filled
    body = api.get("/api/training").json()
    raw = bank.client.xrange(bank.keys.train)  # the stream itself, not through the app's reader
    assert len(raw) == len(body["points"]) == TRAIN_STEPS
    for point, (entry_id, fields) in zip(body["points"], raw):
        assert point["step"] == int(fields[b"step"])
        assert point["time_ms"] == int(entry_id.decode().split("-")[0])
        assert point["scalars"] == pytest.approx({k.decode(): float(v) for k, v in fields.items() if k != b"step"})
    assert body["tags"] == sorted({k.decode() for _, f in raw for k in f} - {"step"})
    assert {"loss/total", "reward/q_high", "train/teacher_version", "train/lr"} <= set(body["tags"])
    meta = json.loads(bank.client.hget(bank.keys.train_probe, "meta"))
    probe = body["probe"]
    assert (probe["step"], probe["teacher_version"], probe["images"], probe["width"], probe["height"]) == (
        meta["step"], meta["teacher_version"], PROBE_IMAGES, PROBE_SIDE, PROBE_SIDE)
    assert [(i["name"], i["score"]) for i in probe["items"]] == [("input", None), ("3", 3.0), ("5", 5.0), ("7", 7.0)]
    assert api.get("/api/training", params={"limit": 5}).json()["points"] == body["points"][-5:]
    for limit in (0, 10_001, "x"):
        r = api.get("/api/training", params={"limit": limit})
        assert r.status_code == 422 and r.json()["error"] == "invalid_request", limit
    with TestClient(create_app(redis_url, prefix=bank.prefix)) as restarted:  # the data lives in Redis
        assert restarted.get("/api/training").json() == body


def test_probe_pngs_are_the_stored_strips(api, filled):
    bank, _ = filled
    items = api.get("/api/training").json()["probe"]["items"]
    for item in items:
        r = api.get(item["url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == bank.client.hget(bank.keys.train_probe, f"png:{item['name']}")
        assert _png(r).shape == (PROBE_SIDE, PROBE_IMAGES * PROBE_SIDE, 3)
    assert api.get("/api/training/probe/3.0.png").content == api.get("/api/training/probe/3.png").content
    etag = api.get("/api/training/probe/7.png").headers["etag"]
    again = api.get("/api/training/probe/7.png", headers={"If-None-Match": etag})
    assert again.status_code == 304 and not again.content
    assert api.get("/api/training/probe/6.png").status_code == 404
    for bad in ("a:b", "-1", "1e5", "3.5.5", "inputs", "%2A", "1234567"):
        r = api.get(f"/api/training/probe/{bad}.png")
        assert r.status_code == 422 and r.json()["error"] == "invalid_probe", bad


def test_training_before_any_log(bank, redis_url):
    with TestClient(create_app(redis_url, prefix=bank.prefix)) as c:
        assert c.get("/api/training").json() == {"points": [], "tags": [], "probe": None}
        r = c.get("/api/training/probe/input.png")
        assert r.status_code == 404 and r.json()["error"] == "not_found"


def test_bad_probe_record_is_no_probe(bank, redis_url):
    """A probe record the monitor cannot read leaves the panel without probes, not a 500."""
    bank.client.hset(bank.keys.train_probe, mapping={"meta": b"\x80not json", "png:3": b"x"})
    with TestClient(create_app(redis_url, prefix=bank.prefix)) as c:
        assert c.get("/api/training").json()["probe"] is None
        assert c.get("/api/training/probe/3.png").status_code == 404


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A strict reader of the text format 0.0.4: every sample after its HELP and TYPE."""
    families: dict[str, list] = {}
    types: dict[str, str] = {}
    helped: set[str] = set()
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split(" ", 3)[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("gauge", "counter", "histogram", "summary", "untyped")
            types[name] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"bad sample line {line!r}"
            name, labels, value = m.group(1), m.group(2) or "{}", m.group(3)
            assert name in types and name in helped, f"{name} has no TYPE/HELP before it"
            if types[name] == "counter":
                assert name.endswith("_total")
            pairs = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels))
            families.setdefault(name, []).append((pairs, float(value)))
    return families


def test_metrics(api, filled):
    bank, made = filled
    r = api.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    fam = parse_prometheus(r.text)
    one = {name: samples[0][1] for name, samples in fam.items() if len(samples) == 1}
    assert one["qualiteacher_redis_up"] == 1
    assert one["qualiteacher_bank_images"] == len(made)
    assert one["qualiteacher_bank_entries"] == 3 * len(made)
    assert one["qualiteacher_teacher_version"] == 2 and one["qualiteacher_scorers"] == 2
    assert one["qualiteacher_gate_admitted_total"] == bank.stats()["counters"]["admitted"]
    drops = {labels["reason"]: v for labels, v in fam["qualiteacher_dropped_total"]}
    assert drops == {"augmentation_instability": 2, "metric_disagreement": 3, "stale": 1}
    bins = fam["qualiteacher_bank_entries_by_score"]
    assert len(bins) == 10 and sum(v for _, v in bins) == 3 * len(made)
    assert all(labels["prefix"] == bank.prefix for samples in fam.values() for labels, _ in samples)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_read_only(api, filled, method):
    bank, made = filled
    before = bank.stats()
    for path in ("/bank/stats", "/bank/images", f"/bank/images/{next(iter(made))}", "/healthz", "/api/training",
                 "/api/training/probe/3.png"):
        r = api.request(method, path)
        assert r.status_code == 405, (method, path)
    assert bank.stats() == before


def test_page_and_assets_are_self_contained(api):
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "__QS__" not in page.text and 'src="/static/app.js"' in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for asset, kind in (("/static/app.js", "javascript"), ("/static/app.css", "text/css")):
        r = api.get(asset)
        assert r.status_code == 200 and kind in r.headers["content-type"], asset
        # No CDN, font or any other outside address (the SVG namespace is a name, not a fetch).
        assert not re.findall(r"https?://(?!www\.w3\.org/2000/svg)", r.text), asset
    assert not re.findall(r"https?://(?!www\.w3\.org/2000/svg)", page.text)
    assert api.get("/static/nope.js").status_code == 404


def test_openapi_lists_the_endpoints(api):
    paths = set(api.get("/openapi.json").json()["paths"])
    assert {"/healthz", "/bank/stats", "/bank/images", "/bank/images/{image_id}",
            "/bank/images/{image_id}/entries/{rank}.png", "/bank/images/{image_id}/input.png",
            "/metrics", "/api/training", "/api/training/probe/{name}.png"} <= paths
    assert api.get("/docs").status_code == 404  # Swagger UI would need a CDN


# ---------------------------------------------------------------------------- token
def test_token_required_everywhere(filled, redis_url):
    bank, made = filled
    token = "s3cr3t-t0ken"
    image_id = next(iter(made))
    paths = ["/", "/static/app.js", "/static/app.css", "/healthz", "/bank/stats", "/bank/images",
             f"/bank/images/{image_id}", f"/bank/images/{image_id}/entries/0.png",
             f"/bank/images/{image_id}/input.png", "/metrics", "/openapi.json", "/nope", "/api/training",
             "/api/training/probe/7.png"]
    with TestClient(create_app(redis_url, prefix=bank.prefix, token=token)) as c:
        for path in paths:
            for headers, params in (({}, {}), ({"Authorization": "Bearer wrong"}, {}), ({}, {"token": "wrong"}),
                                    ({"Authorization": f"Basic {token}"}, {}), ({}, {"token": ""}),
                                    ({"Authorization": "Bearer " + token[:-1]}, {})):
                r = c.get(path, headers=headers, params=params)
                assert r.status_code == 401, (path, headers, params)
                assert r.json()["error"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
                assert token not in r.text
            ok_header = c.get(path, headers={"Authorization": f"Bearer {token}"})
            ok_query = c.get(path, params={"token": token})
            expected = 404 if path == "/nope" else 200
            assert ok_header.status_code == ok_query.status_code == expected, path
        page = c.get("/", params={"token": token}).text
        assert f'src="/static/app.js?token={token}"' in page and f'href="/static/app.css?token={token}"' in page
        # A token with characters that need quoting is forwarded quoted and escaped.
    with TestClient(create_app(redis_url, prefix=bank.prefix, token='a"b<c>&d e')) as c:
        page = c.get("/", params={"token": 'a"b<c>&d e'})
        assert page.status_code == 200 and "a%22b%3Cc%3E%26d%20e" in page.text and "<c>" not in page.text


def test_empty_token_means_no_token(filled, redis_url):
    with TestClient(create_app(redis_url, prefix=filled[0].prefix, token="")) as c:
        assert c.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------- Redis down
def test_503_when_nothing_listens():
    url = f"redis://:pa55word@127.0.0.1:{free_port()}/0"
    with TestClient(create_app(url)) as c:
        t0 = time.monotonic()
        for path in ("/healthz", "/bank/stats", "/bank/images", "/bank/images/x", "/bank/images/x/entries/0.png",
                     "/bank/images/x/input.png", "/api/training", "/api/training/probe/3.png"):
            r = c.get(path)
            assert r.status_code == 503, path
            body = r.json()
            assert body["error"] == "redis_unavailable" and "Traceback" not in r.text
            assert "pa55word" not in r.text and "***" in body["detail"]
            assert r.headers["retry-after"] == "2"
        assert time.monotonic() - t0 < 15  # a quick answer, not a long retry loop
        m = c.get("/metrics")
        assert m.status_code == 200
        assert parse_prometheus(m.text)["qualiteacher_redis_up"][0][1] == 0
        # Bad input is still bad input, even with Redis away.
        assert c.get("/bank/images/a:b").status_code == 422


def test_503_while_redis_restarts_then_recovers(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis", password="pw-x9")
    server.start()
    try:
        bank = MemoryBank(redis_client(server.url), prefix="qt")
        fill_bank(bank, n_images=2)
        with TestClient(create_app(server.url)) as c:
            assert c.get("/bank/stats").json()["images"] == 2
            health = c.get("/healthz").json()
            assert "pw-x9" not in health["redis_url"] and "***" in health["redis_url"]
            server.stop()
            for path in ("/healthz", "/bank/stats", "/bank/images"):
                r = c.get(path)
                assert r.status_code == 503 and r.json()["error"] == "redis_unavailable", path
                assert "pw-x9" not in r.text
            server.start()  # same folder and port: the AOF brings the bank back
            assert c.get("/healthz").status_code == 200
            assert c.get("/bank/stats").json()["images"] == 2
            assert len(c.get("/bank/images").json()["items"]) == 2
        bank.client.close()
    finally:
        server.stop()


# ---------------------------------------------------------------------------- CLI
def test_cli_monitor_refuses_public_bind_without_token(monkeypatch, capsys):
    from qualiteacher.pipelines import cli

    calls = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: calls.append((app, kw)))
    monkeypatch.delenv("QUALITEACHER_MONITOR_TOKEN", raising=False)
    url = "redis://:hunter2@127.0.0.1:1/0"
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert cli.main(["monitor", "--redis", url, "--host", host]) == 2
        err = capsys.readouterr().err
        assert "token" in err and "hunter2" not in err
    assert calls == []

    assert cli.main(["monitor", "--redis", url]) == 0  # loopback: no token needed
    assert calls[-1][1]["host"] == "127.0.0.1" and calls[-1][1]["port"] == 8000
    for host in ("localhost", "::1", "127.0.0.2"):
        assert cli.main(["monitor", "--redis", url, "--host", host, "--port", "8123"]) == 0
        assert calls[-1][1]["host"] == host and calls[-1][1]["port"] == 8123

    monkeypatch.setenv("QUALITEACHER_MONITOR_TOKEN", "env-token-123")
    assert cli.main(["monitor", "--redis", url, "--host", "0.0.0.0", "--prefix", "other"]) == 0
    assert cli.main(["monitor", "--redis", url, "--host", "0.0.0.0", "--token", "flag-token-456"]) == 0
    out = capsys.readouterr()
    for secret in ("hunter2", "env-token-123", "flag-token-456"):
        assert secret not in out.out + out.err
    assert "***" in out.out + out.err

    with TestClient(calls[-2][0]) as c:  # the env token guards the app
        assert c.get("/healthz").status_code == 401
        assert c.get("/healthz", headers={"Authorization": "Bearer env-token-123"}).status_code == 503
    with TestClient(calls[-1][0]) as c:  # --token wins over the env
        assert c.get("/healthz", headers={"Authorization": "Bearer env-token-123"}).status_code == 401


def test_access_log_masks_tokens(monkeypatch):
    import logging

    from qualiteacher.pipelines import cli
    from qualiteacher.services.monitor.security import RedactTokens as _RedactTokens
    from qualiteacher.services.monitor.security import is_loopback

    monkeypatch.setattr("uvicorn.run", lambda app, **kw: None)
    assert cli.main(["monitor", "--redis", "redis://127.0.0.1:1/0", "--token", "zz"]) == 0
    assert cli.main(["monitor", "--redis", "redis://127.0.0.1:1/0", "--token", "zz"]) == 0
    filters = [f for f in logging.getLogger("uvicorn.access").filters if isinstance(f, _RedactTokens)]
    assert len(filters) == 1
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", "/static/app.js?token=s3cret&x=1", "1.1", 200), None)
    assert filters[0].filter(record)
    assert "s3cret" not in record.getMessage() and "token=***&x=1" in record.getMessage()
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "0.0.0.0", "::", "10.0.0.1",
                                     "example.org")] == [True, True, True, True, False, False, False, False]


# ---------------------------------------------------------------------------- browser
def _chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, which the set-up step installs (`make browser`)."""
    found = {name: shutil.which(name) for name in ("chromium", "chromedriver")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH: run `make browser` first (Debian's chromium and "
                    "chromium-driver packages; `make test` does not install them)", pytrace=False)
    return found["chromium"], found["chromedriver"]


class WebDriver:
    """The few W3C WebDriver commands the test needs, over HTTP to chromedriver."""

    def __init__(self, driver: str, chrome: str, profile: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([driver, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.http.get("/status").json()["value"]["ready"]:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-quic", "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
                "--window-size=1440,1000", "--force-device-scale-factor=1"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                 "goog:chromeOptions": {"binary": chrome, "args": args}}}}
        value = self._ok(self.http.post("/session", json=caps))
        self.session = f"/session/{value['sessionId']}"

    @staticmethod
    def _ok(resp: httpx.Response):
        body = resp.json()
        if resp.status_code != 200:
            raise RuntimeError(f"webdriver error: {body}")
        return body["value"]

    def get(self, url: str) -> None:
        self._ok(self.http.post(f"{self.session}/url", json={"url": url}))

    def js(self, script: str, *args):
        return self._ok(self.http.post(f"{self.session}/execute/sync", json={"script": script, "args": list(args)}))

    def wait(self, script: str, timeout: float = 20.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(script)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"page never met: {what}")

    def screenshot(self, path: Path) -> Path:
        import base64

        path.write_bytes(base64.b64decode(self._ok(self.http.get(f"{self.session}/screenshot"))))
        return path

    def close(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            self.http.delete(self.session)
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def served(filled, redis_url) -> Iterator[tuple[str, str]]:
    """The app under uvicorn on loopback (with a token, to check the page passes it on)."""
    token = "browser-token"
    with served_app(create_app(redis_url, prefix=filled[0].prefix, token=token)) as base:
        yield base, token


def test_page_renders_in_chromium(served, filled, tmp_path):
    chrome, driver_bin = _chromium()
    base, token = served
    bank, made = filled
    wd = WebDriver(driver_bin, chrome, tmp_path / "profile")
    try:
        wd.get(f"{base}/?token={token}")
        n = len(made)
        wd.wait(f"return document.querySelectorAll('#grid .card').length === {n}", what=f"{n} thumbnails")
        wd.wait("return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)",
                what="every thumbnail loaded")
        cards = wd.js("return [...document.querySelectorAll('#grid .card')].map(c => "
                      "[c.dataset.imageId, c.querySelector('.score').textContent, c.querySelector('img').naturalWidth])")
        expected = bank.list_images(0, 100)
        assert [c[0] for c in cards] == [i for i, _, _ in expected]
        assert [c[1] for c in cards] == [f"{s:.2f}" for _, s, _ in expected]
        assert all(c[2] == 96 for c in cards)  # 96 px PLs (the 160 px thumbnail does not upscale)
        assert wd.js("return document.getElementById('k-images').textContent") == str(n)
        assert wd.js("return document.getElementById('k-version').textContent") == "v2"
        assert wd.js("return document.querySelectorAll('#hist rect').length") == 10
        assert wd.js("return document.querySelectorAll('#drops .drop-row').length") == 3
        assert wd.js("return document.getElementById('status').className") == "status live"
        wd.wait("return document.querySelectorAll('#spark-entries path').length === 2", timeout=15,
                what="the history charts after a refresh")
        shot = wd.screenshot(tmp_path / "monitor-grid.png")

        # The training panel: a curve per loss term, the teacher version, the probes at 3/5/7.
        assert wd.js("return document.getElementById('train-empty').hidden") is True
        curves = wd.js("return [...document.querySelectorAll('#train-loss path')].map(p => p.dataset.tag)")
        assert curves == ["loss/total", "loss/consistency", "loss/pixel", "loss/pref_rank", "loss/supervised"]
        assert wd.js("return document.getElementById('tv-version').textContent") == f"v{TRAIN_STEPS // 5}"
        assert wd.js("return document.querySelectorAll('#train-version path').length") == 2
        assert wd.js("return document.getElementById('train-step').textContent") == f"· step {TRAIN_STEPS}"
        wd.wait(f"return [...document.querySelectorAll('#train-probes img')].filter(i => i.complete && "
                f"i.naturalWidth === {PROBE_IMAGES * PROBE_SIDE}).length === 4", what="the probe strips loaded")
        probes = wd.js("return [...document.querySelectorAll('#train-probes .probe-row')].map(r => "
                       "[r.dataset.probe, r.querySelector('.probe-label').textContent])")
        assert probes == [["input", "input"], ["3", "score 3"], ["5", "score 5"], ["7", "score 7"]]
        wd.js("window.scrollTo(0, document.getElementById('training').offsetTop - 70)")  # below the sticky bar
        training = wd.screenshot(tmp_path / "monitor-training.png")

        wd.js("document.querySelector('#grid .card').click()")
        wd.wait("return document.querySelectorAll('#d-strip .shot img').length === 4", what="input + top-3")
        wd.wait("return [...document.querySelectorAll('#d-strip img')].every(i => i.complete && i.naturalWidth > 0)",
                what="detail images loaded")
        first = expected[0][0]
        assert wd.js("return document.getElementById('d-title').textContent") == first
        rows = wd.js("return [...document.querySelectorAll('#d-metrics tbody tr')].map(r => r.cells[0].firstChild.textContent)")
        assert rows == [*METRICS, "ensemble (0-10)"]
        badges = wd.js("return [...document.querySelectorAll('#d-strip .shot .score')].map(b => b.textContent)")
        assert badges == [f"{e.ensemble:.2f}" for e in bank.entries(first)]
        detail = wd.screenshot(tmp_path / "monitor-detail.png")
        for path in (shot, training, detail):
            with Image.open(path) as img:
                assert img.size[0] >= 1000 and img.getextrema() != ((0, 0), (0, 0), (0, 0))
        if os.environ.get("QT_MONITOR_SCREENSHOT_DIR"):  # keep copies for a person to look at
            out = Path(os.environ["QT_MONITOR_SCREENSHOT_DIR"])
            out.mkdir(parents=True, exist_ok=True)
            for path in (shot, training, detail):
                shutil.copy(path, out / path.name)
    finally:
        wd.close()
