"""The transformers backend: vision judges (LLaVA family) and text judges, batched, on GPU or CPU.

How a call runs:
1. Each prompt is laid out by `vlm_judge.chat` (images as `{"type": "image"}` parts before the
   text, then the generation prompt, then `Prompt.assistant_prefix`) and tokenized with
   its image placeholders expanded. Each distinct image is decoded and preprocessed once.
2. Prompts are grouped by shared token prefix (same images, same leading tokens: with the 'prefix'
   template that is image + instruction + reference + rubric). Each group's prefix runs once, its
   KV cache is copied along the batch for the members, and only the suffixes run per member.
   Rows are packed into batches by length under a token cap.
3. A plain decode loop over the whole batch (greedy or seeded sampling, EOS and stop strings,
   no per-row Python work per token) writes the completions. The prefill's KV cache is moved into
   preallocated tensors (transformers' StaticCache layers) grown `KV_CHUNK` tokens at a time, so a
   step writes its keys in place instead of concatenating the whole cache per layer. Measured on
   a 2-core CPU (SmolLM2-135M, batch 24, 64 tokens): with transformers 5.24, 198 ms per step
   instead of 273; with 5.19 the same code takes 919 ms instead of 447 (its profile shows 3.5x
   more time copying keys and values in attention's head expansion, `repeat_kv`). So `kv_cache="auto"` (the default) takes
   the preallocated cache from transformers 5.24 on and the growing one before; "static" and
   "dynamic" force either. Models whose cache has other layer kinds (sliding windows) always
   use the growing cache.

The prefix/suffix split is exact: the suffix sits after the prefix in the cache with padding
masked out and positions counted from the attention mask, so outputs equal those of running each
full prompt (tests/test_hf_prefix.py checks the greedy tokens).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlm_judge import card, chat
from vlm_judge.backends.base import Generation, GenerationParams, Prompt
from vlm_judge.images import IMAGE_CACHE_BYTES, ByteCache, ImageError, load_image

KV_CHUNK = 64
"""Tokens by which the decode-time KV cache grows: attention reads at most this many unused slots
per step, and the cache is copied once per this many steps instead of once per step."""

# keys of from_pretrained kwargs that also apply to the config, tokenizer and processor
_SHARED_KW = ("gguf_file", "revision", "cache_dir", "local_files_only", "token", "trust_remote_code", "subfolder")


def _kv_cache_choice(kv_cache: str) -> str:
    """'static' or 'dynamic' for a kv_cache option ('auto': static from transformers 5.24 on,
    where it is measured faster; see the module docstring)."""
    if kv_cache not in ("auto", "static", "dynamic"):
        raise ValueError(f"kv_cache must be 'auto', 'static' or 'dynamic', not {kv_cache!r}")
    if kv_cache != "auto":
        return kv_cache
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "static" if (major, minor) >= (5, 24) else "dynamic"


@dataclass
class _Row:
    """One prompt on its way through a batch."""

    index: int
    ids: list[int]
    image_keys: tuple[str, ...]
    pixels: list[dict[str, torch.Tensor]]
    n_image_tokens: int
    image_end: int = 0
    """Index after the last image token: a shared prefix must reach at least here."""


@dataclass
class _Group:
    rows: list[_Row]
    prefix_len: int
    extra: dict = field(default_factory=dict)


def _lcp(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Watch:
    """Per-step bookkeeping of a batch being served: hands out rows as they finish and stops rows
    whose client left. Used only through `generate_rows` with `on_done` or `cancelled`."""

    CHECK_EVERY = 4
    """Steps between cancellation checks (a Python call per row; the finished-row check is one
    tensor op per step)."""

    def __init__(self, backend: HFBackend, rows: list[_Row], params: GenerationParams, out: list[Generation | None],
                 on_done: Callable[[int, Generation], None] | None, cancelled: Callable[[int], bool] | None) -> None:
        self.backend, self.rows, self.params, self.out = backend, rows, params, out
        self.on_done, self.cancelled = on_done, cancelled
        self.handed = torch.zeros(len(rows), dtype=torch.bool, device=backend.device)
        self.reported = False

    def step(self, t: int, out: torch.Tensor, lengths: torch.Tensor, done: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
        """Rows to stop now (cancelled); finished rows not yet handed out are handed out."""
        stop = torch.zeros_like(done)
        if self.cancelled is not None and t % self.CHECK_EVERY == 0:
            for k in (~done).nonzero().flatten().tolist():
                r = self.rows[k]
                if self.cancelled(r.index):
                    stop[k] = True
                    self.out[r.index] = Generation(text=None, error="cancelled", prompt_tokens=len(r.ids),
                                                   completion_tokens=t + 1)
                    self.handed[k] = True
                    if self.on_done is not None:
                        self.on_done(r.index, self.out[r.index])
        if self.on_done is not None:
            fresh = (done | stop) & ~self.handed
            if bool(fresh.any()):
                toks = out[:, : t + 1]
                for k in fresh.nonzero().flatten().tolist():
                    r = self.rows[k]
                    self.out[r.index] = self.backend._finish(r, toks[k].tolist(), int(lengths[k]), bool(cut[k]), self.params.stop)
                    self.handed[k] = True
                    self.reported = True
                    self.on_done(r.index, self.out[r.index])
        return stop


class HFBackend:
    """A transformers model as a judge backend (implements Backend and ScoresTokens).

    `model`: a model folder or hub name; a folder holding a peft LoRA adapter loads its base
    (`base_model` in the folder's judge card, else adapter_config's `base_model_name_or_path`; a
    relative path is relative to the folder) and applies the adapter. Extra keyword arguments go to
    `from_pretrained` (e.g. `gguf_file=`, `device_map="auto"` for models larger than one device,
    `attn_implementation=`).
    `batch_size` / `max_batch_tokens`: rows and padded tokens per forward pass.
    `prefix_reuse`: run a prefix shared by several prompts once and reuse its KV cache.
    `min_new_tokens`: suppress end-of-sequence before this many tokens (for benchmarks that need
    a fixed feedback length).
    `image_cache_bytes`: budget of the cache of preprocessed images (pixel tensors), in bytes.
    `kv_cache`: "auto" (default), "static" (preallocated, grown in chunks) or "dynamic"
    (transformers' cache that grows by one token per step); see the module docstring.
    """

    def __init__(
        self,
        model: str,
        device: str | None = None,
        dtype: Any = None,
        batch_size: int = 32,
        max_batch_tokens: int = 65536,
        prefix_reuse: bool = True,
        min_prefix_tokens: int = 16,
        min_new_tokens: int = 0,
        merge_adapter: bool = True,
        image_cache_bytes: int = IMAGE_CACHE_BYTES,
        kv_cache: str = "auto",
        **kw: Any,
    ) -> None:
        self.name = str(model)
        self.kv_cache = _kv_cache_choice(kv_cache)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.prefix_reuse = prefix_reuse
        self.min_prefix_tokens = min_prefix_tokens
        self.min_new_tokens = min_new_tokens
        self._init_image_cache(image_cache_bytes)
        self._load(str(model), device, dtype, merge_adapter, kw)

    @classmethod
    def from_model(cls, model: Any, processor: Any, name: str = "in-memory", **options: Any) -> HFBackend:
        """Wrap a model already in memory (a training loop's, or a benchmark's random 7B) with its
        processor (vision) or tokenizer (text); `options` as for the constructor, minus loading ones."""
        self = cls.__new__(cls)
        defaults = dict(batch_size=32, max_batch_tokens=65536, prefix_reuse=True, min_prefix_tokens=16, min_new_tokens=0)
        cache_bytes = options.pop("image_cache_bytes", IMAGE_CACHE_BYTES)
        options["kv_cache"] = _kv_cache_choice(options.get("kv_cache", "auto"))
        for k, v in {**defaults, **options}.items():
            setattr(self, k, v)
        self.name = name
        self._init_image_cache(cache_bytes)
        self.kind = "vision" if getattr(model.config, "vision_config", None) is not None else "text"
        self.model = model.eval()
        self.dtype = model.dtype
        if self.kind == "vision":
            self.processor, self.tokenizer = processor, processor.tokenizer
            chat.fix_llava_processor(processor, model.config)
            self.image_token = getattr(processor, "image_token", "<image>")
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        else:
            self.processor, self.tokenizer = None, processor
            self.image_token, self.image_token_id = None, None
        self._setup(model.config)
        return self

    def _init_image_cache(self, budget_bytes: int) -> None:
        # preprocessed tensors by their size in bytes: the batch being generated, the next one
        # being prefetched, and images that recur (several responses per image)
        self._image_cache = ByteCache(budget_bytes)
        self._prefetcher: ThreadPoolExecutor | None = None
        self._token_chars: int | None = None

    # ---- loading --------------------------------------------------------------------------

    def _load(self, model: str, device: str | None, dtype: Any, merge_adapter: bool, kw: dict[str, Any]) -> None:
        from transformers import AutoConfig

        kw.setdefault("trust_remote_code", False)  # never run model-repo code unless asked
        shared = {k: kw[k] for k in _SHARED_KW if k in kw}
        folder = Path(model)
        base, adapter = model, None
        if (folder / "adapter_config.json").is_file():
            adapter = model
            acfg = json.loads((folder / "adapter_config.json").read_text())
            base = card.resolve_base_model(folder, card.load_card(folder).get("base_model")
                                           or acfg.get("base_model_name_or_path"))
            if not base:
                raise ValueError(f"{model}: LoRA adapter without a base model (set base_model in {card.CARD_FILE})")
        config = AutoConfig.from_pretrained(base, **shared)
        self.kind = "vision" if getattr(config, "vision_config", None) is not None else "text"

        if device is None and "device_map" not in kw:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            on_gpu = (device or "").startswith("cuda") or ("device_map" in kw and torch.cuda.is_available())
            dtype = torch.bfloat16 if on_gpu else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.dtype = dtype

        # the tokenizer/processor may live in the adapter folder (training saves it there)
        proc_src = adapter if adapter and any((folder / f).is_file() for f in ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json")) else base
        if self.kind == "vision":
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.processor = AutoProcessor.from_pretrained(proc_src, **shared)
            self.tokenizer = self.processor.tokenizer
            net = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype, **kw)
            chat.fix_llava_processor(self.processor, config)
            self.image_token = getattr(self.processor, "image_token", "<image>")
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.processor = None
            self.tokenizer = AutoTokenizer.from_pretrained(proc_src, **shared)
            net = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **kw)
            self.image_token, self.image_token_id = None, None
        if adapter:
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, adapter)
            if merge_adapter:  # one matmul per layer instead of three at inference
                net = net.merge_and_unload()
        if "device_map" not in kw:
            net = net.to(device)
        self.model = net.eval()
        self._setup(config)

    def _setup(self, config: Any) -> None:
        """Device, end-of-sequence and padding ids, context length: what generation needs."""
        self.device = self.model.get_input_embeddings().weight.device

        gc = self.model.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids = sorted(set(self.eos_ids) | {self.tokenizer.eos_token_id})
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.max_positions = getattr(text_cfg, "max_position_embeddings", None)
        # transformers renamed `past_key_values` to `cache` (5.2x; the old name goes in 5.40)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    # ---- prompts -> token ids -------------------------------------------------------------

    def _refuse_images(self, p: Prompt) -> None:
        if p.images and self.kind != "vision":
            raise ValueError(f"{self.name} is a text judge and cannot see images (use a vision judge or the caption bridge)")

    def _chat_text(self, p: Prompt) -> str:
        """The prompt as the model's chat template writes it, ending where the answer starts."""
        self._refuse_images(p)
        return chat.apply(self.processor if self.kind == "vision" else self.tokenizer, p, vision=self.kind == "vision")

    def _image_side(self) -> int | None:
        """The largest side the image processor resizes or crops to (decoding need not go further)."""
        ip = getattr(self.processor, "image_processor", None)
        sides: list[int] = []
        for attr in ("size", "crop_size", "image_grid_pinpoints"):
            v = getattr(ip, attr, None)
            vals = v.values() if isinstance(v, dict) else (v if isinstance(v, (list, tuple)) else [v])
            for x in vals:
                sides += [int(y) for y in (x if isinstance(x, (list, tuple)) else [x]) if isinstance(y, (int, float))]
        return max(sides) if sides else None

    def _image(self, key: str, ref: Any) -> tuple[dict[str, torch.Tensor], int]:
        """Pixel tensors and image-token count of one image, preprocessed once (cached by bytes).
        Decoding happens outside the cache's lock: the prefetch thread and the caller may work on
        different images at once."""

        def make() -> tuple[dict[str, torch.Tensor], int]:
            img = load_image(ref, min_side=self._image_side())
            enc = self.processor(text=[self.image_token], images=[img], return_tensors="pt")
            n = int((enc["input_ids"] == self.image_token_id).sum())
            drop = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
            return {k: v for k, v in enc.items() if k not in drop}, n

        def size(v: tuple[dict[str, torch.Tensor], int]) -> int:
            return sum(t.numel() * t.element_size() for t in v[0].values())

        return self._image_cache.get_or_make(key, make, size)

    @property
    def max_token_chars(self) -> int:
        """The most characters one token stands for (the longest vocabulary entry): a prompt of
        C characters has at least C / max_token_chars tokens, a bound known without tokenizing."""
        if self._token_chars is None:
            vocab = self.tokenizer.get_vocab()
            self._token_chars = max((len(t) for t in vocab), default=1) or 1
        return self._token_chars

    def prefetch(self, prompts: Sequence[Prompt]) -> None:
        """Load and preprocess these prompts' images in a background thread (see base.Prefetches).

        PIL decoding and resizing and torch ops release the GIL, so this overlaps the generation
        of the current batch; errors are ignored here and reported when the prompt is encoded."""
        refs = [ref for p in prompts for ref in p.images]
        if not refs or self.kind != "vision":
            return
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-judge-prefetch")

        def work() -> None:
            for ref in refs:
                try:
                    self._image(ref.key, ref)
                except Exception:  # noqa: BLE001, S112 - reported when the prompt is encoded
                    continue

        self._prefetcher.submit(work)

    def _encode(self, p: Prompt, text: str | None = None) -> tuple[list[int], list[dict[str, torch.Tensor]], int]:
        """Token ids (image placeholders expanded), per-image tensors, image-token count."""
        text = self._chat_text(p) if text is None else text
        pixels: list[dict[str, torch.Tensor]] = []
        n_img = 0
        if p.images:
            self._refuse_images(p)
            pieces = text.split(self.image_token)
            if len(pieces) - 1 != len(p.images):
                raise ValueError(f"the chat template placed {len(pieces) - 1} image tokens for {len(p.images)} images")
            out = pieces[0]
            for ref, piece in zip(p.images, pieces[1:]):
                tensors, n = self._image(ref.key, ref)
                pixels.append(tensors)
                n_img += n
                out += self.image_token * n + piece
            text = out
        bos = self.tokenizer.bos_token
        # like processor(text=...): special tokens are added unless the template already wrote BOS
        ids = self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
        return list(ids), pixels, n_img

    def _rows(self, prompts: Sequence[Prompt], out: list[Generation | None], budgets: int | Sequence[int]) -> list[_Row]:
        """Encode each prompt; a prompt that cannot be encoded gets its error and no row.
        `budgets`: tokens to generate, one for all prompts or one per prompt."""
        if isinstance(budgets, int):
            budgets = [budgets] * len(prompts)
        rows = []
        for i, p in enumerate(prompts):
            try:
                ids, pixels, n_img = self._encode(p)
            except Exception as e:  # noqa: BLE001 - one bad prompt (corrupt image...) must not stop the batch
                # the prompt's own fault (an undecodable image, images for a text judge): a server
                # answers it with a 4xx (see vlm_judge.serve_batcher.CLIENT_ERROR)
                out[i] = Generation(text=None, error=f"{type(e).__name__}: {e}",
                                    extra={"client_error": isinstance(e, (ImageError, ValueError))})
                continue
            budget = budgets[i]
            if self.max_positions and len(ids) + budget > self.max_positions:
                out[i] = Generation(text=None, error=f"prompt is {len(ids)} tokens (+{budget} to generate), over the model's {self.max_positions}-token context",
                                    extra={"client_error": True})
                continue
            end = 0
            if n_img:
                end = max(k for k, t in enumerate(ids) if t == self.image_token_id) + 1
            rows.append(_Row(i, ids, tuple(r.key for r in p.images), pixels, n_img, end))
        return rows

    # ---- grouping and batching ------------------------------------------------------------

    def _groups(self, rows: list[_Row]) -> list[_Group]:
        """Groups of rows that share a token prefix covering their images (a row alone otherwise).

        Rows with the same images are sorted by tokens; the split into runs maximises the prefix
        tokens saved, sum over groups of (members - 1) * prefix length (a small dynamic program),
        so that e.g. two instructions of five responses each become two groups with long prefixes
        rather than one group with only the task description in common.
        """
        if not self.prefix_reuse:
            return [_Group([r], len(r.ids)) for r in rows]
        by_images: dict[tuple[str, ...], list[_Row]] = {}
        for r in rows:  # equal image tokens mean equal pixels only when the images are the same
            by_images.setdefault(r.image_keys, []).append(r)
        groups: list[_Group] = []
        for m in by_images.values():
            m.sort(key=lambda r: r.ids)
            n = len(m)
            adj = [_lcp(m[i].ids, m[i + 1].ids, len(m[i].ids)) for i in range(n - 1)]
            best = [0] * (n + 1)  # best[j]: most tokens saved over the first j rows
            cut = [0] * (n + 1)  # where the last group of that best split starts
            for j in range(1, n + 1):
                best[j], cut[j] = best[j - 1], j - 1  # row j-1 alone
                plen, need = len(m[j - 1].ids) - 1, max(self.min_prefix_tokens, m[j - 1].image_end)
                for i in range(j - 2, max(-1, j - 1 - self.batch_size), -1):  # group m[i:j]
                    # every member keeps >= 1 suffix token, and the prefix must hold all image tokens
                    plen = min(plen, adj[i], len(m[i].ids) - 1)
                    need = max(need, m[i].image_end)
                    if plen < need:
                        break
                    if best[i] + (j - 1 - i) * plen > best[j]:
                        best[j], cut[j] = best[i] + (j - 1 - i) * plen, i
            j = n
            while j > 0:
                i = cut[j]
                part = m[i:j]
                plen = min([len(r.ids) - 1 for r in part] + [adj[k] for k in range(i, j - 1)])
                groups.append(_Group(part, plen if len(part) > 1 else len(part[0].ids)))
                j = i
        return groups

    def _batches(self, groups: list[_Group]) -> list[list[_Group]]:
        """Pack groups into batches of similar length under the row and padded-token caps."""
        pieces: list[_Group] = []
        for g in groups:  # a group larger than a batch is split; each piece still shares the prefix
            for s in range(0, len(g.rows), self.batch_size):
                chunk = g.rows[s : s + self.batch_size]
                pieces.append(_Group(chunk, g.prefix_len if len(chunk) > 1 else len(chunk[0].ids)))
        pieces.sort(key=lambda g: max(len(r.ids) for r in g.rows))
        batches: list[list[_Group]] = []
        cur: list[_Group] = []
        rows = longest = 0
        for g in pieces:
            n, ln = len(g.rows), max(len(r.ids) for r in g.rows)
            if cur and (rows + n > self.batch_size or (rows + n) * max(longest, ln) > self.max_batch_tokens):
                batches.append(cur)
                cur, rows, longest = [], 0, 0
            cur.append(g)
            rows, longest = rows + n, max(longest, ln)
        if cur:
            batches.append(cur)
        return batches

    # ---- model passes ---------------------------------------------------------------------

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for k, s in enumerate(seqs):
            if s:
                ids[k, width - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[k, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _pixels(self, rows_with_images: list[_Row]) -> dict[str, torch.Tensor]:
        """Image tensors in the order their tokens appear in the batch (row-major)."""
        per = [t for r in rows_with_images for t in r.pixels]
        if not per:
            return {}
        out = {}
        for k in per[0]:
            v = torch.cat([t[k] for t in per], dim=0).to(self.device)
            out[k] = v.to(self.dtype) if v.is_floating_point() else v
        return out

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, **extra: Any) -> Any:
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                          **{self._cache_kw: cache}, **extra)

    @staticmethod
    def _cache_of(out: Any) -> Any:
        return out.cache if getattr(out, "cache", None) is not None else out.past_key_values

    def _prefill(self, groups: list[_Group]) -> tuple[torch.Tensor, Any, torch.Tensor, list[_Row]]:
        """Run the prompts of one batch; return last-position logits, the cache, the attention
        mask and the rows in batch order. Shared prefixes run once per group."""
        rows = [r for g in groups for r in g.rows]
        if all(len(g.rows) == 1 for g in groups):
            ids, mask = self._left_pad([r.ids for r in rows])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            o = self._forward(ids, mask, pos, None, **self._pixels(rows))
            return o.logits[:, -1], self._cache_of(o), mask, rows
        # a lone row in a mixed batch runs all but its last token as its "prefix"
        plens = [g.prefix_len if len(g.rows) > 1 else len(g.rows[0].ids) - 1 for g in groups]
        # 1) each group's prefix once (its images included)
        p_ids, p_mask = self._left_pad([g.rows[0].ids[:n] for g, n in zip(groups, plens)])
        p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
        o = self._forward(p_ids, p_mask, p_pos, None, **self._pixels([g.rows[0] for g in groups]))
        cache = self._cache_of(o)
        # 2) copy each group's cache row to its members (index_select along the batch)
        member_of = torch.tensor([gi for gi, g in enumerate(groups) for _ in g.rows], device=self.device)
        cache.batch_select_indices(member_of)
        # 3) the suffixes, after the prefix; padding between them is masked and positions
        #    continue from each row's own prefix length, so each row sees exactly its prompt
        s_ids, s_mask = self._left_pad([r.ids[n:] for g, n in zip(groups, plens) for r in g.rows])
        mask = torch.cat([p_mask[member_of], s_mask], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, p_ids.shape[1]:]
        o = self._forward(s_ids, mask, pos, cache)
        return o.logits[:, -1], self._cache_of(o), mask, rows

    def _static_cache(self, cache: Any, width: int, room: int) -> Any | None:
        """The prefill's cache moved into preallocated layers with `room` free slots, or None
        where that does not apply (kv_cache="dynamic", or layers other than plain full attention).
        Moved layer by layer, so at most one layer is held twice."""
        layers = getattr(cache, "layers", None)
        if self.kv_cache != "static" or not layers or any(type(x).__name__ != "DynamicLayer" for x in layers):
            return None
        from transformers import StaticCache

        try:
            static = StaticCache(config=self.model.config, max_cache_len=width + room)
        except (TypeError, ValueError):  # a transformers whose StaticCache takes other arguments
            return None
        if len(static.layers) != len(layers) or any(
                type(x).__name__ != "StaticLayer" or not hasattr(x, "cumulative_length") for x in static.layers):
            return None
        for new, old in zip(static.layers, layers):
            new.lazy_initialization(old.keys, old.values)
            new.keys[:, :, :width] = old.keys
            new.values[:, :, :width] = old.values
            new.cumulative_length.fill_(width)
            old.keys = old.values = None
        return static

    @staticmethod
    def _grow(static: Any, mask: torch.Tensor, room: int) -> torch.Tensor:
        """`room` more free slots in every layer of a static cache, and in the attention mask."""
        for x in static.layers:
            b, h, _, d = x.keys.shape
            x.keys = torch.cat([x.keys, x.keys.new_zeros((b, h, room, d))], dim=2)
            x.values = torch.cat([x.values, x.values.new_zeros((b, h, room, x.values.shape[-1]))], dim=2)
            x.max_cache_len += room
        return torch.cat([mask, mask.new_zeros((mask.shape[0], room))], dim=1)

    def _decode(self, logits: torch.Tensor, cache: Any, mask: torch.Tensor, params: GenerationParams,
                budgets: list[int], watch: _Watch | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generate for the whole batch, row k up to budgets[k] tokens; return tokens [B, T],
        lengths [B] and whether each row was cut at its budget [B] (finish_reason "length")."""
        B, T = logits.shape[0], max(budgets, default=0)
        eos = torch.tensor(self.eos_ids or [-1], device=self.device)
        limit = torch.tensor(budgets, dtype=torch.long, device=self.device)
        out = torch.full((B, max(T, 0)), self.pad_id, dtype=torch.long, device=self.device)
        lengths = limit.clone()
        done = limit <= 0
        cut = torch.zeros(B, dtype=torch.bool, device=self.device)
        pos = (mask.sum(-1, keepdim=True) - 1)
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed if params.seed is not None else torch.seed())
        ones = torch.ones((B, 1), dtype=mask.dtype, device=self.device)
        width = mask.shape[1]  # the slot of step t's input token is width + t
        room = min(KV_CHUNK, T)
        static = self._static_cache(cache, width, room) if T > 1 else None
        if static is not None:
            cache = static
            mask = torch.cat([mask, mask.new_zeros((B, room))], dim=1)
        for t in range(T):
            scores = logits.float()
            if t < self.min_new_tokens and self.eos_ids:
                scores[:, eos] = float("-inf")
            nxt = self._pick(scores, params, gen)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            out[:, t] = nxt
            just = ~done & torch.isin(nxt, eos)
            lengths = torch.where(just, torch.full_like(lengths, t + 1), lengths)
            done |= just
            if params.stop and t % 8 == 7:
                done |= self._hit_stop(out[:, : t + 1], done, params.stop, lengths, t + 1)
            at_budget = ~done & (limit <= t + 1)
            cut |= at_budget
            done |= at_budget
            if watch is not None:
                done |= watch.step(t, out, lengths, done, cut)
            if t + 1 == T or bool(done.all()):
                out = out[:, : t + 1]
                break
            if static is None:
                mask = torch.cat([mask, ones], dim=1)
            else:
                if width + t >= mask.shape[1]:
                    mask = self._grow(static, mask, min(KV_CHUNK, T - t))
                mask[:, width + t] = 1
            pos = pos + 1
            logits = self._forward(nxt[:, None], mask, pos, cache).logits[:, -1]
        return out, lengths, cut

    def _hit_stop(self, toks: torch.Tensor, done: torch.Tensor, stop: Sequence[str], lengths: torch.Tensor, t: int) -> torch.Tensor:
        """Rows whose text so far contains a stop string (checked every few steps, not per token).

        Each row's recent tokens are decoded once per check, not once per stop string, and only
        the tail that can hold a stop string: the 8 new tokens plus, for the longest stop string of
        L characters, 4 * L tokens (a token is at least one byte, a character at most four)."""
        hit = torch.zeros_like(done)
        window = 8 + 4 * max(len(s) for s in stop)
        for k in (~done).nonzero().flatten().tolist():
            tail = self.tokenizer.decode(toks[k, max(0, t - window):], skip_special_tokens=True)
            if any(s in tail for s in stop):
                hit[k] = True
                lengths[k] = t
        return hit

    @staticmethod
    def _pick(scores: torch.Tensor, params: GenerationParams, gen: torch.Generator | None) -> torch.Tensor:
        if params.temperature <= 0:
            return scores.argmax(-1)
        probs = torch.softmax(scores / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sp, si = probs.sort(dim=-1, descending=True)
            drop = sp.cumsum(-1) - sp > params.top_p  # keep the smallest set reaching top_p
            sp = sp.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, si, sp)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    # ---- public API -----------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """One Generation per prompt, in order; a prompt that fails carries its error, the rest go on.
        The text is what the model wrote after the prompt (and after any assistant_prefix)."""
        return self.generate_rows(prompts, params)

    @torch.inference_mode()
    def generate_rows(
        self,
        prompts: Sequence[Prompt],
        params: GenerationParams,
        budgets: Sequence[int] | None = None,
        on_done: Callable[[int, Generation], None] | None = None,
        cancelled: Callable[[int], bool] | None = None,
    ) -> list[Generation]:
        """`generate` with what a server needs (vlm_judge.serve_batcher.RowBackend): prompt i may
        generate up to `budgets[i]` tokens (default `params.max_new_tokens`), rows of one batch
        finish at their own length and are handed to `on_done(i, generation)` as soon as they
        finish (a short request in a batch with a long one is answered early), and a prompt for
        which `cancelled(i)` turns true stops generating (its client left)."""
        n = len(prompts)
        budget = list(budgets) if budgets is not None else [params.max_new_tokens] * n
        if len(budget) != n:
            raise ValueError(f"{len(budget)} budgets for {n} prompts")
        out: list[Generation | None] = [None] * n
        rows = self._rows(prompts, out, budget)
        if on_done is not None:
            for i, g in enumerate(out):
                if g is not None:
                    on_done(i, g)
        for batch in self._batches(self._groups(rows)):
            if cancelled is not None:  # rows whose client left before their batch started
                for g in batch:
                    for r in g.rows:
                        if cancelled(r.index):
                            out[r.index] = Generation(text=None, error="cancelled")
                            if on_done is not None:
                                on_done(r.index, out[r.index])
                # the members left still share the group's prefix (each keeps a suffix token)
                batch = [_Group(kept, g.prefix_len if len(kept) > 1 else len(kept[0].ids))
                         for g in batch if (kept := [r for r in g.rows if out[r.index] is None])]
                if not batch:
                    continue
            self._run_batch(batch, params, out, budget, on_done, cancelled)
        return [g if g is not None else Generation(text=None, error="not generated") for g in out]

    def _finish(self, r: _Row, toks: list[int], length: int, cut: bool, stop: Sequence[str]) -> Generation:
        seq = [t for t in toks[:length] if t not in self.eos_ids]
        text = self.tokenizer.decode(seq, skip_special_tokens=True)
        for s in stop:
            if s in text:
                text = text[: text.index(s)]
        return Generation(text=text, prompt_tokens=len(r.ids), completion_tokens=length,
                          extra={"finish_reason": "length" if cut else "stop"})

    def _run_batch(self, batch: list[_Group], params: GenerationParams, out: list[Generation | None],
                   budget: list[int], on_done: Callable[[int, Generation], None] | None = None,
                   cancelled: Callable[[int], bool] | None = None) -> None:
        watch = None
        try:
            logits, cache, mask, rows = self._prefill(batch)
            if on_done is not None or cancelled is not None:
                watch = _Watch(self, rows, params, out, on_done, cancelled)
            toks, lengths, cut = self._decode(logits, cache, mask, params, [budget[r.index] for r in rows], watch)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: halve the batch, then give up per row
            # halving helps only if no row of this batch was handed out yet (they cannot be taken back)
            if sum(len(g.rows) for g in batch) > 1 and not (watch is not None and watch.reported):
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                for b in self._split(batch):
                    self._run_batch(b, params, out, budget, on_done, cancelled)
                return
            for g in batch:
                for r in g.rows:
                    if out[r.index] is None:
                        out[r.index] = Generation(text=None, error=f"generation failed: {type(e).__name__}: {e}")
                        if on_done is not None:
                            on_done(r.index, out[r.index])
            return
        toks, lengths, cut = toks.tolist(), lengths.tolist(), cut.tolist()
        for k, r in enumerate(rows):
            if out[r.index] is not None:  # already handed out by the watch (or cancelled)
                continue
            out[r.index] = self._finish(r, toks[k], lengths[k], cut[k], params.stop)
            if on_done is not None:
                on_done(r.index, out[r.index])

    @staticmethod
    def _split(batch: list[_Group]) -> list[list[_Group]]:
        if len(batch) > 1:
            return [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
        g = batch[0]
        h = len(g.rows) // 2
        return [[_Group(g.rows[:h], g.prefix_len if h > 1 else len(g.rows[0].ids))],
                [_Group(g.rows[h:], g.prefix_len if len(g.rows) - h > 1 else len(g.rows[h].ids))]]

    @torch.inference_mode()
    def next_token_probs(
        self, prompts: Sequence[Prompt], continuations: Sequence[str], candidates: Sequence[str]
    ) -> list[dict[str, float]]:
        """Probability of each candidate's first token after prompt + continuation.

        The candidates are tokenized in context (a digit after '[RESULT] ' may merge with the
        space), and the probabilities are read where the candidates' tokenizations part ways.
        A prompt that cannot be encoded gets an empty dict.
        """
        result: list[dict[str, float]] = [{} for _ in prompts]
        rows: list[tuple[int, list[int], list[dict[str, torch.Tensor]], dict[str, int]]] = []
        for i, (p, cont) in enumerate(zip(prompts, continuations)):
            try:
                base = self._chat_text(p) + cont
                encs = [self._encode(p, base + c) for c in candidates]
            except Exception:  # noqa: BLE001 - no probabilities for this row; the caller reports it
                continue
            seqs = [e[0] for e in encs]
            common = min(len(s) for s in seqs)
            for s in seqs[1:]:
                common = _lcp(seqs[0], s, common)
            if common == 0:
                continue
            firsts = {c: (s[common] if len(s) > common else None) for c, s in zip(candidates, seqs)}
            rows.append((i, seqs[0][:common], encs[0][1], {c: t for c, t in firsts.items() if t is not None}))
        for s in range(0, len(rows), self.batch_size):
            chunk = rows[s : s + self.batch_size]
            ids, mask = self._left_pad([r[1] for r in chunk])
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            pix = [t for r in chunk for t in r[2]]
            extra = {k: torch.cat([t[k] for t in pix]).to(self.device) for k in pix[0]} if pix else {}
            extra = {k: (v.to(self.dtype) if v.is_floating_point() else v) for k, v in extra.items()}
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1, **extra).logits[:, -1]
            probs = torch.softmax(logits.float(), dim=-1).cpu()
            for k, (i, _, _, firsts) in enumerate(chunk):
                result[i] = {c: float(probs[k, t]) for c, t in firsts.items()}
        return result
