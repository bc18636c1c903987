"""bench/bench_memory.py: its parameter counts at InternVL3.5-1B shapes (meta device, no memory) against a count by
hand from the config numbers and against the published InternVL3.5-1B figures (1.06B = ViT 304M + LM 752M +
projector 5.25M, the LM with its untied LM head, which InternVLModel does not have); its bitsandbytes byte
formula against bitsandbytes itself, on the tiny model; its activation count against bench_train.py's measurement."""

import dataclasses

import pytest

from bench import bench_memory

VOCAB = 151936


def by_hand_1b() -> dict:
    """InternVL3.5-1B = InternViT-300M + projector + Qwen3-0.6B, counted from the config numbers alone."""
    h, inter, layers, heads, kv, hd = 1024, 3072, 28, 16, 8, 128  # Qwen3-0.6B
    attention = h * heads * hd + 2 * h * kv * hd + heads * hd * h  # q, k, v, o; no biases
    mlp = 3 * h * inter  # gate, up, down
    lm_linear = layers * (attention + mlp)
    norms = layers * (2 * h + 2 * hd) + h  # input/post-attention, q/k norms; final norm
    lm_rest = VOCAB * h + norms
    vh, vi, vl = 1024, 4096, 24  # InternViT-300M
    per_layer = (
        3 * (vh * vh + vh)  # q, k, v with bias (qkv_bias)
        + vh * vh
        + vh  # output projection
        + vh * vi
        + vi
        + vi * vh
        + vh  # fc1, fc2
        + 2 * 2 * vh  # two LayerNorms (weight, bias)
        + 2 * vh
    )  # layer scales lambda_1, lambda_2
    patches = (448 // 14) ** 2
    embeddings = vh + (patches + 1) * vh + 3 * 14 * 14 * vh + vh  # cls, positions, patch conv + bias
    vision = vl * per_layer + embeddings
    projector = 2 * 4 * vh + 4 * vh * h + h + h * h + h  # LayerNorm(4096), Linear(4096, 1024), (1024, 1024)
    return dict(vision=vision, projector=projector, lm_linear=lm_linear, lm_rest=lm_rest)


def check_1b(parts) -> None:
    hand = by_hand_1b()
    for name, n in hand.items():
        assert getattr(parts, name) == n, f"{name}: counted {getattr(parts, name):,}, by hand {n:,}"
    assert parts.total == sum(hand.values())
    # The published figures, within their rounding; the LM's includes the untied LM head (vocab x hidden)
    assert round(parts.vision / 1e6) == 304
    assert round(parts.projector / 1e4) == 525
    assert round((parts.lm_linear + parts.lm_rest + VOCAB * parts.hidden) / 1e6) == 752
    assert round((parts.total + VOCAB * parts.hidden) / 1e7) == 106
    assert len(parts.linears) == 28 * 7 and (parts.hidden, parts.layers) == (1024, 28)


@pytest.fixture(scope="module")
def parts_1b():
    return bench_memory.meta_parts("1b")


def test_1b_parts_match_the_config_by_hand_and_the_published_counts(parts_1b):
    check_1b(parts_1b)


@pytest.mark.parametrize("field", ["vision", "projector", "lm_linear", "lm_rest"])
@pytest.mark.parametrize("delta", [-1, 3072 * 1024])
def test_a_miscounted_part_fails_the_check(parts_1b, field, delta):
    wrong = dataclasses.replace(parts_1b, **{field: getattr(parts_1b, field) + delta})
    with pytest.raises(AssertionError, match=field):
        check_1b(wrong)


def test_moving_a_layer_between_parts_fails_the_check(parts_1b):
    """A norm counted with the quantised linears (or the other way round) keeps the total and must still fail."""
    moved = dataclasses.replace(parts_1b, lm_linear=parts_1b.lm_linear + 1024, lm_rest=parts_1b.lm_rest - 1024)
    with pytest.raises(AssertionError, match="lm_linear"):
        check_1b(moved)


def test_byte_formulas_by_hand(parts_1b):
    # Linear(1024, 2048): 2,097,152 weights -> 8-bit: int8 weights + fp32 scale per output row;
    # NF4 + double quantisation: 4 bits a weight, 8-bit absmax per 64, fp32 per 256 absmax, per-layer constants
    assert bench_memory.int8_bytes(1024, 2048) == 2_097_152 + 4 * 2048
    assert bench_memory.nf4_bytes(1024, 2048) == 1_048_576 + 32_768 + 4 * 128 + 4 + 1024 + 64
    rest = 2 * (parts_1b.vision + parts_1b.projector + parts_1b.lm_rest) + parts_1b.buffer_bytes
    assert bench_memory.weight_bytes(parts_1b, "bf16") == rest + 2 * parts_1b.lm_linear
    assert rest + parts_1b.lm_linear < bench_memory.weight_bytes(parts_1b, "8bit") < rest + 1.01 * parts_1b.lm_linear
    four = bench_memory.weight_bytes(parts_1b, "4bit") - rest
    assert 0.5159 * parts_1b.lm_linear < four < 0.5165 * parts_1b.lm_linear  # + 1,092 B a layer x 196 layers


def test_bitsandbytes_holds_what_the_formula_says_on_the_tiny_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    results = bench_memory.verify("tiny", str(tmp_path))
    assert set(results) == {"bf16", "8bit", "4bit"}
    for mode, (measured, formula) in results.items():
        assert measured == formula, mode


def test_activation_count_agrees_with_the_1b_measurement(parts_1b):
    """The meta-device count of what autograd keeps, at bench_train.py's measured setting, within 15% of the memory
    the step added on CPU (without and with gradient checkpointing)."""
    cal = bench_memory.calibration(parts_1b, bench_memory.LoraSettings())
    for key in ("plain", "checkpointing"):
        counted, measured = cal[key]
        assert 0.85 < measured / counted < 1.15, (key, counted, measured)
    assert cal["margin"] >= 1.0


def test_default_run_prints_every_table(capsys):
    bench_memory.main(bench_memory.parse_args(["--sizes", "1b"]))
    out = capsys.readouterr().out
    assert "| 1B | 304.0M | 5.3M | 440.4M | 155.6M | 905.3M | 1.81 GB | 1.37 GB | 1.16 GB |" in out
    assert "| 1B | 1024 x 28 | " in out and "per 1288-token page (5 tiles)" in out
    assert "check at 1B, fp32 backbone" in out
    assert "micro-batch 32 queries" in out and "| 1B | 0.20 |" in out
