r"""Search your own documents with a trained ColIntern: index a folder of PDFs and images, ask questions, see pages.

    # encode every page of every PDF / PNG / JPEG / TIFF under the folders (recursively) into a local index
    python search.py index --ckpt outputs/colintern-1b-e2/colintern_heads_epoch2.pt --docs papers/ scans/ \
        --index outputs/search_index --pool_factor 3
    # ask: the best pages (document, 1-based page, score), as text, --json, or page thumbnails in --html
    python search.py query --index outputs/search_index --top 5 "Which page shows the revenue table?"
    python search.py query --index outputs/search_index --queries questions.txt --html outputs/search.html
    # the same pages in a Qdrant collection (a server URL, or a folder: qdrant-client's local mode)
    python search.py index --ckpt CKPT --docs papers/ --index outputs/search_index --pool_factor 3 \
        --qdrant http://localhost:6333 --collection papers
    python search.py query --index outputs/search_index --qdrant http://localhost:6333 --collection papers "..."

The index (--index DIR) is a store addressed by content, not by position:
    DIR/index.json                         what every vector depends on: the model's embedding identity
                                           (ColIntern.embedding_identity, as mining and eval key theirs), the PDF
                                           render resolution, the stored dtype; another model or --dpi is refused
    DIR/catalog.json                       the documents indexed: path -> sha256, size, mtime, page count
    DIR/objects/<sha256>/pages_A-B.pt      pages A..B (1-based) of the document with that content: the full fp16
                                           vectors and, with --pool_factor > 1, the pooled ones
    DIR/objects/<sha256>/doc.json          written after the document's last chunk: it is complete
Adding a file encodes that file only (mining's positional shards would re-encode every later shard); a changed
file is a new sha256, so only it is encoded again; files no longer under --docs leave the catalog and their objects
are deleted. Chunks are written atomically one by one, so a killed run loses at most the chunk being encoded, and
a 1,000-page PDF streams through --doc_batch pages at a time.

Search: every page's pooled vectors are scored with exact MaxSim (colintern_scoring.maxsim_topk, the CPU and GPU
kernels mining and eval use), and each question's --rerank best are scored again with their full vectors; an index
without pooling (--pool_factor 1), or --exact, scores every page's full vectors. The model comes from the index.
"""

import argparse
import base64
import dataclasses
import html
import io
import json
import os
import re
import shutil
import sys
import time
import urllib.parse
import uuid

from colintern_cli import (
    ArgumentParser,
    UserFileNotFoundError,
    UserImportError,
    UserValueError,
    one_line,
    progress_bar,
    run_cli,
)
from colintern_data import atomic_path, check_output, file_sha256, write_json

STORE_VERSION = 1  # bump when the store's layout or index.json's meaning changes
PDF_SUFFIXES = (".pdf",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
DEFAULT_INDEX = os.path.join("outputs", "search_index")
THUMBNAIL_PX = 320  # the longer side of a page in the --html results
QDRANT_NAMESPACE = uuid.UUID("6f1c8a52-3f0e-4c55-9a7e-2b1f0c7d9e11")  # point ids: uuid5 of (path, content, page)
QDRANT_UPSERT_PAGES = 16  # points per upsert request (a page is up to ~1,300 vectors of 128 floats)


# -----------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    from colintern_launch import DEVICE_HELP, add_model_flags

    p = ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="{index,query}")
    ix = sub.add_parser("index", description=__doc__, help="encode the pages of PDFs and images into --index")
    add_model_flags(ix.add_argument_group("model"), ckpt_required=True)
    g = ix.add_argument_group("documents and index")
    g.add_argument(
        "--docs",
        nargs="+",
        required=True,
        help="PDF and image files (png, jpg, jpeg, tif, tiff: every TIFF frame is a page), and folders "
        "walked recursively for them (hidden files and other suffixes left out). A file that "
        "cannot be read is named in one line and skipped. The index holds exactly these documents: "
        "one indexed before and no longer found is dropped",
    )
    g.add_argument("--index", default=DEFAULT_INDEX, help="the index folder (made if absent)")
    g.add_argument(
        "--dpi",
        type=int,
        default=144,
        help="PDF render resolution (dots per inch): an A4 page is 1190x1684 px at 144. Part of the index's identity",
    )
    g.add_argument("--doc_batch", type=int, default=8, help="pages per forward pass (and in memory) when encoding")
    g.add_argument(
        "--chunk_pages",
        type=int,
        default=64,
        help="pages per stored chunk: the unit a killed run loses and a rerun resumes from",
    )
    add_qdrant_flags(ix)
    q = sub.add_parser("query", description=__doc__, help="the best pages of --index for each question")
    q.add_argument("questions", nargs="*", metavar="QUESTION", help="questions to ask (or --queries)")
    q.add_argument("--queries", default=None, help="a text file of questions, one a line (blank lines skipped)")
    q.add_argument("--index", default=DEFAULT_INDEX, help="the index folder written by `search.py index`")
    q.add_argument("--top", type=int, default=5, help="pages shown per question")
    q.add_argument(
        "--rerank",
        type=int,
        default=100,
        help="with a pooled index: the pages per question the pooled first stage hands to the exact "
        "rerank with full vectors; 0 ranks by pooled scores alone",
    )
    q.add_argument("--exact", action="store_true", help="score every page's full vectors (no pooled first stage)")
    q.add_argument(
        "--json",
        action="store_true",
        help='print one JSON document: [{"query", "results": [{"path", "page", "score"}]}] (notes go to stderr)',
    )
    q.add_argument(
        "--html",
        default=None,
        help="also write the hits as page thumbnails with scores, a section per question, to this file",
    )
    q.add_argument("--device", default=None, help=DEVICE_HELP)
    q.add_argument(
        "--score_dtype",
        default=None,
        choices=("fp32", "bf16", "fp16", "auto"),
        help="the dtype MaxSim scores in (see `index --help`); default: the one the index was built with",
    )
    q.add_argument("--query_batch", type=int, default=32, help="questions per forward pass")
    add_qdrant_flags(q)
    return p


def add_qdrant_flags(p) -> None:
    g = p.add_argument_group("Qdrant (optional: pip install -r requirements-qdrant.txt)")
    g.add_argument(
        "--qdrant",
        default=None,
        help="a Qdrant server's URL (http://localhost:6333), or a folder for qdrant-client's local mode "
        "(in process, on disk). index: the local index's pages are written there too; query: "
        "searched there (pooled first stage, then MaxSim over the full multivectors)",
    )
    g.add_argument("--collection", default=None, help="the Qdrant collection (with --qdrant)")


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    positive = ("pool_factor", "dpi", "doc_batch", "chunk_pages") if args.command == "index" else ("top", "query_batch")
    for flag in positive:
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if (args.qdrant is None) != (args.collection is None):
        p.error("--qdrant and --collection go together: the server (or folder) and the collection in it")
    if args.command == "query":
        if args.rerank < 0:
            p.error(f"--rerank must be >= 0, got {args.rerank}")
        if args.rerank and args.rerank < args.top:
            p.error(f"--rerank ({args.rerank}) must be >= --top ({args.top}): the hits come from the reranked pages")
        if not args.questions and args.queries is None:
            p.error("nothing to ask: pass questions, or --queries FILE")
        if args.questions and args.queries is not None:
            p.error("pass questions or --queries FILE, not both")
    return args


def main(args):
    if args.command == "index":
        return index_command(args)
    return query_command(args)


# -----------------------------------------------------------------------------
# Documents: finding them, their pages, rendering


class DocumentError(Exception):
    """A document that cannot be read: skipped with one line naming it, the rest is indexed."""


@dataclasses.dataclass(frozen=True)
class Document:
    path: str  # absolute
    sha256: str
    size: int
    mtime_ns: int
    pages: int

    @property
    def is_pdf(self) -> bool:
        return self.path.lower().endswith(PDF_SUFFIXES)


def find_documents(inputs: list, say) -> list:
    """--docs -> absolute paths of the PDFs and images they name, sorted, each once. A named file of another kind
    is skipped with one line; a name that does not exist is the user's mistake, before any work."""
    found = set()
    for name in inputs:
        if os.path.isdir(name):
            for root, dirs, files in os.walk(name):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found.update(
                    os.path.abspath(os.path.join(root, f))
                    for f in files
                    if not f.startswith(".") and f.lower().endswith(PDF_SUFFIXES + IMAGE_SUFFIXES)
                )
        elif os.path.lexists(name):
            if name.lower().endswith(PDF_SUFFIXES + IMAGE_SUFFIXES):
                found.add(os.path.abspath(name))
            else:
                say(f"skipped {name}: not a PDF or an image ({', '.join(PDF_SUFFIXES + IMAGE_SUFFIXES)})")
        else:
            raise UserFileNotFoundError(f"--docs {name} does not exist")
    return sorted(found)


def pdf_open_failure(path: str, error: Exception) -> str:
    """Why PDFium would not open a PDF, in words. Hack: PDFium reports a zero-page PDF as 'Incorrect password' or
    'Success', so the file's own bytes say whether it is encrypted (an /Encrypt entry) or has no pages."""
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    if b"/Encrypt" in data:
        return "encrypted PDF (PDFium needs its password): decrypt it first, e.g. `qpdf --decrypt`"
    if re.search(rb"/Count\s+0\b", data) and not re.search(rb"/Type\s*/Page\b", data):
        return "PDF with no pages"
    return f"not a PDF PDFium can open ({str(error).removeprefix('Failed to load document ').strip('.()')})"


def open_pdf(path: str):
    import pypdfium2 as pdfium

    try:
        return pdfium.PdfDocument(path)
    except pdfium.PdfiumError as e:
        raise DocumentError(pdf_open_failure(path, e)) from e


def count_pages(path: str) -> int:
    """A document's page count, opening it as its pages will be read (a bad file fails here, before encoding)."""
    if path.lower().endswith(PDF_SUFFIXES):
        pdf = open_pdf(path)
        try:
            n = len(pdf)
        finally:
            pdf.close()
        if n == 0:
            raise DocumentError("PDF with no pages")
        return n
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) if im.format == "TIFF" else 1
    except (UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise DocumentError(f"not an image PIL can read ({one_line(e)})") from e


def render_pages(doc: Document, first: int, last: int, dpi: int):
    """Yield pages first..last (1-based) of `doc` as RGB images, one at a time: a PDF page rendered at `dpi`, an
    image (a TIFF frame) decoded."""
    from PIL import Image

    n = first
    try:
        if doc.is_pdf:
            pdf = open_pdf(doc.path)
            try:
                for n in range(first, last + 1):
                    page = pdf[n - 1]
                    yield page.render(scale=dpi / 72).to_pil().convert("RGB")
                    page.close()
            finally:
                pdf.close()
            return
        with Image.open(doc.path) as im:
            for n in range(first, last + 1):
                im.seek(n - 1)
                yield im.convert("RGB")
    except DocumentError:
        raise
    except Exception as e:  # PDFium's, PIL's and the OS's errors on one damaged file: that file is skipped
        raise DocumentError(f"page {n} cannot be read ({type(e).__name__}: {one_line(e)})") from e


def scan_documents(paths: list, catalog: dict, say) -> list:
    """Each path -> a Document: its content hash (taken from the catalog while size and mtime are unchanged) and
    page count. Unreadable ones are named in one line each and left out."""
    docs = []
    for path in progress_bar(paths, desc="scan documents", unit="file", disable=not paths):
        try:
            stat = os.stat(path)
            known = catalog.get(path)
            if known and (known["size"], known["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
                docs.append(Document(path, known["sha256"], stat.st_size, stat.st_mtime_ns, known["pages"]))
                continue
            docs.append(Document(path, file_sha256(path), stat.st_size, stat.st_mtime_ns, count_pages(path)))
        except DocumentError as e:
            say(f"skipped {path}: {e}")
        except OSError as e:
            say(f"skipped {path}: cannot be read ({e.strerror})")
    return docs


# -----------------------------------------------------------------------------
# The store: index.json, catalog.json, objects/<sha256>/


def index_identity(model, args, scoring: str) -> dict:
    """What every stored vector depends on; a second run must match it (refuse_mixing). `model` settings let query
    rebuild the same model; `score_dtype` is the queries' default."""
    from colintern_cli import looks_like_hub_id
    from colintern_scoring import dtype_name

    ckpt = args.ckpt if looks_like_hub_id(args.ckpt) else os.path.abspath(args.ckpt)
    return {
        "store_version": STORE_VERSION,
        "embedding": model.embedding_identity(args.pool_factor),
        "dpi": args.dpi,
        "stored_dtype": "fp16",
        "model": {
            "ckpt": ckpt,
            "model_id": args.model_id,
            "max_tiles": model.max_tiles,
            "dtype": dtype_name(model.backbone.dtype),
            "quantize": model.quantize,
            "attn_implementation": model.attn_implementation,
            "dim": model.dim,
        },
        "score_dtype": scoring,
    }


def read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserValueError(
            f"{path} ({what}) is not valid JSON ({e.msg} at line {e.lineno}): delete the index folder and index again"
        ) from e


def embedding_differences(recorded: dict, embedding: dict) -> list:
    """The entries of two embedding identities that differ, named for a message."""
    return [f"embedding.{k}" for k in sorted(set(recorded) | set(embedding)) if recorded.get(k) != embedding.get(k)]


def refuse_mixing(folder: str, recorded: dict, identity: dict) -> None:
    """An index holds vectors of one model and one render resolution: anything else is refused, naming what
    differs."""
    keys = ("store_version", "dpi", "stored_dtype")
    differs = [k for k in keys if recorded.get(k) != identity[k]]
    differs += embedding_differences(recorded.get("embedding", {}), identity["embedding"])
    if differs:
        raise UserValueError(
            f"--index {folder} holds pages of another model or settings ({', '.join(differs)} "
            f"differ): pass another --index folder, or delete {folder} to rebuild it"
        )


def open_store(folder: str, identity: dict) -> None:
    """Make the index folder, or check that the one there was built the same way."""
    path = os.path.join(folder, "index.json")
    if os.path.isfile(path):
        refuse_mixing(folder, read_json(path, "the index's identity"), identity)
    elif os.path.isdir(folder) and set(os.listdir(folder)) - {"objects", "catalog.json"}:
        raise UserValueError(f"--index {folder} is a folder of other files (no index.json): pass a new or empty folder")
    write_json(path, identity)  # the model's path as given this time; every vector's identity unchanged


def chunk_ranges(pages: int, chunk_pages: int) -> list:
    return [(a, min(pages, a + chunk_pages - 1)) for a in range(1, pages + 1, chunk_pages)]


def object_folder(index: str, sha256: str) -> str:
    return os.path.join(index, "objects", sha256)


def chunk_name(first: int, last: int) -> str:
    return f"pages_{first:06d}-{last:06d}.pt"


def stored_chunks(index: str, sha256: str) -> list | None:
    """The chunk files of a complete document (its doc.json), or None."""
    try:
        with open(os.path.join(object_folder(index, sha256), "doc.json")) as f:
            return json.load(f)["chunks"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def encode_document(doc: Document, index: str, encode, pool_factor: int, args, bar) -> None:
    """Encode the chunks of `doc` not yet stored (a killed run's finished chunks are kept), then mark it complete.
    In memory: one chunk's vectors and one --doc_batch of rendered pages."""
    import torch

    from colintern_checkpoint import atomic_torch_save
    from colintern_scoring import pool_pages

    folder = object_folder(index, doc.sha256)
    os.makedirs(folder, exist_ok=True)
    chunks = chunk_ranges(doc.pages, args.chunk_pages)
    for first, last in chunks:
        path = os.path.join(folder, chunk_name(first, last))
        if os.path.isfile(path):
            bar.update(last - first + 1)
            continue
        full, batch = [], []
        for image in render_pages(doc, first, last, args.dpi):
            batch.append(image)
            if len(batch) == args.doc_batch:
                full += encode(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            full += encode(batch)
            bar.update(len(batch))
        pooled = pool_pages(full, pool_factor) if pool_factor > 1 else []
        atomic_torch_save(
            {
                "full": torch.cat(full).half(),
                "full_lengths": [len(e) for e in full],
                "pooled": torch.cat(pooled).half() if pooled else None,
                "pooled_lengths": [len(e) for e in pooled],
            },
            path,
        )
    write_json(
        os.path.join(folder, "doc.json"),
        {"sha256": doc.sha256, "pages": doc.pages, "chunks": [chunk_name(a, b) for a, b in chunks]},
    )


def write_catalog(index: str, docs: list, complete: bool) -> None:
    """catalog.json: the documents a query searches. `complete` is false while an index run is still going."""
    write_json(
        os.path.join(index, "catalog.json"),
        {
            "complete": complete,
            "documents": {
                d.path: {"sha256": d.sha256, "size": d.size, "mtime_ns": d.mtime_ns, "pages": d.pages} for d in docs
            },
        },
    )


def read_catalog(index: str) -> dict:
    path = os.path.join(index, "catalog.json")
    return read_json(path, "the index's catalog") if os.path.isfile(path) else {"complete": False, "documents": {}}


def drop_unlisted_objects(index: str, docs: list) -> int:
    """Delete the objects of documents no longer in the catalog (deleted, changed or skipped files) -> how many."""
    keep = {d.sha256 for d in docs}
    root = os.path.join(index, "objects")
    gone = [name for name in (os.listdir(root) if os.path.isdir(root) else []) if name not in keep]
    for name in gone:
        shutil.rmtree(os.path.join(root, name))
    return len(gone)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(folder) for f in files)


# -----------------------------------------------------------------------------
# index


def load_model_for_index(args, device: str):
    from colintern_model import ColIntern

    model, processor, _ = ColIntern.from_checkpoint(
        args.ckpt,
        model_id=args.model_id,
        dtype=args.dtype,
        max_tiles=args.max_tiles,
        quantize=args.quantize,
        device_map=device if device.startswith("cuda") else None,
        attn_implementation=args.attn_implementation,
        dim=args.dim,
    )
    return model.eval(), processor


def device_for(flag_value: str | None) -> str:
    """--device -> 'cpu' or 'cuda:N' by the repo's one rule (one process: search does not run under torchrun)."""
    import torch

    from colintern_launch import Launch, rank_device

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return rank_device(flag_value, "--device", Launch(), gpus)


def index_command(args):
    from colintern_scoring import dtype_name, score_dtype

    check_output(args.index, "--index", "folder")
    start = time.perf_counter()
    paths = find_documents(args.docs, print)
    device = device_for(args.device)
    model, processor = load_model_for_index(args, device)
    identity = index_identity(model, args, dtype_name(score_dtype(args.score_dtype, device)))
    open_store(args.index, identity)
    catalog = read_catalog(args.index)["documents"]
    docs = scan_documents(paths, catalog, print)
    todo = [d for d in docs if stored_chunks(args.index, d.sha256) is None]
    done = [d for d in docs if d not in todo]
    write_catalog(args.index, done, complete=False)  # deleted files leave the catalog now

    def encode(images):
        return model.encode_pages(processor, images, batch_size=len(images))

    skipped, encoded = len(paths) - len(docs), 0
    with progress_bar(total=sum(d.pages for d in todo), desc="encode pages", unit="page", disable=not todo) as bar:
        for doc in todo:
            try:
                encode_document(doc, args.index, encode, args.pool_factor, args, bar)
            except DocumentError as e:
                print(f"skipped {doc.path}: {e}")
                skipped += 1
                continue
            done.append(doc)
            encoded += 1
            write_catalog(args.index, done, complete=False)
    done.sort(key=lambda d: d.path)
    write_catalog(args.index, done, complete=True)
    dropped = drop_unlisted_objects(args.index, done)
    summary = index_summary(args.index, done, encoded, skipped, dropped, time.perf_counter() - start)
    if args.qdrant:
        summary["qdrant"] = qdrant_sync(args.qdrant, args.collection, args.index, identity)
    print(summary_line(args.index, summary))
    if args.qdrant:
        q = summary["qdrant"]
        print(
            f"qdrant {args.qdrant} collection {q['collection']}: {q['points']} pages, {q['upserted']} written, "
            f"{q['deleted']} deleted"
        )
    return summary


def index_summary(index: str, docs: list, encoded: int, skipped: int, dropped: int, seconds: float) -> dict:
    contents = load_index_vectors(index, docs, full=False)
    return {
        "documents": len(docs),
        "pages": len(contents.refs),
        "vectors": sum(contents.full_lengths),
        "pooled_vectors": sum(len(p) for p in contents.pooled) if contents.pooled else None,
        "bytes": folder_bytes(index),
        "documents_encoded": encoded,
        "documents_skipped": skipped,
        "objects_dropped": dropped,
        "seconds": round(seconds, 2),
    }


def summary_line(index: str, s: dict) -> str:
    pooled = f" ({s['pooled_vectors']} pooled)" if s["pooled_vectors"] is not None else ""
    return (
        f"index {index}: {s['documents']} documents, {s['pages']} pages, {s['vectors']} vectors{pooled}, "
        f"{s['bytes'] / 2**20:.1f} MiB; {s['documents_encoded']} documents encoded, {s['documents_skipped']} "
        f"skipped, {s['objects_dropped']} dropped; {s['seconds']:.1f} s"
    )


# -----------------------------------------------------------------------------
# Reading the index back


@dataclasses.dataclass
class IndexVectors:
    refs: list  # (path, 1-based page) of every page, in catalog order
    full: list  # (L_i, D) fp16 per page, memory-mapped (touched only where scored)
    full_lengths: list
    pooled: list  # (L'_i, D) fp16 per page; [] for an unpooled index


def open_index(index: str) -> tuple:
    """-> (identity, catalog) of a finished or interrupted index; anything else is one line."""
    if not os.path.isdir(index):
        raise UserFileNotFoundError(
            f"--index {index} does not exist: build it with `python search.py index --ckpt "
            f"CKPT --docs FOLDER --index {index}`"
        )
    if not os.path.isfile(os.path.join(index, "index.json")):
        raise UserValueError(
            f"--index {index} is not a search index (no index.json): pass the folder `search.py index` wrote"
        )
    if not os.path.isfile(os.path.join(index, "catalog.json")):
        raise UserValueError(
            f"--index {index} is half-written (no catalog.json: its first index run stopped before "
            f"any page was stored): run the same index command again"
        )
    return read_json(os.path.join(index, "index.json"), "the index's identity"), read_catalog(index)


def load_index_vectors(index: str, docs: list, full: bool = True) -> IndexVectors:
    """Every page of `docs` (Documents or catalog rows), memory-mapped from its chunks."""
    import torch

    out = IndexVectors([], [], [], [])
    for doc in docs:
        path, sha = (doc.path, doc.sha256) if isinstance(doc, Document) else doc
        chunks = stored_chunks(index, sha)
        if chunks is None:
            raise UserValueError(
                f"--index {index}: the pages of {path} are missing (objects/{sha}): run the index command again"
            )
        for name in chunks:
            first = int(name.split("_")[1].split("-")[0])
            file = os.path.join(object_folder(index, sha), name)
            try:
                chunk = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise UserValueError(
                    f"--index {index}: {file} cannot be read ({type(e).__name__}): delete it and "
                    f"run the index command again"
                ) from e
            out.refs += [(path, first + i) for i in range(len(chunk["full_lengths"]))]
            out.full_lengths += chunk["full_lengths"]
            if full:
                out.full += list(torch.split(chunk["full"], chunk["full_lengths"]))
            if chunk["pooled"] is not None:
                out.pooled += list(torch.split(chunk["pooled"], chunk["pooled_lengths"]))
    return out


# -----------------------------------------------------------------------------
# query


def read_questions(args) -> list:
    if args.queries is None:
        questions = args.questions
    else:
        with open(args.queries) as f:
            questions = [line.strip() for line in f if line.strip()]
    if not questions or any(not q.strip() for q in questions):
        raise UserValueError(f"{args.queries or 'QUESTION'}: no questions, or an empty one")
    return questions


def load_model_for_query(identity: dict, device: str, say):
    """The model the index was built with; refused if its weights or settings no longer give the same vectors."""
    from colintern_model import ColIntern

    m = identity["model"]
    model, processor, _ = ColIntern.from_checkpoint(
        m["ckpt"],
        model_id=m["model_id"],
        dtype=m["dtype"],
        max_tiles=m["max_tiles"],
        quantize=m["quantize"],
        device_map=device if device.startswith("cuda") else None,
        attn_implementation=m["attn_implementation"],
        dim=m["dim"],
        say=say,
    )
    differs = embedding_differences(
        identity["embedding"], model.embedding_identity(identity["embedding"]["pool_factor"])
    )
    if differs:
        raise UserValueError(
            f"the index's model {m['ckpt']} no longer gives the vectors the index holds "
            f"({', '.join(differs)} differ: its weights, backbone or the code changed since): "
            f"index the documents again into a new --index folder"
        )
    return model.eval(), processor


def search_local(queries: list, vectors: IndexVectors, args, device: str, dtype) -> list:
    """-> per query [(page index, score)] best first: exact MaxSim over full vectors, or the pooled first stage and
    the exact rerank of its --rerank best."""
    from colintern_scoring import maxsim_scores, maxsim_topk, top_k_by_index

    if args.exact or not vectors.pooled:
        values, indices = maxsim_topk(queries, vectors.full, args.top, device=device, dtype=dtype)
        return [list(zip(i.tolist(), v.tolist())) for v, i in zip(values, indices)]
    depth = args.rerank or args.top
    values, indices = maxsim_topk(queries, vectors.pooled, depth, device=device, dtype=dtype)
    if not args.rerank:
        return [list(zip(i.tolist(), v.tolist())) for v, i in zip(values, indices)]
    hits = []
    for q, cand in zip(queries, indices):
        exact = maxsim_scores([q], [vectors.full[j] for j in cand.tolist()], device=device, dtype=dtype)  # (1, N)
        v, i = top_k_by_index(exact, cand[None], args.top)
        hits.append(list(zip(i[0].tolist(), v[0].tolist())))
    return hits


def query_command(args):
    from colintern_scoring import dtype_name, matmul_dtype, score_dtype

    def say(*a):
        print(*a, file=sys.stderr)

    if args.html:
        check_output(args.html, "--html")
    identity, catalog = open_index(args.index)
    questions = read_questions(args)
    if not catalog["complete"]:
        say(
            f"note: the last index run on {args.index} did not finish: searching the "
            f"{len(catalog['documents'])} documents it completed"
        )
    device = device_for(args.device)
    dtype = score_dtype(args.score_dtype or identity["score_dtype"], device)
    say(f"score dtype {dtype_name(dtype)} (multiplied in {dtype_name(matmul_dtype(dtype, device))} on {device})")
    model, processor = load_model_for_query(identity, device, say)
    start = time.perf_counter()
    queries = model.encode_queries(processor, questions, batch_size=args.query_batch)
    encode_s = time.perf_counter() - start
    if args.qdrant:
        results = qdrant_search(args, identity, queries)
    else:
        docs = [(path, row["sha256"]) for path, row in catalog["documents"].items()]
        vectors = load_index_vectors(args.index, docs)
        start = time.perf_counter()
        hits = search_local(queries, vectors, args, device, dtype)
        results = [
            [{"path": vectors.refs[j][0], "page": vectors.refs[j][1], "score": round(s, 4)} for j, s in row if j >= 0]
            for row in hits
        ]
        say(
            f"{len(vectors.refs)} pages searched in {time.perf_counter() - start:.3f} s "
            f"(queries encoded in {encode_s:.3f} s)"
        )
    answers = [{"query": q, "results": r} for q, r in zip(questions, results)]
    if args.json:
        print(json.dumps(answers, indent=2, ensure_ascii=False))
    else:
        print(results_text(answers))
    if args.html:
        write_html(args.html, answers, catalog["documents"], identity["dpi"])
        say(f"wrote {args.html}")
    return answers


def results_text(answers: list) -> str:
    lines = []
    for n, a in enumerate(answers, 1):
        lines.append(f"[{n}] {a['query']}")
        lines += [f"  {r['score']:9.4f}  {r['path']}  page {r['page']}" for r in a["results"]]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# --html: the hits as page thumbnails; every path and question is user input, so every one is escaped


def thumbnail_uri(path: str, page: int, row: dict | None, dpi: int) -> str | None:
    """The page as a small JPEG data URI, or None when its file changed since it was indexed (or is gone)."""
    try:
        stat = os.stat(path)
        if row is None or (stat.st_size, stat.st_mtime_ns) != (row["size"], row["mtime_ns"]):
            return None
        doc = Document(path, row["sha256"], row["size"], row["mtime_ns"], row["pages"])
        image = next(render_pages(doc, page, page, dpi))
    except (OSError, DocumentError):
        return None
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


HTML_HEAD = """<!doctype html>
<html><head><meta charset="utf-8"><title>ColIntern search</title><style>
body{font-family:sans-serif;margin:1.5em}section{margin-bottom:2em}h2{font-size:1.1em}
.hits{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0;width:THUMBNAIL_PXpx}
img{max-width:100%;border:1px solid #999}figcaption{font-size:.85em;word-break:break-all}
.missing{height:120px;border:1px dashed #999;display:flex;align-items:center;justify-content:center}
</style></head><body><h1>ColIntern search</h1>
""".replace("THUMBNAIL_PX", str(THUMBNAIL_PX))


def hit_html(hit: dict, rank: int, uri: str | None) -> str:
    link = html.escape("file://" + urllib.parse.quote(hit["path"]), quote=True)
    name = html.escape(hit["path"])
    image = (
        f'<img src="{uri}" alt="page {hit["page"]}">'
        if uri
        else '<div class="missing">file changed since indexing</div>'
    )
    return (
        f'<figure><a href="{link}">{image}</a><figcaption>{rank}. score {hit["score"]:.4f}<br>'
        f"{name}, page {hit['page']}</figcaption></figure>"
    )


def write_html(path: str, answers: list, documents: dict, dpi: int) -> None:
    parts = [HTML_HEAD]
    for a in answers:
        parts.append(f'<section><h2>{html.escape(a["query"])}</h2><div class="hits">')
        parts += [
            hit_html(h, n, thumbnail_uri(h["path"], h["page"], documents.get(h["path"]), dpi))
            for n, h in enumerate(a["results"], 1)
        ]
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


# -----------------------------------------------------------------------------
# Qdrant: multivector points (MAX_SIM), a pooled first stage, MaxSim over the full vectors


def qdrant_client(location: str):
    """A server's URL, or a folder for qdrant-client's local mode (in process, on disk, brute force)."""
    try:
        from qdrant_client import QdrantClient
    except ImportError as e:
        raise UserImportError("--qdrant needs qdrant-client: pip install -r requirements-qdrant.txt") from e
    if location.startswith(("http://", "https://")):
        return QdrantClient(url=location)
    return QdrantClient(path=location)


def point_id(path: str, sha256: str, page: int) -> str:
    """A page's point id: the same page of the same file and content gets the same id in every run (upserts are
    idempotent; an interrupted sync resumes)."""
    return str(uuid.uuid5(QDRANT_NAMESPACE, f"{path}\0{sha256}\0{page}"))


def ensure_collection(client, name: str, identity: dict, pooled: bool) -> None:
    """Multivector fields with MAX_SIM: `full` without an HNSW graph (m=0: only ever scored, in the rerank), and
    `pooled` with one (the first stage), as Qdrant advises for late interaction. The index identity rides in a
    marker point's payload: a collection of another model is refused."""
    from qdrant_client import models

    dim = identity["embedding"]["proj_dim"]
    multi = models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)
    fields = {
        "full": models.VectorParams(
            size=dim, distance=models.Distance.DOT, multivector_config=multi, hnsw_config=models.HnswConfigDiff(m=0)
        )
    }
    if pooled:
        fields["pooled"] = models.VectorParams(size=dim, distance=models.Distance.DOT, multivector_config=multi)
    marker = str(uuid.uuid5(QDRANT_NAMESPACE, "colintern-index-identity"))
    if not client.collection_exists(name):
        client.create_collection(name, vectors_config=fields)
        client.upsert(name, [models.PointStruct(id=marker, vector={}, payload={"colintern_identity": identity})])
        return
    found = client.retrieve(name, [marker], with_payload=True)
    if not found or found[0].payload.get("colintern_identity", {}).get("embedding") != identity["embedding"]:
        raise UserValueError(
            f"--collection {name} holds points of another model or settings (or none of "
            f"search.py's): pass another --collection"
        )


def qdrant_sync(location: str, name: str, index: str, identity: dict) -> dict:
    """Make the collection hold exactly the local index's pages: upsert the missing ones, delete the others."""
    from qdrant_client import models

    client = qdrant_client(location)
    _, catalog = open_index(index)
    docs = [(path, row["sha256"]) for path, row in catalog["documents"].items()]
    vectors = load_index_vectors(index, docs)
    ensure_collection(client, name, identity, bool(vectors.pooled))
    sha = dict(docs)
    ids = [point_id(path, sha[path], page) for path, page in vectors.refs]
    present = existing_points(client, name)
    todo = [i for i, pid in enumerate(ids) if pid not in present]
    for s in progress_bar(
        range(0, len(todo), QDRANT_UPSERT_PAGES), desc="qdrant upsert", unit="batch", disable=not todo
    ):
        batch = todo[s : s + QDRANT_UPSERT_PAGES]
        client.upsert(
            name,
            [
                models.PointStruct(
                    id=ids[i],
                    payload={"path": vectors.refs[i][0], "page": vectors.refs[i][1], "sha256": sha[vectors.refs[i][0]]},
                    vector={
                        "full": vectors.full[i].float().tolist(),
                        **({"pooled": vectors.pooled[i].float().tolist()} if vectors.pooled else {}),
                    },
                )
                for i in batch
            ],
        )
    stale = sorted(present - set(ids))
    if stale:
        client.delete(name, points_selector=models.PointIdsList(points=stale))
    client.close()
    return {"collection": name, "upserted": len(todo), "deleted": len(stale), "points": len(ids)}


def existing_points(client, name: str) -> set:
    """Ids of the collection's page points (its identity marker left out)."""
    ids, offset = set(), None
    while True:
        points, offset = client.scroll(name, limit=1024, offset=offset, with_payload=["path"], with_vectors=False)
        ids.update(str(p.id) for p in points if p.payload and "path" in p.payload)
        if offset is None:
            return ids


def qdrant_search(args, identity: dict, queries: list) -> list:
    """Each query's --top pages from the collection: the pooled field's --rerank best (prefetch), then MaxSim over
    their full multivectors; an unpooled index (or --exact) scores the full field alone."""
    from qdrant_client import models

    client = qdrant_client(args.qdrant)
    if not client.collection_exists(args.collection):
        raise UserValueError(
            f"--collection {args.collection} does not exist at --qdrant {args.qdrant}: run the "
            f"index command with these flags first"
        )
    pooled = identity["embedding"]["pool_factor"] > 1
    ensure_collection(client, args.collection, identity, pooled)
    first_stage = pooled and not args.exact
    out = []
    for q in queries:
        vector = q.float().tolist()
        if first_stage and not args.rerank:  # pooled scores alone
            found = client.query_points(
                args.collection, query=vector, using="pooled", limit=args.top, with_payload=True
            ).points
        else:
            prefetch = models.Prefetch(query=vector, using="pooled", limit=args.rerank) if first_stage else None
            found = client.query_points(
                args.collection, query=vector, using="full", prefetch=prefetch, limit=args.top, with_payload=True
            ).points
        out.append([{"path": p.payload["path"], "page": p.payload["page"], "score": round(p.score, 4)} for p in found])
    client.close()
    return out


if __name__ == "__main__":
    run_cli(main, parse_args())
