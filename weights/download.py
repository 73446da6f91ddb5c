"""Fetch the three pretrained checkpoints U2A builds on, with sizes and sha256 checked, resumably.

    python weights/download.py                      # all three, into weights/ (about 1.4 GB)
    python weights/download.py --only bert          # one of them
    python weights/download.py --endpoint URL       # a hub mirror (or set HF_ENDPOINT)

Standard library (urllib) and tqdm only: no hub client. Each file comes from the hub's plain download URL,
`{endpoint}/{repo}/resolve/{revision}/{filename}`, and lands in `weights/<folder>/<filename>`, the layout that
train.py's `--weights DIR` reads.

Integrity, in the order it is decided:
  1. pinned: PINS in the table below give the sha256 (and the size where a public record gives it) of each
     file as it stands at the hub commit named there; they apply when fetching `main` or that commit.
  2. published: for files kept in Git LFS (the .safetensors), the hub answers the resolve request with a
     redirect to its storage that carries `X-Linked-Etag` (the file's sha256) and `X-Linked-Size`.
     huggingface_hub reads exactly these (constants.HUGGINGFACE_HEADER_X_LINKED_ETAG / _SIZE, used in
     file_download.get_hf_file_metadata) from a HEAD request that follows redirects only while they stay on
     the hub, because the headers sit on the redirect itself. Small files kept in plain Git are served
     directly: their ETag is a git blob sha1, not a sha256, so only their Content-Length is used.
  A pin that disagrees with what the hub publishes stops the download before it starts.

Resuming: bytes go to `<file>.part`; a later run asks for the rest with `Range: bytes=<have>-`, appends on
206 and starts again from zero on 200 (a server that ignores Range). The .part becomes the file (os.replace,
atomic) only after its size and sha256 pass; a wrong checksum deletes the .part.
"""
import argparse
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from tqdm import tqdm

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
TIMEOUT_S = 30          # per socket operation, not per file
CHUNK = 1 << 20         # 1 MiB reads
FETCH_COMMAND = "python weights/download.py"


@dataclass(frozen=True)
class Checkpoint:
    repo: str                       # hub repository
    folder: str                     # folder under --weights
    files: tuple                    # all are needed by train.py
    about: str
    pinned_at: str                  # hub commit the pins were read at
    pins: dict                      # filename -> (size in bytes or None, sha256 or None)


# Pins come from public records of these exact files (hub file pages and other projects' manifests that pin
# the same commits); where no exact byte count was found the size is left to the hub's headers.
CHECKPOINTS = {
    "clip": Checkpoint(
        repo="openai/clip-vit-base-patch16", folder="clip-vit-base-patch16",
        files=("model.safetensors", "config.json"),
        about="CLIP ViT-B/16, image encoder (the file holds the whole CLIP model; only vision_model.* is used)",
        pinned_at="57c216476eefef5ab752ec549e440a49ae4ae5f3",
        pins={"model.safetensors": (None, "846bf12e84b91c2a65b44833a915241443b39356f1000ac1345c61d7bf8a209e"),
              "config.json": (None, "eaf1c9089a8553c913d27ea66407f8bfc2be9989c80c9f331ddb3d63d4c5e8ad")}),
    "bert": Checkpoint(
        # `bert-base-uncased` on the hub is the old name of this repository and redirects to it
        repo="google-bert/bert-base-uncased", folder="bert-base-uncased",
        files=("model.safetensors", "config.json", "vocab.txt", "tokenizer.json"),
        about="BERT-base uncased, text encoder and its WordPiece tokenizer (cls.* pre-training heads unused)",
        pinned_at="86b5e0934494bd15c9632b12f734a8a67f723594",
        pins={"model.safetensors": (440449768, "68d45e234eb4a928074dfd868cead0219ab85354cc53d20e772753c6bb9169d3"),
              "config.json": (570, "7160e1553ad2ca51d8c1cb066be533db31826e12d173824c1bb0cb1a4f187d20"),
              "vocab.txt": (231508, "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
              "tokenizer.json": (466062, "ce64fce797c24f68df90b40a3f74f579b336a493db14bd583fd520ea0d8c9a98")}),
    "ast": Checkpoint(
        repo="MIT/ast-finetuned-audioset-10-10-0.4593", folder="ast-finetuned-audioset",
        files=("model.safetensors", "config.json"),
        about="AST fine-tuned on AudioSet, audio encoder (the 527-class classifier.* head is unused)",
        pinned_at="f826b80d28226b62986cc218e5cec390b1096902",
        pins={"model.safetensors": (346404948, "ae0c1e2ad4e1381d851fa9bf298ba13ebc9c5a914cdee2dbe427a6583869924d"),
              "config.json": (26763, "a93d525511d77e8ecc933d09674b85099815bbbb417c228a4edd655e252fb9ff")}),
}


class DownloadError(RuntimeError):
    """A file could not be fetched or did not verify; the message says what to do."""


class Unreachable(DownloadError):
    """The endpoint could not be reached at all (offline, DNS, refused, timed out)."""


# ----------------------------------------------------------------------------------------------------------------
# One file: ask the hub what it publishes, fetch into .part (resuming), verify, rename.

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # surface the 3xx as an HTTPError so its headers (X-Linked-*) can be read


_no_redirect_opener = urllib.request.build_opener(_NoRedirect)
_HEADERS = {"User-Agent": "u2a-weights-downloader", "Accept-Encoding": "identity"}  # identity: real byte counts


def hub_url(endpoint, repo, revision, filename):
    return f"{endpoint.rstrip('/')}/{repo}/resolve/{revision}/{filename}"


def _open(opener, request):
    """urlopen that turns 'could not connect' into Unreachable; HTTP statuses still raise HTTPError."""
    try:
        return opener.open(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError:
        raise
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise Unreachable(f"could not reach {request.full_url} ({reason})") from e


def remote_metadata(url):
    """HEAD the resolve URL like huggingface_hub does: (size, sha256) the hub publishes, each None if it does not.

    Redirects are followed while they stay on the same host (a renamed repository); a redirect to another host
    (the storage CDN) is where LFS metadata sits, and its signed URL is not HEAD-able, so stop there."""
    size = sha256 = None
    for _ in range(10):
        request = urllib.request.Request(url, method="HEAD", headers=_HEADERS)
        try:
            response = _open(_no_redirect_opener, request)
            response.close()
            headers, redirect = response.headers, None
        except urllib.error.HTTPError as e:
            if e.code not in (301, 302, 303, 307, 308):
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason} (check the repository, file name and "
                                    f"--revision)") from e
            headers, redirect = e.headers, urljoin(url, e.headers["Location"])
        etag = (headers.get("X-Linked-Etag") or "").removeprefix("W/").strip('"')
        if len(etag) == 64 and all(c in "0123456789abcdef" for c in etag):
            sha256 = etag
        if headers.get("X-Linked-Size"):
            size = int(headers["X-Linked-Size"])
        elif redirect is None and headers.get("Content-Length") and size is None:
            size = int(headers["Content-Length"])  # served directly (not LFS): the body is the file
        if redirect is None or urlsplit(redirect).netloc != urlsplit(url).netloc:
            return size, sha256
        url = redirect
    raise DownloadError(f"{url}: too many redirects")


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def download_file(url, dest, size=None, sha256=None):
    """Fetch url into dest (a Path) through dest + '.part'; size/sha256 are pins (None: use what the hub says)."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    hub_size, hub_sha256 = remote_metadata(url)
    for what, pinned, published in (("size", size, hub_size), ("sha256", sha256, hub_sha256)):
        if pinned is not None and published is not None and pinned != published:
            raise DownloadError(f"{url}: the hub publishes {what} {published} but {dest.name} is pinned to {pinned}. "
                                f"The file changed upstream: fetch the pinned commit with --revision, or update "
                                f"the pin in weights/download.py after checking the new file.")
    size = size if size is not None else hub_size
    sha256 = sha256 if sha256 is not None else hub_sha256

    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()  # longer than the file can be: not a prefix of it
        have = 0
    if size is None or have < size:
        _fetch(url, part, have, size, desc=f"{dest.parent.name}/{dest.name}")

    got = part.stat().st_size
    if size is not None and got < size:
        raise DownloadError(f"{url}: the server closed after {got} of {size} bytes; {part} is kept: "
                            f"run the same command again to resume.")
    if size is not None and got != size:
        part.unlink()
        raise DownloadError(f"{url}: got {got} bytes, expected {size}; deleted {part}.")
    if sha256 is not None and (actual := sha256_of(part)) != sha256:
        part.unlink()
        raise DownloadError(f"{url}: sha256 mismatch for {dest.name}: expected {sha256}, got {actual}; "
                            f"deleted {part}. Run again to fetch it afresh.")
    os.replace(part, dest)  # atomic: dest only ever exists complete and verified
    return dest


def _fetch(url, part, have, size, desc):
    """GET url into part, asking for bytes from `have` on; follows every redirect (urllib keeps Range on them)."""
    headers = dict(_HEADERS, **({"Range": f"bytes={have}-"} if have else {}))
    try:
        response = _open(urllib.request.build_opener(), urllib.request.Request(url, headers=headers))
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    with response:
        if response.status == 206:
            if not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                raise DownloadError(f"{url}: asked for bytes {have}- but got {response.headers.get('Content-Range')}")
            mode = "ab"
        else:  # 200: the server ignored Range and sends the whole file, so start over
            mode, have = "wb", 0
        with open(part, mode) as f, tqdm(total=size, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                                         desc=desc + (" (resumed)" if mode == "ab" else "")) as bar:
            try:
                while block := response.read(CHUNK):
                    f.write(block)
                    have += len(block)
                    bar.update(len(block))
            except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
                raise DownloadError(f"{url}: connection lost ({type(e).__name__}) with {have} bytes in {part}; "
                                    f"it is kept: run the same command again to resume.") from e


# ----------------------------------------------------------------------------------------------------------------
# The project's layout: which checkpoints, where they go, and the check train.py runs before loading.

def layout(weights_dir):
    return "\n".join(f"  {Path(weights_dir) / ck.folder}/  {', '.join(ck.files)}   ({ck.repo})"
                     for ck in CHECKPOINTS.values())


def offline_message(reason, endpoint, weights_dir):
    return (f"Could not download the pretrained weights: {reason}. This machine looks offline, or {endpoint} is "
            f"unreachable from it (a mirror can be set with --endpoint URL or HF_ENDPOINT). The weights can be "
            f"copied by hand instead: on a machine with internet access run `{FETCH_COMMAND}` (or save the files "
            f"from {DEFAULT_ENDPOINT}/<repo>/tree/main), then copy them into this layout, each folder holding "
            f"exactly these files:\n{layout(weights_dir)}")


def download(names=tuple(CHECKPOINTS), dest=Path(__file__).resolve().parent, endpoint=None,
             revision=DEFAULT_REVISION):
    """Fetch every file of the named checkpoints into dest/<folder>/; returns {name: folder}."""
    dest = Path(dest).expanduser()  # `--dest=~/w`: bash expands `~` in `--dest ~/w` only
    unknown = [n for n in names if n not in CHECKPOINTS]
    if unknown:
        raise ValueError(f"unknown checkpoint(s) {unknown}; known: {', '.join(CHECKPOINTS)}")
    endpoint = endpoint or os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT)
    folders = {}
    for name in names:
        ck = CHECKPOINTS[name]
        folder = dest / ck.folder
        use_pins = revision in (DEFAULT_REVISION, ck.pinned_at)  # pins describe the files at that commit
        for filename in ck.files:
            size, sha256 = ck.pins.get(filename, (None, None)) if use_pins else (None, None)
            target = folder / filename
            if target.exists():
                if size is not None and target.stat().st_size != size:
                    raise DownloadError(f"{target} is {target.stat().st_size} bytes, expected {size}: "
                                        f"delete it and run again.")
                continue  # only ever renamed into place after verifying
            try:
                download_file(hub_url(endpoint, ck.repo, revision, filename), target, size, sha256)
            except Unreachable as e:
                raise DownloadError(offline_message(e, endpoint, dest)) from e
        folders[name] = folder
    return folders


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download U2A's pretrained checkpoints (see weights/README.md).")
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent,
                        help="weights folder, one sub-folder per checkpoint (default: weights/)")
    parser.add_argument("--only", default=",".join(CHECKPOINTS),
                        help=f"comma-separated subset of {','.join(CHECKPOINTS)} (default: all)")
    parser.add_argument("--endpoint", default=None,
                        help=f"hub URL (default: $HF_ENDPOINT, else {DEFAULT_ENDPOINT})")
    parser.add_argument("--revision", default=DEFAULT_REVISION,
                        help="branch, tag or commit to fetch (default: main; pins apply to main and their commit)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    try:
        folders = download(names, args.dest, args.endpoint, args.revision)
    except (DownloadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, folder in folders.items():
        sizes = ", ".join(f"{f} {(folder / f).stat().st_size / 1e6:.1f} MB" for f in CHECKPOINTS[name].files)
        print(f"{name:5s} {folder}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
