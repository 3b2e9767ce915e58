"""Shared-prefix reuse and length-aware batching in the hf backend change speed, never outputs.

Each test runs the same prompts with and without the optimisation and compares greedy tokens.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from vlm_judge.backends import get_backend  # noqa: E402
from vlm_judge.backends.base import GenerationParams  # noqa: E402
from vlm_judge.prompts import render  # noqa: E402
from vlm_judge.records import ImageRef, JudgeRequest, Rubric  # noqa: E402

RUBRIC = Rubric(
    criteria="Is the answer faithful to the image?",
    score_descriptions=("not at all", "barely", "partly", "mostly", "completely"),
)
PARAMS = GenerationParams(max_new_tokens=12)


def _requests(images: dict | None, per_group: int = 5) -> list[JudgeRequest]:
    """Five responses per (image, instruction), two groups plus a lone relative request."""
    reqs = []
    for g, name in enumerate(["astronaut", "chelsea"]):
        for k in range(per_group):
            reqs.append(JudgeRequest(
                instruction=f"What is in photo {g}?", response=f"Answer {k}: " + "a thing " * k, rubric=RUBRIC,
                reference_answer="A photo." if g == 0 else None,
                images=(ImageRef(path=str(images[name])),) if images else (), id=f"{g}-{k}",
            ))
    reqs.append(JudgeRequest(instruction="Which is better?", response="one", response_b="two", rubric=RUBRIC,
                             images=(ImageRef(path=str(images["coffee"])),) if images else (), mode="relative", id="rel"))
    return reqs


@pytest.fixture(scope="module")
def backends(tiny_llava_dir, tiny_text_lm_dir):
    """(with reuse, without reuse) for each tiny model; EOS held off so outputs have length."""
    return {
        kind: tuple(get_backend("hf", model=str(d), prefix_reuse=flag, min_new_tokens=10) for flag in (True, False))
        for kind, d in (("vision", tiny_llava_dir), ("text", tiny_text_lm_dir))
    }


@pytest.mark.parametrize("kind", ["vision", "text"])
@pytest.mark.parametrize("template", ["prefix", "default"])
def test_prefix_reuse_gives_the_same_greedy_tokens(kind, template, backends, sample_images):
    reuse, plain = backends[kind]
    reqs = _requests(sample_images if kind == "vision" else None)
    prompts = [render(r, template) for r in reqs]

    # the optimisation really runs: groups of five whose shared prefix covers the image tokens
    rows = reuse._rows(prompts, [None] * len(prompts), PARAMS.max_new_tokens)
    groups = reuse._groups(rows)
    big = [g for g in groups if len(g.rows) >= 5]
    assert big, [len(g.rows) for g in groups]
    for g in big:
        assert g.prefix_len >= max(r.image_end for r in g.rows)
        assert g.prefix_len > 0.5 * min(len(r.ids) for r in g.rows) if template == "prefix" else g.prefix_len > 0

    a = reuse.generate(prompts, PARAMS)
    b = plain.generate(prompts, PARAMS)
    assert [g.error for g in a] == [None] * len(prompts)
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.prompt_tokens for g in a] == [g.prompt_tokens for g in b]


def test_groups_split_across_batches_and_token_caps_keep_outputs(tiny_llava_dir, backends, sample_images):
    """A group bigger than a batch, and a token cap that forces many small batches."""
    _, plain = backends["vision"]
    prompts = [render(r, "prefix") for r in _requests(sample_images, per_group=4)]
    want = [g.text for g in plain.generate(prompts, PARAMS)]
    small = get_backend("hf", model=str(tiny_llava_dir), batch_size=3, min_new_tokens=10)
    assert [g.text for g in small.generate(prompts, PARAMS)] == want
    capped = get_backend("hf", model=str(tiny_llava_dir), max_batch_tokens=1500, min_new_tokens=10)
    batches = capped._batches(capped._groups(capped._rows(prompts, [None] * len(prompts), 12)))
    assert len(batches) > 2 and all(sum(len(g.rows) for g in b) * 700 <= 1500 or len(b) == 1 for b in batches)
    assert [g.text for g in capped.generate(prompts, PARAMS)] == want


def test_different_images_never_share_a_prefix(backends, sample_images):
    """Image tokens are the same ids for every image: only the same image may share a cache."""
    reuse, plain = backends["vision"]
    # same text, different images
    reqs = [JudgeRequest(instruction="What is this?", response="A thing.", rubric=RUBRIC,
                         images=(ImageRef(path=str(sample_images[n])),)) for n in ("astronaut", "chelsea", "rocket")]
    prompts = [render(r, "prefix") for r in reqs]
    groups = reuse._groups(reuse._rows(prompts, [None] * 3, 12))
    assert sorted(len(g.rows) for g in groups) == [1, 1, 1]
    a, b = reuse.generate(prompts, PARAMS), plain.generate(prompts, PARAMS)
    assert [g.text for g in a] == [g.text for g in b]
    assert len({g.text for g in a}) == 3


def test_a_bad_row_inside_a_group_leaves_the_group_intact(backends, sample_images, tmp_path):
    reuse, plain = backends["vision"]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    reqs = _requests(sample_images)
    reqs[2] = JudgeRequest(instruction=reqs[2].instruction, response="x", rubric=RUBRIC, images=(ImageRef(path=str(bad)),))
    prompts = [render(r, "prefix") for r in reqs]
    a, b = reuse.generate(prompts, PARAMS), plain.generate(prompts, PARAMS)
    assert a[2].text is None and "cannot decode image" in a[2].error
    assert [g.text for g in a] == [g.text for g in b]


def test_prefetched_images_give_the_same_judgments(tiny_llava_dir, sample_images, tmp_path):
    """The scorer hands the backend the next batch's images while it generates the current one:
    the judgments are the same as without prefetching, the images really were preprocessed in the
    background, and a corrupt image is still reported on its own row."""
    from vlm_judge.scorer import Judge, ScorerConfig

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    reqs = _requests(sample_images)
    reqs.append(JudgeRequest(instruction="What is here?", response="a cat", rubric=RUBRIC,
                             images=(ImageRef(path=str(bad)),), id="bad"))
    cfg = ScorerConfig(batch_size=3, max_parse_retries=0, params=PARAMS)
    with_prefetch = get_backend("hf", model=str(tiny_llava_dir), min_new_tokens=10)
    without = get_backend("hf", model=str(tiny_llava_dir), min_new_tokens=10)
    without.prefetch = None  # the scorer then never prefetches

    seen: list[str] = []
    orig = with_prefetch.prefetch
    with_prefetch.prefetch = lambda ps: (seen.extend(ref.key for p in ps for ref in p.images), orig(ps))[1]
    a = Judge(with_prefetch, cfg).grade(reqs)
    b = Judge(without, cfg).grade(reqs)

    assert [(j.id, j.raw_output, j.status) for j in a] == [(j.id, j.raw_output, j.status) for j in b]
    assert {j.id: j.status for j in a}["bad"] == "error"
    assert "path:" + str(bad.resolve()) in seen  # a corrupt image in a prefetch raised nothing there
    with_prefetch._prefetcher.shutdown(wait=True)
    good = {r.images[0].key for r in reqs if r.id != "bad"}
    assert good & set(seen) <= set(with_prefetch._image_cache)


@pytest.mark.parametrize("kind", ["vision", "text"])
def test_static_kv_cache_gives_the_same_tokens_as_the_growing_one(kind, tiny_llava_dir, tiny_text_lm_dir, sample_images):
    """Past one growth of the preallocated cache (KV_CHUNK tokens), with prefix reuse, mixed
    lengths, budgets per row, stop strings and seeded sampling: the same text as transformers'
    cache that grows per token."""
    from vlm_judge.backends.hf import KV_CHUNK

    model = str(tiny_llava_dir if kind == "vision" else tiny_text_lm_dir)
    static, dynamic = (get_backend("hf", model=model, kv_cache=k, min_new_tokens=KV_CHUNK + 10) for k in ("static", "dynamic"))
    prompts = [render(r, "prefix") for r in _requests(sample_images if kind == "vision" else None)]
    budgets = [KV_CHUNK + 20 if i % 3 else 7 for i in range(len(prompts))]
    for params in (GenerationParams(max_new_tokens=KV_CHUNK + 20),
                   GenerationParams(max_new_tokens=KV_CHUNK + 20, temperature=0.9, seed=3, stop=("ab",))):
        a = static.generate_rows(prompts, params, budgets=budgets)
        b = dynamic.generate_rows(prompts, params, budgets=budgets)
        assert [g.error for g in a] == [None] * len(prompts)
        assert [(g.text, g.completion_tokens) for g in a] == [(g.text, g.completion_tokens) for g in b]
    assert max(g.completion_tokens for g in a) > KV_CHUNK  # the cache really grew


def test_static_kv_cache_is_used_and_a_bad_choice_is_refused(tiny_text_lm_dir):
    import torch
    import transformers

    be = get_backend("hf", model=str(tiny_text_lm_dir))
    newer = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24)
    assert be.kv_cache == ("static" if newer else "dynamic")
    be = get_backend("hf", model=str(tiny_text_lm_dir), kv_cache="static")

    ids = torch.tensor([[1, 2, 3, 4]])
    out = be.model(input_ids=ids, use_cache=True)
    assert be._static_cache(out.past_key_values, 4, 8) is not None
    with pytest.raises(ValueError, match="kv_cache"):
        get_backend("hf", model=str(tiny_text_lm_dir), kv_cache="paged")
