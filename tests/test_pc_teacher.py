"""The LLM teacher: JSON extraction from messy output, field checks with reasons, the request
cache (a second teacher over the same file makes no call), and errors from a real HTTP server."""

from __future__ import annotations

import json
import shutil

import pytest

from perception_collection.rows import SeedRubric, SourceImage, Teacher, TeacherError
from perception_collection.teacher import LLMTeacher, TeacherCache, extract_json, request_key, strip_verdict
from tests.fault_server import Fault, start_server
from tests.pc_script import ScriptedVLM
from vlm_judge.backends import GenerationParams, Prompt, get_backend
from vlm_judge.backends.mock import MockBackend
from vlm_judge.records import ImageRef, Rubric

RUBRIC = Rubric("Does the response name the animal correctly?", tuple(f"level {i}" for i in range(1, 6)))
SEEDS = [SeedRubric("object_identity", "grounding", RUBRIC), SeedRubric("counting", "reasoning", RUBRIC)]


@pytest.fixture
def image(sample_images):
    return SourceImage("folder-chelsea", str(sample_images["chelsea"]), "folder", context="A ginger cat.")


@pytest.mark.parametrize("text", [
    '{"a": 1}',
    '```json\n{"a": 1}\n```',
    'Sure! Here you go:\n{"a": 1}\nLet me know if you need more.',
    'Thinking {not json} ... final: {"a": 1}',
    '```\n{"a": 1}\n```',
])
def test_extract_json_tolerates_fences_and_prose(text):
    assert extract_json(text) == {"a": 1}


@pytest.mark.parametrize("text, reason", [("", "empty"), ("no json here at all", "no JSON object"), ('{"a": ', "no JSON")])
def test_extract_json_raises_teacher_error_with_reason(text, reason):
    with pytest.raises(TeacherError, match=reason):
        extract_json(text)


def test_strip_verdict():
    assert strip_verdict("Good detail. So the overall score is 4") == "Good detail."
    assert strip_verdict("Good detail. [RESULT] 4") == "Good detail."
    assert strip_verdict("Scores 4 of 5 checks.") == "Scores 4 of 5 checks."


def test_teacher_follows_protocol_and_parses_every_stage(image, tmp_path):
    teacher = LLMTeacher(ScriptedVLM(), cache=TeacherCache(tmp_path / "cache.jsonl"))
    assert isinstance(teacher, Teacher)
    rubrics = teacher.rubrics(image, SEEDS, 2)
    assert len(rubrics) == 2 and all(r.complete for r, _ in rubrics)
    assert [seed for _, seed in rubrics] == ["object_identity", "counting"]
    reworded = teacher.paraphrase_rubric(image, rubrics[0][0])
    assert reworded.criteria.startswith("In other words:")
    pairs = teacher.instructions(image, rubrics[0][0], 3)
    assert len(pairs) == 3 and all(q and a for q, a in pairs)
    out = teacher.responses(image, rubrics[0][0], pairs[0][0], pairs[0][1])
    assert sorted(out) == [1, 2, 3, 4, 5]
    assert all("overall score" not in fb for _, fb in out.values())  # verdict sentence stripped
    assert teacher.noisy_instruction(image, pairs[0][0]) != pairs[0][0]
    assert teacher.answer(image, pairs[0][0]).startswith("Answer to:")
    assert teacher.stats.calls == 6 and teacher.stats.cache_hits == 0
    assert teacher.stats.prompt_tokens > 0 and teacher.stats.completion_tokens > 0


def test_cache_makes_repeat_calls_free_and_survives_a_torn_line(image, tmp_path):
    path = tmp_path / "cache.jsonl"
    backend = ScriptedVLM()
    t1 = LLMTeacher(backend, cache=TeacherCache(path))
    first = t1.rubrics(image, SEEDS, 2)
    t1.instructions(image, RUBRIC, 2)
    t1.close()
    assert sum(backend.calls.values()) == 2
    with path.open("a") as f:
        f.write('{"key": "abc", "text": "torn')  # a killed writer
    t2 = LLMTeacher(backend, cache=TeacherCache(path))
    assert t2.rubrics(image, SEEDS, 2) == first
    t2.instructions(image, RUBRIC, 2)
    assert sum(backend.calls.values()) == 2 and t2.stats.cache_hits == 2 and t2.stats.calls == 0
    t2.responses(image, RUBRIC, "What is it?", "A cat.")  # a new request is a call, appended cleanly
    t2.close()
    lines = path.read_text().splitlines()
    assert all(json.loads(line) for line in lines) and len(lines) == 3


def test_cache_key_follows_image_content_model_and_params(sample_images, tmp_path):
    p = tmp_path / "a.png"
    shutil.copy(sample_images["chelsea"], p)
    prompt = Prompt(user="x", images=(ImageRef(path=str(p)),))
    params = GenerationParams(temperature=0.7, seed=1)
    k = request_key("m", prompt, params)
    # same bytes elsewhere: same key (a run folder can move); other bytes at the same path: new key
    q = tmp_path / "b.png"
    shutil.copy(p, q)
    assert request_key("m", Prompt(user="x", images=(ImageRef(path=str(q)),)), params) == k
    shutil.copy(sample_images["rocket"], p)
    assert request_key("m", prompt, params) != k
    assert request_key("other", Prompt(user="x", images=(ImageRef(path=str(q)),)), params) != k
    assert request_key("m", Prompt(user="x", images=(ImageRef(path=str(q)),)), GenerationParams(temperature=0.7, seed=2)) != k


def test_malformed_output_is_retried_then_reported(image):
    outputs = iter(["not json", '{"wrong_key": []}', '{"rubrics": []}'])
    backend = MockBackend(script=lambda p, n: next(outputs))
    teacher = LLMTeacher(backend, parse_retries=1)
    with pytest.raises(TeacherError, match=r"lacks key 'rubrics' \(after 2 tries\)"):
        teacher.rubrics(image, SEEDS, 2)
    assert teacher.stats.parse_failures == 2 and teacher.stats.calls == 2


def test_incomplete_rubric_and_missing_scores_are_errors(image):
    bad_rubric = json.dumps({"rubrics": [{"criteria": "c", "score1_description": "a"}]})
    teacher = LLMTeacher(MockBackend(script=lambda p, n: bad_rubric), parse_retries=0)
    with pytest.raises(TeacherError, match="score2_description"):
        teacher.rubrics(image, SEEDS, 1)
    four = json.dumps({"responses": [{"score": s, "response": "r", "feedback": "f"} for s in (1, 2, 3, 4)]})
    teacher = LLMTeacher(MockBackend(script=lambda p, n: four), parse_retries=0)
    with pytest.raises(TeacherError, match=r"no response for score\(s\) \[5\]"):
        teacher.responses(image, RUBRIC, "q", "a")


def test_backend_error_is_a_teacher_error_and_not_cached(image, tmp_path):
    def boom(p, n):
        raise RuntimeError("CUDA out of memory")

    teacher = LLMTeacher(MockBackend(script=boom), cache=TeacherCache(tmp_path / "c.jsonl"))
    with pytest.raises(TeacherError, match="teacher call failed: RuntimeError: CUDA out of memory"):
        teacher.instructions(image, RUBRIC, 1)
    assert teacher.stats.errors == 1 and len(teacher.cache) == 0


def test_over_real_server_image_is_sent_and_500_is_reported(image):
    backend = ScriptedVLM()
    faults = lambda n, body: Fault(500, message="teacher overloaded") if "Reword it" in json.dumps(body) else None
    with start_server(backend, faults=faults) as srv:
        client = get_backend("openai", model="scripted-vlm", base_url=srv.base_url, max_retries=1, backoff=0.01)
        teacher = LLMTeacher(client)
        rubrics = teacher.rubrics(image, SEEDS, 2)
        # the image travelled: the scripted model's fingerprint of the bytes it received is in the text
        import hashlib
        fp = hashlib.sha1(open(image.path, "rb").read()).hexdigest()[:6]
        assert fp in rubrics[0][0].criteria
        with pytest.raises(TeacherError, match="HTTP 500 after 1 retry: teacher overloaded"):
            teacher.paraphrase_rubric(image, rubrics[0][0])
        client.close()
    assert srv.stats.statuses.count(500) == 2 and teacher.stats.errors == 1


def test_hf_teacher_kind_runs_a_local_model_and_reports_its_unusable_output(tiny_llava_dir, sample_images, tmp_path):
    """kind 'hf': a real (tiny, random) LLaVA writes the text on CPU. Its output is noise, so every
    item is a TeacherError naming the parse problem: the wiring works, and nothing is invented."""
    from perception_collection.config import BuildConfig
    from perception_collection.teacher import make_teacher

    cfg = BuildConfig.from_dict({
        "source": {"kind": "folder", "path": str(tmp_path)},
        "teacher": {"kind": "hf", "model": str(tiny_llava_dir), "max_tokens": 8, "temperature": 0.0,
                    "parse_retries": 0, "backend_args": {"device": "cpu"}},
    })
    teacher = make_teacher(cfg, tmp_path / "run")
    assert isinstance(teacher, LLMTeacher)
    image = SourceImage("folder-rocket", str(sample_images["rocket"]), "folder", context="A rocket.")
    with pytest.raises(TeacherError, match="JSON|empty"):
        teacher.instructions(image, RUBRIC, 1)
    assert teacher.stats.calls == 1 and teacher.stats.completion_tokens > 0
    with pytest.raises(TeacherError):  # the same request again: answered from the run's cache
        teacher.instructions(image, RUBRIC, 1)
    assert teacher.stats.calls == 1 and teacher.stats.cache_hits == 1
    teacher.close()
