"""The LLM teacher: writes every stage's text with any vlm_judge backend, through a disk cache.

`LLMTeacher` implements the `rows.Teacher` protocol over a `vlm_judge` Backend (an
OpenAI-compatible server via the `openai` backend, which already retries with backoff, or a local
transformers model via `hf`). Each call asks for one JSON object; the parser tolerates code fences
and prose around it, checks every field, and raises `TeacherError` with the reason.

Every successful generation is appended to a JSONL cache keyed by a hash of (model, prompt, image
contents, every sampling parameter, and the backend's identity: endpoints and extra request fields),
so a resumed or repeated run makes no call it has made before, and another server or another
`top_k` asks again. Errors are not cached: a re-run retries them.

What the teacher writes goes into training prompts, so it is checked before it is used: an output
over `max_tokens` or the character cap is refused (a server that ignores the limit), a text that
carries the judge prompt's section markers is refused (it would forge sections of the prompt the
judge is trained on), and feedback whose trailing verdict contradicts the score it was written for
is refused (stripping that verdict would hide the contradiction from the consistency filter). Each
refusal is a TeacherError with the reason, so the stage retries with another sample and, failing
that, records a drop.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from perception_collection import teacher_prompts as P
from perception_collection.rows import SCORES, SeedRubric, SourceImage, Teacher, TeacherError
from perception_collection.store import JsonlWriter, read_jsonl
from vlm_judge.backends import Backend, GenerationParams, Prompt, get_backend
from vlm_judge.records import ImageRef, RecordError, Rubric
from vlm_judge.redact import redact_text, redact_url
from vlm_judge.store import image_digest

_VERDICT_TAIL = re.compile(r"(\s*(So the overall score is|Overall score:|Score:)\s*(\d)\s*\.?\s*)?(\[RESULT\]\s*(\d)\s*)?$",
                           re.I)

# The section headers of the Prometheus-family judge prompt (vlm_judge.prompts) and its verdict
# marker. Matched as headers ("###" then a section name), so ordinary markdown ("### Step one") passes.
_PROMPT_MARKER = re.compile(
    r"#{2,}\s*(?:Task Description|The instruction to evaluate|Instruction|Responses? to evaluate|Response [AB]\b|"
    r"Response\s*:|Reference Answer|Score Rubrics?|Rubric|Feedback)|\[RESULT\]|\[END\]",
    re.I,
)

CHARS_PER_TOKEN_CAP = 16
"""Default character cap of one teacher output: this many characters per allowed completion token
(real text averages about 4; a server that ignores max_tokens goes far beyond)."""


# ---- JSON extraction -------------------------------------------------------------------------


def extract_json(text: str | None) -> Any:
    """The first JSON object (or array) in a model's output: the whole text, a ```json fence, or
    the first parseable `{...}` found in surrounding prose. Raises TeacherError when there is none."""
    if not text or not text.strip():
        raise TeacherError("teacher output is empty")
    s = text.strip()
    candidates = [m.group(1) for m in re.finditer(r"```(?:json|JSON)?\s*\n?(.*?)```", s, re.S)] + [s]
    dec = json.JSONDecoder()
    for c in candidates:
        c = c.strip()
        try:
            return json.loads(c)
        except ValueError:
            pass
        for m in re.finditer(r"[{\[]", c):
            try:
                obj, _ = dec.raw_decode(c, m.start())
            except ValueError:
                continue
            if isinstance(obj, (dict, list)) and obj:
                return obj
    snippet = s[:120].replace("\n", " ")
    raise TeacherError(f"no JSON object in teacher output: {snippet!r}")


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise TeacherError(f"{where}: teacher JSON lacks key {key!r}")
    return obj[key]


def prompt_marker(text: str) -> str | None:
    """The first judge-prompt section marker in `text` ("###Score Rubrics", "[RESULT]", ...), or None."""
    m = _PROMPT_MARKER.search(text)
    return m.group(0) if m else None


def _no_markers(text: str, key: str, where: str) -> str:
    m = prompt_marker(text)
    if m is not None:
        raise TeacherError(f"{where}: {key!r} carries the judge prompt's section marker {m!r} "
                           "(it would forge a section of the training prompt)")
    return text


def _text(obj: Any, key: str, where: str, check_markers: bool = True) -> str:
    v = _field(obj, key, where)
    if not isinstance(v, str) or not v.strip():
        raise TeacherError(f"{where}: {key!r} must be a non-empty string")
    return _no_markers(v.strip(), key, where) if check_markers else v.strip()


def _items(obj: Any, key: str, where: str) -> list[Any]:
    """The list under `key` (a bare list is accepted too: models sometimes drop the wrapper)."""
    v = obj if isinstance(obj, list) else _field(obj, key, where)
    if not isinstance(v, list) or not v:
        raise TeacherError(f"{where}: {key!r} must be a non-empty list")
    return v


def rubric_from_json(obj: Any, where: str) -> Rubric:
    """A complete Rubric from {'criteria', 'score1_description'..'score5_description'}."""
    criteria = _text(obj, "criteria", where)
    descs = tuple(_text(obj, f"score{i}_description", where) for i in SCORES)
    try:
        return Rubric(criteria, descs)
    except RecordError as e:
        raise TeacherError(f"{where}: {e}") from e


def strip_verdict(feedback: str) -> str:
    """Feedback without a trailing verdict sentence (the exporter adds the verdict in one form)."""
    return _VERDICT_TAIL.sub("", feedback.strip()).strip()


def trailing_verdicts(feedback: str) -> list[int]:
    """The scores stated by the trailing verdict that `strip_verdict` removes ([] when none):
    one per form present ("So the overall score is N", "[RESULT] N")."""
    m = _VERDICT_TAIL.search(feedback.strip())
    return [int(g) for g in (m.group(3), m.group(5)) if g] if m else []


# ---- cache -----------------------------------------------------------------------------------


class TeacherCache:
    """Generations by request key, in memory and appended to a JSONL file (torn lines tolerated)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._mem: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._writer: JsonlWriter | None = None
        if self.path is not None:
            for row in read_jsonl(self.path):
                if "key" in row and isinstance(row.get("text"), str):
                    self._mem[row["key"]] = row
            self._writer = JsonlWriter(self.path)

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached generation for a request key, or None."""
        with self._lock:
            return self._mem.get(key)

    def put(self, key: str, row: dict[str, Any]) -> None:
        """Remember a generation, and append it to the file at once (a kill keeps it)."""
        row = {"key": key, **row}
        with self._lock:
            self._mem[key] = row
        if self._writer is not None:
            self._writer.write(row)

    def __len__(self) -> int:
        return len(self._mem)

    def close(self) -> None:
        """Close the cache file."""
        if self._writer is not None:
            self._writer.close()


class ImageFiles:
    """The image files of a run, each read once: path -> its bytes (sent inline, so the backend
    never re-reads the file) and their sha1 (for the cache key, never hashed again). An entry is
    checked against the file's size and mtime on each use, so a replaced file is read again.

    Bounded memory: least recently used entries are forgotten beyond `max_bytes` (default 256 MiB;
    the build works on few images at a time, so an image is normally read once per run even when
    the run holds many more). A file larger than the bound is read per use and not kept."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.reads = 0
        """Files read so far (what the bound costs: more reads than images means it was too small)."""
        self._entries: OrderedDict[str, tuple[tuple[int, int], str, ImageRef]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, path: str) -> tuple[ImageRef, str]:
        """(an inline ImageRef holding the file's bytes, their sha1 hex digest). Raises TeacherError
        when the file cannot be read."""
        try:
            st = os.stat(path)
            stamp = (st.st_size, st.st_mtime_ns)
            # one lock around the read too: two items of the same image starting together read it once
            with self._lock:
                hit = self._entries.get(path)
                if hit is not None and hit[0] == stamp:
                    self._entries.move_to_end(path)
                    return hit[2], hit[1]
                with open(path, "rb") as f:
                    data = f.read()
                self.reads += 1
                ref, digest = ImageRef(data=data), hashlib.sha1(data).hexdigest()
                if hit is not None:
                    self._bytes -= len(hit[2].data or b"")
                    del self._entries[path]
                if len(data) <= self.max_bytes:
                    self._entries[path] = (stamp, digest, ref)
                    self._bytes += len(data)
                    while self._bytes > self.max_bytes:
                        _, (_, _, old) = self._entries.popitem(last=False)
                        self._bytes -= len(old.data or b"")
                return ref, digest
        except OSError as e:
            raise TeacherError(f"cannot read image {path}: {e.strerror or e}") from e


def request_key(model: str, prompt: Prompt, params: GenerationParams, identity: dict[str, Any] | None = None,
                image_digests: Sequence[str] | None = None) -> str:
    """Hash of everything that decides the teacher's output: the model, the prompt and its image
    bytes, every sampling field (the seed only when sampling), and `identity`, what else decides the
    answer about the backend (its endpoints, extra request fields such as top_k or response_format).
    `image_digests`: the sha1 of each prompt image when the caller knows them (not hashed again);
    an image's digest is the same from a file or inline, so the key is too."""
    imgs = list(image_digests) if image_digests is not None else [image_digest(im) for im in prompt.images]
    sampling = asdict(params)  # every field, so a new sampling field can never be left out
    if params.temperature <= 0:
        sampling["seed"] = None  # greedy decoding does not depend on the seed
    blob = json.dumps({
        "model": model, "system": prompt.system, "user": prompt.user, "prefix": prompt.assistant_prefix,
        "images": imgs, "params": sampling, "backend": identity or {},
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def backend_identity(backend: Any, backend_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """What about a backend decides its answers besides the model name: the endpoints it sends to
    (credentials, query and fragment left out: they do not change the answer and must not be
    stored), its extra request fields, and the options it was built with."""
    endpoints = sorted(redact_url(getattr(e, "url", str(e))) for e in getattr(backend, "endpoints", ()) or ())
    ident: dict[str, Any] = {"endpoints": endpoints}
    extra = getattr(backend, "extra_body", None)
    if extra:
        ident["extra_body"] = extra
    if backend_args:
        ident["backend_args"] = {k: v for k, v in backend_args.items() if k not in ("api_key", "extra_body")}
    return ident


# ---- the teacher -----------------------------------------------------------------------------


@dataclass
class TeacherStats:
    """What the teacher cost: backend calls, cache hits, failures and tokens."""

    calls: int = 0
    cache_hits: int = 0
    errors: int = 0
    """Backend calls that returned an error (after the backend's own retries)."""
    parse_failures: int = 0
    oversize: int = 0
    """Outputs refused for going over max_tokens or the character cap (not cached)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        """The counters as a plain mapping (for summary.json)."""
        return dict(self.__dict__)


class LLMTeacher:
    """The Teacher protocol over a vlm_judge Backend, with the prompts of `teacher_prompts`."""

    def __init__(
        self,
        backend: Backend,
        params: GenerationParams | None = None,
        cache: TeacherCache | None = None,
        parse_retries: int = 1,
        thread_safe: bool = True,
        identity: dict[str, Any] | None = None,
        max_chars: int | None = None,
    ) -> None:
        self.backend = backend
        self.name = getattr(backend, "name", "teacher")
        self.params = params or GenerationParams(max_new_tokens=2048, temperature=0.7, seed=0)
        self.identity = identity if identity is not None else backend_identity(backend)
        """Part of every cache key (see `request_key`)."""
        self.max_chars = max_chars or CHARS_PER_TOKEN_CAP * self.params.max_new_tokens
        self.images = ImageFiles()
        """Each image file read and hashed once per run (see ImageFiles for the memory bound)."""
        self.cache = cache if cache is not None else TeacherCache(None)  # (an empty cache is falsy)
        self.parse_retries = parse_retries
        self.stats = TeacherStats()
        self._stats_lock = threading.Lock()
        # a local transformers model is not thread-safe: its calls go one at a time
        self._backend_lock = None if thread_safe else threading.Lock()

    # ---- one call ---------------------------------------------------------------------

    def _count(self, **kw: int) -> None:
        with self._stats_lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def _generate(self, prompt: Prompt, attempt: int, image_digests: Sequence[str] | None = None) -> str:
        """The teacher's text for this prompt: from the cache, or one backend call (then cached)."""
        params = replace(self.params, seed=(self.params.seed or 0) + attempt)
        if attempt and params.temperature == 0:
            params = replace(params, temperature=0.3)  # greedy decoding would repeat itself: a retry samples a little
        key = request_key(self.name, prompt, params, self.identity, image_digests)
        hit = self.cache.get(key)
        if hit is not None:
            self._count(cache_hits=1)
            return hit["text"]
        if self._backend_lock is not None:
            with self._backend_lock:
                gen = self.backend.generate([prompt], params)[0]
        else:
            gen = self.backend.generate([prompt], params)[0]
        self._count(calls=1, prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens)
        if gen.error is not None or gen.text is None:
            self._count(errors=1)
            # the reason goes into drop files: a URL in it keeps no credentials
            raise TeacherError(f"teacher call failed: {redact_text(gen.error or 'no text')}")
        if gen.completion_tokens > params.max_new_tokens or len(gen.text) > self.max_chars:
            self._count(oversize=1)
            what = (f"{gen.completion_tokens} completion tokens, over max_tokens {params.max_new_tokens}"
                    if gen.completion_tokens > params.max_new_tokens
                    else f"{len(gen.text)} characters, over the cap of {self.max_chars}")
            raise TeacherError(f"teacher output refused: {what}")
        self.cache.put(key, {"text": gen.text, "prompt_tokens": gen.prompt_tokens,
                             "completion_tokens": gen.completion_tokens})
        return gen.text

    def _ask(self, image: SourceImage | None, user: str, parse: Any, draw: int = 0) -> Any:
        """Call, parse; on a parse failure try again (another seed) up to `parse_retries` times.
        `draw` > 0 asks for a fresh sample of the same prompt (another seed, another cache key)."""
        images: tuple[ImageRef, ...] = ()
        digests: list[str] = []
        if image is not None:
            ref, digest = self.images.get(image.path)
            images, digests = (ref,), [digest]
        prompt = Prompt(user=user, system=P.SYSTEM, images=images)
        last: TeacherError | None = None
        for attempt in range(self.parse_retries + 1):
            # a failed call raises: retrying on HTTP errors is the backend's job
            text = self._generate(prompt, attempt + 1000 * draw, digests)
            try:
                return parse(extract_json(text))
            except TeacherError as e:
                self._count(parse_failures=1)
                last = e
        assert last is not None
        tries = self.parse_retries + 1
        raise TeacherError(f"{last} (after {tries} {'try' if tries == 1 else 'tries'})")

    @staticmethod
    def _context(image: SourceImage) -> str:
        return P.CONTEXT.format(context=image.context.strip()) if image.context.strip() else ""

    # ---- the protocol -----------------------------------------------------------------

    def rubrics(self, image: SourceImage, seeds: Sequence[SeedRubric], n: int) -> list[tuple[Rubric, str]]:
        """Up to n image-specific rubrics brainstormed from the seeds, each with its seed's name."""
        seed_block = "\n\n".join(P.SEED_ITEM.format(name=s.name, category=s.category, text=s.rubric.to_text())
                                 for s in seeds)
        user = P.RUBRICS.format(context_block=self._context(image), seed_block=seed_block, n=n)
        names = {s.name for s in seeds}

        def parse(obj: Any) -> list[tuple[Rubric, str]]:
            out = []
            for i, item in enumerate(_items(obj, "rubrics", "rubrics")[:n]):
                seed = item.get("seed", "") if isinstance(item, dict) else ""
                out.append((rubric_from_json(item, f"rubrics[{i}]"), seed if seed in names else ""))
            return out

        return self._ask(image, user, parse)

    def paraphrase_rubric(self, image: SourceImage, rubric: Rubric) -> Rubric:
        """The same rubric in other words (not part of the Teacher protocol; used when present)."""
        return self._ask(image, P.PARAPHRASE.format(rubric=rubric.to_text()),
                         lambda obj: rubric_from_json(obj, "paraphrase"))

    def instructions(self, image: SourceImage, rubric: Rubric, n: int) -> list[tuple[str, str]]:
        """Up to n (instruction, reference answer) pairs."""
        user = P.INSTRUCTIONS.format(context_block=self._context(image), rubric=rubric.to_text(), n=n)

        def parse(obj: Any) -> list[tuple[str, str]]:
            return [(_text(it, "instruction", f"instructions[{i}]"), _text(it, "reference_answer", f"instructions[{i}]"))
                    for i, it in enumerate(_items(obj, "instructions", "instructions")[:n])]

        return self._ask(image, user, parse)

    def responses(
        self, image: SourceImage, rubric: Rubric, instruction: str, reference_answer: str,
        scores: Sequence[int] = SCORES, *, length_hint: int | None = None, draw: int = 0,
    ) -> dict[int, tuple[str, str]]:
        """(response, feedback) for each requested score. `length_hint` (words) and `draw` (the
        try number) are set when an earlier try's lengths varied too much: the retry gets a target
        length and a fresh sample instead of the cached answer."""
        wanted = [int(s) for s in scores]
        user = P.RESPONSES.format(
            context_block=self._context(image), instruction=instruction, reference_answer=reference_answer,
            rubric=rubric.to_text(), scores=", ".join(map(str, wanted)),
            length_note=P.LENGTH_NOTE.format(words=length_hint) if length_hint else "",
        )

        def parse(obj: Any) -> dict[int, tuple[str, str]]:
            out: dict[int, tuple[str, str]] = {}
            for i, it in enumerate(_items(obj, "responses", "responses")):
                where = f"responses[{i}]"
                try:
                    s = int(_field(it, "score", where))
                except (TypeError, ValueError) as e:
                    raise TeacherError(f"{where}: score is not a number") from e
                if s in wanted and s not in out:
                    raw = _text(it, "feedback", where, check_markers=False)
                    wrong = [v for v in trailing_verdicts(raw) if v != s]
                    if wrong:
                        raise TeacherError(f"{where}: feedback for score {s} ends with the verdict {wrong[0]} "
                                           f"({raw[-60:]!r})")
                    feedback = _no_markers(strip_verdict(raw), "feedback", where)
                    if not feedback:
                        raise TeacherError(f"{where}: feedback is only a verdict")
                    out[s] = (_text(it, "response", where), feedback)
            missing = [s for s in wanted if s not in out]
            if missing:
                raise TeacherError(f"responses: no response for score(s) {missing}")
            return out

        return self._ask(image, user, parse, draw)

    def noisy_instruction(self, image: SourceImage, instruction: str) -> str:
        """A close but different instruction about the same image."""
        return self._ask(image, P.NOISY.format(instruction=instruction),
                         lambda obj: _text(obj, "instruction", "noisy_instruction"))

    def answer(self, image: SourceImage, instruction: str) -> str:
        """A good answer to an instruction about the image."""
        user = P.ANSWER.format(context_block=self._context(image), instruction=instruction)
        return self._ask(image, user, lambda obj: _text(obj, "answer", "answer"))

    def close(self) -> None:
        """Close the cache file and the backend's connections."""
        self.cache.close()
        close = getattr(self.backend, "close", None)
        if callable(close):
            close()


def make_teacher(cfg: Any, run_dir: str | Path | None = None) -> Teacher:
    """The teacher a BuildConfig asks for; the cache lives at `<run_dir>/teacher_cache.jsonl`."""
    t = cfg.teacher
    if t.kind == "answer_grounded":
        from perception_collection.vqa_teacher import AnswerGroundedTeacher

        return AnswerGroundedTeacher(seed=cfg.seed)
    cache = TeacherCache(Path(run_dir) / "teacher_cache.jsonl" if run_dir is not None else None)
    params = GenerationParams(max_new_tokens=t.max_tokens, temperature=t.temperature, seed=cfg.seed)
    if t.kind == "openai":
        api_key = os.environ.get(t.api_key_env) if t.api_key_env else None
        backend = get_backend("openai", model=t.model, base_url=t.base_url, base_urls=t.base_urls,
                              api_key=api_key if api_key is not None else "EMPTY", concurrency=t.concurrency,
                              timeout=t.timeout, max_retries=t.max_retries, **t.backend_args)
        return LLMTeacher(backend, params, cache, t.parse_retries, thread_safe=True,
                          identity=backend_identity(backend, t.backend_args))
    if t.kind == "hf":
        backend = get_backend("hf", model=t.model, **t.backend_args)
        return LLMTeacher(backend, params, cache, t.parse_retries, thread_safe=False,
                          identity=backend_identity(backend, t.backend_args))
    raise ValueError(f"unknown teacher kind {t.kind!r}")
