"""``capdiag`` command line: check, overfit, list.

Commands are plain functions over the library; only this module chooses exit codes:
0 nothing failed, 1 a check failed, 2 bad usage or a model that cannot be loaded/called,
130 interrupted by Ctrl-C (SIGINT), 143 stopped by SIGTERM (both print the partial result).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _resolve_target(target: Optional[str]) -> str:
    from .errors import UsageError

    if target:
        return target
    if Path("model.py").is_file():
        return "model.py"
    raise UsageError(
        "no model file given and ./model.py does not exist; run `capdiag check path/to/model.py` "
        "(a file defining build_model())"
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .options import MODEL, add_cli

    p.add_argument("model", nargs="?", help="model file (default: ./model.py) or module name")
    add_cli(p, MODEL)
    p.add_argument("--out", default=None, help="also draw the findings' plots as PNGs into this folder "
                                               "(drawn after the verdicts; default: no plots)")
    p.add_argument("--json", metavar="PATH", help="also write findings as JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capdiag", description="Find wiring bugs in image-captioning models.")
    parser.add_argument("--version", action="version", version=f"capdiag {__import__('capdiag').__version__}")
    from .options import SELECT, add_cli

    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("check", help="run the sanity checks on a captioner file")
    _add_model_args(p)
    add_cli(p, SELECT)
    p.add_argument("--report", metavar="DIR", help="also write an HTML report into DIR")
    p = sub.add_parser("overfit", help="single-batch overfit test")
    _add_model_args(p)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: short sweep)")
    p.add_argument("--batch-size", type=int, default=None, help="captions to memorize (default 16, cut to 8 when a "
                   "model is too slow for --steps in the time budget; given, it is used as given)")
    p = sub.add_parser("list", help="list every check and the bug it catches")
    p.add_argument("--markdown", action="store_true", help="as the README's table")
    return parser


def checks_markdown() -> str:
    from .registry import list_checks

    rows = ["| check | run | catches |", "|---|---|---|"]
    rows += [f"| `{c.name}` | {'quick' if c.cheap else 'full'} | {c.catches} |" for c in list_checks()]
    return "\n".join(rows)


def cmd_list(args) -> int:
    from .registry import list_checks

    if args.markdown:
        print(checks_markdown())
        return EXIT_OK
    for c in list_checks():
        kind = "quick" if c.cheap else "full "
        print(f"{c.name:<24} {kind}  {c.catches}")
    return EXIT_OK


def _subject(args, batch_size: int = 8):
    from .options import subject_from

    return subject_from(_resolve_target(args.model), lambda name: getattr(args, name, None), batch_size)


def _header(command: str, mf, subject, args) -> dict:
    """Print what is checked, where, in which precision, with which weights and data; returns those."""
    from .options import context
    from .report.console import print_header

    ctx = context(subject)
    loaded = f", weights {ctx['weights']}" if ctx["weights"] else ""
    print_header(f"capdiag {command} {mf.path} on {ctx['device']} in {ctx['precision']} (seed {args.seed}){loaded}",
                 subject.assumptions, data=ctx["data"],
                 change=_how_to_change(subject))
    return ctx


def _how_to_change(subject) -> str:
    return "--prompt, --adapter, collate() in a model file" if subject.kind == "prompted" else \
        "set CAPDIAG hints in the model file"


def _with_context(report, subject, ctx: dict):
    report.assumptions = list(subject.assumptions)
    report.how_to_change = _how_to_change(subject)
    report.device, report.precision, report.weights, report.data = ctx["device"], ctx["precision"], ctx["weights"], ctx["data"]
    return report


def _draw(report, args) -> None:
    """Plots only when asked for (--out, --report), after every verdict is printed."""
    out = args.out or (str(Path(args.report) / "plots") if getattr(args, "report", None) else None)
    if out is None:
        return
    from .viz.findings import render

    report.findings[:] = [render(f, Path(out)) for f in report.findings]
    if args.out:
        drawn = Path(args.out).is_dir() and any(Path(args.out).iterdir())
        print(f"plots written to {args.out}" if drawn else f"no plots for these findings (nothing written to {args.out})")


def _finish(report, args, started: float) -> int:
    from .report.console import print_summary

    print_summary(report, time.perf_counter() - started)
    _draw(report, args)
    if args.json:
        from .report.jsonfile import write_json

        print(f"findings written to {write_json(report, args.json)}")
    if getattr(args, "report", None):
        from .report.html import write_html

        path = write_html(report, Path(args.report))
        print(f"HTML report written to {path}")
    return EXIT_FAILED if report.failed else EXIT_OK


def cmd_check(args) -> int:
    from .options import selected
    from .registry import get_check
    from .report.console import format_finding, use_color
    from .runner import run_checks

    started = time.perf_counter()
    selected(lambda name: getattr(args, name, None))  # bad names fail before the model is built
    mf, subject = _subject(args)
    names = selected(lambda name: getattr(args, name, None), subject.kind)
    ctx = _header("check", mf, subject, args)
    color = use_color(sys.stdout)
    report = run_checks(subject, [get_check(n) for n in names], on_finding=lambda f: print(format_finding(f, color), flush=True))
    _with_context(report, subject, ctx)
    if args.debug:
        for f in report.findings:
            if "traceback" in f.artifacts:
                print(f.artifacts["traceback"], file=sys.stderr)
    return _finish(report, args, started)


def cmd_overfit(args) -> int:
    from .finding import Report
    from .registry import get_check
    from .report.console import format_finding, use_color
    from .runner import run_check

    from .measure.training import RECIPE

    started = time.perf_counter()
    if args.steps < 1:
        from .errors import UsageError

        raise UsageError(f"--steps must be at least 1 (got {args.steps})")
    mf, subject = _subject(args, batch_size=args.batch_size or RECIPE.batch_size)
    if subject.kind != "captioner":
        from .errors import UsageError

        raise UsageError(f"capdiag overfit trains (images, captions) -> logits captioners; {mf.path} is a "
                         f"{subject.family.name}: run `capdiag check {mf.path}` (its checks need no training)")
    ctx = _header("overfit", mf, subject, args)
    subject.progress = True
    # An explicit --steps is the user's budget: no time limit cuts it.
    subject.recipe = dataclasses.replace(RECIPE, steps=args.steps, lr=args.lr or RECIPE.lr, batch_size=args.batch_size or RECIPE.batch_size,
                                         min_batch=None if args.batch_size else RECIPE.min_batch,
                                         start_lr=None if args.lr else RECIPE.start_lr,
                                         time_budget=None)
    check = get_check("overfit")
    finding = run_check(subject, check)
    print(format_finding(finding, use_color(sys.stdout)))
    report = _with_context(Report([finding], model_name=subject.name), subject, ctx)
    code = _finish(report, args, started)
    if finding.metrics.get("interrupted"):
        print("capdiag: interrupted; the result above is partial", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


COMMANDS = {"check": cmd_check, "overfit": cmd_overfit, "list": cmd_list}


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    from .errors import CapdiagError, CheckpointMismatch
    from .interrupts import interruptible

    from .threads import applied

    with applied(args.command in ("check", "overfit")), interruptible() as signals:
        try:
            code = COMMANDS[args.command](args)
        except CapdiagError as e:
            if getattr(args, "debug", False):
                traceback.print_exc()
            print(f"capdiag: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except CheckpointMismatch as e:  # a finding about the model and its checkpoint, not bad input
            print(f"FAIL  {e}", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            print("\ncapdiag: interrupted", file=sys.stderr)
            return signals.exit_code()
    # A command that caught the signal itself (overfit prints its partial result) says so with
    # EXIT_INTERRUPTED; SIGTERM turns that into 143.
    return signals.exit_code() if code == EXIT_INTERRUPTED else code


def entry() -> None:
    """The ``capdiag`` console script and ``python -m capdiag``: ``main()``, then a quick exit.

    Finalizing the interpreter after torch and transformers were imported takes about 1.2 s on a 2-core
    CPU (every module's objects freed one by one), a quarter of a quick check of a vision-language
    folder. Once the streams are flushed and the ``atexit`` handlers have run (logging's flush among
    them), nothing of that teardown is observable, so the process ends there: unless a non-daemon thread
    is still running, which a normal exit would wait for. ``main()`` called in-process (tests, scripts)
    returns as before."""
    import atexit
    import os
    import threading

    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if any(t.is_alive() and not t.daemon and t is not threading.main_thread() for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
