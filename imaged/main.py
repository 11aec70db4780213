"""
The `imaged` command.

    imaged [--config FILE] [--config-dir DIR] [--check] [--show-config] [--version]

Exit status: 0 after a clean stop (SIGTERM/SIGINT) or a good --check,
2 for a bad config or command line, 1 when the daemon cannot start (a port
in use, an unreadable certificate).
"""

# Patch before anything imports socket, threading or bottle: bottle's
# request objects are thread locals, which must become greenlet locals.
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

from . import __version__  # noqa: E402
from . import config  # noqa: E402

log = logging.getLogger("imaged")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="imaged",
        description="Serve virtual disk images over HTTPS to authorized clients.")
    parser.add_argument("--config", "-c", default=config.DEFAULT_FILE,
                        help=f"configuration file (default {config.DEFAULT_FILE})")
    parser.add_argument("--config-dir", metavar="DIR", default=None,
                        help="drop-in directory: its *.yaml files are merged over "
                             "FILE in name order (default: conf.d next to FILE, "
                             "/etc/imaged/conf.d)")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration and exit")
    parser.add_argument("--show-config", action="store_true",
                        help="print the merged, effective configuration as YAML and exit")
    parser.add_argument("--version", action="version",
                        version=f"imaged {__version__}")
    args = parser.parse_args(argv)

    try:
        cfg = config.load(args.config, config_dir=args.config_dir)
    except config.ConfigError as e:
        # The message starts with the file that set the bad key.
        print(f"imaged: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.show_config:
        sys.stdout.write(config.dump(cfg))
        return EXIT_OK
    if args.check:
        print(f"imaged: {args.config}: configuration is valid")
        return EXIT_OK

    setup_logging(cfg["logging"])

    from .daemon import Daemon
    daemon = Daemon(cfg)
    try:
        daemon.start()
    except (OSError, ValueError) as e:
        # ssl.SSLError is an OSError: unreadable or mismatched cert/key.
        log.error("cannot start: %s", e)
        return EXIT_FAILURE
    daemon.serve_forever()
    return EXIT_OK


def setup_logging(cfg):
    if cfg["file"]:
        handler = logging.FileHandler(cfg["file"])
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)-7s (%(threadName)s) [%(name)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg["level"])
    # The format names no source file, line or process: records need not
    # look them up (logging's documented switches). findCaller walks the
    # stack for every record, and every operation logs a line.
    logging._srcfile = None
    logging.logProcesses = False
    logging.logMultiprocessing = False


if __name__ == "__main__":
    sys.exit(main())
