"""Document boundaries: packed rows (segment_ids, positions, loss mask), padded rows, the
model's isolation of packed documents, counted-token loss, and each source kind end to end."""

from __future__ import annotations

import json

import datasets
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from framework import nn
from framework.data import DataConfig, DataError, make_loaders
from framework.data.pipeline import build_sources
from framework.data.rows import PackedRows, PaddedRows
from framework.data.sources import TokenArray
from framework.data.tokenizers import BYTE_EOS, ByteTokenizer
from framework.models import transformer as T

DOCS = ["def f():\n", "x", "", "import os\n# é\n", "class A:\n    pass\n", "y = 2\n" * 5]


def _stream() -> np.ndarray:
    return ByteTokenizer().encode_docs(DOCS)


def _reference_row(window: np.ndarray) -> dict[str, np.ndarray]:
    """What a packed row must hold, by a plain loop over its tokens."""
    inputs, targets = window[:-1], window[1:]
    seg, pos, mask = [], [], []
    s, p = 1, 0
    for i, tok in enumerate(inputs):
        if i > 0 and inputs[i - 1] == BYTE_EOS:
            s, p = s + 1, 0
        seg.append(s)
        pos.append(p)
        mask.append(0.0 if tok == BYTE_EOS else 1.0)
        p += 1
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": seg,
        "positions": pos,
        "mask": mask,
    }


def test_packed_rows_match_a_loop_over_their_tokens():
    stream = _stream()
    assert (stream == BYTE_EOS).sum() == len(DOCS) and stream[-1] == BYTE_EOS
    rows = PackedRows([TokenArray(stream)], seq_len=7, eos_id=BYTE_EOS)
    assert len(rows) == (len(stream) - 1) // 7
    got = rows.take(np.arange(len(rows)))
    for i in range(len(rows)):
        want = _reference_row(stream[i * 7 : i * 7 + 8].astype(np.int32))
        for key, value in want.items():
            np.testing.assert_array_equal(got[key][i], value, err_msg=f"row {i} {key}")
    assert got["segment_ids"].max() > 1  # rows do hold several documents


def test_padded_rows_hold_one_document_each_with_padding_masked():
    stream = _stream()
    rows = PaddedRows([TokenArray(stream)], seq_len=8, eos_id=BYTE_EOS)
    batch = rows.take(np.arange(len(rows)))
    # the counted targets, row by row, spell each document after its first byte, then EOS
    counted = [t[m > 0] for t, m in zip(batch["targets"], batch["mask"], strict=True)]
    joined = np.concatenate(counted)
    want = np.concatenate(
        [np.append(np.frombuffer(d.encode(), np.uint8)[1:], BYTE_EOS) for d in DOCS if d]
    )
    np.testing.assert_array_equal(joined, want)
    # the empty document gives no row; a long one takes ceil(len / seq_len) rows
    assert len(rows) == sum(-(-len(d.encode()) // 8) for d in DOCS if d)
    # padding: segment 0, never counted; real tokens: segment 1
    assert (batch["mask"][batch["segment_ids"] == 0] == 0).all()


CFG = dict(vocab_size=257, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32)
CFG["attention_impl"] = "xla"
VARIANTS = {
    "learned-xla": CFG,
    "rope-xla": dict(
        CFG, position="rope", norm="rmsnorm", activation="swiglu", attention_impl="xla"
    ),
    "rope-pallas": dict(CFG, position="rope", attention_impl="pallas"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_perturbing_one_packed_document_leaves_the_next_unchanged(variant):
    cfg = T.TransformerConfig(**VARIANTS[variant])
    params = nn.init(T.spec(cfg), jax.random.key(0))
    rng = np.random.default_rng(0)
    doc1, doc2 = rng.integers(0, 256, 9), rng.integers(0, 256, 14)
    row = np.concatenate([doc1, [BYTE_EOS], doc2, [BYTE_EOS]]).astype(np.int32)[None, :24]
    other = row.copy()
    other[0, :9] = rng.integers(0, 256, 9)  # document 1 changed, its EOS kept
    rows = PackedRows([TokenArray(np.append(row[0], 0))], 24, BYTE_EOS).take(np.array([0]))

    def logits(tokens, packed=True):
        kw = {"segment_ids": rows["segment_ids"], "positions": rows["positions"]} if packed else {}
        with jax.default_matmul_precision("highest"):
            return np.asarray(T.apply(params, tokens, cfg, **kw)[0])

    a, b = logits(row), logits(other)
    np.testing.assert_allclose(a[0, 10:], b[0, 10:], rtol=0, atol=1e-6)
    assert np.abs(a[0, :9] - b[0, :9]).max() > 1e-3  # document 1's own logits did change
    # document 2 packed = document 2 alone (positions restart at 0)
    alone = logits(row[:, 10:], packed=False)
    np.testing.assert_allclose(a[0, 10:], alone[0], rtol=1e-5, atol=1e-5)
    # without segment ids the documents leak into each other: the check above is not vacuous
    c, d = logits(row, packed=False), logits(other, packed=False)
    assert np.abs(c[0, 10:] - d[0, 10:]).max() > 1e-3


def test_loss_is_the_mean_over_counted_targets():
    cfg = T.TransformerConfig(**VARIANTS["learned-xla"])
    params = nn.init(T.spec(cfg), jax.random.key(1))
    rows = PackedRows([TokenArray(_stream())], 16, BYTE_EOS).take(np.arange(4))
    batch = {k: jax.numpy.asarray(v) for k, v in rows.items()}
    loss, aux = T.loss(params, batch, cfg)
    logits = T.apply(params, batch["inputs"], cfg, segment_ids=batch["segment_ids"])[0]
    logp = jax.nn.log_softmax(logits.astype(np.float32), axis=-1)
    per = -np.take_along_axis(np.asarray(logp), rows["targets"][..., None], -1)[..., 0]
    m = rows["mask"]
    assert 0 < m.sum() < m.size  # some targets are not counted (EOS inputs)
    np.testing.assert_allclose(float(loss), (per * m).sum() / m.sum(), rtol=1e-5)
    assert float(aux["weight"]) == m.sum()


def _docs_written(tmp_path, kind: str, docs: list[str]) -> str:
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text(
            "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs))
        )
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"body": docs}), path)
    elif kind == "arrow":
        path = tmp_path / "d.arrow"
        with pa.ipc.new_file(path, pa.schema([("body", pa.string())])) as w:
            w.write_table(pa.table({"body": docs}))
    else:
        path = tmp_path / "ds"
        datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "arrow", "hf_dataset"])
def test_each_source_kind_gives_the_tokenized_documents(tmp_path, kind):
    docs = [f"doc {i}: " + "é" * (i % 5) + "z" * i for i in range(60)]
    cfg = DataConfig(
        source=kind,
        paths=[_docs_written(tmp_path, kind, docs)],
        text_field="body",
        seq_len=8,
        batch_size=4,
        val_fraction=0.0,
    )
    train = build_sources(cfg).train[0]
    np.testing.assert_array_equal(train.segments[0].data, ByteTokenizer().encode_docs(docs))
    batch = next(make_loaders(cfg)[0])
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "mask"}
    with pytest.raises(DataError, match="column|field"):
        build_sources(cfg.model_copy(update={"text_field": "nope"}))


def test_bad_files_are_skipped_and_counted_or_fail_by_the_switch(tmp_path, caplog):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(6):
        (root / f"ok{i}.py").write_text(f"x = {i}\n" * 30)
    (root / "latin.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    (root / "blob.py").write_bytes(b"\x00\x01\x02binary")
    cfg = DataConfig(paths=[str(root)], seq_len=8, batch_size=4, val_fraction=0.0)
    with caplog.at_level("WARNING"):
        stream = build_sources(cfg).train[0].segments[0].data
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warned) == 1 and "2 files" in warned[0], warned
    assert len(stream) == 6 * (30 * 6 + 1)  # the six good files, each + EOS
    with pytest.raises(DataError, match=r"(blob|latin)\.py"):
        build_sources(cfg.model_copy(update={"on_bad_file": "fail"}))


def test_an_empty_source_is_one_line_naming_it(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl.*no text documents"):
        build_sources(DataConfig(source="jsonl", paths=[str(empty)], seq_len=8, batch_size=2))


CHATS = [
    {
        "messages": [
            {"role": "user", "content": "reverse cat"},
            {"role": "assistant", "content": "tac"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": "5"},
            {"role": "user", "content": "upper ok"},
            {"role": "assistant", "content": "OK"},
        ]
    },
]


@pytest.mark.parametrize("packing", [True, False])
def test_chat_rows_count_only_assistant_tokens(tmp_path, packing):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CHATS * 20))
    cfg = DataConfig(
        source="chat",
        paths=[str(path)],
        chat_template="plain",
        packing=packing,
        seq_len=24,
        batch_size=4,
        val_fraction=0.0,
    )
    train = build_sources(cfg).train[0]
    batch = train.take(np.arange(len(train)))
    counted = ByteTokenizer().decode(batch["targets"][batch["mask"] > 0])
    for said in ("reverse", "cat", "be brief", "2+3", "upper", "User", "user"):
        assert said not in counted, (said, counted)
    full = "tac\n5\nOK\n" * 20  # packed rows drop the stream's last partial row
    assert full.startswith(counted) and len(counted) >= (len(full) - 24 if packing else len(full))


def test_val_paths_of_a_text_source_are_its_held_out_set(tmp_path):
    train, held = tmp_path / "a.jsonl", tmp_path / "v.jsonl"
    train.write_text("".join(json.dumps({"text": "a" * 30}) + "\n" for _ in range(20)))
    held.write_text("".join(json.dumps({"text": "v" * 30}) + "\n" for _ in range(20)))
    cfg = DataConfig(source="jsonl", paths=[str(train)], val_paths=[str(held)], seq_len=8)
    s = build_sources(cfg.model_copy(update={"batch_size": 2}))
    assert set(np.unique(s.train[0].segments[0].data)) == {ord("a"), BYTE_EOS}
    assert set(np.unique(s.val[0].segments[0].data)) == {ord("v"), BYTE_EOS}


def test_a_bad_chat_record_names_its_file(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(CHATS[0]) + "\n" + json.dumps({"messages": [{"content": "hi"}]}))
    cfg = DataConfig(source="chat", paths=[str(path)], seq_len=8, batch_size=2)
    with pytest.raises(DataError, match=r"c\.jsonl.*record 1.*role"):
        build_sources(cfg)
