"""rustyface: throughput vs the same models called directly, identify latency in a 100k-face gallery, and
verification quality on augmented pairs of the shipped photos. One run, one table.

    python bench/faces.py [--n 60] [--gallery 100000] [--identify 200] [--rounds 2]

- detect images/s and embed faces/s: `faces.detect` / `faces.embed` through the gateway (JPEG upload as
  base64, decoded in the worker) vs the same engine in this process on the same JPEG bytes (decode included),
  with one client (each request waits for the last: ~1-3 ms of HTTP + IPC per image show) and with 4
  concurrent clients (a server's throughput; OpenCV already uses both cores in the direct call).
  Rounds are interleaved; the best round of each is shown (the VM is noisy).
- identify: a gallery of `--gallery` synthetic 128-d faces (10 per subject: unit vectors around a random
  centre, at the spread SFace shows for one person) plus the astronaut; p50 / p99 of `faces.identify` end to
  end and of its gallery search (the worker's query through the gateway), as the plugin reports them.
- quality: 8 people (skimage's astronaut, insightface's Tom Hanks and the six people of its group photo), 9
  versions each (original, flip, crops, brightness, JPEG quality 25, a combination): every pair embedded
  through the gateway; true-accept and false-accept rates at the default threshold.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import io
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from gateway_harness import ADMIN_KEY, start_gateway  # noqa: E402

from bkg_kernel.plugins.rustyface import images  # noqa: E402
from bkg_kernel.plugins.rustyface.engine import FaceEngine  # noqa: E402


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def photos() -> dict[str, Image.Image]:
    """The shipped photos: one image per person (the group photo cut into one crop per face)."""
    import insightface
    import skimage.data

    folder = Path(insightface.__file__).parent / "data" / "images"
    people = {
        "astronaut": Image.fromarray(skimage.data.astronaut()),
        "hanks": Image.open(folder / "Tom_Hanks_54745.png").convert("RGB"),
    }
    group = Image.open(folder / "t1.jpg").convert("RGB")
    arr = np.asarray(group)[:, :, ::-1].copy()
    for i, f in enumerate(FaceEngine().detect(arr)):
        x1, y1, x2, y2 = f.bbox
        m = 0.8 * max(x2 - x1, y2 - y1)
        box = (max(0, x1 - m), max(0, y1 - m), min(group.width, x2 + m), min(group.height, y2 + m))
        people[f"group-{i + 1}"] = group.crop(tuple(int(v) for v in box))
    return people


def versions(img: Image.Image) -> list[bytes]:
    w, h = img.size
    crop = img.crop((int(w * 0.08), int(h * 0.05), int(w * 0.95), int(h * 0.97)))
    crop2 = img.crop((0, int(h * 0.1), int(w * 0.9), h))
    return [
        jpeg(img),
        jpeg(ImageOps.mirror(img)),
        jpeg(crop),
        jpeg(crop2),
        jpeg(ImageEnhance.Brightness(img).enhance(1.4)),
        jpeg(ImageEnhance.Brightness(img).enhance(0.6)),
        jpeg(img, quality=25),
        jpeg(ImageEnhance.Contrast(ImageOps.mirror(crop)).enhance(1.3), quality=40),
        jpeg(img.resize((max(64, w * 2 // 3), max(64, h * 2 // 3)))),
    ]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60, help="images per throughput round")
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--identify", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients for the second bkg column")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    people = photos()
    samples = [jpeg(p) for p in people.values()]
    work = Path(tempfile.mkdtemp(prefix="bench-faces-"))
    atexit.register(shutil.rmtree, work, True)  # its stores and models go when the bench ends
    gw = start_gateway(work / "data", env={"BKG_MODEL_DIR": str(work / "models")})
    c = httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=600)
    engine = FaceEngine()
    inv = "/api/plugins/rustyface/invoke/"
    try:
        # -- throughput ---------------------------------------------------------------------------------
        batch = [samples[i % len(samples)] for i in range(args.n)]
        b64s = [base64.b64encode(b).decode() for b in batch]
        best: dict[str, float] = {}

        def keep(name: str, value: float) -> None:
            best[name] = max(best.get(name, 0.0), value)

        c.post(inv + "faces.embed", json={"image": b64s[0]}).raise_for_status()  # warm
        clients = [
            httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=600)
            for _ in range(args.clients)
        ]

        def through_bkg(cap: str, n_clients: int) -> float:
            def one(i: int) -> int:
                r = clients[i % n_clients].post(inv + cap, json={"image": b64s[i]})
                r.raise_for_status()
                return len(r.json()["faces"]) if cap == "faces.embed" else 1

            t0 = time.perf_counter()
            with ThreadPoolExecutor(n_clients) as ex:
                n = sum(ex.map(one, range(len(b64s))))
            return n / (time.perf_counter() - t0)

        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for b in batch:
                engine.detect(images.decode(b, field="image", max_pixels=40_000_000))
            keep("detect direct", len(batch) / (time.perf_counter() - t0))
            t0, n = time.perf_counter(), 0
            for b in batch:
                img = images.decode(b, field="image", max_pixels=40_000_000)
                for f in engine.detect(img):
                    engine.embed(img, f)
                    n += 1
            keep("embed direct", n / (time.perf_counter() - t0))
            for what in ("detect", "embed"):
                keep(f"{what} bkg 1", through_bkg(f"faces.{what}", 1))
                keep(f"{what} bkg {args.clients}", through_bkg(f"faces.{what}", args.clients))

        # -- identify in a big gallery --------------------------------------------------------------------
        c.post(inv + "faces.gallery", json={"action": "create", "gallery": "big"}).raise_for_status()
        rng = np.random.default_rng(0)
        per = 10
        t0 = time.perf_counter()
        for a in range(0, args.gallery, 10_000):
            n = min(10_000, args.gallery - a)
            centres = rng.standard_normal((n // per, 128)).astype(np.float32)
            centres /= np.linalg.norm(centres, axis=1, keepdims=True)
            vecs = np.repeat(centres, per, axis=0) + 0.03 * rng.standard_normal((n, 128)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            points = [
                {"id": f"syn-{a + i}", "vector": v.tolist(), "payload": {"subject": f"synthetic-{(a + i) // per}"}}
                for i, v in enumerate(vecs)
            ]
            c.put("/api/collections/faces-big/points", json={"points": points}).raise_for_status()
        print(f"gallery: {args.gallery} synthetic faces stored in {time.perf_counter() - t0:.0f}s")
        astro = base64.b64encode(samples[0]).decode()
        enroll = {"gallery": "big", "subject": "astronaut", "images": [astro]}
        c.post(inv + "faces.enroll", json=enroll).raise_for_status()
        query = base64.b64encode(versions(people["astronaut"])[1]).decode()  # the flipped photo
        total, search, hits = [], [], 0
        for _ in range(args.identify):
            t0 = time.perf_counter()
            r = c.post(inv + "faces.identify", json={"gallery": "big", "image": query})
            total.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            search.append(r.json()["timings"]["search_ms"])
            hits += r.json()["faces"][0]["subject"] == "astronaut"

        # -- verification quality -------------------------------------------------------------------------
        embs: list[tuple[str, np.ndarray]] = []
        for name, img in people.items():
            for v in versions(img):
                r = c.post(inv + "faces.embed", json={"image": base64.b64encode(v).decode(), "max_faces": 1})
                faces = r.json()["faces"]
                if faces:
                    embs.append((name, np.asarray(faces[0]["embedding"])))
        threshold = c.get("/api/plugins/rustyface/config").json()["config"].get("verify_threshold", 0.363)
        gen, imp = [], []
        for (na, va), (nb, vb) in itertools.combinations(embs, 2):
            (gen if na == nb else imp).append(float(va @ vb))
    finally:
        gw.stop()

    print()
    k = args.clients
    print(f"| measure | direct | bkg, 1 client | ratio | bkg, {k} clients | ratio |")
    print("|---|---|---|---|---|---|")
    for what, unit in (("detect", "images/s"), ("embed", "faces/s")):
        d, b1, bk = best[f"{what} direct"], best[f"{what} bkg 1"], best[f"{what} bkg {k}"]
        print(f"| {what} ({unit}) | {d:.1f} | {b1:.1f} | {b1 / d:.2f}x | {bk:.1f} | {bk / d:.2f}x |")
    print()
    print(
        f"identify in a gallery of {args.gallery + 1:,} faces ({args.identify} requests, found {hits}/{args.identify}):"
    )
    print(f"  end to end p50 {statistics.median(total):.1f} ms, p99 {pct(total, 99):.1f} ms (detect + embed + search)")
    print(f"  gallery search p50 {statistics.median(search):.2f} ms, p99 {pct(search, 99):.2f} ms")
    print()
    tar = float(np.mean(np.asarray(gen) >= threshold))
    far = float(np.mean(np.asarray(imp) >= threshold))
    print(
        f"verification at threshold {threshold}: {len(embs)} images of {len(people)} people "
        f"({len(people) * 9 - len(embs)} without a detected face); genuine pairs {len(gen)}, impostor pairs {len(imp)}"
    )
    print(
        f"  TAR {tar:.3f}  FAR {far:.4f}  genuine cosine p5 {pct(gen, 5):.3f}  impostor cosine p99 {pct(imp, 99):.3f}"
    )


if __name__ == "__main__":
    main()
