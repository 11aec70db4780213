"""
The `imaged-client` command.

    imaged-client upload FILE URL
    imaged-client download URL FILE
    imaged-client checksum URL [--compare FILE]
    imaged-client info URL

Results go to stdout (one JSON object per line with --json), progress and
messages to stderr (progress goes to stdout as JSON lines with --json).
Expected failures print one line and exit with a distinct status (see
EXIT_STATUS); only a bug shows a traceback.
"""

import argparse
import contextlib
import faulthandler
import json
import logging
import re
import signal
import sys

from .. import __version__
from .. import blkhash
from . import api
from . import errors
from . import formats
from . import http
from . import progress as progress_mod
from .progress import format_size

PROG = "imaged-client"

EXIT_STATUS = f"""\
exit status:
  {errors.EXIT_OK}    success
  {errors.EXIT_ERROR}    other error (local file, TLS verification, server error)
  {errors.EXIT_USAGE}    bad command line
  {errors.EXIT_FORBIDDEN}    forbidden (HTTP 403): unknown, expired or canceled
       session, or a read-only session for upload
  {errors.EXIT_OUT_OF_RANGE}    out of range (HTTP 416), or the file does not fit in the image
  {errors.EXIT_CONNECTION}    cannot connect, connection lost, or timed out
  {errors.EXIT_VERIFY}    checksum mismatch (--verify, checksum --compare)
  {errors.EXIT_INTERRUPTED}  interrupted (Ctrl-C); the transfer is incomplete
"""

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)(i?b)?\s*$", re.IGNORECASE)


def _size(text):
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size: {text!r} (e.g. 8M, 1048576)")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
    return int(m.group(1)) * scale


def _int_at_least(minimum, message):
    """An argparse type: an integer >= minimum; `message` names the bound."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{message}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "must be at least 1")
_non_negative_int = _int_at_least(0, "must not be negative")


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection and output options")
    g.add_argument("--cafile", metavar="FILE",
                   help="CA certificate to verify the server with (default: system CAs)")
    g.add_argument("--insecure", action="store_true",
                   help="do not verify the server certificate (prints a warning)")
    g.add_argument("--timeout", type=_seconds, default=api.DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"give up when the server does not answer for this long "
                        f"(default {api.DEFAULT_TIMEOUT:g})")
    g.add_argument("--retries", type=_non_negative_int, default=api.DEFAULT_RETRIES,
                   metavar="N",
                   help="retry a request this many times after a reset connection, "
                        f"a timeout or a 502/503/504 (default {api.DEFAULT_RETRIES}; "
                        "0: never)")
    g.add_argument("--retry-delay", type=_seconds, default=api.DEFAULT_RETRY_DELAY,
                   metavar="SECONDS",
                   help="wait before the first retry of a request, doubled before "
                        f"each next one (default {api.DEFAULT_RETRY_DELAY:g})")
    g.add_argument("--no-unix-socket", dest="use_unix_socket", action="store_false",
                   help="do not use the server's local unix socket even when the "
                        "server runs on this host")
    g.add_argument("--json", action="store_true",
                   help="print results, progress and errors as JSON lines on stdout")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress")
    g.add_argument("--progress-interval", type=_seconds, metavar="SECONDS",
                   help="seconds between progress lines when not on a terminal "
                        "(default 10, 1 with --json)")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more messages (twice for debug)")

    moving = argparse.ArgumentParser(add_help=False)
    t = moving.add_argument_group("transfer options")
    t.add_argument("-c", "--connections", type=_positive_int, metavar="N",
                   help=f"connections to use (default: min({api.DEFAULT_CONNECTIONS}, "
                        "what the server allows))")
    t.add_argument("--verify", action="store_true",
                   help="compare the server's checksum with the local file's afterwards")
    t.add_argument("--detect-zeroes", action="store_true",
                   help="also treat all-zero chunks inside data extents as holes")
    t.add_argument("--buffer-size", type=_size, default=api.DEFAULT_BUFFER_SIZE,
                   metavar="SIZE", help="bytes of each connection's buffer: per download "
                                        "request, per piece of an upload request "
                                        "(default 8M)")

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Upload and download disk images through the images API "
                    "of imaged (or any ovirt-imageio compatible server). URL is "
                    "https://HOST:PORT/images/SESSION-ID.",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name, help, parents):
        return sub.add_parser(name, help=help, description=help, parents=parents,
                              epilog=EXIT_STATUS,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("upload", "upload a local image (raw, qcow2, vmdk, vhdx, vpc) to the image; "
                      "FILE - reads raw bytes from stdin", [moving, common])
    p.add_argument("file", metavar="FILE")
    p.add_argument("url", metavar="URL")
    t = p.add_argument_group("format and resume options")
    t.add_argument("--format", choices=formats.FORMATS,
                   help="format of FILE (default: detected); raw sends any file "
                        "as its bytes")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted upload: compare per-block checksums "
                        "and send only the blocks that differ (also to another host)")

    p = add("download", "download the image to a local file (sparse, raw or qcow2); "
                        "FILE - writes raw bytes to stdout", [moving, common])
    p.add_argument("url", metavar="URL")
    p.add_argument("file", metavar="FILE")
    t = p.add_argument_group("format, backup and resume options")
    t.add_argument("--format", choices=formats.DOWNLOAD_FORMATS,
                   help="format of FILE (default raw; qcow2 with --backing-file or "
                        "--incremental)")
    t.add_argument("--backing-file", metavar="FILE",
                   help="with --format qcow2: create FILE on top of this image")
    t.add_argument("--incremental", action="store_true",
                   help="download only the extents changed since the last backup "
                        "(a session with dirty extents) into a qcow2 on top of "
                        "--backing-file, the previous backup")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted download into an existing raw FILE: "
                        "fetch only the blocks that differ")

    p = add("checksum", "print the server's checksum of the image", [common])
    p.add_argument("url", metavar="URL")
    p.add_argument("--compare", metavar="FILE",
                   help="compare with the checksum of this local file (exit "
                        f"{errors.EXIT_VERIFY} on mismatch)")
    p.add_argument("--format", choices=formats.FORMATS,
                   help="format of the --compare FILE (default: detected); its guest "
                        "data is compared")
    p.add_argument("--algorithm", default=blkhash.ALGORITHM,
                   help=f"hash algorithm (default {blkhash.ALGORITHM})")
    p.add_argument("--block-size", type=_size, default=blkhash.BLOCK_SIZE, metavar="SIZE",
                   help="checksum block size (default 4M)")

    p = add("info", "show the image size and what the server offers", [common])
    p.add_argument("url", metavar="URL")
    return parser


class _Formatter(logging.Formatter):
    def format(self, record):
        return f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"


@contextlib.contextmanager
def _logging_to_stderr(verbose):
    """The library's messages as "imaged-client: warning: ..." lines."""
    logger = logging.getLogger("imaged.client")
    saved = logger.level, logger.propagate
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG))
    logger.propagate = False
    try:
        yield
    finally:
        # main() may run in-process (tests, other programs): leave logging
        # as it was.
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _make_progress(args):
    if args.quiet:
        return progress_mod.Progress()
    if args.json:
        interval = 1.0 if args.progress_interval is None else args.progress_interval
        return progress_mod.JsonLines(args.out, interval=interval)
    if args.progress_interval is None and sys.stderr.isatty():
        return progress_mod.Bar(sys.stderr)
    interval = 10.0 if args.progress_interval is None else args.progress_interval
    return progress_mod.Lines(sys.stderr, interval=interval)


def _connection_args(args):
    return {"cafile": args.cafile, "insecure": args.insecure,
            "timeout": args.timeout, "use_unix_socket": args.use_unix_socket,
            "retries": args.retries, "retry_delay": args.retry_delay}


def _out(args, text=None, event=None):
    """
    Print a result: `text` normally, `event` as a JSON line with --json;
    on stderr when stdout carries the image.
    """
    if args.json:
        if event is not None:
            print(json.dumps(event), file=args.out, flush=True)
    elif text is not None:
        print(text, file=args.out, flush=True)


def _transfer(args):
    progress = _make_progress(args)
    kwargs = dict(_connection_args(args), buffer_size=args.buffer_size,
                  progress=progress)
    streaming = args.file == "-"
    if streaming:
        given = [o for o, v in (("--verify", args.verify), ("--resume", args.resume),
                                ("--connections", args.connections),
                                ("--detect-zeroes", args.detect_zeroes))
                 if v]
        if args.command == "download" and (args.format not in (None, "raw")
                                           or args.backing_file or args.incremental):
            given.append("--format/--backing-file/--incremental")
        if args.command == "upload" and args.format not in (None, "raw"):
            given.append("--format")
        if given:
            raise errors.UsageError(
                f"{', '.join(given)} cannot be used with - (a stream of raw bytes)")
        if args.command == "upload":
            result = api.upload_stream(sys.stdin.buffer, args.url, **kwargs)
        else:
            sys.stdout.flush()
            result = api.download_stream(args.url, sys.stdout.buffer, **kwargs)
    else:
        kwargs.update(connections=args.connections, verify=args.verify,
                      detect_zeroes=args.detect_zeroes, resume=args.resume,
                      format=args.format)
        if args.command == "upload":
            result = api.upload(args.file, args.url, **kwargs)
        else:
            result = api.download(args.url, args.file, backing_file=args.backing_file,
                                  incremental=args.incremental, **kwargs)
    verb = "uploaded" if args.command == "upload" else "downloaded"
    transport = "the unix socket" if result.transport == "unix" else result.transport.upper()
    text = (f"{verb} {format_size(result.size)} in {result.elapsed:.1f} s "
            f"({format_size(result.rate)}/s): {format_size(result.data_bytes)} data, "
            f"{format_size(result.zero_bytes)} zero; {result.connections} "
            f"connection{'s' if result.connections > 1 else ''} over {transport}; "
            f"{result.retries} retr{'y' if result.retries == 1 else 'ies'}")
    if result.format != "raw":
        text += f"; local image {result.format}"
    if args.resume:
        text += f"\nresumed: {format_size(result.skipped_bytes)} already in place"
    if result.checksum:
        text += (f"\nverified: {result.checksum['algorithm']} checksum "
                 f"{result.checksum['checksum']} matches")
    _out(args, text, dict({"event": "result"}, **result.to_dict()))


def _checksum(args):
    if args.compare:
        progress = _make_progress(args)
        result = api.verify(args.compare, args.url, algorithm=args.algorithm,
                            block_size=args.block_size, progress=progress,
                            format=args.format, **_connection_args(args))
        _out(args, f"checksum matches: {result['algorithm']} {result['checksum']}",
             dict({"event": "result", "verified": True}, **result))
        return
    result = api.checksum(args.url, algorithm=args.algorithm,
                          block_size=args.block_size, **_connection_args(args))
    _out(args, f"{result['checksum']}  ({result['algorithm']}, block size "
               f"{result['block_size']})", result)


def _info(args):
    result = api.info(args.url, **_connection_args(args))
    if args.json:
        _out(args, event=result)
        return
    unix = result["unix_socket"]
    lines = [
        ("size", f"{format_size(result['size'])} ({result['size']} bytes)"),
        ("writable", "yes" if result["writable"] else "no (read-only session)"),
        ("transport", result["transport"]),
        ("features", ", ".join(result["features"]) or "none"),
        ("max readers", result["max_readers"]),
        ("max writers", result["max_writers"]),
        ("unix socket", http.show_unix_socket(unix) if unix else "none"),
    ]
    if not result["options_supported"]:
        lines.append(("note", "the server does not answer OPTIONS (older server)"))
    _out(args, "\n".join(f"{k + ':':<13}{v}" for k, v in lines))


COMMANDS = {"upload": _transfer, "download": _transfer,
            "checksum": _checksum, "info": _info}


def main(argv=None):
    """Run the CLI with `argv` (default sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # --help and --version exit 0, usage errors 2.
        return e.code if isinstance(e.code, int) else errors.EXIT_USAGE
    # Results go to stdout, unless stdout carries the image.
    args.out = sys.stderr if (args.command == "download" and args.file == "-") \
        else sys.stdout
    # Ctrl-C or kill -INT ends a transfer as "interrupted" (exit 130) also
    # when the client was started with SIGINT ignored, as a shell starts its
    # background jobs: Python then leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # kill -USR1 prints every thread's stack on stderr: where a transfer
    # that seems stuck waits. (Not when stderr is no file: main() called
    # with a captured stderr.)
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (OSError, ValueError, AttributeError):
        pass
    with _logging_to_stderr(args.verbose):
        try:
            COMMANDS[args.command](args)
            return errors.EXIT_OK
        except KeyboardInterrupt:
            what = args.command if args.command in ("upload", "download") else "operation"
            return _fail(args, "interrupted", f"the {what} did not complete",
                         errors.EXIT_INTERRUPTED)
        except errors.UsageError as e:
            print(f"{PROG} {args.command}: error: {e}", file=sys.stderr, flush=True)
            return errors.EXIT_USAGE
        except errors.ClientError as e:
            return _fail(args, "error", str(e), e.exit_code)
        except OSError as e:
            # Local I/O: a full disk, an unreadable file.
            where = f"{e.filename}: " if e.filename else ""
            return _fail(args, "error", f"{where}{e.strerror or e}", errors.EXIT_ERROR)


def _fail(args, label, message, code):
    """Report a failure in one line (and a JSON event); returns `code`."""
    print(f"{PROG}: {label}: {message}", file=sys.stderr, flush=True)
    if args.json:
        try:
            print(json.dumps({"event": label, "message": message, "exit_code": code}),
                  file=args.out, flush=True)
        except OSError:
            pass
    return code


if __name__ == "__main__":
    sys.exit(main())
