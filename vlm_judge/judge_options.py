"""The judge options every judge-loading command takes, with one set of names and one meaning.

`add_judge_options(parser)` adds them to an argparse parser (`score`, `eval`, `serve`);
`JudgeOptions.from_args(args)` reads them back, and `judge_kwargs(args, judge)` turns them into what
`Judge.load` takes: (backend name, backend kwargs, ScorerConfig).

How a judge finds its server: `--base-url URL` (repeatable) gives every judge those servers (several
URLs are replicas; requests are spread over them); `--base-url NAME=URL` gives only the judge named
NAME (its name, folder or label as written after --judge) that server, so two served judges can sit
on two servers. A judge with a server runs on the 'openai' backend unless its backend is named
(`--backend`, or `NAME@BACKEND` in eval), even when the judge's name is 'mock'.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlm_judge.options import ConfigError, parse_pairs

if TYPE_CHECKING:
    from vlm_judge.scorer import ScorerConfig

DEFAULT_RETRIES = 2
"""Extra generations for an output that did not parse (the scorer's default, shared by every command)."""


def add_judge_options(parser: argparse.ArgumentParser, generation: bool = True, template: bool = True,
                      retries: bool = True) -> argparse._ArgumentGroup:
    """Add the shared judge options to `parser` (in their own help group) and return the group.

    `generation=False` leaves out the generation settings and `--retries` (a server such as
    `vlm-judge serve` takes them from each request); `template=False` leaves out `--template`."""
    g = parser.add_argument_group("judge options (shared by score, eval and serve)")
    g.add_argument("--backend", help="hf, openai, vllm, mock or a registered backend "
                   "(default: 'openai' when the judge has a --base-url, else the judge folder's card, else 'hf')")
    g.add_argument("--base-url", action="append", default=[], metavar="[NAME=]URL",
                   help="OpenAI-compatible server; repeat for replicas. NAME=URL: only the judge NAME uses it")
    g.add_argument("--backend-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, value parsed as JSON when it can be: e.g. device=cuda:0, dtype=bfloat16; "
                        "openai: timeout=300, concurrency=16, max_retries=2, api_key=... (default: OPENAI_API_KEY)")
    if template:
        g.add_argument("--template", help="default, prefix, or a template file (default: the judge card's, else 'default')")
    if generation:
        g.add_argument("--max-new-tokens", type=int, default=512, help="generation budget per judgment")
        g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
        g.add_argument("--seed", type=int, default=0, help="sampling seed (in eval also the bootstrap's)")
    if generation and retries:
        g.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                       help="extra generations for an output that did not parse")
        # the older eval spelling, still accepted, not shown
        g.add_argument("--max-parse-retries", dest="retries", type=int, default=DEFAULT_RETRIES, help=argparse.SUPPRESS)
    return g


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default (and none for options without one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == [] \
                or action.default is argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action) or ""


def judge_parser(prog: str, description: str, **kwargs: Any) -> argparse.ArgumentParser:
    """An ArgumentParser whose --help shows defaults (use with `add_judge_options`)."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=DefaultsHelpFormatter,
                                   **kwargs)


@dataclass
class JudgeOptions:
    """The shared judge options, parsed."""

    backend: str | None = None
    base_urls: list[str] = field(default_factory=list)
    """Servers for every judge."""
    judge_urls: dict[str, list[str]] = field(default_factory=dict)
    """Servers for one judge (NAME=URL)."""
    backend_args: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    retries: int = DEFAULT_RETRIES

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be >= 1")
        if self.retries < 0:
            raise ConfigError("--retries must be >= 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("--temperature must be >= 0 and --top-p in (0, 1]")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> JudgeOptions:
        """Read the options `add_judge_options` added (missing ones keep their defaults)."""
        shared, per_judge = split_urls(getattr(args, "base_url", None) or [])
        kw = {k: getattr(args, k) for k in ("template", "max_new_tokens", "temperature", "top_p", "seed", "retries")
              if getattr(args, k, None) is not None}
        return cls(backend=getattr(args, "backend", None), base_urls=shared, judge_urls=per_judge,
                   backend_args=parse_pairs(getattr(args, "backend_arg", None) or [], "--backend-arg",
                                            json_values=True), **kw)

    def urls_for(self, *names: str) -> list[str]:
        """The servers of the judge known by any of `names`: its own (NAME=URL), else the shared ones."""
        for n in names:
            if n in self.judge_urls:
                return self.judge_urls[n]
        return self.base_urls

    def backend_for(self, judge: str, urls: list[str], backend: str | None = None) -> str:
        """The backend a judge runs on: the one named, else 'openai' when it has a server, else its card's."""
        from vlm_judge.card import default_backend

        # a URL wins over the name 'mock': `--judge mock --base-url URL` tests against a served mock
        return backend or self.backend or ("openai" if urls else default_backend(judge))

    def backend_kwargs(self, urls: list[str]) -> dict[str, Any]:
        """--backend-arg values plus the server URL(s)."""
        kw = dict(self.backend_args)
        if len(urls) == 1:
            kw["base_url"] = urls[0]
        elif urls:
            kw["base_urls"] = list(urls)
        return kw

    def params(self) -> Any:
        """The generation settings as `GenerationParams`."""
        from vlm_judge.backends import GenerationParams

        return GenerationParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                top_p=self.top_p, seed=self.seed)

    def scorer_config(self, judge: str, **fields: Any) -> ScorerConfig:
        """A ScorerConfig from these options; the template falls back to the judge card's, then the preset's. `fields`:
        the command's own scorer settings (batch_size, n_samples, ...). A bad template fails here,
        before any model loads."""
        from vlm_judge.card import load_card
        from vlm_judge.presets import preset_template
        from vlm_judge.prompts import get_template
        from vlm_judge.scorer import ScorerConfig

        template = self.template or load_card(judge).get("template") or preset_template(judge) or "default"
        get_template(template, "absolute")
        return ScorerConfig(template=template, max_parse_retries=self.retries, params=self.params(), **fields)


def split_urls(values: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """--base-url values -> (shared URLs, {judge name: its URLs}). 'NAME=URL' names a judge; a bare URL
    (which may itself hold '=' in its query) is shared."""
    shared: list[str] = []
    per_judge: dict[str, list[str]] = {}
    for v in values:
        name, sep, url = v.partition("=")
        if sep and "://" not in name and name:
            if "://" not in url:
                raise ConfigError(f"--base-url {v!r}: expected URL or NAME=URL (with http:// or https://)")
            per_judge.setdefault(name, []).append(url)
        else:
            shared.append(v)
    return shared, per_judge


def judge_kwargs(args: argparse.Namespace, judge: str, backend: str | None = None,
                 **scorer_fields: Any) -> tuple[str, dict[str, Any], ScorerConfig]:
    """(backend name, backend kwargs, ScorerConfig) for `Judge.load(judge, backend=..., config=..., **kwargs)`.

    `backend`: a backend named for this judge alone (eval's NAME@BACKEND)."""
    opts = JudgeOptions.from_args(args)
    urls = opts.urls_for(judge)
    return (opts.backend_for(judge, urls, backend), opts.backend_kwargs(urls),
            opts.scorer_config(judge, **scorer_fields))


__all__ = ["DEFAULT_RETRIES", "DefaultsHelpFormatter", "JudgeOptions", "add_judge_options", "judge_kwargs",
           "judge_parser", "split_urls"]
