"""Send a file larger than one call may carry to the GPU machine in parts, and join it there.

    python benchmarks/gpu/parts.py split FILE DIR [--max-mib 31]   # here: DIR/part-00, part-01, ..., MANIFEST.json
    python benchmarks/gpu/parts.py join DIR OUT                     # there: OUT, checked against the manifest

A call carries at most 64 MiB, and the machine keeps what earlier calls left while it stays warm:
carry DIR/part-00 with one call, DIR/part-01 with the next, and so on (MANIFEST.json with each).
`join` names the parts still missing, refuses a part whose size or SHA-256 differs, and checks the
joined file's SHA-256.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

MANIFEST = "MANIFEST.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split(path: str, out_dir: str, max_bytes: int) -> list[str]:
    """Cut `path` into parts of at most max_bytes under out_dir, with a manifest; return the part names."""
    os.makedirs(out_dir, exist_ok=True)
    parts = []
    with open(path, "rb") as f:
        while block := f.read(max_bytes):
            name = f"part-{len(parts):02d}"
            with open(os.path.join(out_dir, name), "wb") as g:
                g.write(block)
            parts.append({"name": name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    manifest = {"file": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": _sha256(path),
                "parts": parts}
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return [p["name"] for p in parts]


def missing(in_dir: str) -> list[str]:
    """Parts the manifest names that are not (yet) here whole: absent, or of another size."""
    with open(os.path.join(in_dir, MANIFEST), encoding="utf-8") as f:
        parts = json.load(f)["parts"]
    return [p["name"] for p in parts if not os.path.exists(os.path.join(in_dir, p["name"]))
            or os.path.getsize(os.path.join(in_dir, p["name"])) != p["bytes"]]


def join(in_dir: str, out: str) -> str:
    """Join the parts into `out` (written whole, then renamed); raise naming any missing or bad part."""
    with open(os.path.join(in_dir, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    gone = missing(in_dir)
    if gone:
        raise FileNotFoundError(f"{in_dir}: parts {', '.join(gone)} of {len(manifest['parts'])} are missing; "
                                "carry them (one call each) and join again")
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(tmp, "wb") as g:
        for p in manifest["parts"]:
            with open(os.path.join(in_dir, p["name"]), "rb") as f:
                block = f.read()
            if hashlib.sha256(block).hexdigest() != p["sha256"]:
                os.remove(tmp)
                raise ValueError(f"{in_dir}/{p['name']}: SHA-256 differs from {MANIFEST}; carry that part again")
            g.write(block)
    if _sha256(tmp) != manifest["sha256"]:
        os.remove(tmp)
        raise ValueError(f"{out}: the joined file's SHA-256 differs from {MANIFEST}; split it again here")
    os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("file")
    s.add_argument("dir")
    s.add_argument("--max-mib", type=float, default=31.0)
    j = sub.add_parser("join")
    j.add_argument("dir")
    j.add_argument("out")
    a = ap.parse_args()
    if a.cmd == "split":
        names = split(a.file, a.dir, int(a.max_mib * 2 ** 20))
        print(f"{a.file} -> {len(names)} parts in {a.dir}: carry one per call, with {MANIFEST}")
        return
    try:
        print(join(a.dir, a.out))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"[resure_ds] {e}")


if __name__ == "__main__":
    main()
