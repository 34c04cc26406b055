"""``launcherctl``: the launcher's command line, on :mod:`launcher.client.api_client`.

    launcherctl create "--model facebook/opt-125m" --id opt --wait   # prints http://HOST:PORT when ready
    launcherctl list
    launcherctl logs opt -f
    launcherctl delete opt            # or: launcherctl delete --all
    launcherctl watch                 # one line per event, until Ctrl-C

Options for vLLM are one quoted string, or the words after ``--``:
``launcherctl create --id opt -- --model facebook/opt-125m --port 8000``.

Global options (before or after the command): ``--url`` (default ``$LAUNCHER_URL`` or
http://localhost:8001), ``--token`` (default ``$LAUNCHER_API_TOKEN``), ``--json`` (raw JSON
answers, one document per line).

Exit codes:
  0    success
  1    API error (a 4xx/5xx answer other than those below)
  2    usage error (bad command line)
  3    not found (404)
  4    conflict (409: the id exists, or the port is taken)
  5    the instance stopped or failed while waiting for it (create --wait)
  6    cannot connect to the launcher
  7    timed out waiting (create --wait --timeout)
  130  interrupted (Ctrl-C)
"""

# Why this module is long: each subcommand's arguments and its output (tables, lines, exit codes)
# sit together, in the order ``launcherctl --help`` lists them, so that a command reads in one place.
# (A comment, not the docstring: the docstring is launcherctl's --help.)

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO
from urllib.parse import urlsplit

from launcher.client.api_client import (
    DEFAULT_URL,
    ConflictError,
    InstanceState,
    InstanceStoppedError,
    LauncherAPIError,
    LauncherClient,
    LauncherConnectionError,
    NotFoundError,
    UnauthorizedError,
    WaitTimeoutError,
)

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_STOPPED = 5
EXIT_UNREACHABLE = 6
EXIT_TIMEOUT = 7
EXIT_INTERRUPTED = 130

PROG = "launcherctl"
Handler = Callable[[LauncherClient, argparse.Namespace], int]


# ---------------------------------------------------------------------------------- output


def _print_json(document: Any) -> None:
    print(json.dumps(document), flush=True)


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def format_table(headers: Sequence[str] | None, rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart, like kubectl (no header line if ``headers`` is None)."""
    cells = [[str(cell) for cell in row] for row in ([headers] if headers else []) + [list(row) for row in rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(cells[0]))] if cells else []
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in cells)


def format_age(seconds: float) -> str:
    """``45s``, ``12m``, ``5h``, ``3d``: coarse, as an age column wants."""
    seconds = max(0.0, seconds)
    for limit, unit, size in ((120, "s", 1), (7200, "m", 60), (172800, "h", 3600)):
        if seconds < limit:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds // 86400)}d"


def _status(state: InstanceState | dict[str, Any]) -> str:
    if state.get("status") == "stopped":
        return f"stopped (exit {state.get('exit_code')})"
    return str(state.get("status", "?"))


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def instance_url(base_url: str, port: int, options: str = "") -> str:
    """Where the instance serves: its ``--host`` if specific, else the launcher's host."""
    host = _option_value(options, "--host")
    if not host or host in ("0.0.0.0", "::", "[::]"):
        host = urlsplit(base_url).hostname or "localhost"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"http://{host}:{port}"


def _option_value(options: str, flag: str) -> str | None:
    try:
        words = shlex.split(options)
    except ValueError:
        return None
    for index, word in enumerate(words):
        if word == flag and index + 1 < len(words):
            return words[index + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


class Progress:
    """Waiting display on stderr: a spinner line redrawn in place on a TTY, sparse plain lines otherwise."""

    FRAMES = "|/-\\"
    PLAIN_EVERY = 10.0  # seconds between "still waiting" lines when not a TTY

    def __init__(self, instance_id: str, stream: TextIO) -> None:
        self.instance_id = instance_id
        self.stream = stream
        self.tty = stream.isatty()
        self._frame = 0
        self._next_plain = self.PLAIN_EVERY
        if not self.tty:
            self._line(f"waiting for {instance_id} to be ready")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def update(self, state: InstanceState, elapsed: float) -> None:
        """Show that we are still waiting, ``elapsed`` seconds in."""
        if self.tty:
            frame = self.FRAMES[self._frame % len(self.FRAMES)]
            self._frame += 1
            self.stream.write(f"\r\033[K{frame} waiting for {self.instance_id} to be ready ({elapsed:.1f}s)")
            self.stream.flush()
        elif elapsed >= self._next_plain:
            self._line(f"still waiting for {self.instance_id} ({elapsed:.0f}s)")
            self._next_plain += self.PLAIN_EVERY

    def finish(self, message: str) -> None:
        """Replace the spinner (if any) with a final line."""
        if self.tty:
            self.stream.write("\r\033[K")
        self._line(message)


# ---------------------------------------------------------------------------------- commands


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _options_text(words: Sequence[str]) -> str:
    # One word is the whole options string; several are argv words (after --), quoted back.
    return words[0] if len(words) == 1 else shlex.join(words)


def cmd_create(client: LauncherClient, args: argparse.Namespace) -> int:
    """Create an instance; with --wait, wait until it serves and print its URL."""
    options = _options_text(args.options)
    answer = client.create(
        options,
        instance_id=args.id,
        env_vars=dict(args.env) if args.env else None,
        gpu_uuids=args.gpu or None,
        annotations=dict(args.annotation) if args.annotation else None,
    )
    instance_id = str(answer["instance_id"])
    if not args.wait:
        if args.json:
            _print_json(answer)
        else:
            print(f"created {instance_id} (pid {answer['pid']}, port {answer['port']}, model {answer['model']})")
        return EXIT_OK
    return _wait(client, args, instance_id, options)


def _wait(client: LauncherClient, args: argparse.Namespace, instance_id: str, options: str) -> int:
    progress = Progress(instance_id, sys.stderr)
    try:
        state = client.wait_ready(
            instance_id, timeout=args.timeout, poll_interval=0.2 if progress.tty else 0.5, on_poll=progress.update
        )
    except InstanceStoppedError as exc:
        progress.finish(f"{PROG}: error: {exc}")
        _show_log_tail(client, instance_id)
        return EXIT_STOPPED
    except WaitTimeoutError as exc:
        progress.finish(f"{PROG}: error: {exc}; it is still starting (delete it with: {PROG} delete {instance_id})")
        return EXIT_TIMEOUT
    progress.finish(f"{instance_id} is ready after {state.get('start_seconds') or 0:.2f}s")
    if args.json:
        _print_json(state)
    else:
        print(instance_url(client.base_url, int(state["port"]), options), flush=True)
    return EXIT_OK


def _show_log_tail(client: LauncherClient, instance_id: str, lines: int = 20) -> None:
    """The end of a failed instance's log on stderr: usually why it failed."""
    try:
        size = client.log_size(instance_id)
        text = client.log(instance_id, max(0, size - 8192)).decode(errors="replace")
    except LauncherAPIError:
        return  # deleted meanwhile: nothing to show
    tail = text.splitlines()[-lines:]
    if tail:
        print(f"--- last lines of {instance_id}'s log ---", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr, flush=True)


def cmd_list(client: LauncherClient, args: argparse.Namespace) -> int:
    """All instances as a table."""
    answer = client.list(detail=True)
    if args.json:
        _print_json(answer)
        return EXIT_OK
    instances = answer.get("instances", [])
    if not instances:
        print("no instances", file=sys.stderr)
        return EXIT_OK
    now = time.time()
    rows = [
        [
            state.get("instance_id"),
            _status(state),
            ("yes" if state.get("ready") else "no") if state.get("status") == "running" else "-",  # a stopped one is not
            state.get("port"),
            state.get("pid"),
            state.get("model"),
            format_bytes((state.get("memory") or {}).get("host_bytes")) if state.get("status") == "running" else "-",
            format_age(now - float(state.get("created_at") or now)),
        ]
        for state in instances
    ]
    print(format_table(["ID", "STATUS", "READY", "PORT", "PID", "MODEL", "MEMORY", "AGE"], rows))
    return EXIT_OK


def format_bytes(size: object) -> str:
    """``812 MiB``, ``2.05 GiB``; ``-`` when not known."""
    if not isinstance(size, int | float) or isinstance(size, bool):
        return "-"
    if size >= 2**30:
        return f"{size / 2**30:.2f} GiB"
    return f"{size / 2**20:.0f} MiB"


def cmd_get(client: LauncherClient, args: argparse.Namespace) -> int:
    """One instance's state, one field per line."""
    state = client.get(args.id)
    if args.json:
        _print_json(state)
        return EXIT_OK
    rows = []
    for key, value in state.items():
        if key.endswith("_at") and isinstance(value, (int, float)):
            value = f"{_when(value)} ({format_age(time.time() - value)} ago)"
        elif isinstance(value, (dict, list, bool)) or value is None:
            value = json.dumps(value)  # true/false/null, as the API says them
        rows.append([f"{key}:", value])
    if state.get("port") and state.get("status") == "running":
        rows.append(["url:", instance_url(client.base_url, int(state["port"]), str(state.get("options", "")))])
    print(format_table(None, rows))
    return EXIT_OK


def cmd_logs(client: LauncherClient, args: argparse.Namespace) -> int:
    """The instance's log; with -f, follow it until the instance stops."""
    chunks = client.follow_log(args.id) if args.follow else client.iter_log(args.id)
    out = sys.stdout.buffer
    try:
        for chunk in chunks:
            out.write(chunk)
            out.flush()
    except NotFoundError as exc:
        try:
            client.model(args.id)
        except LauncherAPIError:
            raise exc from None
        raise NotFoundError(404, f"{exc.detail}; {args.id!r} is a model: launcherctl models logs {args.id}") from None
    return EXIT_OK


def cmd_delete(client: LauncherClient, args: argparse.Namespace) -> int:
    """Delete one instance, or all of them."""
    if args.all == (args.id is not None):
        args.subparser.error("give an instance ID or --all (not both)")
    if args.all:
        answer = client.delete_all()
        if args.json:
            _print_json(answer)
        else:
            stopped = answer.get("stopped_instances", [])
            ids = ", ".join(str(item.get("instance_id")) for item in stopped)
            print(f"deleted {len(stopped)} instance(s){': ' + ids if ids else ''}")
        return EXIT_OK
    answer = client.delete(args.id)
    if args.json:
        _print_json(answer)
    else:
        print(f"deleted {answer.get('instance_id', args.id)}")
    return EXIT_OK


def format_event(event: dict[str, Any]) -> str:
    """One human line for a watch event."""
    state = event.get("object", {})
    if event.get("type") == "ERROR":
        return f"ERROR {state.get('detail', state)}"
    happened = event.get("time")  # a replayed event (--since) shows when it happened, not when printed
    stamp = time.localtime(happened) if isinstance(happened, (int, float)) else time.localtime()
    return (
        f"{time.strftime('%H:%M:%S', stamp)} {state.get('revision', '-'):>5} {event.get('type', '?'):<8} "
        f"{state.get('instance_id')}  {_status(state)}{', ready' if state.get('ready') else ''}  "
        f"port={state.get('port')} pid={state.get('pid')}"
    )


def cmd_watch(client: LauncherClient, args: argparse.Namespace) -> int:
    """Print events until the launcher ends the stream (or Ctrl-C)."""
    with client.watch(since=args.since) as events:
        for event in events:
            if args.json:
                _print_json(event)
            else:
                print(format_event(dict(event)), flush=True)
            if event.get("type") == "ERROR":
                # The launcher dropped this watcher (it fell behind): the stream ends here.
                _error(f"watch ended: {event['object'].get('detail')}")
                return EXIT_API_ERROR
    return EXIT_OK


def cmd_gpus(client: LauncherClient, args: argparse.Namespace) -> int:
    """The node's GPUs and the instances using them."""
    answer = client.gpus()
    if args.json:
        _print_json(answer)
        return EXIT_OK
    gpus = answer.get("gpus", [])
    if not gpus:
        print("no GPUs", file=sys.stderr)
        return EXIT_OK
    rows = [
        [
            gpu.get("index"),
            gpu.get("uuid"),
            gpu.get("name"),
            "-" if gpu.get("memory_mib") is None else f"{gpu['memory_mib']} MiB",
            ",".join(gpu.get("instances", [])) or "-",
        ]
        for gpu in gpus
    ]
    print(format_table(["INDEX", "UUID", "NAME", "MEMORY", "INSTANCES"], rows))
    if answer.get("mock"):
        print("(mock GPUs: LAUNCHER_MOCK_GPUS is set)", file=sys.stderr)
    return EXIT_OK


def cmd_models(client: LauncherClient, args: argparse.Namespace) -> int:
    """The front door's models: list (default), add, remove, start, stop, warm."""
    action = args.action or "list"
    if action == "list":
        answer = client.models()
        if args.json:
            _print_json(answer)
            return EXIT_OK
        if not answer.get("models"):
            print("no models (add one with: launcherctl models add NAME OPTIONS)", file=sys.stderr)
            return EXIT_OK
        now = time.time()
        rows = [
            [
                model.get("name"),
                model.get("state"),
                _compiled_text(model.get("compiled")),
                model.get("instance_id") or "-",
                model.get("in_flight"),
                "-" if model.get("last_used") is None else format_age(now - float(model["last_used"])) + " ago",
                f"{model.get('idle_timeout'):g}s" if model.get("idle_timeout") else "never",
                format_bytes((model.get("memory_estimate") or {}).get("host_bytes")),
                ",".join(model.get("aliases") or []) or "-",
            ]
            for model in answer["models"]
        ]
        print(
            format_table(
                ["NAME", "STATE", "COMPILED", "INSTANCE", "IN-FLIGHT", "LAST USED", "IDLE STOP", "MEMORY", "ALIASES"],
                rows,
            )
        )
        host = (answer.get("memory") or {}).get("host") or {}
        if host.get("budget_bytes"):
            print(f"host memory: {format_bytes(host.get('used_bytes'))} of {format_bytes(host['budget_bytes'])} "
                  "(--memory-budget) held by running instances")  # fmt: skip
        if answer.get("file_error"):
            print(f"warning: the models file was not reloaded: {answer['file_error']}", file=sys.stderr)
        return EXIT_OK
    if action == "reload":
        answer = client.reload_models()
        if args.json:
            _print_json(answer)
        else:
            changes = [f"{what} {', '.join(answer[what])}" for what in ("added", "removed", "changed") if answer[what]]
            print(f"{answer['models_file']}: {'; '.join(changes) or 'nothing changed'}")
        return EXIT_OK
    if not args.name:
        args.subparser.error(f"models {action} needs a model NAME")
    if action == "add":
        if not args.options:
            args.subparser.error("models add needs OPTIONS (vLLM flags)")
        answer = client.put_model(
            args.name,
            _options_text(args.options),
            aliases=args.alias or (),
            env_vars=dict(args.env) if args.env else None,
            gpu_uuids=args.gpu,
            idle_timeout=args.idle_timeout,
            preload=args.preload,
            share_gpu=args.share_gpu,
        )
    elif action == "remove":
        answer = client.delete_model(args.name)
    elif action == "start":
        answer = client.start_model(args.name)
    elif action == "logs":
        sys.stdout.buffer.write(client.model_log(args.name))
        sys.stdout.buffer.flush()
        return EXIT_OK
    elif action == "warm":
        answer = client.warm_model(args.name)
        if not args.json:
            print(f"{args.name}: compiled {_compiled_text(answer.get('compiled'))}")
            return EXIT_OK
    else:
        answer = client.stop_model(args.name)
    if args.json:
        _print_json(answer)
    else:
        print(f"{args.name}: {answer.get('state', answer.get('status'))}")
    return EXIT_OK


def _compiled_text(compiled: object) -> str:
    return "yes" if compiled is True else "no" if compiled is False else str(compiled)


def cmd_health(client: LauncherClient, args: argparse.Namespace) -> int:
    """Exit 0 if the launcher can create instances now, 1 (503) otherwise."""
    answer = client.health()
    if args.json:
        _print_json(answer)
    else:
        print(answer.get("status", "OK"))
    return EXIT_OK


# ---------------------------------------------------------------------------------- parser


def _global_options() -> argparse.ArgumentParser:
    # SUPPRESS: a subcommand's copy of an option does not overwrite one given before the command.
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("global options")
    group.add_argument(
        "--url", default=argparse.SUPPRESS, help=f"launcher URL (default: $LAUNCHER_URL or {DEFAULT_URL})"
    )
    group.add_argument("--token", default=argparse.SUPPRESS, help="API token (default: $LAUNCHER_API_TOKEN)")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print raw JSON answers")
    return parser


def _epilog() -> str:
    return "exit codes:\n" + (__doc__ or "").split("Exit codes:\n", 1)[1]


def build_parser() -> argparse.ArgumentParser:
    """The ``launcherctl`` argument parser."""
    common = _global_options()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage vLLM instances of a launcher.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str, aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[common], aliases=list(aliases))
        sub.set_defaults(handler=handler, subparser=sub)
        return sub

    create = command("create", cmd_create, "create an instance")
    create.add_argument(
        "options", nargs="+", metavar="OPTIONS", help="vLLM options, as words (--model M --max-model-len 256) or one "
        "quoted string"
    )
    create.add_argument("--id", help="instance id (default: a UUID chosen by the launcher)")
    create.add_argument(
        "--env", action="append", type=_key_value, metavar="K=V", help="environment variable (repeatable)"
    )
    create.add_argument("--gpu", action="append", metavar="UUID", help="GPU UUID (repeatable)")
    create.add_argument("--annotation", action="append", type=_key_value, metavar="K=V", help="label (repeatable)")
    create.add_argument("--wait", action="store_true", help="wait until the instance serves, then print its URL")
    create.add_argument("--timeout", type=float, default=600.0, metavar="S", help="seconds --wait waits (default 600)")

    command("list", cmd_list, "list instances", aliases=["ls"])
    command("get", cmd_get, "show one instance").add_argument("id", metavar="ID")

    logs = command("logs", cmd_logs, "print an instance's log")
    logs.add_argument("id", metavar="ID")
    logs.add_argument("-f", "--follow", action="store_true", help="follow the log until the instance stops")

    delete = command("delete", cmd_delete, "delete an instance (or --all)", aliases=["rm"])
    delete.add_argument("id", nargs="?", metavar="ID")
    delete.add_argument("--all", action="store_true", help="delete every instance")

    watch = command("watch", cmd_watch, "print instance events as they happen")
    watch.add_argument("--since", type=int, metavar="N", help="replay events after revision N")

    command("gpus", cmd_gpus, "list the node's GPUs")

    models = command("models", cmd_models, "the front door's models: list, add, remove, start, stop, warm, logs, reload")
    models.add_argument(
        "action", nargs="?", choices=["list", "add", "remove", "start", "stop", "warm", "logs", "reload"],
        help="default: list; logs: its instance's log, else its last failed start's; reload: read the models file again"
    )
    models.add_argument("name", nargs="?", metavar="NAME", help='the name clients put in "model"')
    models.add_argument("options", nargs="*", metavar="OPTIONS", help="for add: vLLM flags (no --port needed)")
    models.add_argument("--alias", action="append", metavar="NAME", help="for add: another name (repeatable)")
    models.add_argument("--env", action="append", type=_key_value, metavar="K=V", help="for add: environment")
    models.add_argument("--gpu", action="append", metavar="UUID", help="for add: GPU UUID (repeatable)")
    models.add_argument("--idle-timeout", type=float, metavar="S", help="for add: seconds idle before it stops")
    models.add_argument("--preload", action="store_true", help="for add: start it when the launcher starts")
    models.add_argument("--share-gpu", action="store_true", help="for add: may share its GPU")
    command("health", cmd_health, "check that the launcher can create instances")
    return parser


def _run(args: argparse.Namespace) -> int:
    url = getattr(args, "url", None) or os.environ.get("LAUNCHER_URL") or DEFAULT_URL
    token = getattr(args, "token", None) or os.environ.get("LAUNCHER_API_TOKEN") or None
    args.json = getattr(args, "json", False)
    handler: Handler = args.handler
    with LauncherClient(url, token=token) as client:
        return handler(client, args)


def _vllm_words_last(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``create`` and ``models add NAME`` take vLLM's flags as they are (``create --model M
    --max-model-len 256``): every word after the command that is not one of launcherctl's own
    options goes, in order, after a ``--``, as if it had been written so."""
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for index, word in enumerate(argv):
        if word == "create" or (word == "models" and argv[index + 1 : index + 2] == ["add"]):
            break
    else:
        return argv
    sub = commands.choices[word]
    kept, positional, vllm = argv[: index + 1], argv[index + 1 : index + 2] if word == "models" else [], []
    name_pending = word == "models"  # models add's NAME is launcherctl's own
    words = iter(argv[index + 1 + len(positional) :])
    for token in words:
        if token == "--":
            vllm += list(words)
            break
        action = sub._option_string_actions.get(token.split("=", 1)[0])
        if action is not None:
            kept.append(token)
            if action.nargs != 0 and "=" not in token:
                kept += [next(words, "")]  # its value
        elif name_pending and not token.startswith("-"):
            positional.append(token)
            name_pending = False
        else:
            vllm.append(token)
    # Own options first, then the positionals in one run (argparse matches them together), then vLLM's.
    return kept + positional + (["--", *vllm] if vllm else [])


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``launcherctl``; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(_vllm_words_last(parser, list(sys.argv[1:] if argv is None else argv)))
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return _run(args)
    except NotFoundError as exc:
        _error(exc.detail)
        return EXIT_NOT_FOUND
    except ConflictError as exc:
        _error(exc.detail)
        return EXIT_CONFLICT
    except UnauthorizedError as exc:
        _error(f"{exc.detail} (HTTP 401): pass --token or set LAUNCHER_API_TOKEN")
        return EXIT_API_ERROR
    except LauncherAPIError as exc:
        _error(f"{exc.detail} (HTTP {exc.status_code})")
        return EXIT_API_ERROR
    except LauncherConnectionError as exc:
        _error(str(exc))
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`launcherctl logs x | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
