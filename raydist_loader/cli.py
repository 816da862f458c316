"""Layer 5 (entry points): ``raydist-loader``: publish | index | inspect | verify | versions | promote | gc | load |
release | pull-files.

Exit status: 0 success, 1 verification failed (a digest differs), 2 a usage or store error (one line
on stderr, no traceback), 3 an unexpected internal error (traceback, redacted), 130 interrupted. Everything
printed passes through :func:`~raydist_loader.redact.redact_text` with the session's secrets, so no password
reaches the output.
``load`` imports Ray lazily: the other commands never import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TextIO, get_args, get_origin
from urllib.parse import unquote

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .config import LoadSection
from .errors import ConfigError, RaydistError, VerificationError, describe_failures
from .options import DEFAULTS, MAX_CONCURRENCY, MAX_TP, LoadOptions, RetriesOptions
from .redact import redact_text, redact_url, url_password
from .report import LoadReport
from .store.repo import DEFAULT_MAX_FILE_BYTES
from .store.summary import human_bytes
from .validation import bounds_text

PROG = "raydist-loader"
EXIT_OK, EXIT_VERIFY, EXIT_ERROR, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_WORDS = re.compile(r"(\s+)")


# ------------------------------------------------------------------------------------------ output
class _Out:
    """stdout/stderr writers that redact URL passwords and every known secret."""

    def __init__(self) -> None:
        self.secrets: list[str] = []

    def add_secret(self, secret: str | None) -> None:
        if secret:
            for s in {secret, unquote(secret)}:
                if s and s not in self.secrets:
                    self.secrets.append(s)

    def clean(self, text: str) -> str:
        # redact_text word by word: its query-secret pattern, run over free text, would eat everything from a
        # word like "tokenizer" up to the next "=" and the rest of the text after it.
        secrets = tuple(self.secrets)
        text = "".join(redact_text(part, secrets) if part and not part.isspace() else part
                       for part in _WORDS.split(text))
        for secret in secrets:  # secrets that span several words
            text = text.replace(secret, "***")
        return text

    def print(self, text: str = "", *, file: TextIO | None = None) -> None:
        stream = file or sys.stdout
        stream.write(self.clean(text) + "\n")
        stream.flush()

    def err(self, text: str) -> None:
        self.print(text, file=sys.stderr)

    def json(self, obj: Any) -> None:
        self.print(json.dumps(_jsonable(obj), indent=2, default=str))


class _RedactingFormatter(logging.Formatter):
    def __init__(self, out: _Out):
        super().__init__(f"{PROG}: %(levelname)s: %(message)s")
        self._out = out

    def format(self, record: logging.LogRecord) -> str:
        return self._out.clean(super().format(record))


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        data = {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        for name in ("gbps", "ok"):  # derived properties worth having in the JSON
            if isinstance(getattr(type(obj), name, None), property):
                data[name] = getattr(obj, name)
        return data
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------------------------------ arguments
def _number(kind: type, low: float, strict: bool, what: str, high: float | None = None):
    """An argparse type: ``kind`` parsed from text, > ``low`` (``strict``) or >= ``low``, and <= ``high`` when
    given, with a clear message (``what`` says the accepted range)."""

    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value != value or value < low or (strict and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


def _int_range(low: int, high: int):
    return _number(int, low, False, f"an integer in [{low}, {high}]", high)


_positive_int = _number(int, 1, False, "an integer >= 1")
_nonneg_float = _number(float, 0, False, "a number >= 0")
_tp = _int_range(1, MAX_TP)
_concurrency = _int_range(1, MAX_CONCURRENCY)


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main()`` can redact and return a status."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(self, message)


class _UsageError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


def _store_args(p: argparse.ArgumentParser, *, url_optional: str | None = None) -> None:
    if url_optional:
        p.add_argument("url", nargs="?", metavar="URL", help=f"store URL (or give {url_optional})")
    else:
        p.add_argument("url", metavar="URL", help="store URL: file:///dir, a path, s3://bucket/prefix, "
                       "redis://[user@]host:port/db, rediss://...")
    p.add_argument("--model", required=not url_optional, metavar="NAME", help="model name inside the store")
    p.add_argument("--password-env", metavar="VAR",
                   help="read the store's password from environment variable VAR (keeps it out of the "
                        "command line, shell history and `ray job list`)")


def _publish_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tp", type=_tp, default=8, metavar="N",
                   help="finest tensor-parallel size the store will serve (default 8)")
    p.add_argument("--rules", metavar="FILE", help="sharding rules YAML overriding the model_type preset")
    p.add_argument("--blake3", action="store_true", help="also record blake3 digests (tamper evidence)")
    p.add_argument("--max-file-bytes", type=_positive_int, default=DEFAULT_MAX_FILE_BYTES, metavar="N",
                   help="largest config/tokenizer file recorded for pull-files (default 64 MiB); larger ones "
                        "are skipped and listed")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _version_arg(p: argparse.ArgumentParser, more: str = "") -> None:
    p.add_argument("--model-version", metavar="VERSION",
                   help=f"that version of the model (default: the current one){more}")


def _gc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grace", type=_nonneg_float, default=3600.0, metavar="S",
                   help="a version that stopped being current goes S seconds later (default 3600)")
    p.add_argument("--keep", type=_int_range(0, 10_000), default=0, metavar="N",
                   help="also keep the N most recently current versions (rollback targets)")


def _option_args(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`~raydist_loader.options.LoadOptions` field (``max_restarts`` -> ``--max-restarts``),
    with its choices, bounds and help from there. Every flag defaults to None: unset flags leave the config file's
    value (or the option's default) alone."""
    for name, field in LoadOptions.model_fields.items():
        default = getattr(DEFAULTS, name)
        help_text = f"{field.description} (default: {_shown(default)})"
        if name == "verify":
            group = p.add_mutually_exclusive_group()
            group.add_argument("--verify", dest="verify", action="store_const", const=True, default=None,
                               help="check every chunk's digest as it lands (default)")
            group.add_argument("--no-verify", dest="verify", action="store_const", const=False)
            group.add_argument("--verify-full", dest="verify", action="store_const", const="full",
                               help="also re-hash the final device tensors")
            continue
        flags = [f"--{name.replace('_', '-')}", *_ALIASES.get(name, ())]
        if get_origin(field.annotation) is Literal:
            p.add_argument(*flags, dest=name, choices=get_args(field.annotation), help=help_text)
        elif name == "model_version":
            p.add_argument(*flags, dest=name, metavar="VERSION", help=help_text)
        elif name == "retries":
            p.add_argument(*flags, dest=name, type=_retries, metavar="N|K=V,...",
                           help=f"{help_text}; N alone sets attempts")
        else:
            metavar = "S" if name.endswith("_s") else "N"
            p.add_argument(*flags, dest=name, type=_bounded(field), metavar=metavar, help=help_text)


_ALIASES = {"timeout_s": ("--timeout",)}  # the flag's earlier name


def _shown(default: Any) -> str:
    if isinstance(default, BaseModel):
        return ",".join(f"{k}={v:g}" for k, v in default.model_dump().items())
    return "the backend's" if default is None else str(default)


def _bounded(field: FieldInfo):
    """An argparse type for a numeric option: its type and its range, from the option's definition."""
    kind = int if int in (field.annotation, *get_args(field.annotation)) else float
    low, strict, high = 0, False, None
    for rule in field.metadata:
        if isinstance(rule, annotated_types.Ge):
            low, strict = rule.ge, False
        elif isinstance(rule, annotated_types.Gt):
            low, strict = rule.gt, True
        elif isinstance(rule, annotated_types.Le):
            high = rule.le
    noun = "an integer" if kind is int else "a number"
    what = f"{noun} in {bounds_text(field.metadata)}" if high is not None else \
        f"{noun} {'>' if strict else '>='} {low:g}"
    return _number(kind, low, strict, what, high)


def _retries(text: str) -> dict:
    """``--retries 3`` (attempts) or ``--retries attempts=3,deadline_s=60``; checked by RetriesOptions."""
    if "=" not in text:
        return {"attempts": _positive_int(text)}
    out: dict[str, float] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in RetriesOptions.model_fields:
            raise argparse.ArgumentTypeError(
                f"unknown retries key {key!r}; known: {', '.join(RetriesOptions.model_fields)}"
            )
        kind = int if key == "attempts" else float
        try:
            out[key] = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"retries {key}: expected a number, got {value!r}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Distributed, verified loading of tensor-parallel model weights.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("publish", help="copy a Hugging Face checkpoint directory into a store (chunked)")
    p.add_argument("src_dir", metavar="SRC_DIR", help="checkpoint directory (config.json + *.safetensors)")
    _store_args(p)
    _publish_args(p)
    p.add_argument("--allow-eviction", action="store_true",
                   help="publish to a Redis that may evict keys (maxmemory-policy other than noeviction)")

    p = sub.add_parser("index", help="record a manifest for a checkpoint already at <URL>/<model>/")
    _store_args(p)
    _publish_args(p)

    p = sub.add_parser("inspect", help="show what the store holds for a model (and per-rank bytes with --tp)",
                       description="Give URL --model NAME, or --config-only CONFIG.json to size a model that is "
                                   "not published yet (meta tensors built from its config; needs transformers).")
    _store_args(p, url_optional="--config-only")
    p.add_argument("--tp", type=_tp, metavar="N", help="also show what each of N ranks moves")
    p.add_argument("--ep", type=_tp, metavar="N", help="expert parallelism: what each of N ranks moves "
                   "when it holds its routed experts whole (vLLM's linear placement) and its other tensors as TP "
                   "rank r %% tp (--tp defaults to N; N = tp x data-parallel size)")
    _version_arg(p)
    p.add_argument("--config-only", metavar="CONFIG.json",
                   help="size the model a Hugging Face config.json describes: per-rank bytes and what is refused")
    p.add_argument("--max-tp", type=_tp, metavar="N", help="with --config-only: the max_tp to publish "
                   "with (default 8, or --tp when it does not divide 8)")
    p.add_argument("--rules", metavar="FILE", help="with --config-only: sharding rules YAML over the preset")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = sub.add_parser("verify", help="re-read every chunk and file and check the recorded digests")
    _store_args(p)
    _version_arg(p)
    p.add_argument("--concurrency", type=_concurrency, default=4, metavar="N", help="reads in flight")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("versions", help="list every version of a model: current, complete, size, who holds a "
                       "lease on it, when gc may delete it")
    _store_args(p)
    _gc_args(p)
    p.add_argument("--json", action="store_true", help="print the versions as a JSON list")

    p = sub.add_parser("promote", help="make an existing complete version current again (a rollback)")
    _store_args(p)
    p.add_argument("version", metavar="VERSION", help="the version id (`versions` lists them)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("gc", help="delete versions that are not current, not leased and past their grace period")
    _store_args(p)
    _gc_args(p)
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("pull-files", help="write the model's config/tokenizer files (never weights) into DIR, "
                       "e.g. the directory an engine is started on, and DIR/raydist.json (store URL without its "
                       "password, model name) from which load format raydist finds the store")
    _store_args(p)
    _version_arg(p, " (and raydist.json pins it: an engine started on DIR, or updated from it, loads it)")
    p.add_argument("dest", metavar="DIR", help="directory to write into (created; files are replaced atomically)")
    p.add_argument("--json", action="store_true", help="print the written paths as JSON")

    p = sub.add_parser("load", help="load a model across a Ray cluster (one actor per TP rank) and verify it",
                       description="Give URL --model NAME --tp N, or --config FILE (flags then override it).")
    _store_args(p, url_optional="--config")
    p.add_argument("--config", metavar="FILE", help="deployment config YAML (see configs/)")
    p.add_argument("--tp", type=_tp, metavar="N", help="tensor-parallel size")
    _option_args(p)
    p.add_argument("--rules", metavar="FILE", help="check the store's recorded rules against this rules YAML")
    p.add_argument("--expect-manifest-sha256", metavar="HEX", help="refuse a manifest with another sha256")
    p.add_argument("--report", metavar="FILE", help="write the load report as JSON")
    p.add_argument("--hold", action="store_true", default=None,
                   help="keep the actors alive as named actors (raydist:<model>:<rank>, Ray namespace raydist) for "
                        "other drivers until Ctrl-C or `raydist-loader release`")
    p.add_argument("--ray-address", metavar="ADDR", help="Ray cluster to join ('local' starts a private one)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show progress (default: when stderr is a terminal)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")

    p = sub.add_parser("release", help="end a held load (load --hold) from any driver: kill its actors and remove "
                       "its placement group")
    p.add_argument("--model", required=True, metavar="NAME", help="the held model")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="the cluster (default: RAY_ADDRESS, else the cluster running on this node)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


# ------------------------------------------------------------------------------------------ secrets
def _connector_options(args: argparse.Namespace, out: _Out, base: dict | None = None) -> dict:
    """Options for the connector: ``base`` plus the password from ``--password-env``; warns on inline ones."""
    options = dict(base or {})
    if options.get("password"):
        out.add_secret(str(options["password"]))
    url = getattr(args, "url", None)
    if url:
        from .connectors import check_url

        check_url(url)  # one line for a URL that cannot be parsed or carries credentials in an option
        inline = url_password(url)
        if inline:
            out.add_secret(inline)
            out.err(f"{PROG}: warning: {redact_url(url)} carries an inline password, which shell history, "
                    "`ps` and `ray job list` can show; put it in an environment variable and pass "
                    "--password-env VAR instead")
    var = getattr(args, "password_env", None)
    if var:
        value = os.environ.get(var)
        if value is None:
            raise ConfigError(f"--password-env: environment variable {var} is not set")
        if value == "":
            raise ConfigError(f"--password-env: environment variable {var} is set but empty")
        out.add_secret(value)
        options["password"] = value
    return options


# ------------------------------------------------------------------------------------------ commands
def _cmd_publish(args: argparse.Namespace, out: _Out) -> int:
    from .store.publish import publish

    options = _connector_options(args, out)
    result = publish(args.src_dir, args.url, args.model, max_tp=args.max_tp, rules=args.rules,
                     digests=_digests(args), connector_options=options, max_file_bytes=args.max_file_bytes,
                     allow_eviction=args.allow_eviction)
    _print_publish(result, args, out, "published")
    return EXIT_OK


def _cmd_index(args: argparse.Namespace, out: _Out) -> int:
    from .store.publish import index

    options = _connector_options(args, out)
    result = index(args.url, args.model, max_tp=args.max_tp, rules=args.rules, digests=_digests(args),
                   connector_options=options, max_file_bytes=args.max_file_bytes)
    _print_publish(result, args, out, "indexed")
    return EXIT_OK


def _digests(args: argparse.Namespace) -> tuple[str, ...]:
    return ("xxh3_128", "blake3") if args.blake3 else ("xxh3_128",)


def _print_publish(result, args: argparse.Namespace, out: _Out, verb: str) -> None:
    if args.json:
        out.json(result)
        return
    out.print(f"{verb} {result.model} version {result.version} ({result.layout}) to {result.url}: "
              f"{result.tensors} tensors, {result.chunks} chunks, {result.objects} objects, "
              f"{human_bytes(result.bytes)} in {result.seconds:.2f} s ({result.gbps:.2f} GB/s)")
    out.print(f"  files for pull-files: {', '.join(result.files) or '-'}")
    if result.skipped:
        out.print(f"  skipped {len(result.skipped)} (not read):")
    for s in result.skipped:
        size = "" if s.nbytes is None else f" ({human_bytes(s.nbytes)})"
        out.print(f"    {s.name}{size}: {s.reason}")
    for warning in result.warnings:
        out.err(f"{PROG}: warning: {warning}")


def _cmd_inspect(args: argparse.Namespace, out: _Out) -> int:
    from .store.summary import inspect, render

    if args.config_only:
        if args.url or args.model:
            raise ConfigError("inspect: give URL --model NAME, or --config-only CONFIG.json, not both")
        from .store.sizing import inspect_config

        summary = inspect_config(args.config_only, tp=args.tp, max_tp=args.max_tp, rules=args.rules, ep=args.ep)
    else:
        missing = [flag for flag, value in (("URL", args.url), ("--model", args.model)) if not value]
        if missing or args.max_tp or args.rules:
            raise ConfigError(f"inspect: missing {', '.join(missing)}" if missing else
                              "inspect: --max-tp and --rules go with --config-only (a store records its own)")
        summary = inspect(
            args.url, args.model, tp=args.tp, connector_options=_connector_options(args, out), ep=args.ep,
            model_version=args.model_version,
        )
    if args.json:
        out.json(summary)
    else:
        out.print(render(summary))
    if summary.get("refused"):
        out.err(f"{PROG}: error: {summary['model']} cannot be served as asked: {summary['refused']}")
        return EXIT_ERROR
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace, out: _Out) -> int:
    from .store.verify import verify

    result = verify(args.url, args.model, concurrency=args.concurrency,
                    connector_options=_connector_options(args, out), model_version=args.model_version)
    if args.json:
        out.json(result)
    elif result.ok:
        out.print(f"verified {result.model} version {result.version}: {result.chunks} chunks and "
                  f"{result.files} files, {human_bytes(result.bytes)} in {result.seconds:.2f} s: all digests match")
    else:
        out.print(f"{result.model} version {result.version}: "
                  + describe_failures(result.failures, limit=len(result.failures)))
    if not result.ok:
        out.err(f"{PROG}: error: {len(result.failures)} of {result.chunks + result.files} chunk(s)/file(s) "
                f"failed verification; re-publish (or re-index) {result.model}")
        return EXIT_VERIFY
    return EXIT_OK


def _cmd_gc(args: argparse.Namespace, out: _Out) -> int:
    from .store.gc import gc

    result = gc(args.url, args.model, grace_s=args.grace, keep=args.keep, dry_run=args.dry_run,
                connector_options=_connector_options(args, out))
    if args.json:
        out.json(result)
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    deleted, kept = result.get("deleted", []), result.get("kept", [])
    current = result.get("current")
    out.print(f"{args.model}: current version {current}; {verb} {len(deleted)} version(s), kept {len(kept)}"
              + (f" ({result['objects']} objects)" if "objects" in result and not args.dry_run else ""))
    for prefix in deleted:
        out.print(f"  {verb}: {prefix}")
    for prefix in kept:
        out.print(f"  kept: {prefix} ({result['reasons'][prefix]})")
    return EXIT_OK


def _cmd_versions(args: argparse.Namespace, out: _Out) -> int:
    from .store.gc import versions

    listed = versions(args.url, args.model, grace_s=args.grace, keep=args.keep,
                      connector_options=_connector_options(args, out))
    if args.json:
        out.json(listed)
        return EXIT_OK
    out.print(f"{args.model}: {len(listed)} version(s), newest first")
    for v in listed:
        size = human_bytes(v["bytes"]) if v["bytes"] is not None else "-"
        state = "CURRENT" if v["current"] else "complete" if v["complete"] else "INCOMPLETE"
        gc_when = f"kept: {v['kept']}" if v["kept"] else f"gc may delete it after {_when(v['gc_after'])}"
        out.print(f"  {v['version']}  {state:<10}  {size:>10}  published {_when(v['published_at'])}  {gc_when}")
    return EXIT_OK


def _when(t: float | None) -> str:
    from .store.leases import stamp

    return "-" if t is None else stamp(t)


def _cmd_promote(args: argparse.Namespace, out: _Out) -> int:
    from .store.versions import promote

    result = promote(args.url, args.model, args.version, connector_options=_connector_options(args, out))
    if args.json:
        out.json(result)
    elif result.changed:
        out.print(f"{args.model}: version {result.version} is current (was {result.previous}); engines load it at "
                  "their next start or update")
    else:
        out.print(f"{args.model}: version {result.version} is already current; nothing changed")
    return EXIT_OK


def _cmd_pull_files(args: argparse.Namespace, out: _Out) -> int:
    from .store.files import pull_files
    from .store.locator import LOCATOR_FILE

    written = pull_files(args.url, args.model, args.dest, connector_options=_connector_options(args, out),
                         password_env=args.password_env, model_version=args.model_version)
    if args.json:
        out.json([str(p) for p in written])
    else:
        out.print(f"wrote {len(written)} file(s) of {args.model} to {Path(args.dest).resolve()}: "
                  + ", ".join(p.name for p in written) + f"; and {LOCATOR_FILE} (where the weights are)")
    return EXIT_OK


def _cmd_load(args: argparse.Namespace, out: _Out) -> int:
    kwargs, report_path, hold = _load_settings(args, out)
    if report_path:
        _check_writable(report_path)  # minutes of loading must not end in "cannot write the report"
    from . import api  # imports Ray: only here

    if kwargs["progress"] is None:
        kwargs["progress"] = sys.stderr.isatty() and not args.json
    # hold=True names the actors raydist:<model>:<rank> (a name is given at creation) for an engine to find
    loaded = api.load_across_cluster(kwargs.pop("model"), kwargs.pop("url"), hold=hold, **kwargs)
    try:
        report = loaded.report
        if report_path:
            _write_report(report_path, report.to_dict(), out)
        if args.json:
            out.json(report.to_dict())
        else:
            _print_report(report, out)
            if report_path:
                out.print(f"report written to {report_path}")
        if hold:
            _print_held(loaded, out)
            try:
                elsewhere = loaded.hold()  # returns on Ctrl-C, or when another driver released the actors
            except KeyboardInterrupt:
                elsewhere = False
            why = " (the actors were ended elsewhere: `release`, or a failure)" if elsewhere else ""
            out.err(f"{PROG}: released{why}")
    finally:
        loaded.shutdown()
    return EXIT_OK


def _print_held(loaded: Any, out: _Out) -> None:
    """Where the held actors are and how another driver reaches and releases them (stderr: stdout may be JSON)."""
    names, ns, address = loaded.names, loaded.namespace, loaded.ray_address
    out.err(f"{PROG}: holding {', '.join(names)} in Ray namespace {ns!r} on cluster {address}")
    out.err(f"{PROG}: another driver: ray.init(address={address!r}); "
            f"ray.get_actor({names[0]!r}, namespace={ns!r}).run.remote(fn) or .state_dict.remote()")
    out.err(f"{PROG}: release: Ctrl-C here, or raydist-loader release --model {loaded.model} --ray-address {address}")


def _cmd_release(args: argparse.Namespace, out: _Out) -> int:
    from .driver.held import NAMESPACE, group_name, release

    names = release(args.model, ray_address=args.ray_address)
    group = group_name(args.model)
    if args.json:
        out.json({"model": args.model, "namespace": NAMESPACE, "actors": names, "placement_group": group})
    else:
        out.print(f"released {args.model}: actors {', '.join(names) or '-'} (Ray namespace {NAMESPACE!r}) and "
                  f"placement group {group!r}")
    return EXIT_OK


def _load_settings(args: argparse.Namespace, out: _Out) -> tuple[dict, str | None, bool]:
    """Merge --config and flags -> keyword arguments for load_across_cluster, validated (as the YAML ``load:``
    section) before Ray starts. Flags override the file; what neither sets keeps the option's one default."""
    if args.config:
        if args.url:
            raise ConfigError(
                f"load: give either URL or --config, not both (the store URL is store.url in {args.config}; "
                "flags such as --tp override the file)"
            )
        from .config import load_config, resolve_secret

        cfg = load_config(args.config)
        model, url = args.model or cfg.model, cfg.store.url
        settings = cfg.load.model_dump(exclude_unset=True)
        base_options = resolve_secret(cfg.store)
        report, hold = cfg.report, cfg.hold
    else:
        missing = [flag for flag, value in (("URL", args.url), ("--model", args.model), ("--tp", args.tp))
                   if not value]
        if missing:
            raise ConfigError(
                f"load: missing {', '.join(missing)}: give URL --model NAME --tp N, or --config FILE "
                "(see configs/*.yaml)"
            )
        model, url, base_options, report, hold, settings = args.model, args.url, {}, None, False, {}
    flags = (*LoadSection.model_fields,)
    settings.update({k: getattr(args, k) for k in flags if getattr(args, k, None) is not None})
    section = _validated_section(settings)
    options = _connector_options(args, out, base_options)
    kwargs = {
        "model": model, "url": url, "tp": section.tp, "rules": section.rules, "ray_address": section.ray_address,
        "expect_manifest_sha256": section.expect_manifest_sha256, **section.options().model_dump(),
        "connector_options": options, "progress": args.progress,
    }
    return kwargs, args.report or report, bool(args.hold or hold)


def _validated_section(settings: dict) -> LoadSection:
    """The merged ``load`` settings checked as the YAML section is (one error naming the key)."""
    from pydantic import ValidationError

    from .validation import format_validation_error

    try:
        return LoadSection.model_validate(settings)
    except ValidationError as e:
        raise ConfigError(format_validation_error("load", e, LoadSection)) from None


def _check_writable(path: str) -> None:
    """Refuse a report path that cannot be written, before anything is loaded (a new file is created and removed
    again: the only test that also holds for root and read-only mounts)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"--report {path}: is a directory; give the path of a file to write")
    if not target.parent.is_dir():
        raise ConfigError(f"--report {path}: directory {str(target.parent)!r} does not exist; create it first")
    try:
        if target.exists():
            with open(target, "a", encoding="utf-8"):
                pass
        else:
            with open(target, "x", encoding="utf-8"):
                pass
            target.unlink()
    except OSError as e:
        raise ConfigError(f"--report {path}: cannot be written ({e.strerror or e})") from None


def _write_report(path: str, report: dict, out: _Out) -> None:
    text = out.clean(json.dumps(_jsonable(report), indent=2, default=str))
    try:
        Path(path).expanduser().write_text(text + "\n", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write the report to {path}: {e.strerror or e}") from None


_COLUMNS = (("rank", ">"), ("host", "<"), ("gpu", "<"), ("device", "<"), ("bytes", ">"), ("read", ">"),
            ("seconds", ">"), ("GB/s", ">"), ("digest", "<"))


def _report_columns(report: LoadReport) -> tuple[tuple[str, str], ...]:
    return (("replica", ">"), *_COLUMNS) if report.replicas > 1 else _COLUMNS


def _report_rows(report: LoadReport) -> list[list[str]]:
    rows = []
    for r in report.ranks:
        if r.failures:
            state = f"FAILED ({len(r.failures)})"
        elif not r.verify:
            state = "not checked"
        else:
            state = "ok" if r.digest == r.expected_digest else "MISMATCH"
        rows.append([
            *([str(r.replica)] if report.replicas > 1 else []),
            str(r.rank), r.host, ",".join(r.gpu_ids) or "-", r.device, human_bytes(r.bytes),
            human_bytes(r.bytes_read), f"{r.seconds:.2f}", f"{r.gbps:.2f}", state,
        ])
    return rows


def _print_report(report: LoadReport, out: _Out) -> None:
    rows, columns = _report_rows(report), _report_columns(report)
    total = report.total
    replicas = f" x {report.replicas} replicas" if report.replicas > 1 else ""
    head = (f"{report.model} version {report.version} tp={report.tp}{replicas} "
            f"from {report.store}: " + ("verified" if report.verified else "NOT verified"))
    shared = (f"; the store sent {human_bytes(total.bytes_read)}, the replicas shared "
              f"{human_bytes(total.bytes_from_peers)}" if report.replicas > 1 else "")
    foot = (f"total {human_bytes(total.bytes)} in {total.seconds:.2f} s "
            f"({total.gbps:.2f} GB/s){shared}; ready in {total.time_to_ready_s:.2f} s")
    if report.phases:
        foot += f"\ncall to verified {total.call_to_verified_s:.2f} s: {report.phase_line()}"
    if _use_rich():
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=escape(out.clean(head)), caption=escape(out.clean(foot)))
        for name, align in columns:
            table.add_column(name, justify="right" if align == ">" else "left")
        for row in rows:
            table.add_row(*(escape(out.clean(c)) for c in row))
        Console().print(table)
        return
    widths = [max([len(name), *(len(row[i]) for row in rows)]) for i, (name, _) in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, (_, a), w in zip(cells, columns, widths, strict=True)).rstrip()

    out.print(head)
    out.print(line([name for name, _ in columns]))
    for row in rows:
        out.print(line(row))
    out.print(foot)


def print_report(report: LoadReport) -> None:
    """Print a load report as the per-rank summary table ``raydist-loader load`` shows (secrets redacted)."""
    _print_report(report, _Out())


def _use_rich() -> bool:
    if not sys.stdout.isatty():
        return False
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


_COMMANDS = {"publish": _cmd_publish, "index": _cmd_index, "inspect": _cmd_inspect, "verify": _cmd_verify,
             "gc": _cmd_gc, "versions": _cmd_versions, "promote": _cmd_promote, "load": _cmd_load,
             "release": _cmd_release, "pull-files": _cmd_pull_files}


# ------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the exit status (``python -m raydist_loader`` and the script exit with it)."""
    out = _Out()
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv):  # know inline URL passwords before anything can echo them
        if "://" in arg:
            out.add_secret(url_password(arg))
        if arg == "--password-env" and i + 1 < len(argv):
            out.add_secret(os.environ.get(argv[i + 1]))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:  # one line, as every other user error; --help shows the usage
        out.err(f"{e.parser.prog}: error: {e} (see `{e.parser.prog} --help`)")
        return EXIT_ERROR
    except SystemExit as e:  # --help / --version
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_ERROR

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(out))
    pkg_logger = logging.getLogger("raydist_loader")
    old_level = pkg_logger.level
    pkg_logger.addHandler(handler)
    level = logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
    pkg_logger.setLevel(level)
    try:
        return _COMMANDS[args.command](args, out)
    except VerificationError as e:
        out.err(f"{PROG}: error: {e}")
        return EXIT_VERIFY
    except RaydistError as e:
        out.err(f"{PROG}: error: {e}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        out.err(f"{PROG}: interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug: show where, redacted
        out.err(traceback.format_exc().rstrip())
        out.err(f"{PROG}: internal error: {type(e).__name__}: {e}")
        return EXIT_INTERNAL
    finally:
        pkg_logger.removeHandler(handler)
        pkg_logger.setLevel(old_level)
