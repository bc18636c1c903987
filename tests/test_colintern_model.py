"""colintern_model.py: loading, encoders, exact MaxSim, loss, checkpoints, and the errors a user meets."""

import contextlib
import json
import math
import os
import platform
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import colintern_checkpoint as ck
import colintern_loss as cl
import colintern_model as cm
import colintern_scoring as cs
from colintern_model import ColIntern, ColInternProcessor, LoraSettings


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_dir):
    torch.manual_seed(0)
    return ColIntern.from_pretrained(
        tiny_model_dir, proj_dim=16, lora=LoraSettings(r=4, alpha=8, dropout=0.0), max_tiles=4
    )


def naive_maxsim(q, p):
    """Per-pair loop over unpadded token lists: sum over query tokens of the best page token."""
    return sum(max(float(qi @ pj) for pj in p) for qi in q)


# -- loading ------------------------------------------------------------------


def test_load_backbone_through_auto_classes_is_frozen_eval(tiny_model_dir):
    from transformers import InternVLModel

    backbone = cm.load_backbone(tiny_model_dir)
    assert type(backbone) is InternVLModel
    assert not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())
    processor = ColInternProcessor.from_pretrained(tiny_model_dir, max_tiles=3)
    assert processor.image_token_id == backbone.config.image_token_id


def test_attention_implementation_is_chosen_recorded_and_keyed(tiny_model_dir, keyword_page, tmp_path):
    """eager and sdpa agree to fp32 rounding, not bitwise; the one a model runs is in its checkpoint and in its
    embedding identity (the cache and result keys)."""
    pages = [keyword_page("attention", size=(448, 224)), keyword_page("x")]
    out = {}
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        model, processor = ColIntern.from_pretrained(
            tiny_model_dir, proj_dim=16, lora=LoraSettings(r=4, alpha=8), attn_implementation=impl
        )
        assert model.backbone.config.text_config._attn_implementation == impl
        assert model.backbone.config.vision_config._attn_implementation == impl
        assert model.embedding_identity()["attn_implementation"] == impl
        cm.save_checkpoint(str(tmp_path / f"{impl}.pt"), model)
        assert ck.load_checkpoint(str(tmp_path / f"{impl}.pt"))["meta"]["attn_implementation"] == impl
        out[impl] = torch.cat(model.encode_pages(processor, pages))
    # each attention sums <= L = 200 products per output in its own order: |error| <= L u per layer (u = 2^-24),
    # over the tower's 1 layer and the language model's 2, on unit vectors
    bound = 200 * 2**-24 * 3
    assert not torch.equal(out["sdpa"], out["eager"])
    torch.testing.assert_close(out["sdpa"], out["eager"], atol=bound, rtol=0)


def test_flash_attention_without_its_package_is_a_one_line_error(monkeypatch):
    real = cm.importlib.util.find_spec
    monkeypatch.setattr(
        cm.importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a)
    )
    with pytest.raises(ValueError, match="flash_attention_2 needs the flash-attn package"):
        cm.check_attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match="must be one of sdpa, eager, flash_attention_2, got 'flash'"):
        cm.check_attn_implementation("flash")


def test_lora_wraps_language_model_only(model_and_processor):
    model, _ = model_and_processor
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all("language_model" in n for n in lora)
    assert not any("vision_tower" in n for n, _ in model.named_modules() if "lora_" in n)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora) | {"query_head.weight", "query_head.bias", "page_head.weight", "page_head.bias"}


def test_missing_model_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model.*does not exist.*make_tiny_model"):
        cm.load_backbone(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ColInternProcessor.from_pretrained(str(tmp_path / "no-such-model"))


def test_remote_code_checkpoint_names_the_hf_id(tmp_path):
    folder = tmp_path / "InternVL3_5-1B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "auto_map": {}}))
    with pytest.raises(ValueError, match=r"remote-code.*InternVL3_5-1B-HF"):
        cm.load_backbone(str(folder))
    assert cm.hf_id_for("OpenGVLab/InternVL3_5-1B-Instruct") == "OpenGVLab/InternVL3_5-1B-HF"
    assert cm.hf_id_for("OpenGVLab/InternVL3_5-8B") == "OpenGVLab/InternVL3_5-8B-HF"


def test_missing_weight_key_is_an_error_not_a_random_init(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    dropped = next(k for k in weights if "layers.1.mlp.down_proj" in k)
    del weights[dropped]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="missing keys.*down_proj"):
        cm.load_backbone(str(broken))


def test_unexpected_weight_key_is_an_error(tiny_model_dir, tmp_path):
    broken = tmp_path / "extra"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["language_model.model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="unexpected keys"):
        cm.load_backbone(str(broken))


# -- processor and encoders ----------------------------------------------------


def test_query_format_and_empty_query(model_and_processor):
    _, processor = model_and_processor
    text = processor.query_texts(["what is shown?"])[0]
    assert text.startswith(cm.QUERY_PREFIX) and text.endswith(processor.tokenizer.pad_token * 10)
    batch = processor.process_queries(["a", "a longer query with more words"])
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # left padded
    for bad in ["", "   ", None]:
        with pytest.raises(ValueError, match="query 1 is empty"):
            processor.process_queries(["fine", bad])


def test_encoders_shapes_masks_norms(model_and_processor, keyword_page):
    model, processor = model_and_processor
    queries = ["short", "a much longer query about the revenue table on the page"]
    emb, mask = model.forward_queries(processor.process_queries(queries))
    assert emb.shape[:2] == mask.shape and emb.shape[-1] == 16
    lengths = [len(processor.tokenizer(t)["input_ids"]) for t in processor.query_texts(queries)]
    assert mask.sum(1).tolist() == lengths
    assert torch.allclose(emb[mask].norm(dim=-1), torch.ones(int(mask.sum())), atol=1e-5)
    assert torch.all(emb[~mask] == 0)

    pages = [keyword_page("alpha", size=(224, 224)), keyword_page("beta", size=(448, 224))]
    batch = processor.process_pages(pages)
    pemb, pmask = model.forward_pages(batch)
    # one tile (64 tokens) vs 2 tiles + thumbnail (192): exactly the image tokens are kept
    assert pmask.sum(1).tolist() == [64, 192]
    assert torch.equal(pmask, (batch["input_ids"] == processor.image_token_id) & batch["attention_mask"].bool())
    assert torch.allclose(pemb[pmask].norm(dim=-1), torch.ones(int(pmask.sum())), atol=1e-5)
    assert torch.all(pemb[~pmask] == 0)


def test_every_ingredient_of_an_embedding_or_a_score_changes_its_identity(tiny_model_dir, tmp_path, monkeypatch):
    """embedding_identity and score_identity, changed one ingredient at a time, each give a new key; the same model
    loaded again, or its backbone copied to another folder, gives the same one. Every entry is always present."""
    import make_tiny_model

    def key(identity):
        return json.dumps(identity, sort_keys=True)

    def build(backbone=tiny_model_dir, **kwargs):
        torch.manual_seed(0)
        return ColIntern.from_pretrained(backbone, **{"proj_dim": 16, "lora": LoraSettings(r=4, alpha=8), **kwargs})[0]

    base = build()
    identity = base.embedding_identity()
    assert key(identity) == key(build().embedding_identity())
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert key(build(str(copy)).embedding_identity()) == key(identity)  # content, not the folder's path
    rebuilt = tmp_path / "rebuilt"  # the same architecture with other weights, as a backbone rebuilt in place
    other, processor = make_tiny_model.build("tiny", tile=224, seed=1)
    other.save_pretrained(rebuilt)
    processor.save_pretrained(rebuilt)
    heads = build()
    with torch.no_grad():
        heads.page_head.weight[0, 0] += 1e-3
    quantized = build()
    quantized.quantize = "4bit"  # the loading itself is test_quantize's; here only what the identity reads
    variants = {
        "backbone": build(str(rebuilt)).embedding_identity(),
        "adapters": heads.embedding_identity(),
        "proj_dim": build(proj_dim=8).embedding_identity(),
        "max_tiles": build(max_tiles=2).embedding_identity(),
        "dtype": build(dtype="bf16").embedding_identity(),  # and the compute dtype with it
        "quantize": quantized.embedding_identity(),
        "attn_implementation": build(attn_implementation="eager").embedding_identity(),
        "bidirectional": build(bidirectional=True).embedding_identity(),
        "dim": build(matryoshka_dims=[16, 8], dim=8).embedding_identity(),
        "pool_factor": base.embedding_identity(pool_factor=3),
    }
    monkeypatch.setattr(cm, "FORMAT_VERSION", cm.FORMAT_VERSION + 1)
    variants["format_version"] = base.embedding_identity()
    monkeypatch.setattr(cm, "IDENTITY_VERSION", cm.IDENTITY_VERSION + 1)
    variants["identity_version"] = base.embedding_identity()
    monkeypatch.undo()
    assert set(identity) == set(variants) | {"compute_dtype"}
    for name, changed in variants.items():
        assert set(changed) == set(identity) and changed[name] != identity[name], name

    scores = cs.score_identity(identity, torch.float32, "cpu")
    monkeypatch.setattr(cs, "cpu_has_native_bf16", lambda: False)
    bf16_upcast = cs.score_identity(identity, torch.bfloat16, "cpu")
    monkeypatch.setattr(cs, "cpu_has_native_bf16", lambda: True)
    score_variants = {
        "embedding": cs.score_identity(variants["pool_factor"], torch.float32, "cpu"),
        "score_dtype": bf16_upcast,
        "matmul_dtype": cs.score_identity(identity, torch.bfloat16, "cpu"),
        "rerank": cs.score_identity(identity, torch.float32, "cpu", rerank=10),
    }
    monkeypatch.setattr(cs, "SCORING_VERSION", cs.SCORING_VERSION + 1)
    score_variants["scoring_version"] = cs.score_identity(identity, torch.float32, "cpu")
    assert bf16_upcast["matmul_dtype"] == "fp32" and score_variants["matmul_dtype"]["matmul_dtype"] == "bf16"
    assert set(scores) == set(score_variants) | {"dim"} and scores["dim"] == 16
    assert len({key(scores), *map(key, score_variants.values())}) == 1 + len(score_variants)


def test_bidirectional_attention_sees_later_tokens_ignores_padding_and_travels(tiny_model_dir, tmp_path):
    """--bidirectional: a query token's vector depends on the tokens after it (causal: not at all), padding changes
    nothing in either mode, sdpa and eager read their masks alike, and the checkpoint carries the setting into
    from_checkpoint. Causal models built with bidirectional=False compute exactly what they did."""

    def build(**kwargs):
        torch.manual_seed(0)
        return ColIntern.from_pretrained(tiny_model_dir, proj_dim=16, lora=LoraSettings(r=4, alpha=8), **kwargs)

    (causal, processor), (both, _) = build(), build(bidirectional=True)
    default = build(bidirectional=False)[0]
    a, b = "alpha beta gamma delta", "alpha beta gamma epsilon"  # the same first tokens, another last word
    long = "a much longer query " * 6 + "that pads the others on the left"

    def vectors(model, texts):
        return model.encode_queries(processor, texts, batch_size=len(texts))

    ca, cb = vectors(causal, [a])[0], vectors(causal, [b])[0]
    ba, bb = vectors(both, [a])[0], vectors(both, [b])[0]
    shared = 4  # "Query: alpha beta" tokens and more sit before the first word that differs
    # causal: the shared prefix computes the same products in the same order, up to the matmuls' blocking over
    # another sequence length (fp32: ~1e-6 on unit vectors); bidirectional: the later word moves every vector
    assert torch.allclose(ca[:shared], cb[:shared], atol=1e-5)
    assert (ba[:shared] - bb[:shared]).norm(dim=-1).min() > 1e-3
    for model in (causal, both):
        alone, padded = vectors(model, [a])[0], vectors(model, [long, a])[1]
        assert torch.allclose(alone, padded, atol=1e-5)
    assert all(torch.equal(x, y) for x, y in zip(vectors(default, [a, long]), vectors(causal, [a, long])))
    eager = build(bidirectional=True, attn_implementation="eager")[0]
    assert torch.allclose(vectors(eager, [long, a])[1], ba, atol=1e-5)
    cm.save_checkpoint(str(tmp_path / "both.pt"), both)
    loaded = ColIntern.from_checkpoint(str(tmp_path / "both.pt"))[0]
    assert loaded.bidirectional and ck.load_checkpoint(str(tmp_path / "both.pt"))["meta"]["bidirectional"]
    assert torch.equal(vectors(loaded, [a])[0], ba)
    assert both.embedding_identity()["bidirectional"] and not causal.embedding_identity()["bidirectional"]


def test_matryoshka_loss_is_the_sum_over_renormalised_prefixes():
    """The loss at dims (16, 8, 4) against a float64 computation written out here: per prefix, each vector cut and
    renormalised, MaxSim, divided by the query's length, InfoNCE at the temperature; summed. Masked tokens (zero
    vectors) stay out. fp32 against fp64: each score sums <= 12 maxima of 16-term dots, ~1e-6 relative, and the
    loss is a log-sum-exp of scores / 0.05: 1e-4 absolute is far above that and far below a wrong prefix's effect."""
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 12, 16, generator=g), dim=-1)
    p = F.normalize(torch.randn(5, 20, 16, generator=g), dim=-1)
    q_mask, p_mask = torch.ones(3, 12, dtype=torch.bool), torch.ones(5, 20, dtype=torch.bool)
    q_mask[0, 9:], p_mask[2, 15:] = False, False
    q, p = q * q_mask[..., None], p * p_mask[..., None]
    pos, temperature = torch.tensor([0, 1, 2]), 0.05

    def reference(d):
        qd = torch.nn.functional.normalize(q[..., :d].double(), dim=-1)
        pd = torch.nn.functional.normalize(p[..., :d].double(), dim=-1)
        scores = torch.tensor(
            [
                [
                    sum(
                        max(float(qd[i, a] @ pd[j, b]) for b in range(20) if p_mask[j, b])
                        for a in range(12)
                        if q_mask[i, a]
                    )
                    / int(q_mask[i].sum())
                    for j in range(5)
                ]
                for i in range(3)
            ],
            dtype=torch.float64,
        )
        return float(torch.nn.functional.cross_entropy(scores / temperature, pos))

    got = cl.contrastive_loss(q, q_mask, p, p_mask, pos, temperature, dims=[16, 8, 4])
    assert abs(float(got) - sum(reference(d) for d in (16, 8, 4))) < 1e-4
    assert abs(float(cl.contrastive_loss(q, q_mask, p, p_mask, pos, temperature)) - reference(16)) < 1e-4
    assert torch.equal(cl.matryoshka_prefix(q, 16), q) and torch.equal(
        cl.matryoshka_prefix(q, 8)[0, 9:], torch.zeros(3, 8)
    )


def test_a_matryoshka_model_encodes_at_any_trained_prefix(tiny_model_dir, keyword_page):
    """dim 8 of a model trained at (16, 8): vectors of size 8 and unit norm, the renormalised prefixes of the full
    ones; dim 16 (the full size) is exactly the model without --dim; an untrained size is one line."""

    def build(**kwargs):
        torch.manual_seed(0)
        return ColIntern.from_pretrained(
            tiny_model_dir, proj_dim=16, lora=LoraSettings(r=4, alpha=8), matryoshka_dims=[16, 8], **kwargs
        )

    (full, processor), small = build(), build(dim=8)[0]
    pages = [keyword_page("alpha"), keyword_page("beta", size=(448, 224))]
    f, s = full.encode_pages(processor, pages), small.encode_pages(processor, pages)
    for a, b in zip(f, s):
        assert b.shape == (a.shape[0], 8)
        assert torch.allclose(b.norm(dim=-1), torch.ones(len(b)), atol=1e-6)
        assert torch.allclose(b, F.normalize(a[:, :8], dim=-1), atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(f, build(dim=16)[0].encode_pages(processor, pages)))
    with pytest.raises(ValueError, match="--dim 4: this model was trained at 16, 8"):
        build(dim=4)


@pytest.mark.parametrize("dim", [32, 64, 96, 256])
def test_maxsim_scores_at_every_matryoshka_size(dim):
    """The scoring kernels take any vector size a prefix can have: against float64 per-pair MaxSim."""
    g = torch.Generator().manual_seed(dim)
    queries = [F.normalize(torch.randn(n, dim, generator=g), dim=-1) for n in (5, 9)]
    pages = [F.normalize(torch.randn(n, dim, generator=g), dim=-1) for n in (30, 7, 50)]
    got = cs.maxsim_scores(queries, pages)
    expected = torch.tensor(
        [[float((qq.double() @ pp.double().T).max(dim=1).values.sum()) for pp in pages] for qq in queries],
        dtype=torch.float64,
    )
    # fp32 dot products of unit vectors: |error| <= dim * 2^-24 per dot, summed over <= 9 query tokens
    assert torch.allclose(got.double(), expected, atol=9 * dim * 2**-24 * 2)


def test_encode_prepares_the_next_batch_before_fetching_the_last(model_and_processor, monkeypatch):
    """encode_queries keeps one batch in flight: batch k+1 is processed, pinned and its forward launched before batch
    k's embeddings are fetched (on a GPU, the CPU work overlaps the forward). The embeddings are exactly those of the
    same batches encoded one after the other. Pinning itself needs a GPU: here pin_batch is only seen being given
    every batch with the
    model's device (a CPU batch passes as it is)."""
    model, processor = model_and_processor
    queries = [f"query number {i} about page {i}" + " word" * i for i in range(5)]
    with torch.inference_mode():
        one_by_one = [
            e.float()
            for i in range(0, 5, 2)
            for e in cm.unpad(*model.forward_queries(processor.process_queries(queries[i : i + 2])))
        ]
    events, real_forward, real_unpad, real_pin = [], model.forward_queries, cm.unpad, cm.pin_batch
    monkeypatch.setattr(model, "forward_queries", lambda batch: events.append("forward") or real_forward(batch))
    monkeypatch.setattr(cm, "unpad", lambda emb, mask: events.append("fetch") or real_unpad(emb, mask))
    monkeypatch.setattr(
        cm, "pin_batch", lambda batch, device: events.append(("pin", str(device))) or real_pin(batch, device)
    )
    got = model.encode_queries(processor, queries, batch_size=2)
    pin = ("pin", "cpu")
    assert events == [pin, "forward", pin, "forward", "fetch", pin, "forward", "fetch", "fetch"]
    assert len(got) == 5 and all(torch.equal(a, b) for a, b in zip(got, one_by_one))
    batch = processor.process_queries(queries[:2])
    assert cm.pin_batch(batch, "cpu") is batch


def test_left_padding_does_not_change_embeddings(model_and_processor, keyword_page):
    model, processor = model_and_processor
    alone = model.encode_queries(processor, ["revenue"])[0]
    batched = model.encode_queries(processor, ["revenue", "a far longer query that forces left padding"])[0]
    assert torch.allclose(alone, batched, atol=1e-5)
    page = keyword_page("gamma", size=(224, 224))
    alone = model.encode_pages(processor, [page])[0]
    batched = model.encode_pages(processor, [page, keyword_page("delta", size=(448, 448))])[0]
    assert torch.allclose(alone, batched, atol=1e-5)


def stock_pages(processor, pages):
    """The stock InternVL processor's batch for `pages` (fp32 pixel_values, rescaled and normalised), with the
    tiling and prompt of process_pages."""
    return processor.hf(
        text=[processor.page_prompt] * len(pages),
        images=pages,
        padding="longest",
        padding_side="left",
        crop_to_patches=True,
        min_patches=1,
        max_patches=processor.max_tiles,
        return_tensors="pt",
    )


def test_uint8_pages_normalise_to_the_stock_pixels_and_embeddings(model_and_processor, keyword_page):
    model, processor = model_and_processor
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    # 1 tile; 2x2 tiles + thumbnail; 3x1 + thumbnail (non-square); noise (every value, resampled: 2x1 + thumbnail)
    pages = [
        keyword_page("alpha", size=(224, 224)),
        keyword_page("beta", size=(448, 448)),
        keyword_page("gamma", size=(672, 224)),
        noise,
    ]
    batch, stock = processor.process_pages(pages), stock_pages(processor, pages)
    assert batch["pixel_values"].dtype == torch.uint8 and stock["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].shape == stock["pixel_values"].shape == (1 + 5 + 4 + 3, 3, 224, 224)
    assert torch.equal(batch["input_ids"], stock["input_ids"])
    # Exact, not a tolerance: the model folds mean and std as the image processor does, (x - mean/rf) / (std/rf),
    # the same fp32 subtract and divide, so each value rounds identically. (The unfolded x * rf - mean form would
    # differ by up to ~5e-7, one or two fp32 ulps at |x| ~ 2.)
    assert torch.equal(model._pixels(batch["pixel_values"]), stock["pixel_values"])
    # so the backbone sees bitwise the same input, and float pixels from a caller still go in unchanged
    ours = model.encode_pages(processor, pages, batch_size=len(pages))
    with torch.inference_mode():
        theirs = cm.unpad(*model.forward_pages(stock))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_collate_sends_uint8_pages_a_quarter_of_fp32(model_and_processor, keyword_page):
    import train

    _, processor = model_and_processor
    examples = [
        {
            "query": f"about {w}",
            "pos": keyword_page(w, size=(448, 448)),
            "negs": [keyword_page(w + "!", size=(672, 224))],
        }
        for w in ("alpha", "beta")
    ]
    pixels = train.Collate(processor)(examples)["pages"]["pixel_values"]
    pages = [e["pos"] for e in examples] + [n for e in examples for n in e["negs"]]
    stock = stock_pages(processor, pages)["pixel_values"]
    assert pixels.dtype == torch.uint8 and pixels.shape == stock.shape
    assert pixels.nbytes * 4 == stock.nbytes


def test_uint8_pixels_fail_loudly_without_normalisation(tiny_model_dir, model_and_processor, keyword_page):
    _, processor = model_and_processor
    bare = ColIntern(cm.load_backbone(tiny_model_dir), proj_dim=8)  # built without the processor's mean and std
    with pytest.raises(ValueError, match="pixel_normalisation"):
        bare.forward_pages(processor.process_pages([keyword_page("alpha")]))
    with pytest.raises(ValueError, match="both image_mean and image_std"):
        ColIntern(bare.backbone, proj_dim=8, image_mean=[0.5, 0.5, 0.5])
    assert cm.as_uint8_pixels(torch.tensor([0.0, 17.0, 255.0])).tolist() == [0, 17, 255]
    with pytest.raises(ValueError, match="fractional"):
        cm.as_uint8_pixels(torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="not 0..255"):
        cm.as_uint8_pixels(torch.tensor([-1.0, 256.0]))


def test_not_an_image_is_named(model_and_processor, tmp_path):
    _, processor = model_and_processor
    bad = tmp_path / "page.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"page\.png cannot be decoded"):
        processor.process_pages([str(bad)])
    with pytest.raises(FileNotFoundError, match="missing.png does not exist"):
        processor.process_pages([str(tmp_path / "missing.png")])
    with pytest.raises(TypeError, match="page 0 is a str|page 0 is a int"):
        processor.process_pages([3])


# -- MaxSim ----------------------------------------------------------------------


def ragged(n, lengths, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.functional.normalize(torch.randn(lengths[i % len(lengths)], dim, generator=g), dim=-1)
        for i in range(n)
    ]


def test_maxsim_scores_equal_naive_loop_on_ragged_negative_inputs():
    queries = ragged(5, [3, 7, 1, 4])
    # pages whose every similarity with query 0 is negative: zero-padding would wrongly make 0 the max
    pages = ragged(9, [2, 11, 5, 1, 30])
    pages.append(-queries[0][:1].repeat(3, 1))
    expected = torch.tensor([[naive_maxsim(q, p) for p in pages] for q in queries])
    assert expected[0, -1] < 0
    got = cs.maxsim_scores(queries, pages)
    assert torch.allclose(got, expected, atol=1e-5)
    # tiny chunk budget: many chunks, same result
    assert torch.allclose(cs.maxsim_scores(queries, pages, max_sim_elements=50), expected, atol=1e-5)
    # bf16 matmul stays within bf16 tolerance
    assert torch.allclose(cs.maxsim_scores(queries, pages, dtype=torch.bfloat16), expected, atol=0.1)


def test_differentiable_maxsim_with_masks_equals_naive():
    queries, pages = ragged(3, [4, 2, 6], seed=1), ragged(4, [5, 1, 9, 3], seed=2)
    q = cs.pad_queries(queries) + 7.0  # garbage in the padding must not matter: masks decide
    p = torch.nn.utils.rnn.pad_sequence(pages, batch_first=True) - 5.0
    q_mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in queries], True)
    p_mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in pages], True)
    for i, x in enumerate(queries):
        q[i, : len(x)] = x
    for j, x in enumerate(pages):
        p[j, : len(x)] = x
    expected = torch.tensor([[naive_maxsim(a, b) for b in pages] for a in queries])
    assert torch.allclose(cl.maxsim(q, p, q_mask, p_mask), expected, atol=1e-5)


def test_scoring_and_the_loss_add_nothing_with_float_atomics(monkeypatch):
    """index_add_, scatter_add_ and index_put_(accumulate=True) add repeated indices with float atomics on CUDA, in an
    order that varies by run. On CUDA's path (forced here; a CPU keeps its in-order index_add_ for scores) scoring
    (maxsim_scores, maxsim_topk, mining's score_pairs) and the loss (forward and backward, one path on every device)
    call none of them, and still equal a float64 reference within fp32 summation's bound; the two paths of
    sum_by_query agree within it too. Run-to-run byte identity on a GPU itself needs a GPU and is not tested here."""
    import mine_hard_negatives as mine

    called = []
    for owner in (torch.Tensor, torch):
        for name in ("index_add_", "index_add", "scatter_add_", "scatter_add"):
            if hasattr(owner, name):
                monkeypatch.setattr(owner, name, lambda *a, _n=name, **k: called.append(_n))
    real_put = torch.Tensor.index_put_

    def index_put_(self, indices, values, accumulate=False):
        if accumulate:
            called.append("index_put_(accumulate=True)")
        return real_put(self, indices, values, accumulate)

    monkeypatch.setattr(torch.Tensor, "index_put_", index_put_)
    monkeypatch.setattr(cs, "adds_in_varying_order", lambda device: True)  # take CUDA's path here
    queries, pages = ragged(5, [4, 2, 6, 3], dim=16, seed=3), ragged(7, [5, 1, 9, 3], dim=16, seed=4)
    reference = torch.tensor(
        [[naive_maxsim(a.double(), b.double()) for b in pages] for a in queries], dtype=torch.float64
    )
    bound = 6 * 2**-24 * 6  # at most 6 query tokens of |similarity| <= 1: summation error <= L u sum|x|
    scores = cs.maxsim_scores(queries, pages, dtype=torch.float32)
    top, idx = cs.maxsim_topk(queries, pages, k=3, dtype=torch.float32)
    pairs = mine.score_pairs(queries, pages, (list(range(5)), [i * 3 % 7 for i in range(5)]), "cpu", torch.float32)
    assert (scores.double() - reference).abs().max() <= bound
    assert torch.allclose(top.double(), reference.gather(1, idx), atol=bound, rtol=0)
    assert torch.allclose(pairs.double(), reference[torch.arange(5), torch.arange(5) * 3 % 7], atol=bound, rtol=0)
    q, q_mask, p, p_mask = padded_batch([4, 2, 6], [5, 1, 9, 3, 2, 7])
    loss = cl.contrastive_loss(q.float(), q_mask, p.float(), p_mask, torch.arange(3), temperature=0.05)
    loss.backward()
    assert q.grad is not None and p.grad.abs().sum() > 0
    assert called == []
    monkeypatch.undo()
    g = torch.Generator().manual_seed(5)
    best, owner = (
        torch.rand(40, 9, generator=g) * 2 - 1,
        torch.repeat_interleave(torch.arange(6), torch.tensor([7, 1, 12, 5, 3, 12])),
    )
    cpu_path = cs.sum_by_query(best, owner, 6)
    monkeypatch.setattr(cs, "adds_in_varying_order", lambda device: True)
    cuda_path = cs.sum_by_query(best, owner, 6)
    torch.testing.assert_close(cpu_path, cuda_path, atol=12 * 2**-24 * 12, rtol=0)  # 12 tokens of |x| <= 1


def dense_maxsim(queries, pages, query_mask, page_mask):
    """The reference: the whole (Nq, Np, Lq, Lp) similarity tensor, padded page tokens -inf, amax, masked sum."""
    sim = torch.einsum("qid,pjd->qpij", queries, pages)
    sim = sim.masked_fill(~page_mask[None, :, None, :], float("-inf"))
    return sim.amax(dim=-1).masked_fill(~query_mask[:, None, :], 0.0).sum(dim=-1)


def padded_batch(q_lengths, p_lengths, dim=8, seed=0):
    """float64 queries and pages (requiring grad) with masks, left-padded as the processor pads, with a masked token
    in the middle of query 1 and of page 1 too, and +7 garbage wherever masked. Query 0's coordinates are all positive
    and page 0's all negative: their every real similarity is negative, so a padded token of page 0 would win every
    max."""
    g = torch.Generator().manual_seed(seed)
    lq, lp = max(q_lengths), max(p_lengths)
    q_mask = torch.arange(lq) >= lq - torch.tensor(q_lengths)[:, None]
    p_mask = torch.arange(lp) >= lp - torch.tensor(p_lengths)[:, None]
    q_mask[1, -2] = p_mask[1, -2] = False
    q = torch.randn(len(q_lengths), lq, dim, generator=g, dtype=torch.float64)
    p = torch.randn(len(p_lengths), lp, dim, generator=g, dtype=torch.float64)
    q[0], p[0] = q[0].abs(), -p[0].abs()
    q[~q_mask], p[~p_mask] = 7.0, 7.0
    return q.requires_grad_(), q_mask, p.requires_grad_(), p_mask


# 5 queries of up to 6 tokens x 7 pages of up to 9: one page against every query is 5 x 6 x 9 = 270 similarities,
# so a budget of 100 takes one (query, page) pair a block, 600 two pages of every query
@pytest.mark.parametrize("budget", [100, 600, 1 << 30], ids=["query-and-page-blocks", "page-blocks", "one-block"])
def test_maxsim_scores_and_gradients_equal_dense_reference(monkeypatch, budget):
    monkeypatch.setattr(cl, "CPU_TRAIN_SIM_BLOCK", budget)
    q, q_mask, p, p_mask = padded_batch([6, 4, 1, 3, 5], [5, 9, 2, 7, 1, 8, 0])  # the last page has no real token
    expected = dense_maxsim(q, p, q_mask, p_mask)
    assert expected[0, 0] < 0 and expected[:, -1].isneginf().all()
    got = cl.maxsim(q, p, q_mask, p_mask)
    assert got.dtype == torch.float64 and torch.allclose(got, expected, rtol=0, atol=1e-12)
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = torch.autograd.grad(expected, (q, p), upstream)
    have = torch.autograd.grad(got, (q, p), upstream)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(have, want))
    assert have[0][~q_mask].eq(0).all() and have[1][~p_mask].eq(0).all()
    # one side needing a gradient
    only_q = torch.autograd.grad(cl.maxsim(q, p.detach(), q_mask, p_mask), q, upstream)[0]
    only_p = torch.autograd.grad(cl.maxsim(q.detach(), p, q_mask, p_mask), p, upstream)[0]
    assert torch.allclose(only_q, want[0], rtol=0, atol=1e-12) and torch.allclose(only_p, want[1], rtol=0, atol=1e-12)
    # no masks: every token is real
    real = torch.ones_like(q_mask), torch.ones_like(p_mask)
    assert torch.allclose(cl.maxsim(q, p), dense_maxsim(q, p, *real), rtol=0, atol=1e-12)


def test_maxsim_gradcheck(monkeypatch):
    monkeypatch.setattr(cl, "CPU_TRAIN_SIM_BLOCK", 20)  # one (query, page) pair a block
    q, q_mask, p, p_mask = padded_batch([3, 3, 2], [4, 3, 1, 2], dim=3, seed=2)
    assert torch.autograd.gradcheck(lambda a, b: cl.maxsim(a, b, q_mask, p_mask), (q, p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_maxsim_computes_in_the_inputs_dtype(dtype):
    q64, q_mask, p64, p_mask = padded_batch([6, 4, 1, 3, 5], [5, 9, 2, 7, 1, 8], seed=3)
    q, p = q64.detach().to(dtype).requires_grad_(), p64.detach().to(dtype).requires_grad_()
    upstream = torch.randn(5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = cl.maxsim(q, p, q_mask, p_mask)
    gq, gp = torch.autograd.grad(got, (q, p), upstream.to(dtype))
    assert got.dtype == gq.dtype == gp.dtype == dtype
    # the float64 reference on the same rounded inputs
    ref_q, ref_p = q.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    expected = dense_maxsim(ref_q, ref_p, q_mask, p_mask)
    want_q, want_p = torch.autograd.grad(expected, (ref_q, ref_p), upstream)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    assert torch.allclose(got.double(), expected, **tol)
    assert gq[~q_mask].eq(0).all() and gp[~p_mask].eq(0).all()
    if dtype == torch.float32:
        assert torch.allclose(gq.double(), want_q, **tol) and torch.allclose(gp.double(), want_p, **tol)
    else:  # bf16 rounding can tie near maxima, either token then right; a page's summed gradient is the same for both
        assert torch.allclose(gp.double().sum(dim=1), want_p.sum(dim=1), **tol)


def test_pad_pages_rejects_empty_page():
    with pytest.raises(ValueError, match="page 1 has no tokens"):
        cs.pad_pages([torch.ones(2, 4), torch.ones(0, 4)])


def test_maxsim_tokens_row_blocks_and_workers_give_the_plain_maxima():
    """maxsim_tokens against (q @ p.T).amax per page for row counts that do and do not divide into blocks, one or
    two workers, and no query tokens at all (an empty (0, Np) result)."""
    g = torch.Generator().manual_seed(7)
    pages = torch.nn.functional.normalize(torch.randn(5, 9, 6, generator=g), dim=-1)
    for t in (0, 1, 7, 23):
        tokens = torch.nn.functional.normalize(torch.randn(t, 6, generator=g), dim=-1)
        want = torch.einsum("td,pld->tpl", tokens, pages).amax(dim=-1)
        for budget in (9, 40, 10_000):
            for workers in (1, 2):
                got = cs.maxsim_tokens(tokens, pages, block_elements=budget, workers=workers)
                assert got.shape == (t, 5) and torch.allclose(got, want, atol=1e-6), (t, budget, workers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_chunks_into_one_reused_buffer_hold_the_same_pages(monkeypatch, dtype):
    """reuse=True pads every chunk into one buffer (no fresh memory per chunk) with the values reuse=False gives,
    each chunk read before the next is taken: each page's own tokens, then copies of its first token, rounded to the
    score dtype and held in the compute dtype (fp32 here, bf16 being upcast where it is not native)."""
    monkeypatch.setattr(cs, "PAGE_CHUNK_TOKENS", 40)
    pages = ragged(13, [9, 3, 17, 5, 12, 50], dim=6, seed=5)  # the 50-token page overflows a chunk on its own
    fresh = list(cs.page_chunks(pages, dtype, "cpu", torch.float32))
    assert len(fresh) > 3
    storages = set()
    for (idx, chunk), (want_idx, want) in zip(
        cs.page_chunks(pages, dtype, "cpu", torch.float32, reuse=True), fresh, strict=True
    ):
        assert torch.equal(idx, want_idx) and torch.equal(chunk, want) and chunk.dtype == torch.float32
        for row, i in zip(chunk, idx.tolist()):
            page = pages[i].to(dtype).float()
            assert torch.equal(row[: len(page)], page) and (row[len(page) :] == page[0]).all()
        storages.add(chunk.untyped_storage().data_ptr())
    assert len(storages) == 2  # one buffer, grown once for the page longer than a chunk
    assert len({c.untyped_storage().data_ptr() for _, c in fresh}) == len(fresh)


# -- loss --------------------------------------------------------------------------


def test_contrastive_loss_matches_independent_infonce():
    queries, pages = ragged(3, [4, 2, 5], seed=3), ragged(5, [6, 3, 2], seed=4)
    q, p = cs.pad_queries(queries), cs.pad_pages(pages)
    q_mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in queries], True)
    p_mask = torch.ones(p.shape[:2], dtype=torch.bool)
    pos = torch.tensor([2, 3, 4])  # e.g. positives offset by a rank's position in a gathered batch
    loss = cl.contrastive_loss(q, q_mask, p, p_mask, pos, temperature=0.05)
    expected = 0.0
    for i, x in enumerate(queries):
        logits = torch.tensor([naive_maxsim(x, y) / len(x) / 0.05 for y in pages])
        expected += -(logits[pos[i]] - torch.logsumexp(logits, 0))
    assert torch.allclose(loss, expected / 3, atol=1e-4)
    raw = cl.contrastive_loss(q, q_mask, p, p_mask, pos, temperature=1.0, normalize_by_query_length=False)
    logits = torch.tensor([[naive_maxsim(x, y) for y in pages] for x in queries])
    assert torch.allclose(raw, torch.nn.functional.cross_entropy(logits, pos), atol=1e-4)


def test_contrastive_loss_saves_no_similarity_tensor(monkeypatch):
    nq, np_, lq, lp, dim = 8, 12, 16, 512, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(nq, lq, dim, generator=g, requires_grad=True)
    p = torch.randn(np_, lp, dim, generator=g, requires_grad=True)
    q_mask = torch.arange(lq) >= torch.arange(nq)[:, None]  # left padding: query i has lq - i tokens
    p_mask = torch.arange(lp) >= 10 * torch.arange(np_)[:, None]  # page j has lp - 10 j tokens
    pos = torch.arange(nq)

    def loss_and_saved_bytes():
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = cl.contrastive_loss(q, q_mask, p, p_mask, pos)
        return loss, sum(storages.values())

    dense_bytes = nq * np_ * lq * lp * 4  # one (Nq, Np, Lq, Lp) fp32 similarity tensor: 3 MiB
    # the fp32 inputs (8 KiB + 384 KiB), bool masks (6 KiB), the (Nq, Np, Lq) int16 argmax indices (3 KiB), and the
    # loss's own (Nq, Np)-sized tensors, a dozen at 8 bytes (9 KiB): 410 KiB
    bound = (q.numel() + p.numel()) * 4 + q_mask.numel() + p_mask.numel() + nq * np_ * lq * 2 + 12 * nq * np_ * 8
    loss, saved = loss_and_saved_bytes()
    assert saved <= bound < dense_bytes / 7
    monkeypatch.setattr(cl, "maxsim", dense_maxsim)
    dense_loss, dense_saved = loss_and_saved_bytes()
    assert dense_saved > dense_bytes  # the measure sees a similarity tensor where there is one
    assert torch.allclose(loss, dense_loss, atol=1e-6)
    grads, dense_grads = (torch.autograd.grad(x, (q, p)) for x in (loss, dense_loss))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, dense_grads))


def test_loss_gradients_reach_lora_and_heads_only(model_and_processor, keyword_page):
    model, processor = model_and_processor
    model.train()
    try:
        q, qm = model.forward_queries(processor.process_queries(["alpha page", "beta page"]))
        p, pm = model.forward_pages(processor.process_pages([keyword_page("alpha"), keyword_page("beta")]))
        model.zero_grad()
        cl.contrastive_loss(q, qm, p, pm, torch.arange(2)).backward()
    finally:
        model.eval()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert {"query_head.weight", "page_head.weight"} <= set(grads)
    assert any("lora_B" in n and g.abs().sum() > 0 for n, g in grads.items())
    assert all("lora_" in n or "_head." in n for n in grads)
    assert all(p.grad is None for n, p in model.backbone.named_parameters() if "lora_" not in n)
    model.zero_grad(set_to_none=True)


# -- checkpoints ------------------------------------------------------------------


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


def test_checkpoint_round_trip_gives_identical_scores(tiny_model_dir, tmp_path, keyword_page):
    torch.manual_seed(1)
    model, processor = ColIntern.from_pretrained(tiny_model_dir, proj_dim=16, lora=LoraSettings(r=4, alpha=8))
    perturb(model)  # LoRA B starts at zero: make the LoRA weights matter
    path = tmp_path / "ck.pt"
    cm.save_checkpoint(str(path), model, step=7, epoch=1)
    raw = torch.load(path, weights_only=True)
    assert raw["meta"]["step"] == 7 and raw["meta"]["proj_dim"] == 16 and raw["meta"]["lora"]["r"] == 4
    # LoRA as peft's get_peft_model_state_dict names it: no adapter name in the keys
    assert len(raw["lora"]) == 28 and not any(".default." in k for k in raw["lora"])
    assert raw["meta"]["model_id"] == tiny_model_dir and raw["meta"]["format"]["version"] == cm.FORMAT_VERSION
    loaded, processor2, ckpt = ColIntern.from_checkpoint(str(path))
    queries, pages = ["alpha", "beta gamma"], [keyword_page("alpha"), keyword_page("beta", size=(448, 224))]
    before = cs.maxsim_scores(model.encode_queries(processor, queries), model.encode_pages(processor, pages))
    after = cs.maxsim_scores(loaded.encode_queries(processor2, queries), loaded.encode_pages(processor2, pages))
    assert torch.equal(before, after)
    fresh, _ = ColIntern.from_pretrained(tiny_model_dir, proj_dim=16, lora=LoraSettings(r=4, alpha=8))
    other = cs.maxsim_scores(fresh.encode_queries(processor, queries), fresh.encode_pages(processor, pages))
    assert not torch.allclose(before, other)


def test_checkpoint_mismatches_are_clear_errors(tiny_model_dir, tmp_path):
    model, _ = ColIntern.from_pretrained(tiny_model_dir, proj_dim=16, lora=LoraSettings(r=4, alpha=8))
    path = str(tmp_path / "ck.pt")
    cm.save_checkpoint(path, model)
    ckpt = ck.load_checkpoint(path)
    other_dim, _ = ColIntern.from_pretrained(tiny_model_dir, proj_dim=32, lora=LoraSettings(r=4, alpha=8))
    with pytest.raises(ValueError, match="proj_dim 16.*--proj_dim 16"):
        other_dim.load_trainable_state(ckpt)
    no_lora, _ = ColIntern.from_pretrained(tiny_model_dir, proj_dim=16)
    with pytest.raises(ValueError, match="LoRA layout does not match"):
        no_lora.load_trainable_state(ckpt)
    other_r, _ = ColIntern.from_pretrained(
        tiny_model_dir, proj_dim=16, lora=LoraSettings(r=4, target_modules=r".*language_model.*\.q_proj$")
    )
    with pytest.raises(ValueError, match="LoRA layout does not match"):
        other_r.load_trainable_state(ckpt)
    bigger = dict(ckpt, meta=dict(ckpt["meta"], hidden_size=1024, model_id="OpenGVLab/InternVL3_5-1B-HF"))
    with pytest.raises(ValueError, match="hidden size 1024.*--model_id"):
        model.load_trainable_state(bigger)
    old_format = dict(ckpt, meta=dict(ckpt["meta"], format=dict(ckpt["meta"]["format"], version=0)))
    with pytest.raises(ValueError, match="format v0"):
        model.load_trainable_state(old_format)


OLD_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "checkpoint-lora-keys-v0.pt")


def test_checkpoint_with_the_old_lora_keys_loads_exactly(tiny_model_dir, keyword_page):
    """tests/data/checkpoint-lora-keys-v0.pt (tests/data/make_old_checkpoint.py) holds LoRA under the backbone's own
    state_dict keys, peft's adapter name included ("...q_proj.lora_A.default.weight"), as every checkpoint did
    before LoRA went through peft's get_peft_model_state_dict. Every old tensor must land in its own parameter."""
    raw = torch.load(OLD_CHECKPOINT, weights_only=True)
    assert len(raw["lora"]) == 28 and all(
        k.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for k in raw["lora"]
    )
    loaded, processor, _ = ColIntern.from_checkpoint(OLD_CHECKPOINT, model_id=tiny_model_dir)
    # each old key is the name of the model parameter it belongs to, and peft names that tensor without "default"
    from peft import get_peft_model_state_dict

    params = dict(loaded.backbone.named_parameters())
    by_peft = get_peft_model_state_dict(loaded.backbone)
    assert len(by_peft) == len(raw["lora"])
    for key, value in raw["lora"].items():
        assert torch.equal(params[key], value)
        assert torch.equal(by_peft[key.replace(".default.weight", ".weight")], value)
    for key, value in raw["heads"].items():
        assert torch.equal(loaded.get_parameter(key), value)

    # the same scores as a model whose parameters are assigned the raw tensors by hand
    meta = raw["meta"]
    by_hand, _ = ColIntern.from_pretrained(
        tiny_model_dir, proj_dim=meta["proj_dim"], lora=LoraSettings(**meta["lora"]), max_tiles=meta["max_tiles"]
    )
    queries, pages = ["alpha", "beta gamma"], [keyword_page("alpha"), keyword_page("beta", size=(448, 224))]

    def scores(model):
        return cs.maxsim_scores(model.encode_queries(processor, queries), model.encode_pages(processor, pages))

    untouched = scores(by_hand)
    with torch.no_grad():
        for key, value in raw["lora"].items():
            by_hand.backbone.get_parameter(key).copy_(value)
        for key, value in raw["heads"].items():
            by_hand.get_parameter(key).copy_(value)
    expected = scores(by_hand)
    assert not torch.allclose(expected, untouched)
    assert torch.equal(scores(loaded), expected)


def test_old_checkpoint_in_a_wrong_lora_layout_is_a_clear_error(tiny_model_dir):
    ckpt = ck.load_checkpoint(OLD_CHECKPOINT)
    q_only, _ = ColIntern.from_pretrained(
        tiny_model_dir, lora=LoraSettings(target_modules=r".*language_model.*\.q_proj$")
    )
    with pytest.raises(
        ValueError,
        match=r"(?s)LoRA layout does not match the model: 24 checkpoint keys have no place "
        r"\(e.g. \['language_model.layers.0.mlp.down_proj.lora_A.weight'.*"
        r"0 model keys are missing.*LoRA settings \{'r': 32",
    ):
        q_only.load_trainable_state(ckpt)
    no_lora, _ = ColIntern.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="LoRA layout does not match the model: 28 checkpoint keys have no place"):
        no_lora.load_trainable_state(ckpt)


@pytest.mark.parametrize("part", ["heads", "lora"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_checkpoints_with_non_finite_weights_are_refused(tiny_model_dir, tmp_path, part, bad):
    """A .pt and an exported folder whose weights hold an inf or a NaN are refused on load (so by eval, mining,
    export and warm starts alike), naming the tensor."""
    torch.manual_seed(0)
    model, _ = ColIntern.from_pretrained(tiny_model_dir, proj_dim=16, lora=LoraSettings(r=4, alpha=8))
    ckpt = cm.checkpoint_dict(model)
    name = sorted(ckpt[part])[1]
    ckpt[part][name].view(-1)[3] = bad
    ck.atomic_torch_save(ckpt, str(tmp_path / "bad.pt"))
    (tmp_path / "exported").mkdir()
    ck.write_exported(ckpt, str(tmp_path / "exported"), name="bad")
    for path in (tmp_path / "bad.pt", tmp_path / "exported"):
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: {part}\.\S+ holds non-finite values"):
            ck.load_checkpoint(str(path))
    ckpt[part][name].view(-1)[3] = 0.0
    ck.atomic_torch_save(ckpt, str(tmp_path / "good.pt"))
    assert ck.load_checkpoint(str(tmp_path / "good.pt"))["meta"]["proj_dim"] == 16


def test_bad_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        ck.load_checkpoint(str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"junk.pt is not a ColIntern checkpoint \(made by train.py\): torch.load"):
        ck.load_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt is not a ColIntern checkpoint \(made by train.py\): it has no"):
        ck.load_checkpoint(str(tmp_path / "other.pt"))
    # a training --out_dir passed as --ckpt: its .pt files are named
    with pytest.raises(
        FileNotFoundError,
        match=rf"{re.escape(str(tmp_path))} is a folder of checkpoints, not an "
        rf"exported model: pass one of its files, e.g. .*other.pt \(it holds "
        rf"junk.pt, other.pt\)",
    ):
        ck.load_checkpoint(str(tmp_path))


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    ck.atomic_torch_save({"kind": "colintern", "v": torch.tensor([1.0])}, path)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(10)  # half-written bytes on disk, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_torch_save({"kind": "colintern", "v": torch.tensor([2.0])}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["v"].item() == 1.0
    assert os.listdir(tmp_path) == ["ck.pt"]


# -- score dtype: the probe, its overrides, the bf16 bound -----------------------


def unit_vectors(n_rows, dim, g):
    return torch.nn.functional.normalize(torch.randn(n_rows, dim, generator=g), dim=-1)


def float64_maxsim(queries, pages):
    return torch.tensor(
        [[float((q.double() @ p.double().T).amax(dim=1).sum()) for p in pages] for q in queries], dtype=torch.float64
    )


def planted_pages(n_queries=8, n_pages=40, q_len=16, p_len=(60, 120), dim=128, top=10, seed=0):
    """Random unit-vector pages; query i's pages i*top .. i*top+top-1 (mod n_pages, at offsets that do not collide)
    hold noisy copies of q_len, ..., of its tokens, so its top-`top` is well separated."""
    g = torch.Generator().manual_seed(seed)
    pages = [unit_vectors(int(n), dim, g) for n in torch.randint(p_len[0], p_len[1] + 1, (n_pages,), generator=g)]
    queries = []
    for i in range(n_queries):
        q = unit_vectors(q_len, dim, g)
        for rank in range(top):
            slot = i * top + rank
            page, offset = pages[slot % n_pages], q_len * (slot // n_pages)
            copies = max(1, round(q_len * (top - rank) / top))
            noise = 0.3 * torch.randn(copies, dim, generator=g) / dim**0.5
            page[offset : offset + copies] = torch.nn.functional.normalize(q[:copies] + noise, dim=-1)
        queries.append(q)
    return queries, pages


@pytest.fixture
def native_bf16(monkeypatch):
    """Set what the probe says (True: torch's own bf16 matmul runs, slowly where the CPU lacks it; False: the
    fp32 fallback), so both paths run on any CPU."""

    def force(native: bool):
        monkeypatch.setattr(cs, "cpu_has_native_bf16", lambda: native)

    return force


def cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        return next(set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags"))


def test_cpu_probe_is_cached_and_agrees_with_the_kernels_cpu_flags():
    """On either CPU kind: the probe says yes exactly where the kernel lists avx512_bf16 or AMX tiles and oneDNN
    takes bf16 matmuls (on plain AVX-512, oneDNN says yes and emulates bf16), and asks once per process."""
    if platform.machine() not in ("x86_64", "AMD64") or not os.path.exists("/proc/cpuinfo"):
        pytest.skip(f"the CPU flags are read from Linux's /proc/cpuinfo on x86-64, not {platform.machine()}")
    cs.cpu_has_native_bf16.cache_clear()
    first = cs.cpu_has_native_bf16()
    assert cs.cpu_has_native_bf16() is first and cs.cpu_has_native_bf16.cache_info().hits == 1
    flags = cpu_flags()
    expected = bool(flags & {"avx512_bf16", "amx_tile"}) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert first is expected, (first, sorted(flags & {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}))


@pytest.mark.parametrize("native", [True, False])
def test_score_dtype_auto_follows_the_probe_and_overrides_win(native_bf16, native):
    native_bf16(native)
    assert cs.score_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert cs.score_dtype(None, "cpu") == cs.score_dtype("auto", "cpu")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), (torch.bfloat16, torch.bfloat16)):
        assert cs.score_dtype(name, "cpu") == dtype
    # bf16 multiplied natively, or rounded to bf16 and multiplied in fp32
    assert cs.matmul_dtype(torch.bfloat16, "cpu") == (torch.bfloat16 if native else torch.float32)
    assert cs.matmul_dtype(torch.float32, "cpu") == torch.float32
    assert cs.dtype_name(cs.score_dtype("auto", "cpu")) == ("bf16" if native else "fp32")


def test_score_error_bound_values():
    # 3 bf16 roundings per similarity (2 inputs, the bf16 output) + fp32 accumulation of D terms and of Lq sums
    assert cs.score_error_bound(torch.bfloat16, 1, 128) == pytest.approx(3 / 256 + 129 / 2**24)
    assert cs.score_error_bound(torch.float32, 30, 128) == pytest.approx(30 * 158 / 2**24)
    with pytest.raises(ValueError, match="no bound"):
        cs.score_error_bound(torch.float16, 1, 128)


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-native-bf16"])
@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_scores_within_the_derived_bound_of_float64_and_in_the_dtype_asked(native_bf16, monkeypatch, native, name):
    """Random unit vectors (D 128), forced score dtype, against float64: within score_error_bound, and computed in the
    dtype the override asked for (bf16-rounded inputs; a bf16 matmul only where bf16 is native). An ignored override
    fails the dtype checks; an fp32 run also stays within the much tighter fp32 bound."""
    native_bf16(native)
    g = torch.Generator().manual_seed(5)
    q_len, dim = 12, 128
    queries = [unit_vectors(q_len, dim, g) for _ in range(6)]
    pages = [unit_vectors(int(n), dim, g) for n in torch.randint(20, 90, (25,), generator=g)]
    seen = []
    real = cs.maxsim_tokens

    def spy(tokens, chunk, *args, **kwargs):
        seen.append((tokens.dtype, chunk.dtype, bool((tokens.float() == tokens.bfloat16().float()).all())))
        return real(tokens, chunk, *args, **kwargs)

    monkeypatch.setattr(cs, "maxsim_tokens", spy)
    dtype = cs.score_dtype(name, "cpu")
    reference = float64_maxsim(queries, pages)
    got = cs.maxsim_scores(queries, pages, dtype=name)
    topk_values, _ = cs.maxsim_topk(queries, pages, len(pages), dtype=name)
    compute = torch.bfloat16 if name == "bf16" and native else torch.float32
    assert seen and all(s[:2] == (compute, compute) for s in seen)
    assert all(s[2] for s in seen) == (name == "bf16")  # inputs rounded to bf16 exactly when asked
    error = float((got.double() - reference).abs().max())
    bound = cs.score_error_bound(dtype, q_len, dim)
    assert error <= bound, (error, bound)
    assert torch.allclose(topk_values.double(), reference.sort(dim=1, descending=True).values, atol=bound, rtol=0)
    fp32_bound = cs.score_error_bound(torch.float32, q_len, dim)
    assert (error <= fp32_bound) == (name == "fp32"), (error, fp32_bound)


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-native-bf16"])
@pytest.mark.parametrize("name", ["fp32", "bf16", "auto"])
def test_topk_on_planted_data_equals_float64_in_every_score_dtype(native_bf16, native, name):
    native_bf16(native)
    queries, pages = planted_pages()
    reference = float64_maxsim(queries, pages).topk(10, dim=1).indices
    planted = torch.tensor([[(i * 10 + r) % len(pages) for r in range(10)] for i in range(len(queries))])
    assert (reference == planted).all()
    assert (cs.maxsim_topk(queries, pages, 10, dtype=name)[1] == reference).all()
    assert (cs.maxsim_scores(queries, pages, dtype=name).topk(10, dim=1).indices == reference).all()


# -- quantised backbones (--quantize) ------------------------------------------------


@pytest.mark.parametrize("quantize,layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantize_language_model_only_with_fp32_lora_and_heads(tiny_model_dir, keyword_page, quantize, layer):
    """bitsandbytes layers are exactly the language model's linears; the vision tower and projector stay
    torch.nn.Linear in bf16; LoRA (on the bnb layers) and heads are fp32, and a loss reaches LoRA on CPU."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model, processor = ColIntern.from_pretrained(
        tiny_model_dir, proj_dim=16, quantize=quantize, lora=LoraSettings(r=4, alpha=8, dropout=0.0)
    )
    assert model.quantize == quantize and model.backbone.dtype == torch.bfloat16
    bnb_kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    quantised = {n for n, m in model.backbone.named_modules() if isinstance(m, bnb_kinds)}
    expected = {
        n + ".base_layer"
        for n, m in model.backbone.named_modules()
        if n.startswith("language_model.layers.") and hasattr(m, "lora_A")
    }
    assert quantised == expected and len(expected) == 14  # 2 layers x q k v o gate up down
    assert {type(m).__name__ for n, m in model.backbone.named_modules() if n in quantised} == {layer}
    for part in (model.backbone.vision_tower, model.backbone.multi_modal_projector):
        linears = [m for m in part.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 for m in linears)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert sum("lora_" in n for n in trainable) == 28
    model.train()
    try:
        q, qm = model.forward_queries(processor.process_queries(["alpha page", "beta page"]))
        p, pm = model.forward_pages(processor.process_pages([keyword_page("alpha"), keyword_page("beta")]))
        cl.contrastive_loss(q, qm, p, pm, torch.arange(2)).backward()
    finally:
        model.eval()
    assert all(
        trainable[n].grad is not None and trainable[n].grad.abs().sum() > 0
        for n in trainable
        if "lora_B" in n or "_head." in n
    )


def test_quantize_with_fp32_is_refused_and_auto_means_bf16():
    assert cm.resolve_dtype("auto", "cpu", "4bit") == torch.bfloat16
    assert cm.resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ValueError, match="--quantize 4bit with --dtype fp32"):
        cm.resolve_dtype("fp32", "cpu", "4bit")
    with pytest.raises(ValueError, match="unknown quantisation '3bit'"):
        cm.resolve_dtype("auto", "cpu", "3bit")


def test_checkpoint_records_quantization_and_loads_across_it(tiny_model_dir, tmp_path, keyword_page):
    """A bf16-trained checkpoint on a 4-bit base and the reverse: one line says so, the very same heads + LoRA load
    and the model scores; quantize=None keeps the checkpoint's quantisation, silently."""
    torch.manual_seed(1)
    model, processor = ColIntern.from_pretrained(
        tiny_model_dir, proj_dim=16, lora=LoraSettings(r=4, alpha=8), dtype="bf16"
    )
    perturb(model)
    bf16_path = str(tmp_path / "bf16.pt")
    cm.save_checkpoint(bf16_path, model)
    assert ck.load_checkpoint(bf16_path)["meta"]["quantize"] == "none"
    lines = []
    q4, _, _ = ColIntern.from_checkpoint(bf16_path, quantize="4bit", say=lines.append)
    assert q4.quantize == "4bit" and len(lines) == 1
    assert "trained on a --quantize none backbone and is loaded on a --quantize 4bit one" in lines[0]
    assert_same_trainable(model, q4)
    q4_path = str(tmp_path / "q4.pt")
    cm.save_checkpoint(q4_path, q4)
    assert ck.load_checkpoint(q4_path)["meta"]["quantize"] == "4bit"
    lines.clear()
    same, _, _ = ColIntern.from_checkpoint(q4_path, say=lines.append)  # the checkpoint's quantisation
    assert same.quantize == "4bit" and lines == []
    back, processor2, _ = ColIntern.from_checkpoint(q4_path, quantize="none", dtype="bf16", say=lines.append)
    assert back.quantize == "none" and len(lines) == 1 and "trained on a --quantize 4bit" in lines[0]
    assert_same_trainable(model, back)
    scores = cs.maxsim_scores(
        back.encode_queries(processor2, ["alpha"]), back.encode_pages(processor2, [keyword_page("alpha")])
    )
    assert torch.isfinite(scores).all()
    old = dict(ck.load_checkpoint(bf16_path))
    old["meta"] = {k: v for k, v in old["meta"].items() if k != "quantize"}  # written before --quantize
    assert ck.checkpoint_quantization(old["meta"]) == "none"


def assert_same_trainable(a, b):
    sa, sb = cm.trainable_state_dict(a), cm.trainable_state_dict(b)
    for part in ("heads", "lora"):
        assert sa[part].keys() == sb[part].keys()
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part]), part


def four_bit_layers(model):
    import bitsandbytes as bnb

    return [m for m in model.backbone.modules() if isinstance(m, bnb.nn.Linear4bit)]


def pack_for_the_cpu_kernel(layer):
    """What Linear4bit.forward does to its weight on a CPU with avx512_bf16 (bitsandbytes >= 0.48). The packing
    is plain torch, so it runs on any CPU kind."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    weight = layer.weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)


def test_saving_and_loading_lora_never_serialises_the_4bit_backbone(tiny_model_dir, tmp_path, monkeypatch):
    """bitsandbytes' Linear4bit.state_dict() converts a weight packed for the CPU kernel back in place, lossily (with
    double quantisation absmax is requantised), so a snapshot save through the backbone's state_dict() perturbed a
    4-bit run on CPUs with avx512_bf16. Every layer is packed here by hand, as such a CPU does at a forward: saving a
    checkpoint, reading it, loading it into the model, exporting and loading the export leave every packed weight and
    absmax bit-identical, and none of the model's Linear4bit layers serialises. The backbone's own state_dict() is then
    shown to do both, so the spy and the comparison can fail."""
    import bitsandbytes as bnb

    if not hasattr(bnb.functional, "_convert_weight_packed_for_cpu"):
        pytest.skip(f"bitsandbytes {bnb.__version__} never repacks 4-bit weights for the CPU")
    torch.manual_seed(1)
    model, _ = ColIntern.from_pretrained(tiny_model_dir, proj_dim=16, quantize="4bit", lora=LoraSettings(r=4, alpha=8))
    layers = four_bit_layers(model)
    assert len(layers) == 14 and not any(layer.support_avx512bf16_for_cpu for layer in layers)  # ColIntern's choice
    perturb(model)
    for layer in layers:
        pack_for_the_cpu_kernel(layer)
    packed = [(layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()) for layer in layers]
    serialised = []
    real_save = bnb.nn.Linear4bit._save_to_state_dict

    def spy(self, *args, **kwargs):
        if any(self is layer for layer in layers):  # transformers serialises a fresh backbone as it loads one
            serialised.append(self)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(bnb.nn.Linear4bit, "_save_to_state_dict", spy)
    path = str(tmp_path / "q4.pt")
    cm.save_checkpoint(path, model)
    ckpt = ck.load_checkpoint(path)
    model.load_trainable_state(ckpt)
    (tmp_path / "exported").mkdir()
    ck.write_exported(ckpt, str(tmp_path / "exported"), name="q4")
    model.load_trainable_state(ck.load_checkpoint(str(tmp_path / "exported")))
    loaded, _, _ = ColIntern.from_checkpoint(path)
    assert serialised == []
    assert_same_trainable(model, loaded)
    for layer, (weight, absmax) in zip(layers, packed):
        state = layer.weight.quant_state
        assert state.packing_format_for_cpu and torch.equal(layer.weight.data, weight)
        assert torch.equal(state.absmax, absmax)
    model.backbone.state_dict()  # what peft's get_peft_model_state_dict(backbone) did
    assert len(serialised) == len(layers)
    assert not any(layer.weight.quant_state.packing_format_for_cpu for layer in layers)
    for layer in layers:
        pack_for_the_cpu_kernel(layer)
    assert not all(torch.equal(layer.weight.quant_state.absmax, absmax) for layer, (_, absmax) in zip(layers, packed))


def test_4bit_layers_keep_one_layout_on_every_cpu_kind(tiny_model_dir, keyword_page, monkeypatch):
    """Linear4bit takes `support_avx512bf16_for_cpu` from the CPU at construction; here it is told the CPU has
    avx512_bf16, whatever it has. ColIntern turns the repacking off, so a no-grad encoding (which would pack every
    layer on such a CPU, after which the frozen weights pass no gradient to their inputs) leaves every layer in the
    layout that GPUs and AVX2 CPUs use."""
    import bitsandbytes as bnb

    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    model, processor = ColIntern.from_pretrained(
        tiny_model_dir, proj_dim=16, quantize="4bit", lora=LoraSettings(r=4, alpha=8)
    )
    layers = four_bit_layers(model)
    assert len(layers) == 14 and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    with torch.no_grad():
        model.encode_pages(processor, [keyword_page("alpha")])
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)


def test_no_forward_builds_a_kv_cache(model_and_processor, keyword_page, monkeypatch):
    """The text config says use_cache=True; a retriever never generates, so no forward may build a KV cache (a copy
    of every layer's keys and values): neither encoding (eval, no grad) nor a training forward and backward
    (transformers drops the cache by itself only in checkpointed training)."""
    from transformers import cache_utils

    model, processor = model_and_processor
    assert model.backbone.config.text_config.use_cache
    built = []
    real_init = cache_utils.DynamicCache.__init__

    def spy(self, *args, **kwargs):
        built.append(type(self).__name__)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(cache_utils.DynamicCache, "__init__", spy)
    queries, pages = processor.process_queries(["alpha page"]), processor.process_pages([keyword_page("alpha")])
    model.encode_queries(processor, ["alpha page"]), model.encode_pages(processor, [keyword_page("alpha")])
    model.train()
    try:
        model.forward_queries(queries)[0].sum().backward()
        model.forward_pages(pages)[0].sum().backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    assert built == []
    model.backbone(**processor.process_queries(["alpha page"]))  # the backbone's own default
    assert built, "the spy does not see the cache transformers builds"


def lora_linears(model):
    return [m for n, m in model.backbone.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]


def fixed_direction_grads(model, processor, keyword_page):
    """-> gradients of a fixed random linear function of the query and page embeddings (well conditioned: a
    contrastive loss on the tiny random model is near its ln(N) plateau, where gradients are mostly rounding)."""
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        q, _ = model.forward_queries(processor.process_queries(["alpha page", "beta page", "gamma"]))
        p, _ = model.forward_pages(processor.process_pages([keyword_page(w) for w in ("alpha", "beta", "gamma")]))
        g = torch.Generator().manual_seed(7)
        ((q * torch.randn(q.shape, generator=g)).sum() + (p * torch.randn(p.shape, generator=g)).sum()).backward()
    finally:
        model.eval()
    assert q.dtype == p.dtype == torch.float32  # embeddings (and so MaxSim and the loss) in fp32
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_lora_and_heads_compute_in_bf16_over_fp32_masters(tiny_model_dir, keyword_page, monkeypatch):
    """Over a bf16 backbone every LoRA and head matmul takes bf16 inputs and gives bf16 outputs (no fp32 copy of the
    activations) while the weights and their gradients stay fp32. One SGD step's update (lr x gradient) agrees with
    the same model computing LoRA and heads in fp32 (peft's input casting, no autocast) within the bf16 rounding the
    new path adds: on one gradient's path, 4 roundings in its projection's forward (weight and output of A and B),
    4 in its backward, 2 + 2 in the head, the rest of the path bf16 in both. 12 roundings of at most u = 2^-8 each,
    as if they all added up: 12u per tensor, and 6u over all tensors together (errors of opposite signs cancel in
    the norm). A LoRA or head computing wrongly under autocast would be off by O(1)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    torch.manual_seed(0)
    model, processor = ColIntern.from_pretrained(
        tiny_model_dir, proj_dim=16, dtype="bf16", lora=LoraSettings(r=4, alpha=8, dropout=0.0)
    )
    perturb(model)
    seen = []
    layers = lora_linears(model) + [model.query_head, model.page_head]
    hooks = [
        m.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, m.weight.dtype, out.dtype)))
        for m in layers
    ]
    grads = fixed_direction_grads(model, processor, keyword_page)
    for hook in hooks:
        hook.remove()
    assert len(layers) == 30 and len(seen) == 2 * 29  # queries, then pages: 28 LoRA linears and one head each
    assert set(seen) == {(torch.bfloat16, torch.float32, torch.bfloat16)}
    assert len(grads) == 32 and all(g.dtype == torch.float32 for g in grads.values())
    # the reference: LoRA and heads in fp32 over the same bf16 backbone, as before autocast
    for module in model.backbone.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = True
    fp32_project = ColIntern._project
    monkeypatch.setattr(
        ColIntern, "_project", lambda self, head, hidden, mask: fp32_project(self, head, hidden.float(), mask)
    )
    monkeypatch.setattr(model, "compute_precision", contextlib.nullcontext)
    reference = fixed_direction_grads(model, processor, keyword_page)
    u = 2.0**-8
    off = {k: float((grads[k].double() - reference[k].double()).norm() / reference[k].double().norm()) for k in grads}
    assert max(off.values()) <= 12 * u, max(off.items(), key=lambda kv: kv[1])
    total = math.sqrt(
        sum(float((grads[k].double() - reference[k].double()).norm()) ** 2 for k in grads)
        / sum(float(reference[k].double().norm()) ** 2 for k in grads)
    )
    assert total <= 6 * u, total
