"""Input adapters on real files: our JSONL/JSON, datasets parquet/arrow with an Image column, and
the published Prometheus-Vision rows (whose image paths climb out of the data folder)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.samples import PROMETHEUS_VISION
from vlm_judge.images import load_image
from vlm_judge.inputs import InputOptions, RowError, load_rubrics, read_requests
from vlm_judge.records import JudgeRequest, Rubric

SAMPLES = PROMETHEUS_VISION
RUBRIC = {"criteria": "Is the colour right?", **{f"score{i}_description": f"level {i}" for i in range(1, 6)}}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read(path, **kw) -> dict:
    return dict(read_requests(path, InputOptions(**kw)))


@pytest.fixture
def photo(tmp_path, sample_images) -> Path:
    p = tmp_path / "imgs" / "cat.png"
    p.parent.mkdir()
    shutil.copy(sample_images["chelsea"], p)
    return p


def test_our_jsonl_rows_in_every_rubric_form(tmp_path, photo):
    png = photo.read_bytes()
    rows = [
        {"id": "dict", "instruction": "What colour?", "response": "Orange.", "rubric": RUBRIC, "image": "imgs/cat.png"},
        {"instruction": "What colour?", "response": "Orange.", "rubric": Rubric.from_dict(RUBRIC).to_text(),
         "images": [str(photo), base64.b64encode(png).decode()]},
        {"instruction": "Q?", "response": "A.", "rubric": "colour", "reference_answer": "Orange."},
        {"instruction": "Q?", "response": "A.", **RUBRIC, "image": "data:image/png;base64," + base64.b64encode(png).decode()},
        {"instruction": "Q?", "response": "A.", "response_b": "B.", "rubric": {"criteria": "Which is right?"}},
        {"instruction": "Q?", "response": "A."},  # falls back to the default rubric
    ]
    got = read(write_jsonl(tmp_path / "in.jsonl", rows), rubrics={"colour": Rubric.from_dict(RUBRIC)},
               default_rubric=Rubric.from_dict(RUBRIC))
    assert list(got) == ["dict", "1", "2", "3", "4", "5"]  # the row's id, else its index
    assert all(isinstance(r, JudgeRequest) for r in got.values()), got
    assert got["dict"].images[0].path == str(photo.resolve())
    assert len(got["1"].images) == 2 and got["1"].images[1].data == png
    assert got["2"].rubric == Rubric.from_dict(RUBRIC) and got["2"].reference_answer == "Orange."
    assert got["3"].images[0].data == png
    assert got["4"].mode == "relative" and got["4"].response_b == "B."
    assert got["5"].rubric.criteria == "Is the colour right?"
    assert load_image(got["1"].images[1]).size == Image.open(photo).size


@pytest.mark.parametrize(("row", "field", "needle"), [
    ({"response": "A.", "rubric": RUBRIC}, "instruction", "missing or empty"),
    ({"instruction": "Q?", "response": "  ", "rubric": RUBRIC}, "response", "missing or empty"),
    ({"instruction": "Q?", "response": "A."}, "rubric", "no default rubric"),
    ({"instruction": "Q?", "response": "A.", "rubric": {k: v for k, v in RUBRIC.items() if k != "score3_description"}},
     "rubric", "lacks score3_description"),
    ({"instruction": "Q?", "response": "A.", "criteria": "c", "score1_description": "x"}, "score2_description", "five"),
    ({"instruction": "Q?", "response": "A.", "rubric": "nosuch"}, "rubric", "unknown rubric name"),
    ({"instruction": "Q?", "response": "A.", "rubric": {"criteria": "only criteria"}}, "rubric", "five score descriptions"),
    ({"instruction": "Q?", "response": "A.", "rubric": RUBRIC, "image": "imgs/none.png"}, "image", "not found"),
    ({"instruction": "Q?", "response": "A.", "rubric": RUBRIC, "image": "http://x.org/a.png"}, "image", "not fetched"),
    ({"instruction": "Q?", "response": "A.", "rubric": RUBRIC, "image": "/etc/hostname"}, "image", "outside the allowed"),
    ({"instruction": "Q?", "response": "A.", "rubric": RUBRIC, "images": ["imgs/cat.png", 5]}, "images[1]", "unusable"),
    ({"instruction": "Q?", "response": "A.", "rubric": RUBRIC, "mode": "pairwise"}, "mode", "absolute' or 'relative"),
])
def test_a_bad_row_names_its_row_and_field_and_the_others_go_on(tmp_path, photo, row, field, needle):
    good = {"id": "good", "instruction": "Q?", "response": "A.", "rubric": RUBRIC, "image": "imgs/cat.png"}
    got = read(write_jsonl(tmp_path / "in.jsonl", [good, {"id": "bad", **row}, dict(good, id="good2")]))
    assert isinstance(got["good"], JudgeRequest) and isinstance(got["good2"], JudgeRequest)
    err = got["bad"]
    assert isinstance(err, RowError) and err.field == field, err
    assert needle in str(err) and str(err).startswith(f"row bad, field '{field}'")


def test_broken_lines_corrupt_images_duplicates_and_forced_modes(tmp_path, photo):
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows = [
        {"id": "a", "instruction": "Q?", "response": "A.", "rubric": RUBRIC},
        "{not json",
        {"id": "c", "instruction": "Q?", "response": "A.", "rubric": RUBRIC, "image": "imgs/broken.png"},
        {"id": "a", "instruction": "Q?", "response": "A.", "rubric": RUBRIC},
        {"id": "e", "instruction": "Q?", "response": "A.", "response_b": "B.", "rubric": RUBRIC},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    got = read(path)
    assert isinstance(got["a"], JudgeRequest) and got["e"].mode == "relative"
    assert "not valid JSON" in str(got["1"])
    assert got["c"].field == "image" and "cannot decode image" in str(got["c"])
    assert got["a#3"].field == "id" and "duplicate id 'a'" in str(got["a#3"])
    forced = read(path, mode="absolute")
    assert forced["e"].field == "response_b"
    assert read(path, mode="relative")["a"].field == "response_b"
    assert isinstance(read(path, check_images=False)["c"], JudgeRequest)  # decoding is what caught it


def test_a_pixel_limit_refuses_large_images(tmp_path, photo):
    row = {"instruction": "Q?", "response": "A.", "rubric": RUBRIC, "image": "imgs/cat.png"}
    got = read(write_jsonl(tmp_path / "in.jsonl", [row]), max_pixels=100)
    assert "pixel limit" in str(got["0"])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no pixel data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header_only(8000, 8000))  # 64M pixels, under PIL's own bomb limit
    row = {"instruction": "Q?", "response": "A.", "rubric": RUBRIC, "image": "bomb.png"}
    err = read(write_jsonl(tmp_path / "in.jsonl", [row]))["0"]
    assert isinstance(err, RowError) and "8000x8000, over the 50000000-pixel limit" in str(err)


def test_json_list_and_column_map(tmp_path):
    rows = [{"uid": "q1", "question": "What?", "answer": "That.", "rubric": RUBRIC}]
    (tmp_path / "in.json").write_text(json.dumps(rows))
    got = read(tmp_path / "in.json", column_map={"id": "uid", "instruction": "question", "response": "answer"})
    assert got["q1"].instruction == "What?" and got["q1"].response == "That."
    assert isinstance(read(tmp_path / "in.json")["0"], RowError)


def test_datasets_parquet_and_arrow_with_an_image_column(tmp_path, sample_images):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    paths = [str(sample_images[n]) for n in ("astronaut", "coffee")]
    ds = Dataset.from_dict({
        "id": ["x", "y"], "instruction": ["Who?", "What?"], "response": ["An astronaut.", "Coffee."],
        "rubric": [json.dumps(RUBRIC)] * 2, "image": [{"bytes": Path(p).read_bytes(), "path": None} for p in paths],
    }).cast_column("image", ImageFeature())  # as hub parquet files hold images: encoded bytes
    ds = ds.map(lambda r: {"rubric": json.loads(r["rubric"])})
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    for source in (tmp_path / "rows.parquet", tmp_path / "saved", arrow):
        got = read(source)
        assert set(got) == {"x", "y"}, (source, got)
        ref = got["x"].images[0]
        assert ref.data is not None and ref.data == Path(paths[0]).read_bytes()  # bytes, not a path
        assert got["y"].rubric == Rubric.from_dict(RUBRIC)


def test_rubric_files(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps(RUBRIC))
    (tmp_path / "lib.yaml").write_text("default:\n  criteria: Be right?\n" + "".join(
        f"  score{i}_description: s{i}\n" for i in range(1, 6)) + "colour: |\n  [Colour?]\n" + "".join(
        f"  Score {i}: c{i}\n" for i in range(1, 6)))
    (tmp_path / "r.txt").write_text(Rubric.from_dict(RUBRIC).to_text())
    assert load_rubrics(tmp_path / "one.json") == (Rubric.from_dict(RUBRIC), {})
    assert load_rubrics(tmp_path / "r.txt")[0] == Rubric.from_dict(RUBRIC)
    default, lib = load_rubrics(tmp_path / "lib.yaml")
    assert default.criteria == "Be right?" and lib["colour"].score_descriptions[4] == "c5"


# ---- the real published rows ------------------------------------------------------------------



@pytest.fixture
def published(tmp_path, sample_images) -> Path:
    """The published eval rows in data/, and real photos where their ../ paths point (mmmu/, train2017/)."""
    data = tmp_path / "pv" / "data"
    data.mkdir(parents=True)
    shutil.copy(SAMPLES / "sample_eval_data.jsonl", data / "eval.jsonl")
    for rel, name in (("mmmu/9900.png", "coffee"), ("mmmu/3215.png", "rocket"), ("train2017/000000562014.jpg", "astronaut")):
        p = tmp_path / "pv" / rel
        p.parent.mkdir(exist_ok=True)
        Image.open(sample_images[name]).convert("RGB").save(p)
    return data / "eval.jsonl"


def test_published_rows_are_refused_until_their_paths_are_pointed_at_allowed_folders(published):
    refused = read(published)
    assert len(refused) == 3 and all(isinstance(e, RowError) and e.field == "image" for e in refused.values())
    assert "outside the allowed folders" in str(refused["0"]) and "--image-rewrite" in str(refused["0"])
    images = published.parent.parent
    rewrites = {"../mmmu/": str(images / "mmmu") + "/", "../train2017/": str(images / "train2017") + "/"}
    got = read(published, image_rewrites=rewrites)
    assert all(isinstance(r, JudgeRequest) for r in got.values()), got
    rows = [json.loads(line) for line in published.read_text().splitlines()]
    for k, (rid, req) in enumerate(got.items()):
        row = rows[k]
        assert rid == str(k)  # no id column: the index
        assert req.instruction == row["orig_instruction"] and req.response == row["original_response"]
        assert req.reference_answer == row["orig_reference_answer"]
        assert req.rubric.criteria == row["orig_criteria"]
        assert req.rubric.score_descriptions[2] == row["orig_score3_description"]
        assert Path(req.images[0].path).is_file() and req.mode == "absolute"
    # or: strip the '../' and resolve against an image root (the root is then the allowed folder)
    rooted = read(published, image_root=images, image_rewrites={"../": ""})
    assert [r.images[0].path for r in rooted.values()] == [r.images[0].path for r in got.values()]
    # the allowed list binds even when a rewrite points elsewhere
    only_mmmu = read(published, image_rewrites=rewrites, allowed=[images / "mmmu"])
    assert isinstance(only_mmmu["0"], JudgeRequest) and isinstance(only_mmmu["2"], RowError)


def test_feedback_collection_and_pairwise_rows(tmp_path):
    fc = {"orig_instruction": "Explain tides.", "orig_response": "The moon.", "orig_reference_answer": "Gravity.",
          "orig_criteria": "Is it complete?", **{f"orig_score{i}_description": f"d{i}" for i in range(1, 6)},
          "orig_feedback": "Short.", "orig_score": 2}
    pair = {"orig_instruction": "Explain tides.", "orig_response_A": "The moon.", "orig_response_B": "Gravity.",
            "orig_criteria": "Which is more complete?"}
    broken = {k: v for k, v in fc.items() if k != "orig_score4_description"}
    got = read(write_jsonl(tmp_path / "fc.jsonl", [fc, pair, broken]))
    assert got["0"].images == () and got["0"].rubric.score_descriptions[0] == "d1" and got["0"].mode == "absolute"
    assert got["1"].mode == "relative" and got["1"].response_b == "Gravity."
    assert got["2"].field == "orig_score4_description"


@pytest.mark.parametrize("template", ["default", "prefix"])
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("ref", [None, "The reference {answer}."])
def test_split_prompt_inverts_render(template, relative, ref):
    from vlm_judge.inputs import split_prompt
    from vlm_judge.prompts import render

    rb = Rubric.from_dict(RUBRIC) if not relative else Rubric("Which is right?")
    req = JudgeRequest("Count the {apples}.\n\nThen the pears.", "Three.\n\nAnd two.", rb, reference_answer=ref,
                       response_b="Four." if relative else None, mode="relative" if relative else "absolute")
    parts = split_prompt("<image>\n" + render(req, template).user)
    assert parts["instruction"] == req.instruction
    assert parts["response_a" if relative else "response"] == req.response
    assert parts.get("response_b") == req.response_b and parts.get("reference_answer") == ref
    assert (Rubric.from_text(parts["rubric"]) if not relative else Rubric(parts["rubric"])) == rb


def test_published_llava_training_rows_are_read_from_their_prompt_sections(tmp_path, sample_images):
    data = tmp_path / "data"
    (tmp_path / "mmmu").mkdir()
    data.mkdir()
    shutil.copy(SAMPLES / "sample_train_data.json", data / "train.json")
    shutil.copy(sample_images["coffee"], tmp_path / "mmmu" / "361.png")
    got = read(data / "train.json", image_rewrites={"../mmmu/": "../mmmu/"}, allowed=[tmp_path / "mmmu"])
    assert list(got) == ["0", "1", "2"] and all(isinstance(r, JudgeRequest) for r in got.values()), got
    reqs = list(got.values())
    assert len({r.instruction for r in reqs}) == 1 and len({r.image_key for r in reqs}) == 1  # one image, 3 responses
    assert len({r.response for r in reqs}) == 3
    assert reqs[0].instruction.startswith("Analyze the financial data in the image")
    assert reqs[0].rubric.criteria.startswith("Evaluates the model's ability to interpret")
    assert reqs[0].rubric.score_descriptions[0].startswith("Does not recognize") and reqs[0].reference_answer


# ---- one reader: ids, bad lines, csv -----------------------------------------------------------


def test_a_blank_line_then_a_malformed_line_does_not_make_a_valid_row_a_duplicate(tmp_path):
    good = {"instruction": "Q?", "response": "A.", "rubric": RUBRIC}
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(good) + "\n\n{not json\n" + json.dumps(good) + "\n")
    got = read(path)
    assert list(got) == ["0", "1", "2"]  # error rows and good rows count the same way
    assert isinstance(got["0"], JudgeRequest) and isinstance(got["2"], JudgeRequest), got
    assert isinstance(got["1"], RowError) and "line 3" in got["1"].reason and "not valid JSON" in got["1"].reason


def test_bad_lines_become_error_rows_with_their_line_number_and_the_others_go_on(tmp_path):
    good = json.dumps({"instruction": "Q?", "response": "A.", "rubric": RUBRIC}).encode()
    lines = [
        good,
        b'{"instruction": "Q\xff?", "response": "A."}',  # invalid UTF-8
        json.dumps({"instruction": "Q?", "response": "A.", "rubric": RUBRIC, "image": {"bytes": "str"}}).encode(),
        b'{"instruction": "Q?", "response": "A.", "n": ' + b"9" * 5000 + b"}",  # past Python's int digit limit
        b'["a", "list"]',
        good,
    ]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    got = read(path)
    assert list(got) == ["0", "1", "2", "3", "4", "5"]
    assert isinstance(got["0"], JudgeRequest) and isinstance(got["5"], JudgeRequest)
    for rid, line, needle in (("1", 2, "UTF-8"), ("2", 3, "bytes"), ("3", 4, "not valid JSON"),
                              ("4", 5, "not a JSON object")):
        err = got[rid]
        assert isinstance(err, RowError) and err.line == line, (rid, err)
        assert f"line {line}" in str(err) and needle in err.reason, err


def test_a_json_list_item_that_is_not_an_object_says_where_it_is(tmp_path):
    (tmp_path / "in.json").write_text(json.dumps([{"instruction": "Q?", "response": "A.", "rubric": RUBRIC}, [1, 2]]))
    err = read(tmp_path / "in.json")["1"]
    assert isinstance(err, RowError) and "item 2" in err.reason and "not a JSON object" in err.reason


def test_csv_rows_are_read_like_jsonl_rows(tmp_path, photo):
    import csv

    with (tmp_path / "in.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["id", "instruction", "response", "response_b", "image", "rubric"])
        w.writeheader()
        w.writerow({"id": "c1", "instruction": "What colour?", "response": "Orange.", "response_b": "",
                    "image": "imgs/cat.png", "rubric": json.dumps(RUBRIC)})
        w.writerow({"id": "c2", "instruction": "What colour?", "response": "Orange.", "response_b": "Blue.",
                    "image": "", "rubric": Rubric.from_dict(RUBRIC).to_text()})
        w.writerow({"id": "c3", "instruction": "", "response": "Orange.", "rubric": "x"})
    got = read(tmp_path / "in.csv")
    assert got["c1"].mode == "absolute" and got["c1"].images[0].path == str(photo.resolve())
    assert got["c1"].rubric == Rubric.from_dict(RUBRIC)  # a JSON object in a cell is read as one
    assert got["c2"].mode == "relative" and got["c2"].images == () and got["c2"].rubric == Rubric.from_dict(RUBRIC)
    assert got["c3"].field == "instruction" and got["c3"].line == 9  # c2's quoted rubric text spans six lines


def test_score_scores_a_csv_file(tmp_path):
    from vlm_judge.cli import main

    src = tmp_path / "answers.csv"
    src.write_text("instruction,response,criteria," + ",".join(f"score{i}_description" for i in range(1, 6)) + "\n"
                   + "".join(f"Q{k}?,A{k}.,Is it right?,d1,d2,d3,d4,d5\n" for k in range(3)))
    out = tmp_path / "out.jsonl"
    assert main(["score", str(src), "--judge", "mock", "--out", str(out), "--no-progress"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["0", "1", "2"] and all(x["status"] == "ok" for x in lines), lines


def test_formats_are_data_and_visit_reads_human_score(tmp_path):
    from vlm_judge.inputs import FORMATS

    for name in ("ours", "perception", "feedback", "visit", "llava", "mtbench", "conversation"):
        assert name in FORMATS
    for name in ("perception", "feedback", "visit", "llava", "jsonl"):
        assert "human_score" in FORMATS[name].columns["gold"], name
    assert FORMATS["perception"].columns["response"] == ("orig_response", "original_response")
