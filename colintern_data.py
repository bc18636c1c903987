"""ColIntern's data and file helpers: page datasets, page references, query rows, content hashes, atomic writes.

No torch here: make_synthetic_data.py's rendering workers and the plot scripts import it cheaply. Everything that
opens a page (a file under --root, or a row of a hub dataset named by its pseudo-path) goes through PageResolver,
whose errors name the page and where it was referenced (file and line, or dataset row).
"""

import contextlib
import hashlib
import json
import os
import re
import secrets

from PIL import Image, UnidentifiedImageError

from colintern_cli import (
    UserFileNotFoundError,
    UserIndexError,
    UserValueError,
    looks_like_hub_id,
    looks_like_local_path,
)

# -----------------------------------------------------------------------------
# Files: content hashes, atomic writes


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_sha1(path: str) -> str:
    """sha1 of a file's bytes (hex): a page file's page_hash, and a training JSONL's identity (sha1 because step
    snapshots and mining caches already record it so)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def page_hash(*chunks: bytes) -> str:
    """Content hash of a page (sha1, hex): of its stored bytes (mining finds repeated pages before decoding any), or
    of its mode, size and pixels (image_hash)."""
    h = hashlib.sha1()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


def image_hash(image) -> str:
    """Content hash of a decoded page image (mode, size, pixels): the key under which eval.py's language subsets
    share page embeddings."""
    if not hasattr(image, "tobytes"):
        raise TypeError(f"page is a {type(image).__name__}, not a PIL image")
    return page_hash(f"{image.mode}:{image.size}".encode(), image.tobytes())


def hashes_digest(hashes: list) -> str:
    """sha256 of a list of content hashes, in order: a mining shard's pages."""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()


def json_digest(obj, length: int) -> str:
    """The first `length` hex digits of the sha256 of `obj` as sorted JSON: a cache or result key of what it lists."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def tensors_digest(tensors) -> str:
    """sha256 of (name, tensor) pairs, in the order given: names, shapes and fp32 values (so the same weights held
    in another dtype or on another device hash alike)."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().float().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}\n".encode() + t.numpy().tobytes())
    return h.hexdigest()


def visible_files(folder: str, suffixes: tuple = ()) -> list:
    """(path relative to `folder`, path) of every file under `folder` in a fixed order (sorted, folder by folder),
    hidden files and folders (such as the download cache `hf download` keeps) left out; only names ending in one of
    `suffixes` when given. The one walk behind every folder fingerprint."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".") and (not suffixes or f.endswith(suffixes))):
            path = os.path.join(root, name)
            found.append((os.path.relpath(path, folder), path))
    return found


def backbone_fingerprint(model_id: str) -> str:
    """A cheap content fingerprint of a backbone: a local folder's config and weight files (name, size, first and
    last MiB: random or retrained weights differ everywhere), or a hub id with its cached snapshot's commit (a moved
    snapshot is another backbone)."""
    if os.path.isdir(model_id):
        h = hashlib.sha256()
        for name in sorted(os.listdir(model_id)):
            path = os.path.join(model_id, name)
            if not os.path.isfile(path) or not name.endswith((".json", ".safetensors", ".bin")):
                continue
            size = os.path.getsize(path)
            h.update(f"{name}:{size}".encode())
            with open(path, "rb") as f:
                h.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(-(1 << 20), os.SEEK_END)
                    h.update(f.read())
        return h.hexdigest()
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model_id, "config.json")
    snapshot = re.search(r"snapshots[/\\]([0-9a-f]{40})", cached) if isinstance(cached, str) else None
    return f"{model_id}@{snapshot[1]}" if snapshot else model_id


def files_fingerprint(folder: str) -> str:
    """A cheap fingerprint of a local folder (a dataset copy): every visible file's path, size and modification
    time. Editing a file changes it."""
    h = hashlib.sha256()
    for rel, path in visible_files(folder):
        stat = os.stat(path)
        h.update(f"{rel}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def folder_sha256(folder: str) -> str:
    """Content hash of a folder (sha256, hex): every visible file's path and sha256. Touching a file without
    changing its bytes keeps it."""
    h = hashlib.sha256()
    for rel, path in visible_files(folder):
        h.update(rel.encode() + b"\0" + file_sha256(path).encode())
    return h.hexdigest()


def safe_name(text: str) -> str:
    """`text` with every character but letters, digits, '_', '.' and '-' replaced by '_': a label fit for a file or
    task name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def local_checkpoint(path: str) -> str:
    """A trained model's name -> where it is on disk: a .pt file or an exported folder as given; a hub id of an
    exported folder (owner/name) -> its snapshot, downloaded into the hub cache unless already there."""
    if not looks_like_hub_id(path):
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path)
    except Exception as e:  # offline, no such repository, gated, ...: the hub's own message, on one line
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise UserFileNotFoundError(
            f"{path} is no local file or folder, and downloading it as a hub repository failed "
            f"({reason[:300]}). Offline: on a machine with internet run `hf download {path} "
            f"--local-dir DIR` and pass DIR"
        ) from e


def create_beside(path: str, suffix: str, folder: bool = False) -> str:
    """Create an empty hidden file (or folder) `.<name>.<random><suffix>` beside `path`; return its path. Its mode
    is what open() (or os.mkdir) gives: 0666 (0777) less the umask, or the parent's default ACL. tempfile.mkstemp
    and mkdtemp make theirs 0600 (0700) instead, the rename into place keeps that, and a teammate on a shared
    filesystem could not read the checkpoint or exported folder. Creating with the mode, rather than reading the
    umask to chmod, leaves the process-global umask untouched."""
    parent, name = os.path.split(os.path.abspath(path))
    while True:
        tmp = os.path.join(parent, f".{name}.{secrets.token_hex(4)}{suffix}")
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # another writer's temp name: draw another
            continue


def check_output(path: str, flag: str, kind: str = "file") -> None:
    """Before any work, that an output can be written where the user asked: `kind` "file" (not an existing
    folder), "folder" (not an existing file), or "beside" (a file or folder made beside `path`, in its parent). A
    mistake is one line now, naming the flag and the path as typed, not a temporary file's name after the work.
    Makes the folders it needs (the script would anyway) and writes and removes one probe file."""
    if kind == "file" and os.path.isdir(path):
        raise UserValueError(f"{flag} {path} is a folder: pass the path of the file to write")
    if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
        raise UserValueError(f"{flag} {path} is a file: pass a folder")
    where = path if kind == "folder" else os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(where, exist_ok=True)
        open_mode(where)
    except OSError as e:
        at = "" if e.filename in (None, path, where) else f": {e.filename}"
        raise UserValueError(f"{flag} {path}: nothing can be written there ({e.strerror}{at})") from None


def open_mode(folder: str) -> int:
    """The permission bits open() gives a new file in `folder` (the umask's, or the folder's default ACL's), read off
    a probe file made and removed there; raises the OSError of a folder where nothing can be written."""
    probe = create_beside(os.path.join(folder, "mode"), ".probe")
    try:
        return os.stat(probe).st_mode & 0o777
    finally:
        os.remove(probe)


def follow_umask(folder: str) -> None:
    """Hack: safetensors (0.8; its issue #782) writes through a temp file of mode 0600 that it renames into place,
    whatever the umask, so save_pretrained's and save_file's weights come out unreadable to a teammate. Give every
    file directly in `folder` the mode open() gives a new file there."""
    mode = open_mode(folder)
    for name in os.listdir(folder):
        if os.path.isfile(os.path.join(folder, name)):
            os.chmod(os.path.join(folder, name), mode)


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temp path beside `path` to write; on success it is renamed over `path`, on any error removed, so a
    crash leaves the previous file intact. The temp name starts with '.' so that a leftover never matches a
    data-files pattern like `data/train-*`; the file's mode follows the umask, as open()'s would."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = create_beside(path, ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_jsonl(path: str, rows) -> None:
    """Write dicts one per line, atomically (a crash leaves any previous file intact)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path: str, obj) -> None:
    """Write one indented JSON document, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


# -----------------------------------------------------------------------------
# Datasets and pages: hub datasets, local folders, HF pseudo-paths


@contextlib.contextmanager
def datasets_cache_for(folder: str):
    """Load a local folder through a datasets cache of its own. datasets 5.x caches a folder whose README has a
    `configs:` block under the folder's name and config alone, ignoring the files read: another folder of the same
    name (two `eval` sets, a regenerated copy) would silently load the first one's data. The cache here is keyed
    by the folder's path and its files_fingerprint."""
    import datasets

    key = hashlib.sha256(f"{os.path.abspath(folder)}\n{files_fingerprint(folder)}".encode()).hexdigest()[:16]
    previous = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = os.path.join(previous, "colintern_local", key)
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_CACHE = previous


def load_page_dataset(name: str, split: str = "train"):
    """A hub dataset (`vidore/colpali_train_set`) or a local folder with its columns (`query`, `image`, ...):
    a `save_to_disk` folder, or a folder of data files in the hub layout (`data/train-*.parquet`)."""
    import datasets

    if not os.path.isdir(name) and looks_like_local_path(name):
        raise UserFileNotFoundError(f"dataset folder {name} does not exist")
    saved_to_disk = any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json"))
    try:
        if saved_to_disk:
            ds = datasets.load_from_disk(name)
        elif os.path.isdir(name):
            with datasets_cache_for(name):
                ds = datasets.load_dataset(name, split=split)
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise UserValueError(f"cannot open dataset {name} split {split!r}: {type(e).__name__}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserValueError(f"dataset folder {name} has splits {sorted(ds)}, not {split!r}")
        ds = ds[split]
    if len(ds) == 0:
        raise UserValueError(f"dataset {name} split {split!r} is empty")
    return ds


def open_image(path) -> Image.Image:
    """Open an image file as RGB, with an error that names the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise UserFileNotFoundError(f"image {path} does not exist") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserValueError(f"image {path} cannot be decoded: {e}") from e


def raw_images(ds):
    """The dataset with its 'image' column left as stored ({"bytes", "path"}): hashing must not decode every page."""
    import datasets

    return ds.cast_column("image", datasets.Image(decode=False))


def stored_page_hash(value, where: str) -> str:
    """page_hash of a raw_images 'image' value as stored, without decoding it; errors name `where`."""
    if isinstance(value, dict) and value.get("bytes"):
        return page_hash(value["bytes"])
    if isinstance(value, dict) and value.get("path") and os.path.isfile(value["path"]):
        return file_sha1(value["path"])
    raise UserValueError(f"{where}: the 'image' value holds no image bytes or readable file ({str(value)[:80]!r})")


PSEUDO_PATH = re.compile(r"^(?P<dataset>.+)/(?P<split>[^/]+)/doc_(?P<index>\d+)\.png$")


def pseudo_path(dataset: str, split: str, index: int) -> str:
    """How a page of a HF dataset is named in JSONL: `{dataset}/{split}/doc_{i}.png` is row i of that split."""
    return f"{dataset}/{split}/doc_{index}.png"


class PageResolver:
    """The one place a page reference is opened: a file under `root`, else an HF pseudo-path (row N of a dataset's
    split; with root=None, pseudo-paths only: the rows of a --train_hub dataset). Every error names
    the reference and `where` it came from ('file.jsonl line 3', "--train_hub NAME split 'train' row 5"), so
    callers need not wrap them.

    Each dataset is opened once (lazily, memory-mapped) and images are decoded on demand, so DataLoader workers
    can share one resolver."""

    def __init__(self, root: str | None = "."):
        self.root = root
        self._datasets, self._raw = {}, {}

    def dataset(self, name: str, split: str, columns=("image",)):
        """The dataset, opened once; refused, naming it, when it lacks any of `columns` (the one column check)."""
        if (name, split) not in self._datasets:
            self._datasets[(name, split)] = load_page_dataset(name, split)
        ds = self._datasets[(name, split)]
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise UserValueError(
                f"dataset {name} split {split!r} lacks column(s) {missing} (it has "
                f"{ds.column_names}): pages are read from an 'image' column and queries from "
                f"'query', as in vidore/colpali_train_set"
            )
        return ds

    def file(self, ref: str) -> str | None:
        """The file `ref` names under root, if there is one (files win over pseudo-paths)."""
        if self.root is not None and os.path.isfile(os.path.join(self.root, ref)):
            return os.path.join(self.root, ref)
        return None

    def check(self, ref: str, where: str = "") -> None:
        """Raise now if `ref` cannot resolve, without decoding it."""
        if self.file(ref):
            return
        m = PSEUDO_PATH.match(ref)
        if m is None:
            raise UserFileNotFoundError(
                f"{where}: page {ref!r} is neither a file under --root {self.root!r} nor an "
                f"HF pseudo-path 'DATASET/SPLIT/doc_N.png'"
            )
        try:
            ds = self.dataset(m["dataset"], m["split"])
        except Exception as e:
            raise UserFileNotFoundError(
                f"{where}: page {ref!r} is not a file under --root {self.root!r}, and its "
                f"dataset {m['dataset']!r} split {m['split']!r} cannot be opened: {e}"
            ) from e
        if int(m["index"]) >= len(ds):
            raise UserIndexError(
                f"{where}: page {ref!r} points at row {m['index']} but {m['dataset']} split "
                f"{m['split']!r} has {len(ds)} rows"
            )

    def __call__(self, ref: str, where: str = "") -> Image.Image:
        """`ref` decoded as RGB."""
        path = self.file(ref)
        if path:
            try:
                return open_image(path)
            except (OSError, ValueError) as e:  # open_image names the file; this adds the reference and its line
                raise UserValueError(f"{where}: page {ref!r} cannot be read: {e}") from e
        self.check(ref, where)
        m = PSEUDO_PATH.match(ref)
        try:
            image = self.dataset(m["dataset"], m["split"])[int(m["index"])]["image"]
        except Exception as e:  # datasets' decode errors name no row
            raise UserValueError(f"{where}: page {ref!r} cannot be read: {type(e).__name__}: {e}") from e
        if not isinstance(image, Image.Image):
            raise UserValueError(
                f"{where}: page {ref!r} cannot be read: 'image' is {type(image).__name__}, not an image"
            )
        return image.convert("RGB")

    def content_hash(self, ref: str, where: str) -> str:
        """page_hash of `ref` as stored (a file's bytes, a dataset row's image bytes), without decoding it."""
        self.check(ref, where)
        path = self.file(ref)
        if path:
            return file_sha1(path)
        m = PSEUDO_PATH.match(ref)
        key = (m["dataset"], m["split"])
        if key not in self._raw:
            self._raw[key] = raw_images(self.dataset(*key))
        return stored_page_hash(self._raw[key][int(m["index"])]["image"], f"{where}: page {ref!r}")


# -----------------------------------------------------------------------------
# Query rows: a training JSONL's triples, a hub dataset's queries


def read_triples(path: str) -> list:
    """Read a JSONL of `{"query": str, "pos": str, "negs": [str, ...]}` (negs optional; any other field is kept in
    the row's "fields", e.g. a source for train.py --batch_by). Errors name file and line."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(row, dict):
                raise UserValueError(f"{where}: expected a JSON object with 'query' and 'pos'")
            if not isinstance(row.get("query"), str) or not row["query"].strip():
                raise UserValueError(f"{where}: 'query' is missing or empty")
            if not isinstance(row.get("pos"), str) or not row["pos"]:
                raise UserValueError(f"{where}: 'pos' is missing or not a page path")
            negs = row.get("negs", [])
            if not isinstance(negs, list) or not all(isinstance(x, str) for x in negs):
                raise UserValueError(f"{where}: 'negs' must be a list of page paths")
            rows.append(
                {
                    "query": row["query"],
                    "pos": row["pos"],
                    "negs": negs,
                    "line": n,
                    "fields": {k: v for k, v in row.items() if k not in ("query", "pos", "negs")},
                }
            )
    if not rows:
        raise UserValueError(f"{path} has no triples")
    return rows


def read_queries(ds, what: str) -> list:
    """The 'query' column of a dataset whose rows are a query and its positive page (vidore/colpali_train_set's
    layout), refusing empty queries; `what` names the data, e.g. "--train_hub NAME split 'train'"."""
    queries = list(ds["query"])  # reads one column; images stay undecoded
    bad = [i for i, q in enumerate(queries) if not isinstance(q, str) or not q.strip()]
    if bad:
        raise UserValueError(
            f"{what}: rows {bad[:5]} ({len(bad)} in all) have an empty query; filter them out of the dataset first"
        )
    return queries


# -----------------------------------------------------------------------------
# Datasets in the hub layout (a README.md whose `configs:` block maps configs to parquet files): checked whole
# before anything loads


HUB_CONFIGS = ("corpus", "queries", "qrels")  # the ViDoRe v1 hub layout, which --local_task reads too
COLPALI_TRAIN_SET = "vidore/colpali_train_set"


def check_hub_layout(folder: str, configs: list, splits, what: str, hint: str = "") -> None:
    """Raise, naming the config and the path, unless `folder` holds every data file the loader will read: each
    config in README.md's `configs:` block, each split's files on disk, as many rows as its `dataset_info` says.
    datasets reads split names from the README without touching the files, so a partial download (only the English
    configs, a missing shard) would pass its checks and die mid-evaluation."""
    from datasets.data_files import resolve_pattern, sanitize_patterns

    card = read_card(folder)
    declared = {c.get("config_name", "default"): c for c in card.get("configs") or []}
    missing = [" or ".join(alts) for alts in configs if not any(c in declared for c in alts)]
    if missing:
        raise UserValueError(
            f"{what}: {folder} lacks the dataset configs {missing} (it has {list(declared)}). It needs the hub "
            "layout: a README.md whose `configs:` block maps each config to its parquet files (e.g. corpus -> "
            "corpus/test-*.parquet), as `hf download ... --repo-type dataset` gives"
        )
    rows = expected_rows(card)
    absent, short = [], []
    for alts in configs:
        config = next(c for c in alts if c in declared)
        if "data_files" not in declared[config]:
            continue  # a data_dir config: datasets finds its files itself
        have = sanitize_patterns(declared[config]["data_files"])
        lacking = [s for s in splits if s not in have]
        if lacking:
            raise UserValueError(f"{what}: {folder} config {config!r} has splits {list(have)}, not {lacking}")
        for split in splits:
            files = []
            for pattern in have[split]:
                try:
                    files += resolve_pattern(pattern, folder)
                except FileNotFoundError:
                    absent.append(f"{config!r} ({pattern})")
            found = parquet_rows(files)
            if files and found is not None and rows.get((config, split), found) != found:
                short.append(
                    f"{config!r} split {split!r} has {found} of the {rows[(config, split)]} rows its "
                    f"README lists ({len(files)} file(s))"
                )
    if absent:
        raise UserFileNotFoundError(
            f"{what}: {folder} is incomplete: its README.md lists data files that are not there (paths under the "
            f"folder), for config {', '.join(absent[:6])}"
            + (f" and {len(absent) - 6} more" if len(absent) > 6 else "")
            + f". {hint or 'Copy the missing files.'}"
        )
    if short:
        raise UserValueError(f"{what}: {folder} is incomplete: {'; '.join(short)}. {hint or 'Copy the missing files.'}")


def read_card(folder: str) -> dict:
    """The YAML header of a dataset folder's README.md ({} without one)."""
    from huggingface_hub.repocard import metadata_load

    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return {}
    try:
        return metadata_load(path) or {}
    except Exception as e:
        raise UserValueError(f"{path}: its YAML header cannot be read ({type(e).__name__}: {e})") from e


def expected_rows(card: dict) -> dict:
    """{(config, split): rows} from a README's `dataset_info` (one dict, or a list with config names)."""
    infos = card.get("dataset_info") or []
    infos = [infos] if isinstance(infos, dict) else infos
    return {
        (info.get("config_name", "default"), split["name"]): split["num_examples"]
        for info in infos
        for split in info.get("splits") or []
        if "num_examples" in split
    }


def parquet_rows(files: list) -> int | None:
    """Rows in these parquet files, from their footers (None unless all are parquet)."""
    if not files or not all(f.endswith(".parquet") for f in files):
        return None
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
