"""The multimodal model at paper scale (docs/experiments.md §10.4): COCO captions and web text read from tfds
datasets prepared here, offline, in tfds's own ArrayRecord format (tfds's feature serializer, ArrayRecord writer and
dataset_info proto, as `tfds build --file_format=array_record` leaves them), the train_tokenizer and encode stages
run on them, packed documents built from them, and `configs/mllm.py:scale=paper`, whose 1.3B train step lowers in
the planner.

tfds's `coco_captions` builder imports TensorFlow to be constructed (its features name `tf.int64`), so neither
`tfds.data_source` nor `tfds.testing.mock_data` can open it here; the readers (data_pipelines/tfds_records.py) read
the prepared files, which is what these tests write.
"""

import importlib.util
import io
import math
import os
import pickle

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import mllm
from data_pipelines import coco_captions, coco_documents, image_pipeline, web_text
from data_pipelines.imagenet import center_crop_arr
from data_pipelines.latent_cache import LatentCacheSource, encode_to_latent_cache
from latent_lm import experiment, stage_inputs
from latent_lm.config_validation import validate
from latent_lm.errors import ConfigError, DataError, MissingInputError
from latent_lm.latents import LatentNormalization
from latent_lm.parallel.mesh import logical_rules, make_mesh
from latent_lm.planning import plan_memory
from latent_lm.text.tokenizer import TextTokenizer
from latent_lm.training.tasks import VAETask, make_generator_task
from conftest import write_random_checkpoint

WORDS = ("a man riding a wave on top of a surfboard", "two giraffes standing next to a tall tree",
         "a plate of food with broccoli and rice", "a red double decker bus on a city street",
         "a cat sleeping on a laptop keyboard", "a kitchen with a stove and a white refrigerator")
TEXTS = ("The history of the city goes back to a small fishing village on the river.",
         " ".join(f"In week {k} of the report, prices rose by {3 * k + 1} percent." for k in range(16)),
         "Click here to read more about our summer sale.")  # the middle one spans several rows


def _features():
    """tfds's coco_captions/2014 features (object_detection/coco_captions.py), with np.int64 for its tf.int64."""
    import tensorflow_datasets as tfds

    f = tfds.features
    return f.FeaturesDict({
        "image": f.Image(encoding_format="jpeg"), "image/filename": f.Text(), "image/id": np.int64,
        "objects": f.Sequence({"id": np.int64, "area": np.int64, "bbox": f.BBoxFeature(),
                               "label": f.ClassLabel(num_classes=80), "is_crowd": np.bool_}),
        "captions": f.Sequence({"text": np.str_, "id": np.int64})})


def _write(data_dir: str, builder: str, version: str, features, splits: dict[str, list[dict]],
           file_format: str = "array_record") -> str:
    """`<data_dir>/<builder>/<version>/` as `tfds build --file_format=array_record` leaves it: one shard per split
    of tfds-serialized examples, dataset_info.json and features.json."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from google.protobuf import json_format
    from tensorflow_datasets.core import naming
    from tensorflow_datasets.core.proto import dataset_info_pb2

    name, _, config = builder.partition("/")
    builder_dir = os.path.join(data_dir, builder, version)
    os.makedirs(builder_dir)
    info = dataset_info_pb2.DatasetInfo(name=name, config_name=config, version=version, file_format=file_format)
    for split, examples in splits.items():
        template = naming.ShardedFileTemplate(data_dir=builder_dir, dataset_name=name, split=split,
                                              filetype_suffix="array_record")
        writer = ArrayRecordWriter(os.fspath(template.sharded_filepath(shard_index=0, num_shards=1)), "group_size:1")
        for example in examples:
            writer.write(features.serialize_example(example))
        writer.close()
        info.splits.append(dataset_info_pb2.SplitInfo(name=split, shard_lengths=[len(examples)], num_bytes=0))
    with open(os.path.join(builder_dir, "dataset_info.json"), "w") as f:
        f.write(json_format.MessageToJson(info))
    features.save_config(builder_dir)
    return builder_dir


def _coco_example(rng, image_id: int, num_captions: int = 5) -> dict:
    h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    jpeg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(jpeg, format="JPEG", quality=95)
    captions = [f" {WORDS[(image_id + k) % len(WORDS)].capitalize()}  number {image_id}.\n"
                for k in range(num_captions)]  # stray spaces and a newline, as COCO's raw captions have
    return {"image": io.BytesIO(jpeg.getvalue()), "image/filename": f"COCO_{image_id:012d}.jpg",
            "image/id": image_id, "objects": {"id": [image_id], "area": [10], "label": [1], "is_crowd": [False],
                                              "bbox": [np.array([0.1, 0.2, 0.5, 0.6], np.float32)]},
            "captions": {"text": captions, "id": list(range(10 * image_id, 10 * image_id + num_captions))}}


# Karpathy splits: train + restval → the experiment's "train", test → "test" (val unused).
COCO_SPLITS = {"train": [101, 102, 103, 104, 105], "restval": [201, 202], "val": [301], "test": [401, 402, 403]}


def prepare_coco(data_dir: str, splits: dict[str, list[int]] = COCO_SPLITS, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return _write(data_dir, "coco_captions/2014", "1.1.0", _features(),
                  {s: [_coco_example(rng, i) for i in ids] for s, ids in splits.items()})


def prepare_c4(data_dir: str) -> str:
    """c4/en/3.1.0 with its train and validation splits (tfds's c4 features text, url, timestamp)."""
    import tensorflow_datasets as tfds

    f = tfds.features
    features = f.FeaturesDict({"text": f.Text(), "url": f.Text(), "timestamp": f.Text()})
    rows = lambda texts: [{"text": t, "url": "https://example.com", "timestamp": "2019-04-25T12:57:54Z"}
                          for t in texts]
    return _write(data_dir, "c4/en", "3.1.0", features, {"train": rows(TEXTS), "validation": rows(TEXTS[::-1])})


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    prepare_coco(data_dir)
    prepare_c4(data_dir)
    return data_dir


SEQ_LEN = 96


def small_paper_config(data_dir: str) -> ml_collections.ConfigDict:
    """`scale=paper` with every size cut (32² images → 2×2 latents, a 1-layer backbone on rows of 64) and the
    documents read from `data_dir`: the paper-scale data path, fast."""
    c = mllm.get_config("scale=paper")
    c.data.update(dict(data_dir=data_dir, image_size=32, num_workers=0, cache_shards=2, encode_batch_size=8))
    c.vae.update(dict(width=32, depth=1, num_heads=2, dtype="float32"))
    c.vae_loss.update(dict(disc_channels=8, disc_layers=1))
    c.text.vocab_size = 400
    c.model.update(dict(depth=1, width=32, num_heads=2, text_vocab_size=400, max_len=SEQ_LEN, head_capacity=8,
                        dtype="float32", remat="none"))
    c.head.depth = 1
    c.documents.update(dict(max_caption_tokens=48, tokenizer_images=6, tokenizer_texts=3))
    c.mesh.shape = (-1, 1, 1)
    return c


def _files(directory: str) -> dict[str, bytes]:
    """Every file below `directory` (relative path → bytes): what a stage must leave as it was."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.fixture(scope="module")
def imagenet_vae_run(tfds_dir, tmp_path_factory):
    """The ImageNet σ-VAE run as configs/imagenet_vae.py leaves it: vae/ (a random checkpoint of the paper config's
    σ-VAE) and its ImageNet latent caches (latents/{train,test}, meta fingerprint dataset="imagenet2012")."""
    config, run = small_paper_config(tfds_dir), str(tmp_path_factory.mktemp("imagenet_vae"))
    write_random_checkpoint(VAETask.from_config(config), config.vae_optim, config.vae_train, f"{run}/vae",
                            config, {}, np.random.default_rng(0))
    latents = np.random.default_rng(1).normal(size=(6, 4, 16)).astype(np.float32)
    for split in ("train", "test"):
        encode_to_latent_cache(f"{run}/latents/{split}", num_examples=6, encode_fn=lambda x: x, num_shards=2,
                               read_batches=lambda a, b: [(latents[a:b], np.arange(a, b))], process_index=0,
                               process_count=1, fingerprint={"dataset": "imagenet2012", "split": split})
    return run


@pytest.fixture(scope="module")
def tokenizer_run(tfds_dir, imagenet_vae_run, tmp_path_factory):
    """(config, workdir) after the train_tokenizer and encode stages, the σ-VAE read in place from the ImageNet σ-VAE
    run (`data.vae_workdir`, docs/experiments.md §10.4), whose files are checked unchanged."""
    config, workdir = small_paper_config(tfds_dir), str(tmp_path_factory.mktemp("run"))
    config.data.vae_workdir = imagenet_vae_run
    before = _files(imagenet_vae_run)
    mesh, rules = make_mesh(config.mesh), logical_rules(config.mesh)
    experiment.train_text_tokenizer(config, workdir, mesh, rules)
    experiment.encode(config, workdir, mesh, rules)
    assert _files(imagenet_vae_run) == before
    return config, workdir


def test_coco_and_web_text_read_without_tensorflow(tfds_dir):
    """Splits map to Karpathy's (train + restval in order; test); the JPEG bytes decode with PIL and are center-cropped
    as ImageNet is; captions come whitespace-collapsed; the web text reads back; no TensorFlow anywhere."""
    assert importlib.util.find_spec("tensorflow") is None
    train = coco_captions.CocoImageSource("train", 32, tfds_dir)
    assert len(train) == 7 and [int(train[i]["label"]) for i in range(7)] == [101, 102, 103, 104, 105, 201, 202]
    records = coco_captions.records("test", tfds_dir, image=True)
    assert records.identity() == {"builder": "coco_captions/2014", "version": "1.1.0", "splits": {"test": 3}}
    raw = Image.open(io.BytesIO(records[1]["image"]))
    expected = center_crop_arr(raw.convert("RGB"), 32)
    test = coco_captions.CocoImageSource("test", 32, tfds_dir)
    assert test[1]["image"].dtype == np.uint8 and test[1]["image"].shape == (32, 32, 3)
    np.testing.assert_array_equal(test[1]["image"], expected)
    assert coco_captions.captions_of(records[1])[1] == "Two giraffes standing next to a tall tree number 402."
    count, read = image_pipeline.ordered_images(small_paper_config(tfds_dir).data, "test", 2)
    batches = list(read(0, count))
    assert count == 3 and [b[1].tolist() for b in batches] == [[401, 402], [403]]
    np.testing.assert_allclose(batches[0][0][1], expected / 127.5 - 1.0, atol=1e-6)
    web = web_text.WebText("c4", "test", tfds_dir)
    assert len(web) == 3 and web[0] == TEXTS[-1]  # "test" is c4's validation split


def test_train_tokenizer_and_encode_stages_read_coco(tokenizer_run):
    """train_tokenizer learns the captions and the web text; encode caches each split's images in order, the COCO
    image id as each record's label, with the latent normalisation from the train split."""
    config, workdir = tokenizer_run
    tok = TextTokenizer.load(f"{workdir}/text")
    assert tok.decode(tok.encode("A cat sleeping on a laptop keyboard")) == "A cat sleeping on a laptop keyboard"
    assert tok.vocab_size > 8 + 256  # merges learned from the captions and the web text
    for split, ids in (("train", [101, 102, 103, 104, 105, 201, 202]), ("test", [401, 402, 403])):
        cache = LatentCacheSource(f"{workdir}/latents/{split}")
        assert cache.shape == (4, 16) and [int(cache[i]["label"]) for i in range(len(cache))] == ids
    assert stage_inputs.latent_norm(config, workdir).scale > 0


def test_encode_reads_the_vae_workdir_and_never_writes_another_runs_cache(tokenizer_run, imagenet_vae_run):
    """With data.vae_workdir the σ-VAE is read from that run and the COCO latents go to the tokenizer dir (the
    fixture checks the σ-VAE run's files unchanged). Pointing data.tokenizer_workdir at the σ-VAE run itself, encode
    refuses in one line before writing anything: its latents/ holds ImageNet's cache; train_vae refuses to resume
    a σ-VAE read from another run."""
    config, workdir = tokenizer_run
    assert stage_inputs.vae_dir(config, workdir) == f"{imagenet_vae_run}/vae"
    assert stage_inputs.data_paths(config, workdir).latents == f"{workdir}/latents"
    assert not os.path.exists(f"{workdir}/vae") and os.path.exists(f"{workdir}/latents/train/meta.json")

    shared = config.copy_and_resolve_references()
    shared.data.update(dict(tokenizer_workdir=imagenet_vae_run, vae_workdir=""))
    before = _files(imagenet_vae_run)
    with pytest.raises(ConfigError, match=r"latents/train holds 'imagenet2012' latents, not data.dataset="
                                          r"'coco_captions': encode will not overwrite") as refused:
        experiment.encode(shared, str(os.path.dirname(imagenet_vae_run)), None, None)
    assert "\n" not in str(refused.value) and _files(imagenet_vae_run) == before
    with pytest.raises(ConfigError, match=r"data.vae_workdir=.* names a σ-VAE this run reads and never trains"):
        experiment.train_vae(config, workdir, None, None)


def test_paper_documents_and_packed_rows(tokenizer_run):
    """Documents of the three kinds from the real caches: the latents of the drawn image, one of its captions (or
    <null>), web-text chunks with <eos> only on the last; test documents show only test images and keep every
    caption; the task packs them into rows and its loss runs on one of them."""
    config, workdir = tokenizer_run
    paths = stage_inputs.data_paths(config, workdir)
    tok = TextTokenizer.load(paths.text_tokenizer)
    documents = config.documents.to_dict()
    source = coco_documents.document_source(documents, "train", f"{paths.latents}/train", tok, SEQ_LEN, seed=3,
                                            train=True)
    cache = LatentCacheSource(f"{paths.latents}/train")
    captions = coco_captions.records("train", config.data.data_dir)
    assert len(source) == round(7 / 0.5)  # one epoch ≈ each image once
    kinds, nulls, chunk_ends = set(), 0, []
    for i in range(200):
        doc = source.document(i)
        kinds.add(doc["kind"])
        ids, latent = doc["tokens"], doc["is_latent"]
        if doc["kind"] == "paragraph":
            assert ids[0] == tok.bos_id and not latent.any() and len(ids) <= SEQ_LEN
            body = tok.decode(ids[1:], skip_special=True)
            assert any(body.strip() in t for t in TEXTS)
            chunk_ends.append((doc["paragraph"], ids[-1] == tok.eos_id, TEXTS[doc["paragraph"]].endswith(
                body.strip()[-20:])))
            continue
        image = int(doc["images"][0])
        np.testing.assert_array_equal(doc["latents"][latent], cache[image]["latents"])
        assert latent.sum() == 4 and doc["caption"] in coco_captions.captions_of(captions[image])
        if doc["kind"] == "text_to_image":
            assert ids[doc["prompt_len"] - 1] == tok.boi_id and list(ids[-2:]) == [tok.eoi_id, tok.eos_id]
            nulls += int(list(ids[1:doc["prompt_len"] - 1]) == [tok.null_id])
        else:
            assert doc["prompt_len"] == 7 and ids[doc["prompt_len"] - 1] == tok.eoi_id
            assert tok.decode(ids[7:-1]) == doc["caption"]
    assert kinds == set(coco_documents.KINDS) and 0 < nulls < 30
    assert all(last == ends for _, last, ends in chunk_ends) and {p for p, last, _ in chunk_ends if not last} == {1}
    doc = source.document(17)
    assert doc["tokens"].tolist() == source.document(17)["tokens"].tolist()  # a function of (seed, index)
    copy = pickle.loads(pickle.dumps(source))  # as grain workers get it: the files reopen there
    assert copy.document(17)["tokens"].tolist() == doc["tokens"].tolist()

    test = coco_documents.document_source(documents, "test", f"{paths.latents}/test", tok, SEQ_LEN, seed=0,
                                          train=False)
    test_ids = [int(test.pairs[int(d["images"][0])]["image/id"]) for d in map(test.document, range(60))
                if d["kind"] != "paragraph"]
    assert set(test_ids) <= {401, 402, 403} and len(test_ids) > 10
    assert all(d["tokens"][1] != tok.null_id for d in map(test.document, range(60)))

    task, batch = _packed_batch(config, workdir)
    assert batch["tokens"].shape == (8, SEQ_LEN) and batch["latents"].shape == (8, SEQ_LEN, 16)
    assert (batch["is_latent"].sum(1) <= config.model.head_capacity).all() and batch["is_latent"].any()
    assert set(np.unique(batch["segment_ids"])) > {0, 1}  # several documents per row, then padding


def _packed_batch(config, workdir: str, batch_size: int = 8):
    """(the run's task, one packed "train" batch of it): what the train stage reads."""
    task = make_generator_task(config, stage_inputs.latent_norm(config, workdir))
    paths = stage_inputs.data_paths(config, workdir)
    return task, next(iter(task.make_dataset(paths, "train", batch_size=batch_size, seed=0)))


@pytest.mark.slow  # ≈ 20 s here: init and loss compile; test_paper_config_… lowers the full step on shapes
def test_the_task_trains_on_the_packed_rows(tokenizer_run):
    """The multimodal task's loss on one packed batch of paper-scale documents: both terms finite and positive."""
    config, workdir = tokenizer_run
    task, batch = _packed_batch(config, workdir)
    params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
    loss, metrics = jax.jit(task.loss)(params, batch, jax.random.PRNGKey(1))
    assert np.isfinite(float(loss)) and float(metrics["diffusion_loss"]) > 0 and float(metrics["ce_loss"]) > 0
    assert int(metrics["head_overflow"]) == 0


def test_paper_config_validates_and_its_1_3b_train_step_lowers():
    """scale=paper, size=1.3B: COCO through the ImageNet σ-VAE (16×16 latents of 16 channels), rows of 2,048; the
    train step lowers on 8 fake devices (FSDP) with the packed-row batch."""
    from latent_lm.experiment import STAGES

    config = mllm.get_config("scale=paper")
    assert validate(config, STAGES) == []
    assert config.data.dataset == "coco_captions" and config.documents.source == "coco"
    assert config.stages == ("train_tokenizer", "encode", "train", "eval_loss")
    assert (config.data.image_size // config.vae.patch_size) ** 2 == 256 and config.model.latent_dim == 16
    config.data.data_dir = "/data/tfds"  # one data dir: the documents follow data.data_dir
    assert config.documents.to_dict()["data_dir"] == "/data/tfds"
    plan = plan_memory(config, 8, stage="lower", hbm_bytes=80e9)
    assert plan.mesh_shape == {"data": 1, "fsdp": 8, "tensor": 1} and 1.45e9 < plan.num_params < 1.55e9
    rows = 256 // 8
    assert plan.batch == rows * 2048 * (4 + 1 + 16 * 4 + 4 + 4)  # tokens, is_latent, latents, segments, positions


def test_1_3b_parameter_count():
    """The 1.3B LLaMA-style model (24 × 2048, 16 heads, SwiGLU 5,440, 32k vocabulary): 1.34 B parameters as a
    language model (backbone, embedding, LM head), plus its 3-block diffusion head; counted with jax.eval_shape."""
    task = make_generator_task(mllm.get_config("scale=paper,size=1.3B"), LatentNormalization(scale=1.0, bias=0.0))
    shapes = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))["params"]
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    head = count(shapes["head"])
    language_model = count(shapes) - head - count(shapes["x_embedder"]) - count(shapes["condition_layer"])
    assert 1.30e9 < language_model < 1.37e9 and 1.4e8 < head < 1.6e8
    assert shapes["backbone"]["blocks"]["mlp"]["fc1"]["kernel"].value.shape == (24, 2048, 5440)
    assert shapes["token_embed"]["embedding"].value.shape == (32_000, 2048)


def test_bad_input_is_one_clear_error(tfds_dir, tmp_path, tokenizer_run):
    """A data dir without the dataset, a prepared dataset without a split or stored as TFRecord, a document kind
    COCO cannot build, a cache of another split, and config arguments that do not combine: one line each."""
    empty = str(tmp_path / "empty")
    with pytest.raises(MissingInputError, match=r"tfds build coco_captions --file_format=array_record "
                                                r"--data_dir=.*set --config.data.data_dir=") as missing:
        coco_captions.records("train", empty)
    assert "\n" not in str(missing.value)  # latent_lm.cli prints it as one `error: …` line
    config = small_paper_config(empty)
    with pytest.raises(MissingInputError, match=r"coco_captions/2014' is not prepared"):
        experiment.train_text_tokenizer(config, str(tmp_path / "run"), None, None)
    with pytest.raises(MissingInputError, match=r"tfds build c4 --config=en"):
        web_text.WebText("c4", "train", empty)
    no_restval = str(tmp_path / "no_restval")
    prepare_coco(no_restval, {"train": [1], "test": [2]})
    with pytest.raises(ConfigError, match=r"has no split\(s\) \['restval'\]; it has \['test', 'train'\]"):
        coco_captions.records("train", no_restval)
    tfrecord = str(tmp_path / "tfrecord")
    _write(tfrecord, "lm1b", "1.1.0", _features_text(), {"train": [{"text": "x"}]}, file_format="tfrecord")
    with pytest.raises(MissingInputError, match=r"stored as tfrecord.*tfds convert_format"):
        web_text.WebText("lm1b", "train", tfrecord)

    bad = small_paper_config(tfds_dir)
    bad.documents.mix = (("text_to_image", 1.0), ("question", 0.5))
    with pytest.raises(ConfigError, match=r"documents.mix holds \['question'\]"):
        validate(bad, experiment.STAGES)
    bad.documents.mix, bad.documents.text_dataset = (("paragraph", 1.0),), "wikipedia"
    with pytest.raises(ConfigError, match=r"documents.text_dataset='wikipedia' is not supported"):
        validate(bad, experiment.STAGES)
    with pytest.raises(ConfigError, match="tiny=1 is the embedded smoke run"):
        mllm.get_config("scale=paper,tiny=1")
    with pytest.raises(ConfigError, match="arm=vq has no paper-scale tokenizer"):
        mllm.get_config("scale=paper,arm=vq")
    with pytest.raises(ConfigError, match=r"unknown size 'XXL'"):
        mllm.get_config("scale=paper,size=XXL")
    with pytest.raises(ConfigError, match="does not train one on COCO"):
        image_pipeline.make_training_images(bad.data, 8, seed=0)

    run_config, workdir = tokenizer_run
    tok = TextTokenizer.load(f"{workdir}/text")
    with pytest.raises(DataError, match=r"holds 3 images but coco_captions \['train', 'restval'\] holds 7"):
        coco_documents.document_source(run_config.documents.to_dict(), "train", f"{workdir}/latents/test", tok,
                                       SEQ_LEN, seed=0, train=True)


def _features_text():
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({"text": tfds.features.Text()})
