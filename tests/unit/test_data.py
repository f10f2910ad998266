import json

import pytest

from plasticity.data import load_corpus, load_statements


def test_repe_facts_are_shipped_whole():
    st = load_statements("facts_true_false")
    assert len(st) == 612
    assert sum(s.label for s in st) == 306
    assert st[0].text.startswith("The Earth's atmosphere protects us")


def test_statement_without_label_is_named(tmp_path):
    bad = tmp_path / "facts.csv"
    bad.write_text("statement,label\nThe sky is blue.,1\nWater is dry.,\n")
    with pytest.raises(ValueError, match=r"facts.csv:3: expected a statement and a label 0 or 1"):
        load_statements(str(bad))


def test_statement_file_missing_columns(tmp_path):
    bad = tmp_path / "facts.csv"
    bad.write_text("text\nhello\n")
    with pytest.raises(ValueError, match="missing column"):
        load_statements(str(bad))


def test_shipped_corpora():
    pubmed = load_corpus("pubmed")
    assert len(pubmed) == 2000 and all(len(d) > 200 for d in pubmed)
    e2e = load_corpus("e2e", max_documents=3)
    assert len(e2e) == 3 and " ||| " in e2e[0] and e2e[0].startswith("name[")


def test_corpus_files_by_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(3)))
    assert load_corpus(str(tmp_path / "a.jsonl")) == ["doc 0", "doc 1", "doc 2"]
    (tmp_path / "b.txt").write_text("first para\nstill first\n\nsecond\n")
    assert load_corpus(str(tmp_path / "b.txt")) == ["first para\nstill first", "second"]
    pq.write_table(pa.table({"id": [1, 2], "body": ["x", "y"]}), tmp_path / "c.parquet")
    assert load_corpus(str(tmp_path / "c.parquet"), text_field="body") == ["x", "y"]
    with pytest.raises(ValueError, match="cannot tell which column"):
        load_corpus(str(tmp_path / "c.parquet"))
    (tmp_path / "d.csv").write_text("text,n\nhello,1\n")
    assert load_corpus(str(tmp_path / "d.csv")) == ["hello"]


def test_missing_corpus_is_named():
    with pytest.raises(FileNotFoundError, match="neither a shipped corpus"):
        load_corpus("/nope/corpus.parquet")
