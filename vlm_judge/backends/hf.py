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
   no per-row Python work per token) writes the completions.

The prefix/suffix split is exact: the suffix sits after the prefix in the cache with padding
masked out and positions counted from the attention mask, so outputs equal those of running each
full prompt (tests/test_hf_prefix.py checks the greedy tokens).
"""

from __future__ import annotations

import inspect
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlm_judge import card, chat
from vlm_judge.backends.base import Generation, GenerationParams, Prompt
from vlm_judge.images import load_image

# keys of from_pretrained kwargs that also apply to the config, tokenizer and processor
_SHARED_KW = ("gguf_file", "revision", "cache_dir", "local_files_only", "token", "trust_remote_code", "subfolder")


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
        **kw: Any,
    ) -> None:
        self.name = str(model)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.prefix_reuse = prefix_reuse
        self.min_prefix_tokens = min_prefix_tokens
        self.min_new_tokens = min_new_tokens
        self._init_image_cache()
        self._load(str(model), device, dtype, merge_adapter, kw)

    @classmethod
    def from_model(cls, model: Any, processor: Any, name: str = "in-memory", **options: Any) -> HFBackend:
        """Wrap a model already in memory (a training loop's, or a benchmark's random 7B) with its
        processor (vision) or tokenizer (text); `options` as for the constructor, minus loading ones."""
        self = cls.__new__(cls)
        defaults = dict(batch_size=32, max_batch_tokens=65536, prefix_reuse=True, min_prefix_tokens=16, min_new_tokens=0)
        for k, v in {**defaults, **options}.items():
            setattr(self, k, v)
        self.name = name
        self._init_image_cache()
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

    def _init_image_cache(self) -> None:
        self._image_cache: OrderedDict[str, tuple[dict[str, torch.Tensor], int]] = OrderedDict()
        # room for the batch being generated and the next one being prefetched
        self._image_cache_size = max(64, 4 * self.batch_size)
        self._image_lock = threading.Lock()
        self._prefetcher: ThreadPoolExecutor | None = None

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

    def _image(self, key: str, ref: Any) -> tuple[dict[str, torch.Tensor], int]:
        """Pixel tensors and image-token count of one image, preprocessed once (small LRU)."""
        with self._image_lock:
            hit = self._image_cache.get(key)
            if hit is not None:
                self._image_cache.move_to_end(key)
                return hit
        # decoded outside the lock: the prefetch thread and the caller may work on different images
        img = load_image(ref)
        enc = self.processor(text=[self.image_token], images=[img], return_tensors="pt")
        n = int((enc["input_ids"] == self.image_token_id).sum())
        tensors = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")}
        with self._image_lock:
            self._image_cache[key] = (tensors, n)
            while len(self._image_cache) > self._image_cache_size:
                self._image_cache.popitem(last=False)
        return tensors, n

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

    def _rows(self, prompts: Sequence[Prompt], out: list[Generation | None], budget: int) -> list[_Row]:
        """Encode each prompt; a prompt that cannot be encoded gets its error and no row."""
        rows = []
        for i, p in enumerate(prompts):
            try:
                ids, pixels, n_img = self._encode(p)
            except Exception as e:  # noqa: BLE001 - one bad prompt (corrupt image...) must not stop the batch
                out[i] = Generation(text=None, error=f"{type(e).__name__}: {e}")
                continue
            if self.max_positions and len(ids) + budget > self.max_positions:
                out[i] = Generation(text=None, error=f"prompt is {len(ids)} tokens (+{budget} to generate), over the model's {self.max_positions}-token context")
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

    def _decode(self, logits: torch.Tensor, cache: Any, mask: torch.Tensor, params: GenerationParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate up to max_new_tokens for the whole batch; return tokens [B, T] and lengths [B]."""
        B, T = logits.shape[0], params.max_new_tokens
        eos = torch.tensor(self.eos_ids or [-1], device=self.device)
        out = torch.full((B, max(T, 0)), self.pad_id, dtype=torch.long, device=self.device)
        lengths = torch.full((B,), max(T, 0), dtype=torch.long, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        pos = (mask.sum(-1, keepdim=True) - 1)
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed if params.seed is not None else torch.seed())
        ones = torch.ones((B, 1), dtype=mask.dtype, device=self.device)
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
            if t + 1 == T or bool(done.all()):
                out = out[:, : t + 1]
                break
            mask = torch.cat([mask, ones], dim=1)
            pos = pos + 1
            logits = self._forward(nxt[:, None], mask, pos, cache).logits[:, -1]
        return out, lengths

    def _hit_stop(self, toks: torch.Tensor, done: torch.Tensor, stop: Sequence[str], lengths: torch.Tensor, t: int) -> torch.Tensor:
        """Rows whose text so far contains a stop string (checked every few steps, not per token)."""
        hit = torch.zeros_like(done)
        for k in (~done).nonzero().flatten().tolist():
            if any(s in self.tokenizer.decode(toks[k], skip_special_tokens=True) for s in stop):
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

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """One Generation per prompt, in order; a prompt that fails carries its error, the rest go on.
        The text is what the model wrote after the prompt (and after any assistant_prefix)."""
        out: list[Generation | None] = [None] * len(prompts)
        rows = self._rows(prompts, out, params.max_new_tokens)
        for batch in self._batches(self._groups(rows)):
            self._run_batch(batch, params, out)
        return [g if g is not None else Generation(text=None, error="not generated") for g in out]

    def _run_batch(self, batch: list[_Group], params: GenerationParams, out: list[Generation | None]) -> None:
        try:
            logits, cache, mask, rows = self._prefill(batch)
            toks, lengths = self._decode(logits, cache, mask, params)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: halve the batch, then give up per row
            if sum(len(g.rows) for g in batch) > 1:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                half = self._split(batch)
                for b in half:
                    self._run_batch(b, params, out)
                return
            r = batch[0].rows[0]
            out[r.index] = Generation(text=None, error=f"generation failed: {type(e).__name__}: {e}")
            return
        toks, lengths = toks.tolist(), lengths.tolist()
        for k, r in enumerate(rows):
            seq = [t for t in toks[k][: lengths[k]] if t not in self.eos_ids]
            text = self.tokenizer.decode(seq, skip_special_tokens=True)
            for s in params.stop:
                if s in text:
                    text = text[: text.index(s)]
            out[r.index] = Generation(text=text, prompt_tokens=len(r.ids), completion_tokens=lengths[k])

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
