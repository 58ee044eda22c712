"""Multimodal data (docs/method.md §7.3): the caption grammar and its pixel attributes, the document kinds and their
layouts, the held-out split, packing into rows, and the checkpointable iterator."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from data_pipelines import mllm_documents as md
from data_pipelines.embedded import load_embedded
from data_pipelines.latent_cache import write_latent_cache
from data_pipelines.packing import check_fits, make_document_dataset, pack_documents
from data_pipelines.text_corpus import python_docs_paragraphs
from latent_lm.errors import ConfigError, DataError
from latent_lm.text import captions, train_tokenizer

T, N, C = 128, 49, 4
MIX = {kind: 1.0 for kind in md.KINDS}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(md.tokenizer_training_texts("mnist"), 600)


def _split(tok, split, seed, seq_len=T):
    images, labels = load_embedded("mnist", split)
    latents = np.random.default_rng(seed).standard_normal((len(labels), N, C)).astype(np.float32)
    return md.MultimodalSplit(dataset="mnist", split=split, latents=latents, images=images, labels=labels,
                              paragraphs=python_docs_paragraphs(split), tokenizer=tok, seq_len=seq_len)


@pytest.fixture(scope="module")
def train(tok):
    return _split(tok, "train", 1)


@pytest.fixture(scope="module")
def test(tok):
    return _split(tok, "test", 2)


# ---------------------------------------------------------------------------------------------------------------
# Attributes and captions

def test_attribute_measures_mean_what_they_say():
    img = np.zeros((5, 28, 28), np.uint8)
    img[0, 4:24, 13:15] = 255  # a bar 2 wide
    img[1, 4:24, 11:17] = 255  # a bar 6 wide
    for r in range(4, 24):  # a line leaning right: further right going up
        img[2, r, 20 - (r - 4) // 2: 22 - (r - 4) // 2] = 255
    img[3, 10:18, 10:18] = 255  # a small square ...
    img[4, 2:26, 2:26] = 255  # ... and a large one
    thick, slant, size = captions.measure(img).T
    assert thick[0] == pytest.approx(2 * 40 / 44) and thick[1] == pytest.approx(2 * 120 / 52)
    assert slant[2] > 0.3 and abs(slant[0]) < 1e-12 and size[4] > 2.5 * size[3]
    np.testing.assert_array_equal(captions.measure(np.zeros((1, 28, 28, 1), np.uint8)), [[0, 0, 0]])


@pytest.mark.parametrize("dataset", ["mnist", "animal_mnist"])
def test_attributes_are_deterministic_and_bins_balanced(dataset):
    images, _ = load_embedded(dataset, "train")
    values = captions.measure(images)
    # Integer moments: an image measures the same alone as in any batch.
    np.testing.assert_array_equal(np.concatenate([captions.measure(images[i:i + 1]) for i in range(0, 200, 7)]),
                                  values[0:200:7])
    # The fixed thresholds are this split's tertiles (rounded to 3 decimals) ...
    for name, edges in captions.tertile_thresholds(images).items():
        np.testing.assert_allclose(captions.THRESHOLDS[dataset][name], edges, atol=6e-4)
    # ... so each bin holds about a third of the split.
    bins = captions.attribute_bins(images, dataset)
    for j in range(3):
        share = np.bincount(bins[:, j], minlength=3) / len(bins)
        assert share.min() >= 0.2 and share.max() <= 0.45, (j, share)


@pytest.mark.parametrize("dataset", ["mnist", "animal_mnist"])
def test_caption_round_trip_over_the_whole_grammar(dataset):
    texts = set()
    for label in range(10):
        for attrs in captions.ALL_ATTRIBUTES:
            for t in range(captions.NUM_TEMPLATES):
                text = captions.render_caption(label, attrs, dataset=dataset, template=t)
                assert captions.parse_caption(text, dataset) == (label, attrs), text
                texts.add(text)
    assert len(texts) == 10 * 27 * captions.NUM_TEMPLATES == len(captions.all_captions(dataset))
    rng = np.random.default_rng(0)
    drawn = {captions.render_caption(7, captions.ALL_ATTRIBUTES[0], rng, dataset) for _ in range(100)}
    assert len(drawn) == captions.NUM_TEMPLATES  # the rng picks every template


def test_parser_rejects_anything_else():
    good = captions.render_caption(7, captions.Attributes("thick", "right", "small"), dataset="mnist", template=0)
    assert good == "a thick digit seven leaning right, small."
    assert captions.parse_caption("  " + good + "\n") == (7, ("thick", "right", "small"))
    for junk in ("", "a thick digit seven", good + " and more", good.upper(), good.replace("seven", "ten"),
                 good.replace("thick", "huge"), good.replace(",", ""), "<bos>" + good, "which digit is this?"):
        assert captions.parse_caption(junk) is None, junk
    animal = captions.render_caption(0, captions.ALL_ATTRIBUTES[0], dataset="animal_mnist", template=1)
    assert "bear" in animal and captions.parse_caption(animal) is None
    with pytest.raises(ConfigError, match="no caption grammar"):
        captions.parse_caption(good, "cifar10")


# ---------------------------------------------------------------------------------------------------------------
# Documents

def _segments(doc, tok):
    """[(kind "text"|"image", token ids or latents)] of a document; asserts the latent span invariants."""
    tokens, is_lat, lat = doc["tokens"], doc["is_latent"], doc["latents"]
    assert tokens.dtype == np.int32 and is_lat.dtype == bool and lat.dtype == np.float32 and lat.shape[1] == C
    assert (tokens[is_lat] == 0).all() and (lat[~is_lat] == 0).all()
    out, i = [], 0
    while i < len(tokens):
        if is_lat[i]:
            j = i
            while j < len(tokens) and is_lat[j]:
                j += 1
            assert j - i == N and tokens[i - 1] == tok.boi_id and tokens[j] == tok.eoi_id
            out.append(("image", lat[i:j]))
        else:
            j = i
            while j < len(tokens) and not is_lat[j]:
                j += 1
            out.append(("text", tokens[i:j]))
        i = j
    return out


def _check_answer(q, a, label, attrs):
    name = captions.class_name(label)
    lean = {"left": "leaning left", "upright": "standing upright", "right": "leaning right"}
    yes_no = lambda truth: a == ("yes." if truth else "no.")  # noqa: E731
    if q == "which digit is this?":
        return a == f"{name}."
    if q == "how thick is the stroke?":
        return a == f"{attrs.thickness}."
    if q == "how big is it?":
        return a == f"{attrs.size}."
    if q == "which way does it lean?":
        return a == {"left": "left.", "upright": "it stands upright.", "right": "right."}[attrs.slant]
    if q.startswith("is the stroke "):
        return yes_no(q[len("is the stroke "):-1] == attrs.thickness)
    word = q[len("is it "):-1]
    if word in lean.values():
        return yes_no(word == lean[attrs.slant])
    return yes_no(word == attrs.size)


def test_document_layouts(train, tok):
    rng = np.random.default_rng(0)
    bos, eos, boi, eoi = tok.bos_id, tok.eos_id, tok.boi_id, tok.eoi_id
    for _ in range(30):
        for kind, build in md.BUILDERS.items():
            doc = build(train, rng)
            segs, tokens, images = _segments(doc, tok), doc["tokens"], doc["images"]
            assert doc["kind"] == kind and tokens[0] == bos and tokens[-1] == eos and len(tokens) <= T
            shown = [s for k, s in segs if k == "image"]
            for latents, i in zip(shown, images):  # each span is the cached μ of the image it names
                np.testing.assert_array_equal(latents, train.latents[i])
            pre = doc["prompt_len"]
            if kind == "text_to_image":
                assert len(shown) == 1 and tokens[pre - 1] == boi and doc["is_latent"][pre]
                assert list(tokens[-2:]) == [eoi, eos]
                got = captions.parse_caption(tok.decode(tokens[1:pre - 1]))
                assert got == (train.labels[images[0]], train.attributes[images[0]]) or list(tokens[1:pre - 1]) == [
                    tok.null_id]
            elif kind == "image_to_text":
                assert list(tokens[:2]) == [bos, boi] and pre == N + 3 and tokens[pre - 1] == eoi
                got = captions.parse_caption(tok.decode(tokens[pre:-1]))
                assert got == (train.labels[images[0]], train.attributes[images[0]])
            elif kind == "question":
                assert list(tokens[:2]) == [bos, boi] and len(shown) == 1
                q, a = tok.decode(tokens[N + 3:pre]), tok.decode(tokens[pre:-1])
                assert q.endswith("?") and a.startswith(" ")
                assert _check_answer(q, a[1:], int(train.labels[images[0]]), train.attributes[images[0]]), (q, a)
            elif kind == "successor":
                a_, b_ = images
                assert len(shown) == 2 and train.labels[b_] == (train.labels[a_] + 1) % 10
                assert tokens[pre - 1] == boi and doc["is_latent"][pre] and doc["is_latent"][:pre].sum() == N
                assert tok.decode(tokens[:pre], skip_special=True) == "the digit after  is "
                assert tok.decode(tokens[-2:-1]) == "."
            elif kind == "paragraph":
                p = doc["paragraph"]
                ids = np.asarray(tok.encode(train.paragraphs[p]))
                body = tokens[1:-1]
                assert len(shown) == 0 and 0 < len(body) <= T - 2
                assert any(np.array_equal(ids[s:s + len(body)], body) for s in range(0, len(ids), T - 2))
            else:  # caption
                assert len(shown) == 0 and pre == 1
                got = captions.parse_caption(tok.decode(tokens[1:-1]))
                assert got == (train.labels[images[0]], train.attributes[images[0]])


def test_prompt_forms(train, tok):
    rng = np.random.default_rng(1)
    for kind, last in (("text_to_image", tok.boi_id), ("image_to_text", tok.eoi_id), ("successor", tok.boi_id)):
        doc = md.BUILDERS[kind](train, rng)
        p = md.prompt(doc)
        assert p["tokens"][-1] == last and len(p["latents"]) == len(p["is_latent"]) == doc["prompt_len"]
        np.testing.assert_array_equal(p["tokens"], doc["tokens"][:doc["prompt_len"]])
    doc = md.text_to_image(train, rng, image=5)
    text = tok.decode(doc["tokens"][1:doc["prompt_len"] - 1])
    np.testing.assert_array_equal(md.caption_prompt(tok, text), md.prompt(doc)["tokens"])
    np.testing.assert_array_equal(md.caption_prompt(tok, None), [tok.bos_id, tok.null_id, tok.boi_id])


@pytest.mark.parametrize("rate", [0.0, 0.1, 1.0])
def test_null_prompt_rate(train, tok, rate):
    source = md.DocumentSource(train, seed=3, mix={"text_to_image": 1.0}, null_prompt_rate=rate)
    docs = [source[i] for i in range(1500)]
    null = np.mean([d["tokens"][1] == tok.null_id for d in docs])
    assert abs(null - rate) < 0.025, null
    assert all(d["prompt_len"] == 3 for d in docs if d["tokens"][1] == tok.null_id)


def test_mix_and_determinism(train):
    mix = {"text_to_image": 3, "paragraph": 1, "successor": 0}
    source = md.DocumentSource(train, seed=7, mix=mix)
    kinds = [source[i]["kind"] for i in range(800)]
    assert set(kinds) == {"text_to_image", "paragraph"} and 0.7 < kinds.count("text_to_image") / 800 < 0.8
    again = md.DocumentSource(train, seed=7, mix=mix)
    for i in (0, 5, 799, 10 ** 9):
        a, b = source[i], again[i]
        assert all(np.array_equal(a[k], b[k]) for k in ("tokens", "is_latent", "latents", "images"))
    np.testing.assert_array_equal(md.document_dataset(train, 7, mix)[3]["tokens"], source[3]["tokens"])
    other = md.DocumentSource(train, seed=8, mix=mix)
    assert not all(np.array_equal(source[i]["tokens"], other[i]["tokens"]) for i in range(5))
    for bad, match in (({"video": 1}, "unknown document kind"), ({"caption": -1}, "≥ 0"),
                       ({"caption": 0}, "no positive weight")):
        with pytest.raises(ConfigError, match=match):
            md.DocumentSource(train, seed=0, mix=bad)
    with pytest.raises(ConfigError, match="null_prompt_rate"):
        md.DocumentSource(train, seed=0, mix=mix, null_prompt_rate=1.5)


def test_train_and_test_documents_are_disjoint(train, test, tok):
    rows = {r.tobytes(): "train" for r in train.latents} | {r.tobytes(): "test" for r in test.latents}
    test_paragraphs = set(test.paragraphs)
    for data, split in ((train, "train"), (test, "test")):
        source = md.DocumentSource(data, seed=0, mix=MIX)
        for i in range(300):
            doc = source[i]
            for k, latents in _segments(doc, tok):
                if k == "image":
                    assert rows[latents.tobytes()] == split
            if doc["kind"] == "paragraph":
                assert (data.paragraphs[doc["paragraph"]] in test_paragraphs) == (split == "test")
    assert not test_paragraphs & set(train.paragraphs)
    assert not test_paragraphs & set(md.tokenizer_training_texts("mnist"))


def test_load_split_reads_the_cache_in_embedded_order(tmp_path, tok):
    _, labels = load_embedded("mnist", "test")
    latents = np.random.default_rng(4).standard_normal((len(labels), N, C)).astype(np.float32)
    write_latent_cache(str(tmp_path / "ok"), latents, labels, {}, num_shards=3)
    data = md.load_split("mnist", "test", str(tmp_path / "ok"), tok, T)
    np.testing.assert_array_equal(data.latents, latents)
    assert data.paragraphs == python_docs_paragraphs("test")
    write_latent_cache(str(tmp_path / "bad"), latents, np.roll(labels, 1), {})
    with pytest.raises(DataError, match="re-run --mode=encode"):
        md.load_split("mnist", "test", str(tmp_path / "bad"), tok, T)


# ---------------------------------------------------------------------------------------------------------------
# Packing and the iterator

def _check_row(row, capacity):
    seg, pos = row["segment_ids"], row["positions"]
    used = seg > 0
    n = int(used.sum())
    assert used[:n].all() and not used[n:].any()  # documents first, then padding
    assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all() and (n == 0 or seg[0] == 1)
    assert (row["tokens"][~used] == 0).all() and not row["is_latent"][~used].any()
    assert (row["latents"][~used] == 0).all() and (pos[~used] == 0).all()
    assert row["is_latent"].sum() <= capacity
    docs = []
    for s in range(1, int(seg.max(initial=0)) + 1):
        idx = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
        docs.append({k: row[k][idx] for k in ("tokens", "is_latent", "latents")})
    return docs


def _key(doc):
    return doc["tokens"].tobytes() + doc["is_latent"].tobytes() + doc["latents"].tobytes()


def test_packing_keeps_documents_whole_and_respects_the_latent_capacity(train, tok):
    source = md.DocumentSource(train, seed=0, mix={"text_to_image": 2, "paragraph": 1, "caption": 1})
    docs = [source[i] for i in range(60)]
    for capacity, seq_len in ((60, 256), (1000, 256)):
        rows = list(pack_documents(grain.MapDataset.source(docs).to_iter_dataset(), seq_len=seq_len,
                                   latent_capacity=capacity, num_bins=4, shuffle_bins=False))
        assert all(r["tokens"].shape == (seq_len,) and r["latents"].shape == (seq_len, C) for r in rows)
        packed = [d for r in rows for d in _check_row(r, capacity)]
        # Every document comes out exactly once and unchanged: none is split, dropped or altered.
        assert sorted(map(_key, packed)) == sorted(map(_key, docs))
        per_row = [int(r["is_latent"].sum()) // N for r in rows]
        if capacity == 60:
            assert max(per_row) == 1 and len(rows) >= sum(d["kind"] == "text_to_image" for d in docs)
        else:
            assert max(per_row) >= 3  # without the capacity several images share a row
    long = dict(docs[0], tokens=np.zeros(300, np.int32), is_latent=np.zeros(300, bool),
                latents=np.zeros((300, C), np.float32), kind="paragraph")
    with pytest.raises(DataError, match="paragraph document of 300 positions does not fit"):
        list(pack_documents(grain.MapDataset.source([long]).to_iter_dataset(), seq_len=256, latent_capacity=60,
                            num_bins=2))


def test_fit_checks_name_the_kind(train, tok):
    check_fits(train, MIX, 2 * N)
    with pytest.raises(ConfigError, match="latent_capacity=49 is below the 98 latent positions of a successor"):
        check_fits(train, MIX, N)
    short = _split(tok, "test", 0, seq_len=80)
    with pytest.raises(ConfigError, match="seq_len=80 is too short for successor documents"):
        check_fits(short, MIX, 2 * N)
    check_fits(short, {"text_to_image": 1, "paragraph": 1}, N)
    for kind in md.KINDS:  # the bound holds for every document built
        length, latents = md.max_document_shape(train, kind)
        rng = np.random.default_rng(0)
        for _ in range(20):
            doc = md.build_document(train, kind, rng)
            assert len(doc["tokens"]) <= length and doc["is_latent"].sum() <= latents


def test_iterator_batches_shards_and_resumes(train):
    # 5 open rows per pack: a batch of 8 ends inside a pack, so the state holds a pack half emitted.
    kw = dict(mix=MIX, latent_capacity=2 * N, null_prompt_rate=0.1, packing_bins=5)
    it = iter(make_document_dataset(train, 8, seed=0, **kw))
    first = next(it)
    assert {k: (v.dtype, v.shape) for k, v in first.items()} == {
        "tokens": (np.int32, (8, T)), "is_latent": (np.bool_, (8, T)), "latents": (np.float32, (8, T, C)),
        "segment_ids": (np.int32, (8, T)), "positions": (np.int32, (8, T))}
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # the train loop stores it as JSON
    assert state["next_row"] > 0
    expected = [next(it) for _ in range(3)]
    resumed = iter(make_document_dataset(train, 8, seed=0, **kw))
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(3)]):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    for b in expected:
        for row in range(8):
            _check_row({k: v[row] for k, v in b.items()}, 2 * N)
    # Same seed, same stream; two processes read different documents, half the global batch each.
    np.testing.assert_array_equal(next(iter(make_document_dataset(train, 8, seed=0, **kw)))["tokens"],
                                  first["tokens"])
    halves = [next(iter(make_document_dataset(train, 8, seed=0, process_index=p, process_count=2, **kw)))
              for p in (0, 1)]
    assert halves[0]["tokens"].shape == (4, T) and not np.array_equal(halves[0]["tokens"], halves[1]["tokens"])
    with pytest.raises(ConfigError, match="multiple of the 3 processes"):
        make_document_dataset(train, 8, seed=0, process_index=0, process_count=3, **kw)


def test_single_pass_ends(test):
    ds = make_document_dataset(test, 4, seed=0, mix={"caption": 1}, latent_capacity=0, num_documents=30,
                               shuffle=False, repeat=False, drop_remainder=False)
    batches = list(ds)  # ends: no repeat
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == 30  # every document, once
    assert all(b["tokens"].shape[1:] == (T,) for b in batches)
