"""colintern_data.py: triples, page datasets, PageResolver (the one place pages are opened) and the content hashes,
also through the train and mine paths that open pages with it."""

import hashlib
import json
import os
import re

import datasets
import pytest
from test_export import checkpoint, run_export  # noqa: F401 (checkpoint: test_export's fixture, a tiny .pt)

import colintern_checkpoint as ck
import colintern_data
import mine_hard_negatives as mine
import train
from colintern_data import PageResolver, pseudo_path


def save_dataset(folder, columns: dict):
    """A save_to_disk folder; an 'image' column of PIL images or of {"bytes", "path"} values is cast to Image."""
    ds = datasets.Dataset.from_dict(columns)
    if "image" in columns:
        ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(folder))
    return str(folder)


# -- triples -------------------------------------------------------------------------


def test_read_triples_errors_name_file_and_line(tmp_path):
    good = tmp_path / "ok.jsonl"
    good.write_text('{"query": "q1", "pos": "a.png", "negs": ["b.png"]}\n\n{"query": "q2", "pos": "c.png"}\n')
    rows = colintern_data.read_triples(str(good))
    assert [(r["query"], r["negs"], r["line"]) for r in rows] == [("q1", ["b.png"], 1), ("q2", [], 3)]
    cases = {
        '{"query": "q", "pos": "a.png"}\n{"query": "q", \n': "line 2: not valid JSON",
        '{"query": "q"}\n': "line 1: 'pos' is missing",
        '{"query": "", "pos": "a.png"}\n': "line 1: 'query' is missing or empty",
        '{"query": "q", "pos": "a.png", "negs": "b.png"}\n': "line 1: 'negs' must be a list",
        "\n": "has no triples",
    }
    for i, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"bad{i}.jsonl {message}" if "line" in message else message):
            colintern_data.read_triples(str(bad))


# -- page datasets and PageResolver ----------------------------------------------------


def test_page_resolver_files_and_pseudo_paths(tmp_path, keyword_page):
    pages = [keyword_page(w) for w in ["alpha", "beta", "gamma"]]
    folder = save_dataset(tmp_path / "sets" / "mini", {"query": ["a", "b", "c"], "image": pages})
    keyword_page("file").save(tmp_path / "p.png")
    resolve = PageResolver(root=str(tmp_path))
    assert resolve("p.png", "x.jsonl line 1").size == (224, 224)
    ref = pseudo_path(folder, "train", 2)
    assert ref == f"{folder}/train/doc_2.png"
    assert resolve(ref, "x.jsonl line 2").tobytes() == pages[2].convert("RGB").tobytes()
    with pytest.raises(IndexError, match="x.jsonl line 4: .*row 9 but .* has 3 rows"):
        resolve(pseudo_path(folder, "train", 9), "x.jsonl line 4")
    with pytest.raises(FileNotFoundError, match="x.jsonl line 5: page 'nope.png' is neither a file"):
        resolve("nope.png", "x.jsonl line 5")
    with pytest.raises(FileNotFoundError, match="x.jsonl line 6: .*dataset .*missing.* cannot be opened"):
        resolve(pseudo_path(str(tmp_path / "missing"), "train", 0), "x.jsonl line 6")
    # root=None: a --train_hub dataset's own rows, never a file that happens to share the name
    assert PageResolver(root=None)(ref, "row 2").tobytes() == pages[2].convert("RGB").tobytes()
    with pytest.raises(FileNotFoundError, match="'p.png' is neither a file under --root None"):
        PageResolver(root=None)("p.png", "row 0")


def test_load_page_dataset_names_a_missing_or_empty_dataset(tmp_path):
    empty = tmp_path / "empty"
    (empty / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"query": ["x"]}).select([]).to_parquet(
        str(empty / "data" / "train-00000-of-00001.parquet")
    )
    with pytest.raises(ValueError, match="dataset .*empty split 'train'.*(is empty|no data)"):
        colintern_data.load_page_dataset(str(empty), "train")
    with pytest.raises(FileNotFoundError, match="dataset folder .*nowhere does not exist"):
        colintern_data.load_page_dataset(str(tmp_path / "nowhere"), "train")


def test_one_column_check_for_train_mine_and_pseudo_paths(tmp_path, keyword_page):
    no_query = save_dataset(tmp_path / "no_query", {"text": ["a"], "image": [keyword_page("a")]})
    message = (
        rf"dataset {no_query} split 'train' lacks column\(s\) \['query'\] \(it has \['text', 'image'\]\): "
        r"pages are read from an 'image' column and queries from 'query'"
    )
    with pytest.raises(ValueError, match=message):
        train.HubPairs(no_query, "train")
    with pytest.raises(ValueError, match=message):
        mine.hub_input(no_query, "train")
    # a page needs only 'image'; a JSONL pseudo-path into a dataset without one names the line
    no_image = save_dataset(tmp_path / "no_image", {"query": ["a"]})
    with pytest.raises(
        FileNotFoundError, match=r"t.jsonl line 3: .*lacks column\(s\) \['image'\] \(it has \['query'\]\)"
    ):
        PageResolver(".").check(pseudo_path(no_image, "train", 0), "t.jsonl line 3")


def test_empty_queries_are_refused_alike_by_train_and_mine(tmp_path, keyword_page):
    hub = save_dataset(tmp_path / "hub", {"query": ["q", " ", "q3"], "image": [keyword_page("a")] * 3})
    message = rf"--train_hub {hub} split 'train': rows \[1\] \(1 in all\) have an empty"  # one flag name in both
    with pytest.raises(ValueError, match=message):
        train.HubPairs(hub, "train")
    with pytest.raises(ValueError, match=message):
        mine.hub_input(hub, "train")


def mine_page(data, i):
    """What mine's DataLoader workers get for distinct page i."""
    return mine.PageImages(data, [i])[0]


def test_an_unreadable_page_is_named_once_with_its_line_by_train_and_mine(tmp_path, keyword_page):
    keyword_page("good").save(tmp_path / "good.png")
    keyword_page("other").save(tmp_path / "other.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(
        json.dumps({"query": "q", "pos": "good.png", "negs": ["other.png"]})
        + "\n\n"
        + json.dumps({"query": "q2", "pos": "broken.png", "negs": ["good.png"]})
        + "\n"
    )
    message = (
        rf"^{re.escape(str(jsonl))} line 3: page 'broken.png' cannot be read: image .*broken.png cannot be decoded: "
    )
    rows = train.JsonlTriples(str(jsonl), str(tmp_path), num_negs=1, seed=0)
    with pytest.raises(ValueError, match=message):
        rows[(0, 1)]
    data = mine.jsonl_input(str(jsonl), str(tmp_path))
    assert data.page_refs == ["good.png", "other.png", "broken.png"]  # hashing reads bytes and does not decode
    assert mine_page(data, 0).size == (224, 224)
    with pytest.raises(ValueError, match=message) as raised:
        mine_page(data, 2)
    assert str(raised.value).count("line 3") == 1  # raised once, not wrapped again


def test_an_undecodable_hub_row_is_named_by_train_and_mine(tmp_path, keyword_page):
    keyword_page("a").save(tmp_path / "a.png")
    good = (tmp_path / "a.png").read_bytes()
    hub = save_dataset(
        tmp_path / "hub",
        {"query": ["q0", "q1"], "image": [{"bytes": good, "path": None}, {"bytes": b"junk", "path": None}]},
    )
    ref = pseudo_path(hub, "train", 1)
    rows = train.HubPairs(hub, "train")
    assert rows[(0, 0)]["pos"].size == (224, 224)
    with pytest.raises(ValueError, match=rf"^--train_hub {hub} split 'train' row 1: page '{ref}' cannot be read: "):
        rows[(0, 1)]
    data = mine.hub_input(hub, "train")
    assert data.page_wheres == [f"--train_hub {hub} split 'train' row 0", f"--train_hub {hub} split 'train' row 1"]
    with pytest.raises(ValueError, match=rf"^--train_hub {hub} split 'train' row 1: page '{ref}' cannot be read: "):
        mine_page(data, 1)


# -- content hashes ------------------------------------------------------------------------


def test_content_hashes_of_files_and_dataset_rows_agree(tmp_path, keyword_page):
    keyword_page("a").save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    hub = save_dataset(tmp_path / "hub", {"query": ["q"], "image": [{"bytes": data, "path": None}]})
    resolver = PageResolver(str(tmp_path))
    expected = hashlib.sha1(data).hexdigest()  # the keys mining caches already hold
    assert colintern_data.file_sha1(str(tmp_path / "a.png")) == colintern_data.page_hash(data) == expected
    assert resolver.content_hash("a.png", "t.jsonl line 1") == expected
    assert resolver.content_hash(pseudo_path(hub, "train", 0), "t.jsonl line 2") == expected  # one page, not two
    with pytest.raises(FileNotFoundError, match="t.jsonl line 3: page 'b.png' is neither a file"):
        resolver.content_hash("b.png", "t.jsonl line 3")
    # several chunks hash as their concatenation: colintern_data.image_hash (mode, size, pixels) keeps the keys it had
    image = keyword_page("b")
    assert (
        colintern_data.page_hash(f"{image.mode}:{image.size}".encode(), image.tobytes())
        == hashlib.sha1(f"{image.mode}:{image.size}".encode() + image.tobytes()).hexdigest()
    )


def test_folder_hashes_walk_the_visible_files_and_keep_their_formats(tmp_path):
    """One walk (visible_files) behind the three folder hashes; each hash keeps the byte format its cache keys were
    made with (spelled out here), so existing mteb results and embedding caches stay valid."""
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".cache").mkdir()
    files = {"b.json": b"{}", "a.safetensors": b"w", "sub/c.txt": b"c", "sub/deeper/d.json": b"[1]"}
    for name, data in {**files, ".cache/x.json": b"hidden", ".e.json": b"hidden", "sub/.f.txt": b"hidden"}.items():
        (tmp_path / name).write_bytes(data)
    walked = colintern_data.visible_files(str(tmp_path))
    assert [rel for rel, _ in walked] == ["a.safetensors", "b.json", "sub/c.txt", "sub/deeper/d.json"]
    assert all(path == str(tmp_path / rel) for rel, path in walked)
    assert [rel for rel, _ in colintern_data.visible_files(str(tmp_path), (".json",))] == [
        "b.json",
        "sub/deeper/d.json",
    ]

    def sha(data):
        return hashlib.sha256(data).hexdigest().encode()

    content = hashlib.sha256(b"".join(rel.encode() + b"\0" + sha(files[rel]) for rel, _ in walked)).hexdigest()
    stamps = hashlib.sha256(
        "".join(f"{rel}:{os.stat(path).st_size}:{os.stat(path).st_mtime_ns}\n" for rel, path in walked).encode()
    ).hexdigest()
    assert colintern_data.folder_sha256(str(tmp_path)) == content
    assert colintern_data.files_fingerprint(str(tmp_path)) == stamps
    os.utime(tmp_path / "sub" / "c.txt", ns=(1, 1))  # touched, same bytes: only the cheap fingerprint moves
    assert colintern_data.folder_sha256(str(tmp_path)) == content
    assert colintern_data.files_fingerprint(str(tmp_path)) != stamps


# -- file modes ------------------------------------------------------------------------


@pytest.fixture(params=[(0o022, "0o644", "0o755"), (0o077, "0o600", "0o700")], ids=["umask022", "umask077"])
def umask_modes(request):
    """The process umask set for one test (restored after) and the modes open() and mkdir give under it: (file,
    folder). Two umasks, so that a hard-coded mode fails one of them."""
    umask, file_mode, folder_mode = request.param
    previous = os.umask(umask)
    yield file_mode, folder_mode
    os.umask(previous)


def modes(folder) -> dict:
    """The folder's mode (as ".") and each entry's, in octal, by name."""
    return {name: oct(os.stat(os.path.join(folder, name)).st_mode & 0o777) for name in [".", *os.listdir(folder)]}


def test_atomic_writes_follow_the_umask_as_open_does(tmp_path, umask_modes):
    """A checkpoint or eval JSON on a shared filesystem is readable by whom a plain open() would let read it
    (tempfile.mkstemp would make it 0600, and the rename keeps that)."""
    file_mode, folder_mode = umask_modes
    open(tmp_path / "plain.txt", "w").close()
    assert modes(tmp_path)["plain.txt"] == file_mode  # the oracle: what open() makes under this umask
    run = tmp_path / "run"
    with colintern_data.atomic_path(str(run / "training_loss.txt")) as tmp, open(tmp, "w") as f:
        f.write("1 0.5\n")
    colintern_data.write_json(str(run / "eval.json"), {"benchmarks": {}})
    ck.atomic_torch_save({"step": 1}, str(run / "colintern_heads_step1.pt"))
    assert modes(run) == {
        ".": folder_mode,
        "training_loss.txt": file_mode,
        "eval.json": file_mode,
        "colintern_heads_step1.pt": file_mode,
    }  # and no temp file left


def test_exported_folder_follows_the_umask(checkpoint, tmp_path, umask_modes):  # noqa: F811
    """The export's hidden temp folder (tempfile.mkdtemp would make it 0700) is renamed into place as --out_dir,
    and the safetensors files (0600 from safetensors 0.8 on) get the mode open() gives (follow_umask). An empty
    --out_dir already there is replaced through the .old folder."""
    file_mode, folder_mode = umask_modes
    (tmp_path / "empty").mkdir()
    for out_dir in [tmp_path / "new", tmp_path / "empty"]:
        run_export("--ckpt", checkpoint, "--out_dir", out_dir, "--name", "me/colintern-tiny")
        for folder, folders, files in os.walk(out_dir):  # sentence-transformers' modules are in subfolders
            assert modes(folder) == {
                ".": folder_mode,
                **dict.fromkeys(folders, folder_mode),
                **dict.fromkeys(files, file_mode),
            }
    assert sorted(os.listdir(tmp_path)) == ["empty", "new"]  # no temp or .old folder left


def test_tiny_model_folder_follows_the_umask(tmp_path, umask_modes):
    """make_tiny_model's save_pretrained writes model.safetensors through safetensors' own 0600 temp file: the
    folder's files end with open()'s mode all the same."""
    import make_tiny_model

    file_mode, folder_mode = umask_modes
    make_tiny_model.main(make_tiny_model.parse_args(["--out", str(tmp_path / "tiny")]))
    assert modes(tmp_path / "tiny") == {".": folder_mode, **dict.fromkeys(os.listdir(tmp_path / "tiny"), file_mode)}
