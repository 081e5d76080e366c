"""Labelled datasets from a researcher's own file: token labels from whole texts or character
spans, padding never probed, bad lines named; and ``mechscope probe --data`` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.errors import InputError
from mechscope.probing.datasets import load_dataset_file

WORDS = ["the", "cat", "sat", "on", "mat", "x", "=", "f", "(", ")", "print", "def", "return", "a", "b"]


@pytest.fixture
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)} | {"[UNK]": len(WORDS), "[PAD]": len(WORDS) + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def write(tmp_path, records, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_labels_follow_texts_and_spans(tmp_path, tokenizer):
    text = "the cat sat x = f ( a ) on the mat"
    start, end = text.index("x"), text.index(")") + 1
    path = write(tmp_path, [{"text": "the cat sat on the mat", "label": 0}, "",
                            {"text": "def f ( a ) return a", "label": 1},
                            {"text": text, "spans": [[start, end]]}])  # fmt: skip
    data = load_dataset_file(path, tokenizer, seq_len=8)
    assert data.name == "d" and data.tokens.shape == (3, 8)
    # the first text has 6 tokens: padded, and the padding is not probed
    assert data.selected[0].tolist() == [True] * 6 + [False] * 2
    assert data.tokens[0, 6:].tolist() == [tokenizer.pad_token_id] * 2
    assert data.labels[0][data.selected[0]].tolist() == [0] * 6
    assert data.labels[1][data.selected[1]].tolist() == [1] * 7
    # the third keeps its first 8 tokens; tokens inside the span (x = f ( a )) are labelled 1
    assert data.selected[2].all()
    assert data.labels[2].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    words = text.split()[:8]
    assert data.tokens[2].tolist() == [WORDS.index(w) for w in words]


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"text": "the cat", "label": 0}', "not json"], "line 2: not valid JSON"),
        (['{"text": "the cat", "label": 2}', '{"text": "a", "label": 1}'], 'line 1: "label" must be 0 or 1'),
        (['{"text": "the cat", "label": true}', '{"text": "a", "label": 1}'], "must be 0 or 1"),
        (['{"text": "the cat"}', '{"text": "a", "label": 1}'], 'either "label"'),
        (['{"text": "the cat", "label": 0, "spans": []}', '{"text": "a", "label": 1}'], 'either "label"'),
        (['{"text": "the cat", "spans": [[3, 99]]}', '{"text": "a", "label": 1}'], "<= 7"),
        (['{"text": "", "label": 0}', '{"text": "a", "label": 1}'], 'non-empty "text"'),
        (['["the cat", 0]', '{"text": "a", "label": 1}'], "line 1: each line must be an object"),
        (['{"text": "the cat", "label": 1}'], "at least 2"),
        (['{"text": "the cat", "label": 1}', '{"text": "a", "label": 1}'], "same label"),
    ],
)
def test_bad_files_are_named(tmp_path, tokenizer, lines, match):
    with pytest.raises(InputError, match=match):
        load_dataset_file(write(tmp_path, lines), tokenizer)


def test_missing_file_and_bad_length(tmp_path, tokenizer):
    with pytest.raises(InputError, match="no dataset file"):
        load_dataset_file(tmp_path / "absent.jsonl", tokenizer)
    path = write(tmp_path, [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    with pytest.raises(InputError, match="seq_len"):
        load_dataset_file(path, tokenizer, seq_len=0)


@pytest.mark.slow
def test_probe_command_on_a_file(tmp_path, capsys):
    """``mechscope probe --data`` on the bundled model: a report per layer, as printed."""
    from mechscope.cli import main

    prose = ["To be, or not to be, that is the question.", "Now is the winter of our discontent.",
             "My kingdom for a horse!", "Friends, Romans, countrymen, lend me your ears.",
             "All the world's a stage, and all the men and women merely players."]  # fmt: skip
    code = ["def add(a, b):\n    return a + b", "for i in range(10):\n    total += i",
            "import os\nos.path.join('a', 'b')", "x = [n * n for n in values if n]",
            "while True:\n    break"]  # fmt: skip
    path = write(tmp_path, [{"text": t, "label": 0} for t in prose] + [{"text": t, "label": 1} for t in code])
    out = tmp_path / "report.json"
    assert main(["probe", "--data", str(path), "--layers", "0", "2", "--ks", "1", "2", "--seq-len", "12",
                 "--quiet", "--threads", "1", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["dataset"] == "d" and [row["layer"] for row in report["layers"]] == [0, 2]
    # every token of the 10 texts (at most 12 each) is probed, none of the padding
    assert 10 * 5 < report["n_train"] + report["n_test"] <= 10 * 12 and report["n_test"] > 0
    assert abs(report["positive_rate"] - 0.5) < 0.2
    printed = capsys.readouterr().out
    assert "top neurons (k=2)" in printed and "labels from d.jsonl (10 texts)" in printed
    for row in report["layers"]:
        assert [s["k"] for s in row["sparse"]] == [1, 2] and 0 <= row["dense"]["f1"] <= 1
    with pytest.raises(SystemExit):
        main(["probe", "--data", str(path), "--dataset", "code_block"])


def test_study_split_holds_both_labels_on_both_sides(model):
    """Labels per text on few texts: the split moves to the next seed until train and test both
    hold 0 and 1, says which seed it used, and names the problem when no split can."""
    from mechscope.probing.datasets import TokenDataset
    from mechscope.probing.study import probing_study

    tokens = torch.randint(50, (8, 5), generator=torch.Generator().manual_seed(0))
    per_text = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    data = TokenDataset("few", tokens, per_text[:, None].expand(8, 5).clone(), torch.ones(8, 5, dtype=torch.bool), "")
    report = probing_study(model, data, "resid_post", [0], ks=(1,), test_fraction=0.25)
    # two texts held out; with both labels on both sides, exactly one of them is a label-1 text
    assert report["n_test"] == 10 and report["n_train"] == 30
    from mechscope.probing.data import split_by_sequence

    assert report["split_seed"] > 0  # seed 0 holds out two label-0 texts
    sequence = torch.arange(8).repeat_interleave(5)
    for seed in range(report["split_seed"]):  # the seeds skipped really put one label on one side
        _, test = split_by_sequence(sequence, 0.25, seed)
        assert per_text[sequence[test]].unique().numel() == 1
    _, test = split_by_sequence(sequence, 0.25, report["split_seed"])
    assert per_text[sequence[test]].unique().tolist() == [0, 1]
    data.labels[7] = 0  # one label-1 text cannot sit on both sides
    with pytest.raises(InputError, match="add texts of the rarer label"):
        probing_study(model, data, "resid_post", [0], ks=(1,), test_fraction=0.25)
