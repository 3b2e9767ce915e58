"""A small real-image judge dataset for the debug recipe, tests and benchmarks.

Rows follow the Perception Collection schema (absolute) and the pairwise export (relative). The
responses to each image are graded by a simple, learnable rule (does the response name what the
image shows?), so a few dozen steps of training visibly lower the loss.
"""

from __future__ import annotations

import json
from pathlib import Path

SUBJECTS = {
    "astronaut": "an astronaut in a space suit",
    "chelsea": "a tabby cat",
    "coffee": "a cup of coffee",
    "rocket": "a rocket on a launch pad",
}
_DESCS = {f"orig_score{i}_description": d for i, d in enumerate([
    "The answer names nothing in the image.",
    "The answer names a wrong subject.",
    "The answer is vague about the subject.",
    "The answer names the subject with a small error.",
    "The answer names the subject exactly.",
], 1)}


def rows_for(images: dict[str, str | Path]) -> tuple[list[dict], list[dict]]:
    """(absolute rows, pairwise rows) for images named like SUBJECTS' keys (others get a generic subject)."""
    absolute, pairs = [], []
    names = list(images)
    for k, (name, path) in enumerate(images.items()):
        subject = SUBJECTS.get(name, f"a {name}")
        wrong = SUBJECTS.get(names[(k + 1) % len(names)], "a tree")
        common = {"image": str(path), "orig_instruction": "What is the main subject of this picture?",
                  "orig_reference_answer": f"The picture shows {subject}.",
                  "orig_criteria": "Does the answer name the main subject of the picture correctly?", **_DESCS}
        graded = [
            (f"The picture shows {subject}.", 5, f"The answer names {subject}, which is what the picture shows."),
            (f"It might be {subject}, or something else.", 3, "The answer is vague about the subject."),
            (f"The picture shows {wrong}.", 2, f"The answer names {wrong}, but the picture shows {subject}."),
            ("I do not know.", 1, "The answer names nothing in the picture."),
        ]
        for j, (resp, score, fb) in enumerate(graded):
            absolute.append({**common, "id": f"{name}-{j}", "orig_response": resp, "orig_feedback": fb, "orig_score": score})
        pairs.append({"image": str(path), "id": f"{name}-pair", "orig_instruction": common["orig_instruction"],
                      "orig_response_A": f"The picture shows {wrong}.", "orig_response_B": f"The picture shows {subject}.",
                      "orig_reference_answer": common["orig_reference_answer"], "orig_criteria": common["orig_criteria"],
                      "orig_feedback": f"Response B names {subject} correctly, while Response A names {wrong}.",
                      "orig_preference": "B"})
    return absolute, pairs


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


def sample_images(out_dir: str | Path, size: int = 48) -> dict[str, Path]:
    """scikit-image's bundled photos (public domain / CC0), resized, as PNG files."""
    from PIL import Image
    from skimage import data

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in SUBJECTS:
        p = out / f"{name}.png"
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size)).save(p)
        paths[name] = p
    return paths
