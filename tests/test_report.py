"""Tests of the self-contained HTML audit report (pmpclean.report)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pmpclean.report import context as report_ctx
from pmpclean.report import render_report, write_report

SCRIPT_CAPTION = "<script>alert(1)</script> a dog on a beach"
IMG_PROPOSAL = "<img src=x onerror=alert(2)> two cats & a dog"
SECTIONS = ("overview", "scores", "suspects", "rematches", "borderline", "unscored", "details")
VOID = {"img", "meta", "br", "hr", "input", "link", "col", "source", "wbr", "area", "base"}


# --------------------------------------------------------------------------- fixtures


class Page(HTMLParser):
    """Collect tags, attributes, text per element id and table rows of a page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str | None]] = []
        self.tags: list[tuple[str, dict[str, str | None], tuple[str, ...]]] = []
        self.text_by_id: dict[str, str] = {}
        self.rows: list[list[str]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.text = []
        self.feed(text)
        self.close()

    def open_ids(self) -> tuple[str, ...]:
        return tuple(i for _, i in self.stack if i)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        self.tags.append((tag, attr, self.open_ids()))
        if tag == "tr":
            self._row = []
        if tag in ("td", "th") and self._row is not None:
            self._cell = []
        if tag not in VOID:
            key = attr.get("id")
            if tag == "article" and attr.get("data-row") is not None:
                key = f"row-{attr['data-row']}"  # cards: keyed by the row they show
            self.stack.append((tag, key))
            if key:
                self.text_by_id.setdefault(key, "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        for i in self.open_ids():  # element boundaries separate words
            self.text_by_id[i] += " "
        while self.stack:  # pop to the matching tag
            name, _ = self.stack.pop()
            if name == tag:
                break

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for i in self.open_ids():
            self.text_by_id[i] += data
        if self._cell is not None:
            self._cell.append(data)

    def ids(self) -> set[str]:
        return {a["id"] for _, a, _ in self.tags if a.get("id")}

    def tags_in(self, section: str, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a, ids in self.tags if t == tag and section in ids]

    def cards_in(self, section: str) -> list[str]:
        """Row ids shown by the cards of a section, in page order."""
        out = []
        for t, a, ids in self.tags:
            if t == "article" and section in ids:
                out.append(a)
        return [str(a.get("data-row")) for a in out]


def _write_images(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "wide": root / "wide.png",
        "tall": root / "tall.jpg",
        "alpha": root / "alpha.png",
        "broken": root / "broken.png",
    }
    Image.new("RGB", (32, 16), (200, 30, 30)).save(paths["wide"])
    Image.new("RGB", (12, 24), (30, 160, 60)).save(paths["tall"], quality=90)
    Image.new("RGBA", (16, 16), (20, 40, 200, 120)).save(paths["alpha"])
    paths["broken"].write_bytes(b"this is not an image")
    return paths


def make_audit(
    tmp_path: Path,
    n: int = 40,
    *,
    labels: bool = True,
    evaluation: bool = True,
    n_classes: int = 4,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A synthetic audit + summary following the scan output contract.

    Row 1 holds a ``<script>`` caption and is the worst suspect; row 3 has a missing
    image, row 4 an empty caption, row 5 an unreadable image, row 6 a remote image.
    """
    rng = np.random.default_rng(seed)
    images = _write_images(tmp_path / "imgs")
    kinds = ["wide", "tall", "alpha"]
    image_rel = [f"imgs/{images[kinds[i % 3]].name}" for i in range(n)]
    image_abs = [str(images[kinds[i % 3]]) for i in range(n)]
    captions = [f"caption number {i}" for i in range(n)]
    captions[1] = SCRIPT_CAPTION
    status = np.array(["ok"] * n, dtype=object)
    status[3], status[4], status[5], status[6] = (
        "missing_image",
        "empty_caption",
        "unreadable_image",
        "remote_image",
    )
    image_abs[3] = str(tmp_path / "imgs" / "does_not_exist.png")
    captions[4] = ""
    image_abs[5] = str(images["broken"])
    image_rel[6] = image_abs[6] = "https://example.org/remote.jpg"
    ok = status == "ok"

    match = np.linspace(0.01, 0.99, n)
    rng.shuffle(match)
    match[1] = 0.0  # the worst suspect
    match = np.where(ok, match, np.nan)
    pair = np.where(ok, 0.3 * match - 0.05 + rng.normal(0, 0.01, n), np.nan)
    flagged = np.nan_to_num(match, nan=1.0) < 0.5
    proposed = np.full(n, -1, dtype=np.int64)
    conf = np.zeros(n)
    flagged_rows = np.flatnonzero(flagged)
    for k, i in enumerate(flagged_rows):
        if k % 3 != 2:
            proposed[i] = int(flagged_rows[(k + 1) % len(flagged_rows)])
            conf[i] = 0.5 + 0.5 * (k % 5) / 5
    proposed_caption = [captions[j] if j >= 0 else "" for j in proposed]
    proposed[1] = 2
    conf[1] = 0.99
    proposed_caption[1] = IMG_PROPOSAL
    action = np.where(flagged, np.where(proposed >= 0, "rematch", "drop"), "keep").astype(object)
    action[~ok] = "review"
    # evidence: a flagged pair has a better caption and a better image elsewhere
    similarity = pair + 0.25
    rows = np.arange(n)
    alt_caption = np.where(ok, (rows + 1) % n, -1)
    alt_image = np.where(ok, (rows + 2) % n, -1)
    step = np.where(flagged, 0.1, -0.1)
    runner = np.where(proposed >= 0, (rows + 3) % n, -1)

    audit = pd.DataFrame(
        {
            "image": image_rel,
            "caption": captions,
            "flickr_url": [f"http://farm9.staticflickr.com/{i}.jpg" for i in range(n)],
            "row": np.arange(n),
            "status": status,
            "image_path": image_abs,
            "similarity": similarity,
            "pair_score": pair,
            "match_score": match,
            "is_mismatched": flagged,
            "proposed_row": proposed,
            "proposed_caption": proposed_caption,
            "rematch_confidence": conf,
            "alt_caption_row": alt_caption,
            "alt_caption_similarity": np.where(ok, similarity + step, np.nan),
            "alt_image_row": alt_image,
            "alt_image_similarity": np.where(ok, similarity + 2 * step, np.nan),
            "runner_up_row": runner,
            "runner_up_similarity": np.where(runner >= 0, similarity + 0.05, np.nan),
            "action": action,
        }
    )
    label_info = None
    if labels:
        classes = [f"class_{c}" for c in range(n_classes)]
        given = np.array([classes[i % n_classes] for i in range(n)], dtype=object)
        suggested = given.copy()
        issue = np.zeros(n, dtype=bool)
        issue[[7, 8, 9]] = True
        suggested[issue] = [classes[(i + 1) % n_classes] for i in (7, 8, 9)]
        audit["category"] = given
        audit["label_status"] = "ok"
        audit["label_score"] = 0.9
        audit.loc[issue, "label_score"] = [0.05, 0.01, 0.2]
        audit["is_label_issue"] = issue
        audit["suggested_label"] = suggested
        audit["label_confidence"] = np.where(issue, 0.8, 0.95)
        table = pd.crosstab(audit["category"], audit["suggested_label"])
        label_info = {
            "label_col": "category",
            "n_classes": n_classes,
            "n_label_issues": int(issue.sum()),
            "estimated_label_noise": float(issue.mean()),
            "confusion": {
                "given": list(table.index),
                "suggested": list(table.columns),
                "counts": table.to_numpy().tolist(),
            },
        }
    eval_info = None
    if evaluation:
        recall = np.linspace(0, 1, 50)
        eval_info = {
            "detection": {"auroc": 0.91, "precision": 0.8, "recall": 0.7, "f1": 0.746},
            "rematch": {"precision": 0.66, "coverage": 0.5, "exact_accuracy": 0.4},
            "pr_curve": {"precision": (1 - 0.5 * recall**2).tolist(), "recall": recall.tolist()},
        }
    summary = {
        "pmpclean_version": "0.1.0",
        "created": "2026-11-23T16:00:00Z",
        "manifest": str(tmp_path / "data.csv"),
        "out_dir": str(tmp_path / "data.pmpclean"),
        "n_rows": n,
        "n_scored": int(ok.sum()),
        "n_images": 3,
        "status_counts": {str(k): int(v) for k, v in pd.Series(status).value_counts().items()},
        "action_counts": {str(k): int(v) for k, v in pd.Series(action).value_counts().items()},
        "n_mismatched": int(flagged.sum()),
        "estimated_noise_rate": float(flagged.sum() / ok.sum()),
        "threshold": 0.5,
        "mixture": {
            "space": "pair_score",
            "weights": [0.6, 0.4],
            "means": [0.17, 0.0],
            "stds": [0.05, 0.04],
            "score_at_threshold": 0.1,
        },
        "rematch": {"n_suspects": int(flagged.sum()), "n_proposed": int((proposed >= 0).sum())},
        "model": {"source": "file:emb.npz", "device": "cpu"},
        "evaluation": eval_info,
        "labels": label_info,
        "settings": {"image_col": "image", "text_col": "caption", "threshold": 0.5, "k": 10},
        "versions": {"pmpclean": "0.1.0", "numpy": np.__version__},
        "timings": {"read": 0.01, "embed": 1.5, "score": 0.2},
        "files": {"report": str(tmp_path / "data.pmpclean" / "report.html")},
        "warnings": ["1 row has a remote image"],
    }
    return audit, summary


def big_audit(n: int = 100_000, seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A 100k-row audit pointing at (non-existent) distinct image files."""
    rng = np.random.default_rng(seed)
    match = rng.beta(0.6, 0.4, n)
    flagged = match < 0.5
    proposed = np.where(flagged & (rng.random(n) < 0.6), rng.integers(0, n, n), -1)
    action = np.where(flagged, np.where(proposed >= 0, "rematch", "drop"), "keep")
    audit = pd.DataFrame(
        {
            "image": [f"img/{i}.jpg" for i in range(n)],
            "caption": [f"a fairly ordinary caption describing picture {i}" for i in range(n)],
            "row": np.arange(n),
            "status": "ok",
            "image_path": [f"/nonexistent/img/{i}.jpg" for i in range(n)],
            "pair_score": 0.2 * match + rng.normal(0, 0.01, n),
            "match_score": match,
            "is_mismatched": flagged,
            "proposed_row": proposed,
            "proposed_caption": np.where(proposed >= 0, "another caption", ""),
            "rematch_confidence": np.where(proposed >= 0, rng.random(n), 0.0),
            "action": action,
        }
    )
    summary = {
        "n_rows": n,
        "n_scored": n,
        "threshold": 0.5,
        "mixture": {"weights": [0.5, 0.5], "means": [0.15, 0.05], "stds": [0.03, 0.03]},
        "evaluation": {
            "pr_curve": {"precision": rng.random(n).tolist(), "recall": rng.random(n).tolist()}
        },
    }
    return audit, summary


@pytest.fixture()
def sample(tmp_path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    return make_audit(tmp_path)


# --------------------------------------------------------------------------- tests


def test_sections_and_counts(sample: tuple[pd.DataFrame, dict[str, Any]]) -> None:
    audit, summary = sample
    page = Page(render_report(audit, summary))
    ids = page.ids()
    for section in (*SECTIONS, "labels", "evaluation"):
        assert section in ids, section
        assert {"href": f"#{section}"} in [
            {"href": a.get("href")} for t, a, _ in page.tags if t == "a"
        ]

    def kpi(name: str) -> str:
        return " ".join(page.text_by_id[f"kpi-{name}"].split())

    assert kpi("rows") == "Rows scanned 40 36 scored · 4 not scored"
    noise = 100 * summary["estimated_noise_rate"]
    assert kpi("flagged") == (
        f"Flagged mismatched {summary['n_mismatched']} est. noise rate {noise:.1f}%"
    )
    counts = summary["action_counts"]
    assert kpi("rematch").startswith(f"Rematch proposed {counts['rematch']} ")
    assert kpi("drop").startswith(f"Dropped {counts['drop']} ")
    assert (
        kpi("review")
        == f"Left for review {counts['review']} {100 * counts['review'] / 40:.1f}% of rows"
    )
    assert kpi("keep").startswith(f"Kept {counts['keep']} ")
    assert kpi("labels") == "Label issues 3 est. label noise 7.5%"
    assert kpi("auroc") == "Detection AUROC 0.910 F1 0.746 vs ground truth"
    rows = {tuple(r[:2]) for r in page.rows}
    for status, count in summary["status_counts"].items():
        assert (status, str(count)) in rows
    for action, count in summary["action_counts"].items():
        assert (action, str(count)) in rows
    assert "1 row has a remote image" in page.text_by_id["warnings"]


def test_no_external_resources(sample: tuple[pd.DataFrame, dict[str, Any]]) -> None:
    audit, summary = sample
    text = render_report(audit, summary)
    page = Page(text)
    for tag, attrs, _ in page.tags:
        assert tag not in {"link", "iframe", "object", "embed", "base", "form"}
        for name in ("src", "href", "srcset", "action", "poster", "data", "xlink:href"):
            value = attrs.get(name)
            if value is not None:
                assert value.startswith(("data:image/", "#")), (tag, name, value[:60])
    assert "http://" not in text  # flickr_url is never shown
    assert "url(" not in text and "@import" not in text
    csp = [a for t, a, _ in page.tags if t == "meta" and a.get("http-equiv")]
    assert csp and "default-src 'none'" in str(csp[0]["content"])
    # one inline script, allowed by its sha256 and by nothing else
    scripts = [a for t, a, _ in page.tags if t == "script"]
    assert scripts == [{}]
    body = text.split("<script>")[1].split("</script>")[0]
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    policy = {d.split()[0]: d.split()[1:] for d in str(csp[0]["content"]).split(";") if d.strip()}
    assert policy["script-src"] == [f"'sha256-{digest}'"]
    assert "</" not in body and "innerHTML" not in body
    # the remote image path may appear as text only
    assert text.count("https://example.org/remote.jpg") == len(
        [t for t in page.text if "https://example.org/remote.jpg" in t]
    )


def test_captions_and_labels_are_escaped(sample: tuple[pd.DataFrame, dict[str, Any]]) -> None:
    audit, summary = sample
    audit.loc[7, "category"] = "<b>bold</b>"
    text = render_report(audit, summary)
    assert SCRIPT_CAPTION not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<img src=x" not in text and "<b>bold</b>" not in text
    page = Page(text)
    shown = "".join(page.text)
    assert SCRIPT_CAPTION in shown  # rendered as text
    assert IMG_PROPOSAL in shown
    assert not [a for t, a, _ in page.tags if t == "img" and a.get("src") == "x"]


def test_suspects_worst_first_and_capped(sample: tuple[pd.DataFrame, dict[str, Any]]) -> None:
    audit, summary = sample
    page = Page(render_report(audit, summary, gallery_size=5))
    rows = [int(r) for r in page.cards_in("suspects")]
    # worst first by the statistic the split cuts (pair_score), not the saturated posterior
    flagged = audit[audit["is_mismatched"]].sort_values("pair_score")
    assert rows == flagged["row"].head(5).tolist()
    assert rows[0] == int(audit.loc[audit["pair_score"].idxmin(), "row"])
    assert f"Showing 5 of {len(flagged)} flagged pairs" in page.text_by_id["suspects"]
    rematch_rows = [int(r) for r in page.cards_in("rematches")]
    conf = audit.set_index("row").loc[rematch_rows, "rematch_confidence"].to_numpy()
    assert (np.diff(conf) <= 0).all() and len(rematch_rows) == 5
    assert set(audit.loc[rematch_rows, "action"]) == {"rematch"}


def test_borderline_sorted_around_threshold(sample: tuple[pd.DataFrame, dict[str, Any]]) -> None:
    audit, summary = sample
    text = render_report(audit, summary, gallery_size=6)
    page = Page(text)
    rows = [int(r) for r in page.cards_in("borderline")]
    scores = audit.set_index("row").loc[rows, "match_score"].to_numpy()
    expected = audit["match_score"].sub(0.5).abs().nsmallest(6).index
    assert sorted(rows) == sorted(audit.loc[expected, "row"])
    assert (np.diff(scores) >= 0).all()
    assert (scores < 0.5).any() and (scores >= 0.5).any()
    # the threshold divider sits between the last flagged and the first kept card
    sequence = [
        "divider" if a.get("class") == "divider" else "card"
        for t, a, ids in page.tags
        if "borderline" in ids and (t == "article" or a.get("class") == "divider")
    ]
    assert sequence.index("divider") == int((scores < 0.5).sum())
    assert sequence.count("divider") == 1


def test_thumbnails_inline_aspect_and_placeholders(
    sample: tuple[pd.DataFrame, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    audit, summary = sample
    flagged = audit.index[audit["is_mismatched"]]
    audit.loc[flagged[0], "image_path"] = "/no/such/dir/picture.png"  # e.g. an identifier
    audit.loc[flagged[1], "image_path"] = "https://example.org/flagged.jpg"
    opened: list[str] = []
    real_open = Image.open

    def spy(fp: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    page = Page(render_report(audit, summary, gallery_size=40, thumbnail_px=64))
    assert not [p for p in opened if "://" in p]
    imgs = [a for t, a, _ in page.tags if t == "img"]
    assert imgs
    sizes = set()
    for attrs in imgs:
        src = str(attrs["src"])
        assert src.startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert max(thumb.size) <= 64
        sizes.add((thumb.size, (int(attrs["width"]), int(attrs["height"]))))
    # the 32x16 image keeps its 2:1 aspect, the 12x24 image its 1:2
    assert ((32, 16), (64, 32)) in sizes
    assert ((12, 24), (32, 64)) in sizes
    for r in audit.loc[flagged[:2], "row"]:
        thumbs = [a.get("class") for t, a, ids in page.tags if t == "div" and f"row-{r}" in ids]
        assert "thumb ph" in thumbs and "thumb" not in thumbs
        assert "no preview" in page.text_by_id[f"row-{r}"]


@pytest.mark.parametrize(
    "name", ["I;16 png", "EXIF orientation 6 png", "EXIF orientation 8 png", "RGBA png"]
)
def test_thumbnail_shows_what_the_scan_embedded(
    name: str, image_twins: dict[str, tuple[Path, Path]]
) -> None:
    """The report decodes with the scan's decoder: upright, 16-bit scaled, alpha on white."""
    path, twin = image_twins[name]
    got, want = report_ctx._thumbnail(str(path), 64), report_ctx._thumbnail(str(twin), 64)
    assert got is not None and want is not None
    assert got[1:] == want[1:] == (16, 10)

    def pixels(uri: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))

    assert np.abs(pixels(got[0]).astype(int) - pixels(want[0]).astype(int)).mean() < 2


def test_a_directory_row_says_it_is_a_folder(
    sample: tuple[pd.DataFrame, dict[str, Any]], tmp_path: Path
) -> None:
    audit, summary = sample
    audit = audit.copy()
    audit.loc[3, "status"] = "image_is_directory"
    audit.loc[3, "image_path"] = str(tmp_path)
    page = Page(render_report(audit, summary))
    table = {r[0]: r for r in page.rows if len(r) == 6 and r[0].isdigit()}
    assert table["3"][1:3] == ["image_is_directory", "image path is a folder, not a file"]


def test_unscored_rows_listed_with_reason(sample: tuple[pd.DataFrame, dict[str, Any]]) -> None:
    audit, summary = sample
    page = Page(render_report(audit, summary))
    table = {r[0]: r for r in page.rows if len(r) == 6 and r[0].isdigit()}
    assert set(table) == {"3", "4", "5", "6"}
    assert table["3"][1:3] == ["missing_image", "image file not found"]
    assert table["4"][1:3] == ["empty_caption", "caption is empty"]
    assert table["5"][1] == "unreadable_image"
    assert table["6"][2] == "image is a remote URL (never fetched)"


def test_labels_section(sample: tuple[pd.DataFrame, dict[str, Any]]) -> None:
    audit, summary = sample
    page = Page(render_report(audit, summary))
    labels = page.text_by_id["labels"]
    assert "label-status" not in page.ids()
    summary["labels"]["status_counts"] = {"ok": 38, "missing_label": 2}
    status_line = Page(render_report(audit, summary)).text_by_id["label-status"]
    assert status_line.strip() == "Label status: 38 ok, 2 missing_label."
    assert "category" in labels and "label issues" in labels
    issue_rows = [int(r) for r in page.cards_in("labels")]
    assert issue_rows == [8, 7, 9]  # ascending label_score
    confusion = [r for r in page.rows if r and r[0].startswith("class_") and len(r) == 5]
    assert confusion == [
        ["class_0", "9", "1", "·", "·"],
        ["class_1", "·", "9", "1", "·"],
        ["class_2", "·", "·", "10", "·"],
        ["class_3", "1", "·", "·", "9"],
    ]
    pairs = page.text_by_id["label-pairs"]
    assert "class_3" in pairs and "class_0" in pairs


def test_confusion_folds_many_classes(tmp_path: Path) -> None:
    audit, summary = make_audit(tmp_path, n=60, n_classes=30)
    page = Page(render_report(audit, summary))
    header = next(r for r in page.rows if r and r[0] == "given \\ suggested")
    assert len(header) <= 13 and header[-1] == "(other)"
    body_rows = [r for r in page.rows if len(r) == len(header) and r[0] != header[0]]
    assert body_rows[-1][0] == "(other)"
    # the classes involved in label issues are kept
    involved = set(
        audit.loc[audit["is_label_issue"], ["category", "suggested_label"]].values.ravel()
    )
    assert involved <= set(header)
    assert "the rest are summed in (other)" in page.text_by_id["labels"]


def test_optional_sections_absent(tmp_path: Path) -> None:
    audit, summary = make_audit(tmp_path, labels=False, evaluation=False)
    page = Page(render_report(audit, summary))
    ids = page.ids()
    assert "labels" not in ids and "evaluation" not in ids and "kpi-auroc" not in ids
    assert "#labels" not in [a.get("href") for t, a, _ in page.tags if t == "a"]
    for section in SECTIONS:
        assert section in ids


def test_evaluation_section(sample: tuple[pd.DataFrame, dict[str, Any]]) -> None:
    audit, summary = sample
    page = Page(render_report(audit, summary))
    det = " ".join(page.text_by_id["eval-detection"].split())
    assert "auroc 0.910" in det and "f1 0.746" in det
    # counts are integers, rates have 3 decimals
    summary["evaluation"]["detection"].update(n=8092, tp=1577)
    det = " ".join(Page(render_report(audit, summary)).text_by_id["eval-detection"].split())
    assert "n 8,092" in det and "tp 1,577" in det and "8092.000" not in det
    assert "exact accuracy 0.400" in " ".join(page.text_by_id["eval-rematch"].split())
    assert page.tags_in("fig-pr", "polyline") and page.tags_in("fig-pr", "circle")


def test_score_plots(sample: tuple[pd.DataFrame, dict[str, Any]]) -> None:
    """One histogram, of the statistic the split cuts, with the cut drawn; the flagged
    rows are the red part of the bars. No histogram of the posterior match_score."""
    audit, summary = sample
    page = Page(render_report(audit, summary))
    pair = " ".join(page.text_by_id["fig-pair-score"].split())
    assert "pair_score (lower = more likely mismatched)" in pair and "cut 0.1" in pair
    assert "mismatched (40%)" in pair and "matched (60%)" in pair
    assert "36 scored rows, 19 flagged (red)" in pair
    assert len(page.tags_in("fig-pair-score", "polyline")) == 2  # the two components
    assert "fig-match-score" not in page.ids()
    heights = {"#e3a3a3": 0.0, "#9fb3c8": 0.0}
    for rect in page.tags_in("fig-pair-score", "rect"):
        if rect.get("fill") in heights and rect.get("y") != "9":  # y 9: the legend
            heights[str(rect["fill"])] += float(rect["height"] or 0)
    flagged = int(audit["is_mismatched"].sum())
    scored = int(audit["pair_score"].notna().sum())
    # bar heights are row counts: the red share is the flagged share
    red = heights["#e3a3a3"] / (heights["#e3a3a3"] + heights["#9fb3c8"])
    assert red == pytest.approx(flagged / scored, abs=0.03)


def test_large_dataset_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    audit, summary = big_audit()
    calls: list[str] = []
    real = report_ctx._thumbnail

    def counting(path: str, px: int) -> Any:
        calls.append(path)
        return real(path, px)

    monkeypatch.setattr(report_ctx, "_thumbnail", counting)
    text = render_report(audit, summary, gallery_size=24)
    assert len(text.encode()) < 3_000_000
    assert len(calls) <= 3 * 24  # suspects + rematches + borderline, never every row
    page = Page(text)
    for section in ("suspects", "rematches", "borderline"):
        assert len(page.cards_in(section)) == 24
    assert "Showing 24 of" in page.text_by_id["suspects"]


def test_write_report_atomic(sample: tuple[pd.DataFrame, dict[str, Any]], tmp_path: Path) -> None:
    audit, summary = sample
    target = tmp_path / "out" / "report.html"
    target.parent.mkdir()
    target.write_text("old")
    written = write_report(target, audit, summary, gallery_size=3)
    assert written == target
    assert target.read_text(encoding="utf-8") == render_report(audit, summary, gallery_size=3)
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.html"]


def test_minimal_inputs_render() -> None:
    page = Page(render_report(pd.DataFrame({"caption": ["a", "b"]}), {}))
    assert "overview" in page.ids()
    assert " ".join(page.text_by_id["kpi-rows"].split()).startswith("Rows scanned 2")
    empty = Page(render_report(pd.DataFrame(), {"n_rows": 0}))
    assert "No scored rows to plot." in empty.text_by_id["scores"]


def test_raise_errors(sample: tuple[pd.DataFrame, dict[str, Any]]) -> None:
    audit, summary = sample
    with pytest.raises(TypeError, match="audit must be a pandas DataFrame, not dict"):
        render_report({"a": 1}, summary)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="summary must be a dict, not list"):
        render_report(audit, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gallery_size must be >= 0, got -1"):
        render_report(audit, summary, gallery_size=-1)
    with pytest.raises(ValueError, match="thumbnail_px must be >= 16 pixels, got 4"):
        render_report(audit, summary, thumbnail_px=4)


# --------------------------------------------------------------------------- browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


# Injected by the browser test only: records every content-security violation of the page
# on its root element, where --dump-dom shows it (headless chromium logs no console).
_REPORTER = (
    "document.addEventListener('securitypolicyviolation', function (e) {"
    " var r = document.documentElement;"
    " r.setAttribute('data-csp', (r.getAttribute('data-csp') || '') + e.violatedDirective + ';');"
    " });"
)


def _with_reporter(page: Path, out: Path, *, break_hash: bool = False) -> Path:
    """A copy of ``page`` whose policy also allows the violation reporter (by its hash)."""
    text = page.read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(_REPORTER.encode()).digest()).decode()
    src = "script-src &#39;sha256-"  # the policy as the page writes it (attribute-escaped)
    assert text.count(src) == 1
    own = "&#39;sha256-x" if break_hash else "&#39;sha256-"
    text = text.replace(src, f"script-src &#39;sha256-{digest}&#39; {own}")
    meta = '<meta name="referrer"'
    text = text.replace(meta, f"<script>{_REPORTER}</script>{meta}", 1)
    out.write_text(text, encoding="utf-8")
    return out


def _run_chromium(browser: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)


def _dom(browser: str, tmp_path: Path, url: str) -> Page:
    res = _run_chromium(browser, tmp_path, "--virtual-time-budget=5000", "--dump-dom", url)
    assert "<html" in res.stdout, res.stderr[-2000:]
    return Page(res.stdout)


@pytest.mark.browser
def test_renders_in_headless_chromium(
    sample: tuple[pd.DataFrame, dict[str, Any]], tmp_path: Path
) -> None:
    """The page draws (a real screenshot), breaks no content-security rule, and its one
    script runs: the controls of the flagged table appear and a sort reorders the rows."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium installed (apt-get install chromium)")
    audit, summary = sample
    page = write_report(tmp_path / "report.html", audit, summary)
    shot = tmp_path / "shot.png"
    _run_chromium(
        browser, tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()
    )
    assert shot.exists() and shot.stat().st_size > 20_000
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        colors = im.convert("RGB").resize((64, 120)).getcolors(64 * 120)
    assert colors is not None and len(colors) > 50  # a real page, not a blank canvas

    watched = _with_reporter(page, tmp_path / "watched.html")
    flagged = audit[audit["is_mismatched"]]
    for column, key in ((0, "row"), (2, "pair_score")):
        # "#sort=N" asks the page's script to sort by column N once loaded
        dom = _dom(browser, tmp_path, f"{watched.as_uri()}#sort={column}")
        root = next(a for t, a, _ in dom.tags if t == "html")
        assert "data-csp" not in root, root["data-csp"]  # no content-security violation
        tools = [a for t, a, _ in dom.tags if a.get("id") == "flagged-tools"]
        assert tools and "hidden" not in tools[0]  # the script ran
        heads = [a for t, a, ids in dom.tags if t == "th" and "flagged-table" in ids]
        assert heads[column]["aria-sort"] == "ascending"
        shown = [r[0] for r in dom.rows if r and r[0].isdigit() and len(r) > 5]
        want = flagged.sort_values([key, "row"])["row"].astype(str).tolist()
        assert shown[: len(want)] == want
    # the check bites: a script the policy does not allow is reported and does not run
    blocked = _dom(
        browser, tmp_path, _with_reporter(page, tmp_path / "b.html", break_hash=True).as_uri()
    )
    root = next(a for t, a, _ in blocked.tags if t == "html")
    assert "script-src" in str(root.get("data-csp"))
    tools = [a for t, a, _ in blocked.tags if a.get("id") == "flagged-tools"]
    assert "hidden" in tools[0]


def test_index_labels_do_not_matter(sample: tuple[pd.DataFrame, dict[str, Any]]) -> None:
    audit, summary = sample
    expected = Page(render_report(audit, summary, gallery_size=6))
    shuffled_index = audit.set_axis([7] * len(audit))  # duplicate, meaningless labels
    page = Page(render_report(shuffled_index, summary, gallery_size=6))
    for section in ("suspects", "rematches", "borderline", "labels"):
        assert page.cards_in(section) == expected.cards_in(section)
    assert page.text_by_id["unscored-table"] == expected.text_by_id["unscored-table"]


# --------------------------------------------------------------------------- evidence


def test_cards_show_the_evidence(sample: tuple[pd.DataFrame, dict[str, Any]]) -> None:
    """Each card shows the pair's own similarity, the caption that fits the image better
    (row, similarity, text), the image that fits the caption better and, for a rematch,
    the runner-up caption."""
    audit, summary = sample
    page = Page(render_report(audit, summary, gallery_size=40))
    rec = audit[(audit["action"] == "rematch") & (audit["row"] != 1)].iloc[0]
    row = int(rec["row"])
    card = " ".join(page.text_by_id[f"row-{row}"].split())
    cap, img, run = (int(rec[c]) for c in ("alt_caption_row", "alt_image_row", "runner_up_row"))
    assert f"This pair {rec['similarity']:.3f}" in card
    assert (
        f"Caption of row {cap} fits this image better "
        f"{rec['alt_caption_similarity']:.3f} {audit.loc[cap, 'caption']}" in card
    )
    assert f"Image of row {img} fits this caption better {rec['alt_image_similarity']:.3f}" in card
    assert (
        f"Runner-up caption: row {run} {rec['runner_up_similarity']:.3f} "
        f"{audit.loc[run, 'caption']}" in card
    )
    # a kept pair's neighbours fit less well, and it has no runner-up
    kept = audit[(audit["action"] == "keep")].iloc[0]
    kept_card = " ".join(page.text_by_id[f"row-{int(kept['row'])}"].split())
    assert f"Caption of row {int(kept['alt_caption_row'])} fits this image less well" in kept_card
    assert "Runner-up" not in kept_card
    # the better evidence is marked, the worse is not
    better = [a for t, a, ids in page.tags if t == "div" and f"row-{row}" in ids and "ev" in str(a)]
    assert [str(a["class"]) for a in better][:4] == [
        "ev ev-own",
        "ev ev-caption better",
        "ev ev-image better",
        "ev ev-runner better",
    ]


def test_a_runner_up_that_is_the_better_caption_is_said_once(
    sample: tuple[pd.DataFrame, dict[str, Any]],
) -> None:
    audit, summary = sample
    row = int(audit.loc[audit["action"] == "rematch", "row"].iloc[-1])
    alt = int(audit.loc[row, "alt_caption_row"])
    audit.loc[row, "runner_up_row"] = alt
    card = " ".join(
        Page(render_report(audit, summary, gallery_size=40)).text_by_id[f"row-{row}"].split()
    )
    assert f"Caption of row {alt} fits this image better (the runner-up)" in card
    assert "Runner-up caption" not in card


def test_old_audits_without_evidence_columns_still_render(
    sample: tuple[pd.DataFrame, dict[str, Any]],
) -> None:
    audit, summary = sample
    old = audit.drop(columns=[c for c in audit.columns if c.startswith(("alt_", "runner_up"))])
    page = Page(render_report(old, summary))
    card = page.text_by_id[f"row-{int(old.loc[old['is_mismatched'], 'row'].iloc[0])}"]
    assert "This pair" in card and "fits this" not in card


def test_flagged_table_lists_every_flagged_row(
    sample: tuple[pd.DataFrame, dict[str, Any]],
) -> None:
    audit, summary = sample
    text = render_report(audit, summary, gallery_size=3)
    page = Page(text)
    table = [r for r in page.rows if r and r[0] != "row"]
    flagged = audit[audit["is_mismatched"]].sort_values("pair_score")
    body = [a for t, a, ids in page.tags if t == "tr" and "flagged-table" in ids and a]
    assert [a["data-action"] for a in body] == flagged["action"].tolist()
    rows_shown = [r[0] for r in table if r[0].isdigit()]
    want = [str(r) for r in flagged["row"]]
    assert [r for r in rows_shown if r in want][: len(want)] == want
    # every flagged row, though the gallery shows 3
    first = flagged.iloc[0]
    line = next(r for r in table if r[0] == str(first["row"]) and r[1] == first["action"])
    assert line[2] == f"{first['pair_score']:.3f}"
    assert line[4] == f"{first['alt_caption_similarity']:.3f} ({first['alt_caption_row']})"
    cells = [a for t, a, ids in page.tags if t == "td" and "flagged-table" in ids]
    assert all("data-sort" in a for a in cells)
    tools = [a for t, a, _ in page.tags if a.get("id") == "flagged-tools"]
    assert tools and "hidden" in tools[0]  # the controls appear only with scripts on
    capped = Page(render_report(audit, summary, max_flagged_rows=5))
    shown = [a for t, a, ids in capped.tags if t == "tr" and "flagged-table" in ids and a]
    assert len(shown) == 5
    assert f"Showing the 5 worst of {len(flagged)} flagged rows" in capped.text_by_id["flagged"]


def test_banners_for_random_weights_and_undecided(
    sample: tuple[pd.DataFrame, dict[str, Any]],
) -> None:
    audit, summary = sample
    plain = Page(render_report(audit, summary))
    assert "banner-random" not in plain.ids()
    assert "Nothing was dropped" not in plain.text_by_id.get("verdict", "")
    summary = {
        **summary,
        "model": {"source": "model:pmpclean-tiny/none", "device": "cpu", "random_weights": True},
        "verdict": "undecided",
        "verdict_reason": "the model does not separate pairs",
    }
    summary["warnings"] = [
        "model 'x' has RANDOM weights (--pretrained none, seed 0): ...",
        "Undecided: the model does not separate pairs. No pair is dropped ...",
        "1 row has a remote image",
    ]
    page = Page(render_report(audit, summary))
    assert "The model has random weights" in page.text_by_id["banner-random"]
    verdict = " ".join(page.text_by_id["verdict"].split())
    assert "Verdict: undecided" in verdict
    assert "Nothing was dropped or rematched: every scored pair is left for review" in verdict
    # nothing twice: the overview's warnings leave out what the banners say
    assert page.text_by_id["warnings"].split() == "Warnings 1 row has a remote image".split()
    decision = " ".join(page.text_by_id["decision"].split())
    assert "Weights random (--pretrained none)" in decision and "Device cpu" in decision


def test_decision_shows_what_a_user_decides_with(
    sample: tuple[pd.DataFrame, dict[str, Any]],
) -> None:
    """Model and decision: words, integers, no solver internals (those are in Run details);
    an --embeddings run lists no model settings."""
    audit, summary = sample
    summary = {
        **summary,
        "rematch": {
            "n_suspects": 795,
            "n_proposed": 40,
            "min_confidence": 0.8,
            "cost": "learned",
            "mass": 0.8,
            "eps": 0.0249,
            "marginal_error": 1e-7,
            "n_edges": 4371,
        },
        "settings": {
            "data": {"image_col": "image", "text_col": "caption"},
            "embed": {"model": "ViT-B-32", "embeddings": "emb.npz", "batch_size": 64, "k": 3},
        },
    }
    page = Page(render_report(audit, summary))
    text = " ".join(page.text_by_id["decision"].split())
    assert "Suspects 795" in text and "Rematches proposed 40" in text and "795.000" not in text
    assert "Embeddings file:emb.npz" in text
    for internal in ("eps", "marginal", "edges", "_"):
        assert internal not in text, internal
    solver = " ".join(page.text_by_id["solver"].split())
    assert "candidate edges 4,371" in solver and "marginal error 1e-07" in solver
    settings = page.text_by_id["settings"]
    assert "embed.embeddings" in settings and "embed.model" not in settings
    assert "embed.batch_size" not in settings
    # nothing listed twice: the decision's figures are not repeated in the solver table
    assert "795" not in solver and "learned" not in solver and "0.8" not in solver


def test_script_cannot_end_its_element() -> None:
    from pmpclean.report import _resource

    assert "</" not in _resource("table.js")


def test_thumbnail_of_an_image_inside_a_shard(
    image_twins: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """An img2dataset tar member ("<shard>.tar#<key>.jpg" in the audit) gets its thumbnail."""
    import tarfile

    path, _ = image_twins["RGBA png"]
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(path, arcname="000000001.jpg")
    got = report_ctx._thumbnail(f"{shard}#000000001.jpg", 64)
    assert got is not None and got == report_ctx._thumbnail(str(path), 64)
    assert report_ctx._thumbnail(f"{shard}#000000002.jpg", 64) is None  # not in the shard
