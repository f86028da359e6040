"""Tests for pmpclean.embedding: model loading, embedding, the cache, precomputed files.

Everything runs offline on CPU with the shipped ``pmpclean-tiny`` architecture and
random (seeded) weights, on a handful of images generated into ``tmp_path``.
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pmpclean.data import read_manifest
from pmpclean.embedding import (
    Embeddings,
    LoadedModel,
    default_cache_dir,
    embed_manifest,
    load_embeddings,
    load_model,
    register_model_configs,
    save_embeddings,
    weights_fingerprint,
)
from pmpclean.errors import ConfigError, EmbeddingError, ModelLoadError

torch = pytest.importorskip("torch")

# the module itself (``pmpclean.embedding`` as an attribute may be the pipeline function)
E = importlib.import_module("pmpclean.embedding")

pytestmark = pytest.mark.filterwarnings("ignore:model 'pmpclean-tiny' has RANDOM weights")

TINY = "pmpclean-tiny"
D = 32  # embed_dim of pmpclean-tiny
# Embeddings are held as float16: unit-vector entries round by at most half a unit in
# the last place (2^-12 below 0.5, 2^-11 below 1).
F16 = 2.5e-4


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model(TINY, "none", device="cpu")


def _png(path: Path, color: tuple[int, int, int], size: int = 24) -> Path:
    from PIL import Image

    rng = np.random.default_rng(sum(color))
    arr = np.clip(np.array(color) + rng.integers(-30, 30, (size, size, 3)), 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


def _truncated_jpeg(path: Path) -> Path:
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """9 rows: 3 good PNGs (shared by several rows), a truncated JPEG shown twice,
    a missing file and an empty caption. Returns the manifest path."""
    img = tmp_path / "img"
    img.mkdir()
    _png(img / "red.png", (220, 20, 20))
    _png(img / "green.png", (20, 220, 20))
    _png(img / "blue.png", (20, 20, 220))
    _truncated_jpeg(img / "broken.jpg")
    rows = [
        ("img/red.png", "a red square"),  # 0
        ("img/red.png", "something crimson"),  # 1
        ("img/green.png", "a green square"),  # 2
        ("img/green.png", "a red square"),  # 3  same text as row 0 (mismatched pair)
        ("img/blue.png", "a blue square"),  # 4
        ("img/broken.jpg", "a noisy picture"),  # 5  truncated: unreadable
        ("img/broken.jpg", "static"),  # 6  same truncated image
        ("img/missing.png", "nothing here"),  # 7  missing file
        ("img/red.png", "   "),  # 8  empty caption
    ]
    path = tmp_path / "manifest.csv"
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(path, index=False)
    return path


GOOD_ROWS = [0, 1, 2, 3, 4]
BAD_ROWS = [5, 6, 7, 8]
N_GOOD_IMAGES = 3
N_GOOD_TEXTS = 4  # "a red square" appears twice


def _spy(monkeypatch: pytest.MonkeyPatch, loaded: LoadedModel) -> dict[str, int]:
    """Count images and captions that reach the model's encoders."""
    counts = {"images": 0, "texts": 0, "image_calls": 0}
    enc_img, enc_txt = loaded.model.encode_image, loaded.model.encode_text

    def encode_image(x, *a, **k):  # type: ignore[no-untyped-def]
        counts["images"] += int(x.shape[0])
        counts["image_calls"] += 1
        return enc_img(x, *a, **k)

    def encode_text(x, *a, **k):  # type: ignore[no-untyped-def]
        counts["texts"] += int(x.shape[0])
        return enc_txt(x, *a, **k)

    monkeypatch.setattr(loaded.model, "encode_image", encode_image)
    monkeypatch.setattr(loaded.model, "encode_text", encode_text)
    return counts


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every model build that embed_manifest triggers lazily."""
    builds: list[str] = []
    real = E._build

    def build(spec, device, precision):  # type: ignore[no-untyped-def]
        builds.append(spec.model_name)
        return real(spec, device, precision)

    monkeypatch.setattr(E, "_build", build)
    return builds


# --------------------------------------------------------------------------- load_model


def test_tiny_none_warns_and_is_deterministic_without_touching_global_rng() -> None:
    before = torch.random.get_rng_state().clone()
    with pytest.warns(UserWarning, match=r"RANDOM weights \(--pretrained none, seed 0\)"):
        a = load_model(TINY, "none", device="cpu")
    with pytest.warns(UserWarning, match="RANDOM weights"):
        b = load_model(TINY, "none", device="cpu")
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.fingerprint == "pmpclean-tiny/random:seed=0"
    assert (a.device, a.precision, a.model.training) == ("cpu", "fp32", False)
    assert a.source == "model:pmpclean-tiny/none"


def test_tiny_config_is_registered_in_plain_open_clip() -> None:
    import open_clip

    register_model_configs()
    register_model_configs()  # idempotent
    assert "pmpclean-tiny" in open_clip.list_models()
    model = open_clip.create_model("pmpclean-tiny")
    tok = open_clip.get_tokenizer("pmpclean-tiny")
    out = model.encode_text(tok(["a cat"]))
    assert out.shape == (1, D)


def test_unknown_model_lists_close_matches() -> None:
    with pytest.raises(
        ModelLoadError, match=r"unknown model 'ViT-B-23'\. Did you mean: ViT-B-32"
    ) as e:
        load_model("ViT-B-23", "none", device="cpu")
    assert "open_clip.list_models()" in str(e.value)


def test_unknown_tag_lists_valid_tags() -> None:
    with pytest.raises(
        ModelLoadError, match=r"unknown pretrained tag 'lion2b' for model 'ViT-B-32'"
    ) as e:
        load_model("ViT-B-32", "lion2b", device="cpu")
    assert "Valid tags for ViT-B-32: openai, " in str(e.value)
    assert "laion2b_s34b_b79k" in str(e.value)


def test_missing_checkpoint_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelLoadError, match=r"checkpoint file '.*nope\.pt' .* does not exist"):
        load_model(TINY, str(missing), device="cpu")
    with pytest.raises(ModelLoadError, match="is a directory, not a checkpoint file"):
        load_model(TINY, str(tmp_path), device="cpu")


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable-host"])
def test_real_tag_without_network_fails_fast_with_remedies(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    # an empty Hugging Face cache, so the weights cannot be found locally
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # exercise the socket probe; ".invalid" never resolves, so nothing is downloaded
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", "https://hub.pmpclean-test.invalid")
        for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(var, raising=False)
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as e:
        load_model("ViT-B-32", "laion2b_s34b_b79k", device="cpu")
    assert time.monotonic() - start < 60  # safety net; it takes well under a second
    msg = str(e.value)
    assert "model 'ViT-B-32' with pretrained tag 'laion2b_s34b_b79k'" in msg
    assert "--pretrained /path/to/checkpoint" in msg
    assert "--embeddings FILE" in msg
    assert ("HF_HUB_OFFLINE is set" if how == "HF_HUB_OFFLINE" else "cannot connect to") in msg


def test_hf_hub_model_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    for model, pretrained in [(hub, "ignored"), ("ViT-B-32", hub)]:
        with pytest.raises(ModelLoadError, match=f"model '{hub}'.*--pretrained.*--embeddings"):
            load_model(model, pretrained, device="cpu")
    assert weights_fingerprint("ViT-B-32", hub) == hub
    with pytest.raises(ModelLoadError, match="expected 'hf-hub:org/name'"):
        load_model("hf-hub:justaname", "none", device="cpu")


def test_weights_fingerprint_needs_no_weights(tmp_path: Path) -> None:
    assert weights_fingerprint("ViT-B-32", "laion2b_s34b_b79k") == "ViT-B-32/laion2b_s34b_b79k"
    assert weights_fingerprint(TINY, "none") == "pmpclean-tiny/random:seed=0"
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"x" * 10)
    fp = weights_fingerprint(TINY, str(ckpt))
    st = ckpt.stat()
    assert fp == f"file:{ckpt}|10|{st.st_mtime_ns}"


def test_local_checkpoint_round_trip(tiny: LoadedModel, tmp_path: Path, dataset: Path) -> None:
    # perturb the weights so that "loaded from file" differs from "random init"
    gen = torch.Generator().manual_seed(7)
    state = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in tiny.model.state_dict().items()
    }
    ckpt = tmp_path / "tiny.pt"
    torch.save(state, ckpt)
    loaded = load_model(TINY, str(ckpt), device="cpu")
    assert loaded.pretrained == str(ckpt.absolute())
    assert loaded.fingerprint.startswith(f"file:{ckpt.absolute()}|")
    assert all(torch.equal(loaded.model.state_dict()[k], state[k]) for k in state)

    m = read_manifest(dataset)
    from_file = embed_manifest(m, loaded=loaded, workers=0, use_cache=False)
    m2 = read_manifest(dataset)
    by_path = embed_manifest(m2, model=TINY, pretrained=str(ckpt), workers=0, use_cache=False)
    random = embed_manifest(read_manifest(dataset), loaded=tiny, workers=0, use_cache=False)
    np.testing.assert_allclose(by_path.image, from_file.image, atol=1e-6)
    np.testing.assert_allclose(by_path.text, from_file.text, atol=1e-6)
    assert not np.allclose(from_file.image[GOOD_ROWS], random.image[GOOD_ROWS], atol=1e-3)
    assert by_path.source == f"model:pmpclean-tiny/{ckpt.absolute()}"


def test_local_dir_model(tiny: LoadedModel, tmp_path: Path) -> None:
    import json

    folder = tmp_path / "tiny-dir"
    folder.mkdir()
    cfg = json.loads((E.MODEL_CONFIG_DIR / "pmpclean-tiny.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.save(tiny.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    loaded = load_model(f"local-dir:{folder}", "ignored", device="cpu")
    assert loaded.model_name == f"local-dir:{folder}"
    assert loaded.fingerprint.startswith(f"local-dir:{folder}|")
    x = torch.zeros(1, 3, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(
            loaded.model.encode_image(x).numpy(), tiny.model.encode_image(x).numpy(), atol=1e-6
        )
    with pytest.raises(ModelLoadError, match=r"open_clip_config\.json does not exist"):
        load_model(f"local-dir:{tmp_path / 'nowhere'}", "none", device="cpu")


def test_checkpoint_that_does_not_fit(tiny: LoadedModel, tmp_path: Path) -> None:
    state = dict(tiny.model.state_dict())
    state.pop("text_projection")
    ckpt = tmp_path / "broken.pt"
    torch.save(state, ckpt)
    with pytest.raises(ModelLoadError, match=r"does not fit model 'pmpclean-tiny'"):
        load_model(TINY, str(ckpt), device="cpu")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(
        ModelLoadError, match=r"cannot read checkpoint '.*junk\.pt' for model 'pmpclean-tiny'"
    ):
        load_model(TINY, str(junk), device="cpu")


def test_torchvision_mismatch_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str):  # type: ignore[no-untyped-def]
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(E.importlib, "import_module", broken)
    with pytest.raises(
        ModelLoadError,
        match=r"torchvision does not match the installed torch.*"
        r"pip install --force-reinstall torch torchvision",
    ):
        load_model(TINY, "none", device="cpu")


def test_unknown_precision_and_device() -> None:
    with pytest.raises(ConfigError, match="Unknown precision 'fp8'"):
        load_model(TINY, "none", device="cpu", precision="fp8")
    with pytest.raises(ConfigError, match="Unknown device 'tpu'"):
        load_model(TINY, "none", device="tpu")


# --------------------------------------------------------------------------- embed_manifest


def test_embed_manifest_shapes_norms_and_bad_rows(
    tiny: LoadedModel, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = read_manifest(dataset)
    assert list(m.status[BAD_ROWS]) == ["ok", "ok", "missing_image", "empty_caption"]
    counts = _spy(monkeypatch, tiny)
    calls: list[tuple[str, int, int]] = []
    emb = embed_manifest(
        m,
        loaded=tiny,
        batch_size=2,
        workers=0,
        use_cache=False,
        progress=lambda s, d, t: calls.append((s, d, t)),
    )
    assert isinstance(emb, Embeddings)
    assert emb.image.shape == (9, D) and emb.text.shape == (9, D)
    assert emb.image.dtype == np.float16 and emb.text.dtype == np.float16  # held as float16
    # the truncated JPEG was found while embedding and marked on all its rows
    assert list(m.status) == ["ok"] * 5 + ["unreadable_image"] * 2 + [
        "missing_image",
        "empty_caption",
    ]
    for arr in (emb.image, emb.text):  # unit rows, up to float16 rounding
        norms = np.linalg.norm(arr[GOOD_ROWS].astype(np.float64), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-3)
    assert np.isnan(emb.image[BAD_ROWS]).all() and np.isnan(emb.text[BAD_ROWS]).all()
    # each unique decodable image and each unique caption went through the model once
    assert counts["images"] == N_GOOD_IMAGES == emb.n_model_images
    assert counts["texts"] == N_GOOD_TEXTS == emb.n_model_texts
    # broadcast: rows of the same image / same text share the vector
    np.testing.assert_array_equal(emb.image[0], emb.image[1])
    np.testing.assert_array_equal(emb.text[0], emb.text[3])
    assert not np.allclose(emb.image[0], emb.image[2])
    # progress: images (4 unique, broken included) then captions
    assert calls[0] == ("Embedding images", 0, 4) and ("Embedding images", 4, 4) in calls
    assert calls[-1] == ("Embedding captions", 4, 4)
    assert emb.source == "model:pmpclean-tiny/none"


def test_embeddings_match_a_direct_forward_pass(tiny: LoadedModel, dataset: Path) -> None:
    from PIL import Image

    m = read_manifest(dataset)
    emb = embed_manifest(m, loaded=tiny, batch_size=4, workers=0, use_cache=False)
    with Image.open(dataset.parent / "img" / "green.png") as im:
        x = tiny.preprocess(im.convert("RGB"))[None]
    with torch.inference_mode():
        img = torch.nn.functional.normalize(tiny.model.encode_image(x), dim=-1)[0].numpy()
        txt = tiny.model.encode_text(tiny.tokenizer(["a blue square"]))
        txt = torch.nn.functional.normalize(txt, dim=-1)[0].numpy()
    # held as float16: equal up to float16 rounding (half a unit in the last place
    # of values below 1 is at most 2.5e-4)
    np.testing.assert_allclose(emb.image[2].astype(np.float32), img, atol=2.5e-4)
    np.testing.assert_allclose(emb.text[4].astype(np.float32), txt, atol=2.5e-4)


def test_images_as_users_have_them_embed_like_their_8bit_rgb_twin(
    tiny: LoadedModel, image_twins: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """A 16-bit PNG is not embedded white, a phone photo stored sideways not sideways..."""
    names = ["I;16 png", "F [0,1] tiff", "P transparent png", "CMYK tiff"]
    names += ["EXIF orientation 6 png", "EXIF orientation 8 png", "EXIF orientation 3 png"]
    rows = []
    for name in names:
        path, twin = image_twins[name]
        rows += [(str(path), name), (str(twin), name + " twin")]
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(manifest, index=False)
    m = read_manifest(manifest)
    emb = embed_manifest(m, loaded=tiny, batch_size=4, workers=0, use_cache=False)
    assert list(m.status) == ["ok"] * len(rows)
    # the same picture decoded two ways gives the same vector (different pictures give
    # cosines of 0.95-0.998 with this random-weight model)
    same = {name: float(emb.image[2 * i] @ emb.image[2 * i + 1]) for i, name in enumerate(names)}
    assert min(same.values()) > 1 - 1e-4, same


def test_a_cache_of_an_older_decoder_is_not_reused(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    kw = {"model": TINY, "pretrained": "none", "workers": 0, "cache_dir": cache}
    monkeypatch.setattr(E, "_IMAGE_KEY", "img:")  # the key of pmpclean <= 0.x's decoder
    embed_manifest(read_manifest(dataset), **kw)
    monkeypatch.undo()
    again = embed_manifest(read_manifest(dataset), **kw)
    assert again.n_model_images == N_GOOD_IMAGES  # re-decoded, not read from the cache


def test_worker_processes_give_the_same_result(tiny: LoadedModel, dataset: Path) -> None:
    m0, m2 = read_manifest(dataset), read_manifest(dataset)
    e0 = embed_manifest(m0, loaded=tiny, batch_size=2, workers=0, use_cache=False)
    e2 = embed_manifest(m2, loaded=tiny, batch_size=2, workers=2, use_cache=False)
    np.testing.assert_allclose(e0.image, e2.image, atol=1e-6)  # NaN == NaN here
    np.testing.assert_allclose(e0.text, e2.text, atol=1e-6)
    assert list(m0.status) == list(m2.status)
    assert (m2.status == "unreadable_image").sum() == 2


def test_cache_second_run_does_no_model_work(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    builds = _count_builds(monkeypatch)
    first = embed_manifest(
        read_manifest(dataset), model=TINY, pretrained="none", workers=0, cache_dir=cache
    )
    assert builds == [TINY]
    assert (first.n_model_images, first.n_model_texts) == (N_GOOD_IMAGES, N_GOOD_TEXTS)
    assert len(list((cache / "embeddings").glob("*.sqlite"))) == 1

    m = read_manifest(dataset)
    second = embed_manifest(m, model=TINY, pretrained="none", workers=0, cache_dir=cache)
    assert builds == [TINY]  # the model was not even loaded
    assert (second.n_model_images, second.n_model_texts) == (0, 0)
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.text, second.text)
    # the decode failure was cached too
    assert (m.status == "unreadable_image").sum() == 2

    # a rewritten image file (new size/mtime) is embedded again, alone
    _png(dataset.parent / "img" / "blue.png", (20, 20, 200), size=28)
    third = embed_manifest(
        read_manifest(dataset), model=TINY, pretrained="none", workers=0, cache_dir=cache
    )
    assert (third.n_model_images, third.n_model_texts) == (1, 0)
    assert not np.allclose(third.image[4], first.image[4])
    np.testing.assert_array_equal(third.image[:4], first.image[:4])


def test_cache_default_dir_comes_from_the_environment(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PMPCLEAN_CACHE_DIR", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    embed_manifest(read_manifest(dataset), model=TINY, pretrained="none", workers=0)
    assert list((tmp_path / "env-cache" / "embeddings").glob("*.sqlite"))
    monkeypatch.delenv("PMPCLEAN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "pmpclean"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "pmpclean"


def test_interrupted_run_resumes(
    tiny: LoadedModel, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"

    def stop_after_first_batch(stage: str, done: int, total: int) -> None:
        if stage == "Embedding images" and done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_manifest(
            read_manifest(dataset),
            loaded=tiny,
            batch_size=2,
            workers=0,
            cache_dir=cache,
            progress=stop_after_first_batch,
        )
    counts = _spy(monkeypatch, tiny)
    m = read_manifest(dataset)
    emb = embed_manifest(m, loaded=tiny, batch_size=2, workers=0, cache_dir=cache)
    # first batch = red + green (committed); only blue (+ the broken JPEG) remain
    assert counts["images"] == emb.n_model_images == N_GOOD_IMAGES - 2
    assert counts["texts"] == emb.n_model_texts == N_GOOD_TEXTS
    fresh = embed_manifest(read_manifest(dataset), loaded=tiny, workers=0, use_cache=False)
    np.testing.assert_allclose(emb.image, fresh.image, atol=1e-6)
    np.testing.assert_allclose(emb.text, fresh.text, atol=1e-6)


def test_use_cache_false_recomputes_and_writes_nothing(
    tiny: LoadedModel, dataset: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    embed_manifest(read_manifest(dataset), loaded=tiny, workers=0, cache_dir=cache)
    again = embed_manifest(
        read_manifest(dataset), loaded=tiny, workers=0, cache_dir=cache, use_cache=False
    )
    assert (again.n_model_images, again.n_model_texts) == (N_GOOD_IMAGES, N_GOOD_TEXTS)
    other = tmp_path / "unused"
    embed_manifest(read_manifest(dataset), loaded=tiny, workers=0, cache_dir=other, use_cache=False)
    assert not other.exists()


def test_random_weights_are_deterministic_across_loads(dataset: Path) -> None:
    a = embed_manifest(
        read_manifest(dataset), model=TINY, pretrained="none", workers=0, use_cache=False
    )
    b = embed_manifest(
        read_manifest(dataset), model=TINY, pretrained="none", workers=0, use_cache=False
    )
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.text, b.text)


def test_no_decodable_image_still_gives_model_width(tiny: LoadedModel, tmp_path: Path) -> None:
    _truncated_jpeg(tmp_path / "a.jpg")
    _truncated_jpeg(tmp_path / "b.jpg")
    frame = pd.DataFrame({"image": ["a.jpg", "b.jpg"], "caption": ["one", "two"]})
    m = read_manifest(frame, root=tmp_path)
    emb = embed_manifest(m, loaded=tiny, workers=0, use_cache=False)
    assert emb.image.shape == (2, D) and emb.text.shape == (2, D)
    assert np.isnan(emb.image).all() and np.isnan(emb.text).all()
    assert list(m.status) == ["unreadable_image"] * 2
    assert (emb.n_model_images, emb.n_model_texts) == (0, 0)


def test_embed_manifest_validates_before_work(dataset: Path) -> None:
    m = read_manifest(dataset)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        embed_manifest(m, model=TINY, pretrained="none", batch_size=0)
    with pytest.raises(ConfigError, match="workers must be >= 0"):
        embed_manifest(m, model=TINY, pretrained="none", workers=-1)
    with pytest.raises(ModelLoadError, match="unknown model 'nope'"):
        embed_manifest(m, model="nope", pretrained="none")
    assert list(m.status[5:7]) == ["ok", "ok"]  # nothing was decoded


# --------------------------------------------------------------------------- precomputed files


def test_save_and_load_npz_normalises_and_keeps_nan_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(5, 128)) * 3.0
    text = rng.normal(size=(5, 10))
    image[1] = np.nan
    text[2] = 0.0  # zero norm -> NaN
    text[3, 4] = np.inf  # non-finite -> NaN
    path = save_embeddings(tmp_path / "e.npz", Embeddings(image=image, text=text, source="x"))
    emb = load_embeddings(path, 5)
    assert emb.image.shape == (5, 128) and emb.text.shape == (5, 10)
    assert emb.image.dtype == np.float16
    assert emb.source == f"file:{path.absolute()}"
    assert (emb.n_model_images, emb.n_model_texts) == (0, 0)
    good_img = [0, 2, 3, 4]
    norms = np.linalg.norm(emb.image[good_img].astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-3)  # float16 rounding
    np.testing.assert_allclose(
        emb.image[0].astype(np.float64), image[0] / np.linalg.norm(image[0]), atol=F16
    )
    assert np.isnan(emb.image[1]).all()
    assert np.isnan(emb.text[2]).all() and np.isnan(emb.text[3]).all()
    assert not np.isnan(emb.text[[0, 1, 4]]).any()


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status (not Linux)")


def test_saved_embeddings_are_memory_mapped_not_read(tmp_path: Path) -> None:
    # 20,000 x 1,024 float16 rows = 40 MB per array: mapped, so loading them takes no
    # anonymous memory and hands back the file's own bytes
    rng = np.random.default_rng(0)
    n, d = 20_000, 1024
    image = rng.normal(size=(n, d)).astype(np.float32)
    image[7] = np.nan
    path = save_embeddings(tmp_path / "e.npz", Embeddings(image=image, text=image, source="x"))
    before = _rss_anon_mb()
    emb = load_embeddings(path, n)
    # reading would take 2 x 40 MB (plus a normalised copy); checking the rows takes
    # a float32 chunk at a time (32 MB), which the allocator may keep
    assert _rss_anon_mb() - before < 40
    assert isinstance(emb.image, np.memmap) and str(emb.image.filename) == str(path.absolute())
    assert emb.image.dtype == np.float16 and not emb.image.flags.writeable
    assert np.isnan(emb.image[7]).all()
    unit = image[0] / np.linalg.norm(image[0])
    np.testing.assert_allclose(emb.image[0].astype(np.float64), unit, atol=F16)


def test_unnormalised_or_float32_files_are_normalised_into_float16(tmp_path: Path) -> None:
    # float16 rows that are not unit vectors, and float32 rows: both normalised copies
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(6, 16))
    for dtype in (np.float16, np.float32):
        path = tmp_path / f"{np.dtype(dtype).name}.npz"
        np.savez(path, image=(raw * 3).astype(dtype), text=raw.astype(dtype))
        emb = load_embeddings(path, 6)
        assert emb.image.dtype == np.float16 and not isinstance(emb.image, np.memmap)
        norms = np.linalg.norm(emb.image.astype(np.float64), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-3)
    # a row of unit float16 vectors with one partly-NaN row is not usable as it is
    unit = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float16)
    unit[2, 3] = np.nan
    np.savez(tmp_path / "partial.npz", image=unit, text=unit)
    emb = load_embeddings(tmp_path / "partial.npz", 6)
    assert np.isnan(emb.image[2]).all() and not np.isnan(emb.image[[0, 1, 3, 4, 5]]).any()


def test_large_normalised_copies_live_on_an_unnamed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(E, "_SPILL_BYTES", 1000)
    monkeypatch.setenv("PMPCLEAN_CACHE_DIR", str(tmp_path / "cache"))
    raw = np.random.default_rng(2).normal(size=(300, 8))
    np.savez(tmp_path / "raw.npz", image=raw, text=raw)
    emb = load_embeddings(tmp_path / "raw.npz", 300)
    assert isinstance(emb.image, np.memmap) and emb.image.dtype == np.float16
    np.testing.assert_allclose(
        emb.image.astype(np.float64), raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=F16
    )
    assert list((tmp_path / "cache").iterdir()) == []  # no name left behind


def test_save_embeddings_only_writes_npz(tmp_path: Path) -> None:
    emb = Embeddings(image=np.ones((2, 3)), text=np.ones((2, 3)), source="x")
    with pytest.raises(EmbeddingError, match=r"only \.npz is written"):
        save_embeddings(tmp_path / "e.csv", emb)


def test_load_embeddings_errors(tmp_path: Path) -> None:
    f = tmp_path / "missing.npz"
    np.savez(f, image=np.ones((3, 4)), txt=np.ones((3, 4)))
    with pytest.raises(
        EmbeddingError, match=r"missing\.npz' has no array 'text'; it holds: 'image', 'txt'"
    ):
        load_embeddings(f, 3)

    f = tmp_path / "rows.npz"
    np.savez(f, image=np.ones((790, 4)), text=np.ones((790, 4)))
    with pytest.raises(
        EmbeddingError,
        match=r"rows\.npz': array 'image' has 790 rows but the manifest has 795 rows; "
        r"embeddings must be row-aligned with the manifest",
    ):
        load_embeddings(f, 795)

    f = tmp_path / "flat.npz"
    np.savez(f, image=np.ones(3), text=np.ones((3, 4)))
    with pytest.raises(
        EmbeddingError, match=r"flat\.npz': array 'image' has shape \(3,\), not 2-D"
    ):
        load_embeddings(f, 3)

    f = tmp_path / "ints.npz"
    np.savez(f, image=np.ones((3, 4)), text=np.ones((3, 4), dtype=np.int64))
    with pytest.raises(
        EmbeddingError, match=r"ints\.npz': array 'text' has dtype int64, not float"
    ):
        load_embeddings(f, 3)

    f = tmp_path / "emb.csv"
    f.write_text("image,text\n")
    with pytest.raises(
        EmbeddingError, match=r"unsupported embeddings file .*emb\.csv' \(suffix '\.csv'\)"
    ):
        load_embeddings(f, 3)

    with pytest.raises(EmbeddingError, match=r"nothere\.npz' does not exist"):
        load_embeddings(tmp_path / "nothere.npz", 3)


def test_parquet_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(size=(4, 6)).astype(np.float32)
    text = rng.normal(size=(4, 3))
    frame = pd.DataFrame(
        {"image": [list(r) for r in image], "text": [list(r) for r in text], "id": range(4)}
    )
    frame.loc[2, "image"] = None
    path = tmp_path / "emb.parquet"
    frame.to_parquet(path)
    emb = load_embeddings(path, 4)
    assert emb.image.shape == (4, 6) and emb.text.shape == (4, 3)
    np.testing.assert_allclose(
        emb.image[0].astype(np.float64), image[0] / np.linalg.norm(image[0]), atol=F16
    )
    np.testing.assert_allclose(
        emb.text[3].astype(np.float64), text[3] / np.linalg.norm(text[3]), atol=F16
    )
    assert np.isnan(emb.image[2]).all() and not np.isnan(emb.text).any()

    pd.DataFrame({"image": [[1.0, 2.0]] * 4, "caption": [[1.0]] * 4}).to_parquet(
        tmp_path / "nocol.parquet"
    )
    with pytest.raises(EmbeddingError, match="has no column 'text'; it holds: 'image', 'caption'"):
        load_embeddings(tmp_path / "nocol.parquet", 4)
    with pytest.raises(EmbeddingError, match="has 4 rows but the manifest has 5 rows"):
        load_embeddings(path, 5)


# --------------------------------------------------------------------------- shared data


@pytest.mark.shared
def test_coco_mini_embeds_every_row_once_per_image(
    shared_data: Path, tiny: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coco = shared_data / "coco-mini" / "captions.csv"
    if not coco.exists():
        pytest.skip("coco-mini is not present")
    m = read_manifest(coco)
    assert len(m) == 795 and len(m.unique_images) == 159
    counts = _spy(monkeypatch, tiny)
    emb = embed_manifest(m, loaded=tiny, batch_size=64, workers=2, cache_dir=tmp_path)
    assert counts["images"] == emb.n_model_images == 159
    assert counts["image_calls"] == 3  # 64 + 64 + 31
    assert emb.n_model_texts == len(set(m.captions))
    assert np.isfinite(emb.image).all() and np.isfinite(emb.text).all()
    assert emb.image.shape == (795, D)
    assert (m.status == "ok").all()
    assert os.path.basename(m.unique_images[0]).endswith(".jpg")
