"""The data sets on the network: the manifest (datasets.tsv: each file's set, name, size, sha256
and public URL), and `python data.py download`, which fetches and verifies them."""

import argparse
import csv
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from files import atomic_write, check_writable, removed_if_left_empty
from utils import HelpFormatter, UserError

MANIFEST = Path(__file__).with_name("datasets.tsv")
DEFAULT_DATA_ROOT = "datasets"
COPY_HINT = "copy the sets into a folder and pass --data-root DIR"
OFFLINE_HINT = f"Offline? Fetch from a mirror with --base-url URL (or SRCNN_DATA_URL), or {COPY_HINT}"


def default_data_root() -> str:
    return os.environ.get("SRCNN_DATA_ROOT", DEFAULT_DATA_ROOT)


def read_manifest() -> list[dict]:
    with open(MANIFEST, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def known_sets() -> list[str]:
    return sorted({row["dataset"] for row in read_manifest()})


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_verified(path: Path, size: int, sha256: str) -> bool:
    return path.is_file() and path.stat().st_size == size and sha256_of(path) == sha256


def fetch(url: str, dest: Path, size: int, sha256: str, hint: str = OFFLINE_HINT, timeout: float = 30.0) -> None:
    """Stream `url` into `dest` (atomic_write: the file appears only once whole), checking its size
    and sha256 on the way. `hint`: what to try when `url` cannot be reached."""
    with atomic_write(dest, "data file") as f:
        try:
            digest, received = hashlib.sha256(), 0
            with urllib.request.urlopen(url, timeout=timeout) as response:
                for block in iter(lambda: response.read(1 << 16), b""):
                    received += len(block)
                    if received > size:
                        break
                    digest.update(block)
                    f.write(block)
        except urllib.error.HTTPError as err:  # the server answered, but not with the file (404, 500, redirect loop)
            raise UserError(f"cannot download {url}: HTTP {err.code} {err.reason}") from None
        except http.client.HTTPException as err:  # e.g. the connection closed mid-file
            raise UserError(f"cannot download {url}: {type(err).__name__}; the partial file was not kept") from None
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
            raise UserError(f"cannot download {url}: {reason}. {hint}") from None
        if received != size:
            raise UserError(f"{url}: got {received} bytes, expected {size}; the bad file was not kept")
        if digest.hexdigest() != sha256:
            raise UserError(f"{url}: sha256 mismatch (corrupt download); the bad file was not kept")


def download(root: str | Path, sets: list[str], base_url: str | None = None) -> int:
    """Fetch the files of `sets` into root/<set>/, skipping those already verified. A failed first
    download leaves no empty folder behind."""
    rows = [row for row in read_manifest() if row["dataset"] in sets]
    unknown = set(sets) - {row["dataset"] for row in rows}
    if unknown:
        raise UserError(f"unknown data set(s) {', '.join(sorted(unknown))}; known: {', '.join(known_sets())}")
    fetched = 0
    for row in tqdm(rows, desc="download", unit="file"):
        dest = Path(root) / row["dataset"] / row["file"]
        size, sha256 = int(row["bytes"]), row["sha256"]
        if is_verified(dest, size, sha256):
            continue
        check_writable(dest, "data file")
        url = f"{base_url.rstrip('/')}/{row['dataset']}/{row['file']}" if base_url else row["source_url"]
        with removed_if_left_empty(dest.parent):
            fetch(url, dest, size, sha256, f"Is the mirror at {base_url} running? Or {COPY_HINT}" if base_url
                  else OFFLINE_HINT)
        fetched += 1
    return fetched


def fetch_on_first_use(root: str | Path, names: list[str]) -> None:
    """The known sets among `names` (set names, not paths) that the default data root lacks, or holds
    only in part, fetched and verified there as `python data.py download` does, said in one line
    first, as torchvision's datasets do: after install, training is one command. Another data root
    (--data-root) is never filled or changed."""
    if Path(root) != Path(default_data_root()):
        return
    rows = [row for row in read_manifest() if row["dataset"] in names]
    missing = sorted({row["dataset"] for row in rows
                      if not (path := Path(root) / row["dataset"] / row["file"]).is_file()
                      or path.stat().st_size != int(row["bytes"])})
    if not missing:
        return
    base_url = os.environ.get("SRCNN_DATA_URL")
    print(f"note: {', '.join(missing)} not in {root}/: fetching {'them' if len(missing) > 1 else 'it'} "
          f"(sha256-checked) from {base_url or 'the public URLs in datasets.tsv'}, as `python data.py download` does",
          file=sys.stderr)
    download(root, missing, base_url)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="data.py", description="Data sets for SRCNN.", formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("download", help="fetch and verify the data sets listed in datasets.tsv",
                         formatter_class=HelpFormatter)
    get.add_argument("--root", default=default_data_root(), help="folder to fill (env SRCNN_DATA_ROOT)")
    get.add_argument("--sets", nargs="+", default=known_sets(), help="which sets")
    get.add_argument(
        "--base-url",
        help="fetch <base-url>/<set>/<file> instead of the manifest's URLs, e.g. from a local mirror "
        "(default: $SRCNN_DATA_URL if set, else the manifest's URLs)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python data.py download ...`"""
    args = build_parser().parse_args(argv)
    fetched = download(args.root, args.sets, args.base_url or os.environ.get("SRCNN_DATA_URL"))
    print(f"{fetched} file(s) fetched; {', '.join(args.sets)} verified in {args.root}", file=sys.stderr)
    return 0
