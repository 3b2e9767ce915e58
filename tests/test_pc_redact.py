"""Credentials in a teacher URL never reach the run folder or the printed recipe."""

from __future__ import annotations

import yaml

from perception_collection.cli import main as data_main

URL = "http://alice:s3cretPW@127.0.0.1:9/v1?api_key=QUERYKEY#frag"


def test_no_output_of_a_build_holds_the_credentials_of_its_base_url(tmp_path, sample_images, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "chelsea.png").write_bytes(sample_images["chelsea"].read_bytes())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "source": {"kind": "folder", "path": str(photos)},
        "teacher": {"kind": "openai", "model": "m", "base_url": URL, "base_urls": [URL], "max_retries": 0,
                    "timeout": 5},
        "out": str(tmp_path / "run"),
    }))
    # the teacher's server is checked up front: it is down, so the build stops in one line that
    # names the server without its credentials
    assert data_main(["build", str(recipe), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "127.0.0.1:9" in err and "s3cretPW" not in err and "QUERYKEY" not in err and "alice" not in err
    # with the check off every call fails on its own: the drops name the server, redacted too
    assert data_main(["build", str(recipe), "--no-progress", "teacher.backend_args={check: false}"]) == 1
    printed = capsys.readouterr()
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "drops.jsonl" for p in files) and any(p.name == "recipe.yaml" for p in files)
    for text in [p.read_text(errors="replace") for p in files] + [printed.out, printed.err]:
        assert "s3cretPW" not in text and "QUERYKEY" not in text and "alice" not in text
    assert "http://127.0.0.1:9/v1" in (tmp_path / "run" / "recipe.yaml").read_text()
    assert "127.0.0.1:9" in (tmp_path / "run" / "drops.jsonl").read_text()  # which server failed is still said

    assert data_main(["build", str(recipe), "--dry-run"]) in (0, 2)
    out = capsys.readouterr().out
    assert "s3cretPW" not in out and "QUERYKEY" not in out


def test_drop_table_shows_the_measured_range_not_a_placeholder():
    from perception_collection.pipeline import _drop_table
    from perception_collection.rows import Drop

    drops = [Drop(f"i{k}", "source", f"ambiguous size (shape covers {v} of the image)")
             for k, v in enumerate((0.081, 0.117, 0.093))]
    drops.append(Drop("i9", "source", "ambiguous size (shape covers 0.2 of the image)"))  # an integer-less 0.2 too
    table = _drop_table(drops)
    assert table == {"source": {"ambiguous size (shape covers 0.081-0.2 of the image)": 4}}
    assert "#" not in str(table)
    one = _drop_table([Drop("x", "responses", "length ratio 3.50 over 2 after 3 tries")])
    assert one == {"responses": {"length ratio 3.5 over 2 after 3 tries": 1}}
