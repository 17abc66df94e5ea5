"""Documents from files, folders and the embedded corpora; tokenizers; packing; batch streams."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codebook_lens.model.tokenizer import gpt2_tokenizer, load_tokenizer
from codebook_lens.training.data import (
    BatchStream,
    DataConfig,
    Document,
    check_block_size,
    fixed_batches,
    load_documents,
    pack_tokens,
    split_documents,
)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ sources
def test_folder_labels_come_from_subfolders(tmp_path: Path) -> None:
    write(tmp_path / "sport" / "1.txt", "goal")
    write(tmp_path / "sport" / "deep" / "2.md", "match")
    write(tmp_path / "tech" / "3.txt", "chip")
    write(tmp_path / "top.txt", "no label")
    write(tmp_path / "notes.csv", "ignored")
    write(tmp_path / ".hidden" / "4.txt", "ignored")
    docs = load_documents(str(tmp_path))
    assert [(d.id, d.text, d.label) for d in docs] == [
        ("sport/1", "goal", "sport"),
        ("sport/deep/2", "match", "sport"),
        ("tech/3", "chip", "tech"),
        ("top", "no label", None),
    ]


def test_jsonl_file(tmp_path: Path) -> None:
    rows = [{"text": "a b", "label": "x", "id": "first"}, {"text": "c"}, {"text": "   "}]
    f = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = load_documents(str(f))
    assert docs == [Document("first", "a b", "x"), Document("d:2", "c", None)]


def test_single_text_file(tmp_path: Path) -> None:
    f = write(tmp_path / "book.md", "# Title\nbody")
    assert load_documents(str(f)) == [Document("book", "# Title\nbody", None)]


def test_limit_takes_turns_over_labels(tmp_path: Path) -> None:
    for lab in ("a", "b"):
        for i in range(3):
            write(tmp_path / lab / f"{i}.txt", f"{lab}{i}")
    assert [d.text for d in load_documents(str(tmp_path), limit=3)] == ["a0", "b0", "a1"]


def test_bbc_corpus() -> None:
    docs = load_documents("bbc")
    assert len(docs) == 2225
    assert {d.label for d in docs} == {"business", "entertainment", "politics", "sports", "tech"}
    # The one article that is not valid UTF-8 is read with replacement characters.
    assert any("\ufffd" in d.text for d in docs)
    assert docs[0].id == "business/001" and docs[0].text.strip()


def test_shakespeare_corpus() -> None:
    docs = load_documents("shakespeare", limit=4)
    assert len(docs) == 4 and len({d.label for d in docs}) == 4
    assert all(d.text.startswith("# ") for d in docs)


# ------------------------------------------------------------------- errors
def test_missing_path() -> None:
    with pytest.raises(FileNotFoundError, match="no-such-dir.*no such file or folder"):
        load_documents("no-such-dir")


def test_empty_corpus(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "  \n ")
    with pytest.raises(ValueError, match="the corpus is empty"):
        load_documents(str(tmp_path))
    (tmp_path / "a.txt").unlink()
    with pytest.raises(ValueError, match=r"no \.txt, \.md.* files in this folder"):
        load_documents(str(tmp_path))


def test_non_utf8_user_file_is_named(tmp_path: Path) -> None:
    bad = write(tmp_path / "sub" / "bad.txt", b"caf\xe9 ok")
    write(tmp_path / "good.txt", "fine")
    with pytest.raises(ValueError, match=r"bad\.txt: not valid UTF-8 \(byte 3"):
        load_documents(str(tmp_path))
    with pytest.raises(ValueError, match="bad.txt: not valid UTF-8"):
        load_documents(str(bad))


def test_bad_jsonl(tmp_path: Path) -> None:
    f = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: each line must be a JSON object"):
        load_documents(str(f))
    write(f, '{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        load_documents(str(f))


def test_unsupported_file_and_bad_arguments(tmp_path: Path) -> None:
    f = write(tmp_path / "x.csv", "a,b")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_documents(str(f))
    with pytest.raises(ValueError, match="limit=0 is invalid"):
        load_documents("bbc", limit=0)
    with pytest.raises(ValueError, match="block_size=1 is invalid"):
        DataConfig(block_size=1)
    with pytest.raises(ValueError, match="val_fraction=0.95 is invalid"):
        DataConfig(val_fraction=0.95)


# -------------------------------------------------------------------- split
def test_split_by_document_is_seeded_and_disjoint() -> None:
    docs = [Document(str(i), f"text {i}") for i in range(20)]
    train, val = split_documents(docs, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert {d.id for d in train}.isdisjoint({d.id for d in val})
    assert split_documents(docs, 0.25, seed=3) == (train, val)
    assert split_documents(docs, 0.25, seed=4)[1] != val
    assert split_documents(docs, 0.0) == (docs, [])
    with pytest.raises(ValueError, match="needs at least 2 documents"):
        split_documents(docs[:1], 0.1)


# --------------------------------------------------------------- tokenizers
def test_gpt2_tokenizer_is_the_real_one() -> None:
    tok = gpt2_tokenizer()
    assert len(tok) == 50257
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok.eos_token_id == 50256


def test_bpe_trained_on_corpus_round_trips(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    docs = [Document(str(i), "the quick brown fox jumps over the lazy dog " * 5) for i in range(8)]
    tok = load_tokenizer("bpe:300", docs)
    assert len(tok) <= 300 and tok.eos_token_id == 0
    ids = tok("the lazy dog")["input_ids"]
    assert tok.decode(ids) == "the lazy dog"
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert again("the lazy dog")["input_ids"] == ids
    with pytest.raises(ValueError, match="bpe:abc' is invalid"):
        load_tokenizer("bpe:abc", docs)
    with pytest.raises(ValueError, match="must be an integer >= 260"):
        load_tokenizer("bpe:10", docs)
    with pytest.raises(FileNotFoundError, match="tokenizer='/no/such/dir': cannot load it"):
        load_tokenizer("/no/such/dir")


def test_pack_tokens_puts_eos_between_documents() -> None:
    tok = gpt2_tokenizer()
    docs = [Document("a", "Hello world"), Document("b", "Hello")]
    blocks = pack_tokens(docs, tok, 2)
    # Hello world <eos> Hello <eos> -> 5 tokens -> 2 blocks of 2, tail dropped
    assert blocks.tolist() == [[15496, 995], [50256, 15496]]
    assert blocks.dtype == torch.int64
    with pytest.raises(ValueError, match="block_size=8 is invalid for this corpus"):
        pack_tokens(docs, tok, 8)


def test_block_size_longer_than_context() -> None:
    from transformers import GPT2Config

    check_block_size(128, GPT2Config(n_positions=128))
    with pytest.raises(ValueError, match="block_size=129 is invalid for this model: its context"):
        check_block_size(129, GPT2Config(n_positions=128))


# ------------------------------------------------------------------ batches
def test_batch_stream_resumes_exactly() -> None:
    blocks = torch.arange(40).view(20, 2)
    a = BatchStream(blocks, 3, seed=7)
    first = [next(a) for _ in range(8)]  # crosses an epoch boundary (6 batches per epoch)
    state = a.state_dict()
    rest = [next(a) for _ in range(5)]
    b = BatchStream(blocks, 3, seed=7)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(x, y) for x, y in zip(rest, [next(b) for _ in range(5)], strict=True))
    # Every block appears once per epoch; epochs are shuffled differently.
    epoch0 = torch.cat(first[:6]).view(-1, 2)[:, 0] // 2
    assert sorted(epoch0.tolist()) == sorted(set(epoch0.tolist()))
    assert not torch.equal(torch.cat(first[:6]), torch.cat(first[6:8] + rest[:4]))


def test_batch_stream_state_mismatch_is_refused() -> None:
    s = BatchStream(torch.zeros(10, 2, dtype=torch.long), 2, seed=0).state_dict()
    with pytest.raises(ValueError, match="field 'num_blocks' is 10 but this run has 12"):
        BatchStream(torch.zeros(12, 2, dtype=torch.long), 2, seed=0).load_state_dict(s)


def test_ranks_share_the_global_batch() -> None:
    blocks = torch.arange(64).view(32, 2)
    single = BatchStream(blocks, 4, seed=1)
    ranks = [BatchStream(blocks, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(10):
        assert torch.equal(next(single), torch.cat([next(r) for r in ranks]))


def test_batch_stream_needs_enough_blocks_and_fixed_batches() -> None:
    with pytest.raises(ValueError, match="batch_size=8 .* only 5 blocks"):
        BatchStream(torch.zeros(5, 4, dtype=torch.long), 8)
    parts = fixed_batches(torch.arange(10).view(5, 2), 2)
    assert [p.shape[0] for p in parts] == [2, 2, 1]
    assert len(fixed_batches(torch.arange(10).view(5, 2), 2, max_batches=2)) == 2
