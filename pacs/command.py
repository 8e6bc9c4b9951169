"""``lumireg pacs``: run the PACS node until SIGTERM or Ctrl-C.

DIMSE: ``--pacs AE@host:port`` (queried with C-FIND, retrieved from with C-GET, and where results go unless
``--destination``), the node's own SCP on ``--port`` as ``--ae-title``. DICOMweb: ``--dicomweb URL`` (QIDO-RS polled
every ``--poll-seconds``, WADO-RS, STOW-RS). Exit codes: 0 stopped by SIGTERM, 130 by Ctrl-C, 2 bad usage (a rule
file, an address, a port in use), 4 the dicom extra missing.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

from lumireg.contract import EXIT_INTERRUPTED, EXIT_MISSING_DEPENDENCY, EXIT_OK, EXIT_USAGE


def _register_with(client, outputs_base=("displacement", "warped", "qc")):
    def register(fixed, moving, labels, parameters):
        outputs = outputs_base + (("warped_labels",) if labels is not None else ())
        return client.register(fixed, moving, outputs, moving_labels=labels, **parameters)

    return register


def build_node(args):
    """The node, its PACS and, for DIMSE, its SCP, from the parsed arguments (``ValueError`` for bad ones)."""
    from lumireg.client.command import _credentials
    from lumireg.client.registration import RegistrationClient
    from lumireg.pacs.dimse import DimsePacs, StoreSCP, parse_address
    from lumireg.pacs.journal import Journal
    from lumireg.pacs.node import Node
    from lumireg.pacs.rules import load_rules

    rules = load_rules(args.rules)
    if bool(args.pacs) == bool(args.dicomweb):
        raise ValueError("give --pacs AE@host:port (DIMSE) or --dicomweb URL")
    if args.dicomweb:
        from lumireg.pacs.dicomweb import DicomWebPacs

        pacs = DicomWebPacs(args.dicomweb)
    else:
        destination = parse_address(args.destination) if args.destination else None
        pacs = DimsePacs(args.ae_title, parse_address(args.pacs), destination)
    client = RegistrationClient(args.url, retry_seconds=args.retry_seconds, credentials=_credentials(args))
    node = Node(
        Journal(args.journal),
        pacs,
        rules,
        _register_with(client),
        settle_seconds=args.settle_seconds,
        store_attempts=args.store_attempts,
        resend_seconds=args.resend_seconds,
        uid_root=args.uid_root,
    )
    scp = None
    if not args.dicomweb:
        try:
            scp = StoreSCP(args.ae_title, args.host, args.port, node.journal.spool, node.received, node.refused)
        except OSError as exc:
            raise ValueError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    return node, scp, client


def serve(node, stop: threading.Event, poll_seconds: float | None = None) -> None:
    """Run the node's loop until ``stop`` is set: a tick every half second, a DICOMweb poll every ``poll_seconds``."""
    from lumireg.pacs.dimse import DeliveryError

    log = logging.getLogger("lumireg.pacs")
    next_poll = 0.0
    while not stop.is_set():
        if poll_seconds is not None and time.monotonic() >= next_poll:
            next_poll = time.monotonic() + poll_seconds
            try:
                node.poll()
            except DeliveryError as exc:
                log.warning("poll failed: %s", exc)
        try:
            node.tick()
        except Exception:  # the loop itself must survive; the study's own failures are handled in tick
            log.exception("the node's loop failed; going on")
        stop.wait(0.5)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import pydicom  # noqa: F401
        import pynetdicom  # noqa: F401
    except ImportError:
        print("lumireg pacs: needs the dicom extra: pip install 'lumireg[dicom]'", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    try:
        node, scp, client = build_node(args)
    except ValueError as exc:
        print(f"lumireg pacs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from prometheus_client import start_http_server

    metrics_server = None
    if args.metrics_port:
        metrics_server, _ = start_http_server(args.metrics_port, args.metrics_host, registry=node.metrics.registry)
    stop, code = threading.Event(), [EXIT_OK]

    def on_signal(signum, frame):
        code[0] = EXIT_OK if signum == signal.SIGTERM else EXIT_INTERRUPTED
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    where = f"DICOMweb {args.dicomweb}" if args.dicomweb else f"{args.ae_title} on {args.host}:{args.port}"
    logging.getLogger("lumireg.pacs").info("lumireg pacs: ready (%s)", where)
    try:
        serve(node, stop, args.poll_seconds if args.dicomweb else None)
    finally:
        if scp:
            scp.close()
        if metrics_server:
            metrics_server.shutdown()
        client.close()
        node.journal.close()
    return code[0]


def add_parser(sub) -> None:
    from lumireg.client.command import add_security_arguments

    pacs = sub.add_parser(
        "pacs", help="a DICOM node: series in from a PACS, registered, results back", description=__doc__
    )
    pacs.add_argument("--rules", required=True, help="rule file (JSON or TOML): which series is registered onto which")
    pacs.add_argument("--journal", required=True, help="folder for the journal, the spool and the outbox")
    pacs.add_argument("--pacs", help="DIMSE: the PACS as AE@host:port (C-FIND, C-GET, and results' C-STORE)")
    pacs.add_argument("--destination", help="DIMSE: where results are stored, AE@host:port (default: --pacs)")
    pacs.add_argument("--ae-title", default="LUMIREG", help="the node's AE title (default: LUMIREG)")
    pacs.add_argument("--host", default="127.0.0.1", help="the SCP's address (default: 127.0.0.1)")
    pacs.add_argument("--port", type=int, default=11112, help="the SCP's port (default: 11112)")
    pacs.add_argument("--dicomweb", help="DICOMweb: the PACS's DICOMweb root URL (instead of --pacs)")
    pacs.add_argument("--poll-seconds", type=float, default=10.0, help="DICOMweb: QIDO-RS poll interval (default: 10)")
    pacs.add_argument("--url", default="localhost:8001", help="the lumireg server's gRPC host:port")
    pacs.add_argument("--settle-seconds", type=float, default=5.0, help="a series is complete after this quiet time")
    pacs.add_argument("--store-attempts", type=int, default=3, help="attempts to store results before reporting")
    pacs.add_argument("--resend-seconds", type=float, default=60.0, help="then, retry interval (default: 60)")
    pacs.add_argument("--retry-seconds", type=float, default=60.0, help="how long to wait for the lumireg server")
    pacs.add_argument("--uid-root", help="root of the results' UIDs (default: 2.25., UUID-derived)")
    pacs.add_argument("--metrics-port", type=int, default=9102, help="Prometheus metrics port, 0: none (default: 9102)")
    pacs.add_argument("--metrics-host", default="127.0.0.1", help="metrics address (default: 127.0.0.1)")
    add_security_arguments(pacs)
    pacs.set_defaults(func=run)
