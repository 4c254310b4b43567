"""Bytes-per-token accounting: #549's lookup table and CaseOps' sidecar, each audited against SentencePiece's own
decoding of every document; the refusals on crafted tokenizers; CaseOps round trips."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt
import fineweb_sample
from conftest import SAMPLE_DATASET, SAMPLE_TOKENIZER


def sample_texts(limit: int | None = None) -> list[str]:
    """Real FineWeb documents: the committed sample's first ones (its 120 validation documents first)."""
    return fineweb_sample.documents(limit)


def stream(processor, documents) -> np.ndarray:
    return np.array([t for ids in processor.encode(documents) for t in [1] + ids], dtype=np.int64)


def train(texts, tmp_path, name, vocab_size, **options):
    import build_sample

    build_sample.train_tokenizer(texts, tmp_path / name, vocab_size, **options)
    path = str(tmp_path / f"{name}.model")
    return spm.SentencePieceProcessor(model_file=path), path


def validation_set(dataset, tokenizer) -> train_gpt.ValidationSet:
    size = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    h = train_gpt.Hyperparameters(
        dict(DATA_PATH=str(dataset), TOKENIZER_PATH=str(tokenizer), VOCAB_SIZE=str(size), EVAL_SEQ_LEN="64")
    )
    return train_gpt.ValidationSet(h, train_gpt.load_tokenizer(str(tokenizer), size))


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """SP4096, SP8192 and CaseOps SP8192 built by data/build_sample.py from real FineWeb text (the KJV sample
    ): 60 validation documents, tokenizers trained on the next 900; and the validation texts."""
    import build_sample

    texts = sample_texts(960)
    root = tmp_path_factory.mktemp("variants")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    built = {v: build_sample.build_fineweb(docs, root, v, val_docs=60) for v in ("sp4096", "sp8192", "caseops_sp8192")}
    return texts[:60], {name: (info["dataset"], info["tokenizer"]) for name, info in built.items()}


def test_challenge_sp1024_audit_agrees_on_real_fineweb():
    """The challenge's tokenizer on the sample's 120 validation documents: the table and the decoder agree to
    the byte on every document (unknown pieces count 0 bytes, as #549's table counts them)."""
    val = validation_set(SAMPLE_DATASET, SAMPLE_TOKENIZER)
    assert val.source == "lookup" and val.audit["documents"] == 120 and val.audit["tokens"] == 322_203
    assert val.audit["counted"] == val.audit["decoded"] == 804_434 and val.audit["unknown_targets"] == 1035
    assert int(val.target_bytes.sum()) < val.audit["counted"]  # the scored range is trimmed to whole sequences


@pytest.mark.parametrize("variant", ["sp4096", "sp8192", "caseops_sp8192"])
def test_every_variant_audit_agrees_to_the_byte(variants, variant):
    texts, built = variants
    val = validation_set(*built[variant])
    assert val.audit["counted"] == val.audit["decoded"] and val.audit["documents"] == 60
    if variant.startswith("caseops"):  # the sidecar is charged the original text's bytes, exactly
        assert val.source == "sidecar" and val.audit["unknown_targets"] == 0
        assert val.audit["counted"] == sum(len(t.encode("utf-8")) for t in texts)
    else:
        assert val.source == "lookup" and val.audit["counted"] > 100_000


def test_caseops_round_trips_every_sample_document(variants):
    """The transform on every document of the FineWeb sample (all 3,100), and the CaseOps tokenizer's decoding on
    the validation documents, give back the original text exactly."""
    from caseops import caseops_encode

    texts = sample_texts()
    assert len(texts) == 3100 and all(train_gpt.caseops_decode(caseops_encode(t)) == t for t in texts)
    processor = spm.SentencePieceProcessor(model_file=str(variants[1]["caseops_sp8192"][1]))
    validation = variants[0]
    decoded = [
        train_gpt.caseops_decode(processor.decode(ids))
        for ids in processor.encode([caseops_encode(t) for t in validation])
    ]
    assert decoded == validation
    awkward = "McDonald's iPhone NASA A I \ue000\ue003 \u2581\u2581x ÉCOLE eBay X-Ray"
    assert not any(c.isupper() and c.isascii() for c in caseops_encode(awkward))  # only non-ASCII capitals stay
    assert train_gpt.caseops_decode(caseops_encode(awkward)) == awkward


def test_caseops_tokenizer_without_sidecar_is_refused(variants, tmp_path):
    dataset, tokenizer = variants[1]["caseops_sp8192"]
    shutil.copy(dataset / "fineweb_val_000000.bin", tmp_path / "fineweb_val_000000.bin")
    with pytest.raises(train_gpt.InputError, match=r"CaseOps operator pieces \['U\+E001'.*no byte sidecar.*#2071"):
        validation_set(tmp_path, tokenizer)


def test_sidecar_must_match_token_count_and_bytes(variants, tmp_path):
    import build_sample

    dataset, tokenizer = variants[1]["caseops_sp8192"]
    tokens = train_gpt.load_data_shard(dataset / "fineweb_val_000000.bin", 8192)
    costs = train_gpt.load_data_shard(dataset / "fineweb_val_bytes_000000.bin", 1 << 16).copy()
    build_sample.write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    build_sample.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", costs[:-1])
    with pytest.raises(train_gpt.InputError, match=r"fineweb_val_bytes_000000.bin: \d+ entries; the byte sidecar must"):
        validation_set(tmp_path, tokenizer)
    costs[np.nonzero(tokens == 1)[0][3]] = 2  # a BOS charged 2 bytes: document 2's total is off
    build_sample.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", costs)
    with pytest.raises(train_gpt.InputError, match=r"document 2 \(tokens from \d+\) counts \d+ bytes but decodes to"):
        validation_set(tmp_path, tokenizer)
    assert train_gpt.shard_files(str(tmp_path), "val") == [str(tmp_path / "fineweb_val_000000.bin")]


def test_tokenizer_without_space_piece_is_refused(tmp_path):
    """#897: without a standalone '▁' a space falls back to the 3 byte pieces of U+2581, counted 3 bytes."""
    texts = sample_texts(200)
    processor, path = train(["".join(t.split()) for t in texts], tmp_path, "nospace", 400, byte_fallback=True)
    assert processor.piece_to_id("\u2581") == processor.unk_id()
    with pytest.raises(train_gpt.InputError, match=r"no standalone '\u2581' piece.*#897"):
        train_gpt.check_tokenizer(processor, path, "", sidecar=False)
    # Why the refusal must exist: the decoder gives back U+2581 too, so the audit agrees with the over-count.
    tokens = stream(processor, texts[:5])
    audit = train_gpt.audit_bytes(processor, tokens, train_gpt.lookup_target_bytes(processor, tokens), "")
    spaces = sum(t.count(" ") for t in texts[:5])
    assert audit["counted"] == audit["decoded"] >= sum(len(t.encode()) for t in texts[:5]) + spaces


def test_pieces_spanning_spaces_are_refused(tmp_path):
    processor, path = train(sample_texts(200), tmp_path, "spanning", 2000, split_by_whitespace=False)
    with pytest.raises(train_gpt.InputError, match=r"\d+ pieces hold '\u2581' after their first character"):
        train_gpt.check_tokenizer(processor, path, "", sidecar=False)


def test_audit_catches_byte_fallback_counted_as_replacement_character(tmp_path):
    """Scylla (#1143): byte-fallback pieces counted as 3 bytes (U+FFFD) instead of 1; and a BOS-less stream."""
    texts = sample_texts(300)
    processor, _ = train(texts[100:], tmp_path, "fallback", 600, byte_fallback=True, character_coverage=0.98)
    tokens = stream(processor, texts[:100])
    counted = train_gpt.lookup_target_bytes(processor, tokens)
    is_byte = np.array([processor.is_byte(int(t)) for t in tokens[1:]])
    assert is_byte.sum() > 0 and train_gpt.audit_bytes(processor, tokens, counted, "")["decoded"] == counted.sum()
    with pytest.raises(train_gpt.InputError, match=r"documents disagree"):
        train_gpt.audit_bytes(processor, tokens, counted + 2 * is_byte, "")
    with pytest.raises(train_gpt.InputError, match=r"must start with BOS"):
        train_gpt.audit_bytes(processor, tokens[1:], counted[1:], "")


def test_embedded_tokenizer_audit_agrees(sample_data):
    dataset, tokenizer = sample_data
    val = validation_set(dataset, tokenizer)
    assert val.audit["counted"] == val.audit["decoded"] and val.audit["documents"] == 60


def test_boundary_rules(sample_data):
    """A BOS target adds 0 bytes; a '▁' piece after BOS or an unknown piece loses its space, after a word keeps it."""
    _, tokenizer = sample_data
    processor = train_gpt.load_tokenizer(tokenizer, 1024)
    spaced = next(
        i for i in range(4, 1024) if processor.id_to_piece(i).startswith("\u2581") and len(processor.id_to_piece(i)) > 2
    )
    word = len(processor.id_to_piece(spaced)[1:].encode())
    tokens = np.array([spaced, 1, spaced, spaced, processor.unk_id(), spaced])
    assert train_gpt.lookup_target_bytes(processor, tokens).tolist() == [0, word, word + 1, 0, word]


def test_bpb_formula():
    val = SimpleNamespace(target_bytes=np.array([4] * 10 + [2] * 9))
    scores = train_gpt.ScoreAccumulator(torch.device("cpu"), val)
    scores.add(torch.full((10,), 2.0), np.arange(10), np.ones(10, dtype=bool))
    keep = np.array([True] * 6 + [False] * 3)  # masked positions count nothing, even non-finite padding
    scores.add(torch.tensor([1.0] * 6 + [7.0, float("nan"), float("inf")]), np.arange(10, 19), keep)
    loss, bpb, tokens, byte_total = scores.result(distributed=False)
    assert tokens == 16 and byte_total == 52
    assert math.isclose(loss, 26 / 16) and math.isclose(bpb, 26 / math.log(2) / 52)


# ---- The 1.0611 record's CaseOps export (data/fineweb_sample): its tokenizer normalizes, its sidecar counts the original ----


def record_caseops():
    from conftest import RECORD_CASEOPS_DATASET, RECORD_CASEOPS_TOKENIZER

    return RECORD_CASEOPS_DATASET, RECORD_CASEOPS_TOKENIZER


def test_record_caseops_export_is_accepted_and_counts_the_original_text():
    """The record's sidecar sums to the 120 documents' original UTF-8 length; the decoder returns NFKC-normalized,
    whitespace-collapsed text, so the decoded total differs (in 7 documents) and is logged beside it."""
    dataset, tokenizer = record_caseops()
    val = validation_set(dataset, tokenizer)
    texts = sample_texts(120)
    assert val.source == "sidecar" and val.audit["documents"] == 120 and val.audit["tokens"] == 269_617
    assert val.audit["counted"] == sum(len(t.encode("utf-8")) for t in texts) == 806_935
    assert val.audit["decoded"] == 806_926 and val.audit["normalized_documents"] == 7
    assert val.audit["normalized_pieces"] == 15 and val.audit["extra_bytes"] == 14
    assert val.audit["doubled_space_documents"] == 0


def test_record_caseops_export_of_the_whole_sample_is_accepted(whole_sample_caseops):
    """All 3,100 sample documents (3,000 validation), where the fixed slack before refused document 248 (18 of its
    966 pieces charged otherwise) and one other: the sidecar counts every original byte."""
    dataset, original_bytes = whole_sample_caseops
    val = validation_set(dataset, record_caseops()[1])
    assert val.audit["documents"] == 3000 and val.audit["counted"] == original_bytes == 19_804_757
    assert val.audit["decoded"] == 19_804_252 and val.audit["normalized_documents"] == 174
    assert val.audit["extra_bytes"] == 837 and val.audit["doubled_space_documents"] == 0


def test_nfkc_stress_export_is_the_records_and_is_accepted(nfkc_stress_export):
    """Every code point the tokenizer's normalizer or NFKC changes, in words, numbers and tables (data/nfkc_stress.py):
    data/caseops.py reproduces the committed export (written by the record's script) entry for entry, and the audit
    accepts it. The sidecar counts every original byte but one: the first document starts with U+0001, which the
    normalizer drops with no piece to carry it."""
    import lzma

    from caseops import encode_documents

    processor = spm.SentencePieceProcessor(model_file=str(record_caseops()[1]))
    with lzma.open(Path(__file__).parents[1] / "data" / "nfkc_stress" / "docs.jsonl.xz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    shard = lambda name: train_gpt.load_data_shard(nfkc_stress_export / name, 1 << 16).tolist()  # noqa: E731
    tokens, entries = encode_documents(processor, texts[:123])
    assert tokens == shard("fineweb_val_000000.bin") and entries == shard("fineweb_val_bytes_000000.bin")
    val = validation_set(nfkc_stress_export, record_caseops()[1])
    assert val.audit["documents"] == 123 and texts[0][0] == "\x01"
    assert val.audit["counted"] == sum(len(t.encode("utf-8")) for t in texts[:123]) - 1 == 540_535
    assert val.audit["normalized_documents"] == 102 and val.audit["doubled_space_documents"] == 0


def crafted_record_sidecar(tmp_path, change) -> Path:
    """The record's export with its sidecar changed by change(tokens, entries)."""
    import build_sample

    dataset, _ = record_caseops()
    tokens = train_gpt.load_data_shard(dataset / "fineweb_val_000000.bin", 8192)
    entries = train_gpt.load_data_shard(dataset / "fineweb_val_bytes_000000.bin", 1 << 16).astype(np.int64)
    entries = change(tokens, entries)
    build_sample.write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    build_sample.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", entries.astype(np.uint16))
    return tmp_path


def test_crafted_byte_bugs_are_refused_on_the_normalizing_tokenizer(tmp_path):
    """What no text can give the record's exporter is refused: a sidecar one entry short, a BOS charged bytes, an
    operator charged 3 bytes, byte-fallback pieces counted 3 bytes each (Scylla), the sidecar shifted by one token,
    the bytes of a document's last piece moved to the next document (all of them, or one), and +1 byte on every
    normalized unit of document 6 ('½' -> '1⁄2': a unit inside one character's image is charged nothing)."""
    _, tokenizer = record_caseops()
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer))
    byte_ids = [t for t in range(8192) if processor.is_byte(t)]

    def refused(change, message):
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        with pytest.raises(train_gpt.InputError, match=message):
            validation_set(crafted_record_sidecar(folder, change), tokenizer)

    refused(lambda tokens, entries: entries[:-1], r"fineweb_val_bytes_000000.bin: \d+ entries; the byte sidecar must")

    def bos_charged(tokens, entries):
        entries[np.flatnonzero(tokens == 1)[3]] = 2
        return entries

    refused(bos_charged, r"target \d+ \(id 1, a BOS or CaseOps operator\) is charged 2 bytes")

    def operator_charged(tokens, entries):
        entries[np.flatnonzero(tokens == 4)[10]] = 3  # TITLE, the lookup table's 3 bytes of U+E001 (#2071)
        return entries

    refused(operator_charged, r"\(id 4, a BOS or CaseOps operator\) is charged 3 bytes")

    def scylla(tokens, entries):
        return np.where(np.isin(tokens, byte_ids), 3, entries)

    refused(scylla, r"byte-fallback character at targets \d+-\d+ is charged \[3, 3")
    refused(lambda tokens, entries: np.r_[entries[1:], 0], r"is charged \d+ bytes")  # shifted: operators charged

    def moved(amount):
        def change(tokens, entries):
            bos = np.flatnonzero(tokens == 1)[4]  # document 3's last piece is before it; document 4's first text after
            receiver = bos + int(np.flatnonzero(entries[bos:] > 0)[0])  # not an operator: those must stay 0
            moving = entries[bos - 1] if amount is None else amount
            entries[bos - 1], entries[receiver] = entries[bos - 1] - moving, entries[receiver] + moving
            return entries

        return change

    less = r"document 3 \(tokens from \d+\): targets \d+-\d+ are charged less than their text needs"
    refused(moved(None), less)
    refused(moved(1), less)
    refused(plus_one_on_normalized_units(processor, 6), r"document 6 \(tokens from \d+\): targets .* '⁄':1, '2':3")


def plus_one_on_normalized_units(processor, document: int):
    """+1 byte on every unit of the document charged other than it decodes to (a byte-fallback character is one
    unit, on its last piece)."""

    def change(tokens, entries):
        units = train_gpt.sidecar_units(
            processor, tokens, entries[1:], train_gpt.caseops_operators(processor), NORMALIZATION_IMAGES(processor)
        )
        starts = np.flatnonzero(tokens == 1)
        inside = np.zeros(len(units.charged), bool)
        inside[starts[document] : starts[document + 1] - 1] = True
        differing = inside & (units.charged != units.decoded)
        entries[1:][differing] += 1
        return entries

    return change


@functools.cache
def NORMALIZATION_IMAGES(processor):  # noqa: N802 (one table per tokenizer, built once: a second)
    return train_gpt.NormalizationImages(processor)


def test_inflation_that_text_can_give_is_accepted_and_reported(tmp_path, monkeypatch):
    """Extra bytes are never refused: every such sidecar is also what the record's exporter writes for some text.
    Each document 5's spaces charged twice is its text with every whitespace run one space longer; +1 byte on
    every normalized unit of document 53 ('…' -> '...' over two pieces) is its text with U+0001, which the normalizer
    deletes, after its first and third '…'. data/caseops.py (the record's export, entry for entry) writes exactly
    the tampered sidecars for those texts; the audit accepts both and flags document 5 (doubled spaces)."""
    import re

    from caseops import encode_document

    _, tokenizer = record_caseops()
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer))
    texts = sample_texts(120)

    def space_twice(tokens, entries):  # every '▁'-led piece of document 5 charged its space twice
        starts = np.flatnonzero(tokens == 1)
        led = [t for t in range(8192) if processor.id_to_piece(t).startswith("\u2581")]
        inside = np.zeros(len(tokens), bool)
        inside[starts[5] : starts[6]] = True
        return np.where(inside & np.isin(tokens, led), entries + 1, entries)

    first_and_third = iter([True, False, True])
    twins = {
        5: (space_twice, re.sub(r"(?<=\S)(\s+)(?=\S)", r"\1 ", texts[5])),
        53: (
            plus_one_on_normalized_units(processor, 53),
            re.sub("\u2026", lambda m: m[0] + "\x01" * next(first_and_third), texts[53]),
        ),
    }
    assert texts[53].count("\u2026") == 3
    for document, (change, twin) in twins.items():
        folder = tmp_path / f"document{document}"
        folder.mkdir()
        tampered = crafted_record_sidecar(folder, change)
        tokens = train_gpt.load_data_shard(tampered / "fineweb_val_000000.bin", 8192)
        entries = train_gpt.load_data_shard(tampered / "fineweb_val_bytes_000000.bin", 1 << 16)
        starts = np.flatnonzero(tokens == 1)
        ids, costs = encode_document(processor, twin)
        assert ids == tokens[starts[document] : starts[document + 1]].tolist()
        assert costs == entries[starts[document] : starts[document + 1]].tolist()
        audit = validation_set(tampered, tokenizer).audit
        assert audit["counted"] == 806_935 + sum(costs) - len(texts[document].encode("utf-8"))
        assert audit["doubled_space_documents"] == (document == 5)
    from conftest import RECORD_CASEOPS_DATASET, TINY_ENV

    (tmp_path / "document5" / "fineweb_train_000000.bin").symlink_to(
        RECORD_CASEOPS_DATASET / "fineweb_train_000000.bin"
    )
    monkeypatch.chdir(tmp_path)  # the run's start-up checks log the warning
    env = dict(TINY_ENV, DATA_PATH=str(tmp_path / "document5"), TOKENIZER_PATH=str(tokenizer), VOCAB_SIZE="8192")
    train_gpt.check_inputs(train_gpt.RunContext(train_gpt.Hyperparameters(dict(env, RUN_ID="doubled"))))
    log = (tmp_path / "logs" / "doubled.txt").read_text(encoding="utf-8")
    assert "WARNING: 1 validation documents have half or more of their spaces charged extra bytes" in log


def test_caseops_transform_reproduces_the_record_export_token_for_token():
    """data/caseops.py with the record's tokenizer on the export's documents (the first 720 of the sample): the
    validation and train shards token for token, the sidecar entry for entry; caseops_decode inverts the transform."""
    import build_sample
    from caseops import caseops_encode, encode_document

    dataset, tokenizer = record_caseops()
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer))
    texts = sample_texts(720)
    encoded = [encode_document(processor, text) for text in texts]
    shard = lambda name: train_gpt.load_data_shard(dataset / name, 1 << 16).tolist()  # noqa: E731
    assert [t for ids, _ in encoded[:120] for t in ids] == shard("fineweb_val_000000.bin")
    assert [c for _, costs in encoded[:120] for c in costs] == shard("fineweb_val_bytes_000000.bin")
    assert [t for ids, _ in encoded[120:] for t in ids] == shard("fineweb_train_000000.bin")
    assert all(train_gpt.caseops_decode(caseops_encode(t)) == t for t in texts)
    assert build_sample.caseops_shards  # the sample builder writes shards through the same encode_document


def test_caseops_record_semantics_on_awkward_words():
    """The record's rules (lossless_caps_caseops_v1): TITLE before a mixed word's first capital, CAPNEXT after."""
    from caseops import caseops_encode

    assert caseops_encode("McDonald") == "\ue001mc\ue003donald"
    assert caseops_encode("iPhone NASA A eBay") == "i\ue003phone \ue002nasa \ue001a e\ue003bay"
    assert caseops_encode("\ue000\ue001\u2581") == "\ue000\ue004\ue001\u2581"  # only the operators are escaped


def test_plain_sp8192_record_tokenizer_lookup_table_agrees(tmp_path):
    """A record's plain SP8192 tokenizer on the sample's 120 validation documents: #549's lookup table and the
    decoder agree to the byte on every document."""
    import build_sample
    from conftest import PLAIN_SP8192_TOKENIZER

    processor = spm.SentencePieceProcessor(model_file=str(PLAIN_SP8192_TOKENIZER))
    build_sample.write_shard(
        tmp_path / "fineweb_val_000000.bin", stream(processor, sample_texts(120)).astype(np.uint16)
    )
    val = validation_set(tmp_path, PLAIN_SP8192_TOKENIZER)
    assert val.source == "lookup" and val.audit["documents"] == 120
    assert val.audit["counted"] == val.audit["decoded"] > 700_000
